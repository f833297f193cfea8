"""Small filesystem helpers for the cache: files read and written whole, never through a symlink."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from entrypoint.errors import ConfigError

DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC  # a directory, never through a symlink
NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def kind(st: os.stat_result) -> str:
    """What a file is, for an error: `a directory`, `a symbolic link`…"""
    if stat.S_ISDIR(st.st_mode):
        return "a directory"
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link"
    return "a FIFO" if stat.S_ISFIFO(st.st_mode) else "not a regular file"


def not_ours(path: Path, what: str) -> ConfigError:
    """One of the cache's names holds what the cache never makes there: nothing is followed,
    written or removed through it; the user removes it."""
    return ConfigError(
        f"{path} is {what}, which the cache never makes there; nothing was written through it",
        f"remove it (rm -r '{path}') and try again",
    )


def read_small(path: Path | str, limit: int, dir_fd: int | None = None, flags: int = 0) -> bytes | None:
    """A regular file's bytes, or None if it holds more than `limit` or is no regular file (a FIFO
    must not block, a directory is not data)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | flags, dir_fd=dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks: list[bytes] = []
        size = 0
        while size <= limit and (chunk := os.read(fd, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks) if size <= limit else None


def write_atomic(path: Path, data: bytes | Iterable[bytes]) -> None:
    """Write, sync and rename into place: a reader sees the old file or the whole new one. The
    temporary is created exclusively under a name no one can guess, never through a symlink."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(8).hex()}.tmp")
    try:
        with open(os.open(tmp, NEW_FILE, 0o644), "wb", buffering=1 << 16) as out:
            for chunk in [data] if isinstance(data, bytes) else data:
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.cache
def _libc_syncfs() -> Callable[[int], int] | None:
    import ctypes

    try:
        fn: Callable[[int], int] = ctypes.CDLL(None, use_errno=True).syncfs
        return fn
    except (OSError, AttributeError):
        return None


def syncfs(path: Path) -> None:
    """syncfs(2) of the filesystem holding `path` (Python has no binding); os.sync() without it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fn = _libc_syncfs()
        if fn is None or fn(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


class BackgroundSync:
    """syncfs every half second in a thread while an entry is written, so the one sync before
    publishing waits only for the last writes, not for every byte written (syncfs releases the GIL)."""

    INTERVAL = 0.5

    def __init__(self, root: Path) -> None:
        self._root = root
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="syncfs", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.INTERVAL):
            with contextlib.suppress(OSError):
                syncfs(self._root)

    def __enter__(self) -> BackgroundSync:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self._stop.set()
        if exc_type is None:  # after a failure, no wait for a sync in flight: the process is ending
            self._thread.join()


def remove_file(path: Path, empty_dir_too: bool = False) -> bool:
    """Unlink one of the cache's files, never following a symlink there; whether there was one. A
    directory in its place is one line, or removed if it is empty and `empty_dir_too`."""
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False
    except IsADirectoryError as exc:
        if empty_dir_too:
            with contextlib.suppress(OSError):
                os.rmdir(path)
                return True
        if os.path.isdir(path):
            raise not_ours(path, "a directory") from exc
        return False
    except OSError as exc:
        raise ConfigError(f"cannot remove {path} ({exc.strerror})", "remove it by hand and try again") from exc


def remove_tree(top: str, deadline: float | None = None) -> bool:
    """Remove a tree in memory that does not grow with its size (shutil.rmtree lists each directory
    whole first), through descriptors opened with O_NOFOLLOW; each directory is made 0755 first, so
    one packed without owner write bits goes too. False if it stopped at `deadline` (monotonic)."""
    os.chmod(top, 0o755)
    stack: list[tuple[int, os._ScandirIterator[str], str, int | None]] = []  # fd, listing, name, parent fd
    _enter(stack, top, None)
    try:
        while stack:
            if not _remove_step(stack, deadline):
                return False
        return True
    finally:
        for fd, listing, _, _ in stack:
            listing.close()
            os.close(fd)


def _enter(stack: list[tuple[int, os._ScandirIterator[str], str, int | None]], name: str, parent: int | None) -> None:
    fd = os.open(name, DIR_OPEN, dir_fd=parent)
    try:
        stack.append((fd, os.scandir(fd), name, parent))
    except BaseException:
        os.close(fd)
        raise


def _remove_step(stack: list[tuple[int, os._ScandirIterator[str], str, int | None]], deadline: float | None) -> bool:
    """Unlink entries of the innermost open directory up to its next subdirectory (entered), or
    remove the directory itself once it is empty; False once past `deadline`."""
    fd, listing, name, parent = stack[-1]
    for e in listing:
        if deadline is not None and time.monotonic() > deadline:
            return False
        if e.is_dir(follow_symlinks=False):
            os.chmod(e.name, 0o755, dir_fd=fd)
            _enter(stack, e.name, fd)
            return True
        os.unlink(e.name, dir_fd=fd)
    stack.pop()
    listing.close()
    os.close(fd)
    try:
        os.rmdir(name, dir_fd=parent)
    except OSError as exc:  # a listing that missed entries (NFS may): read it again
        if exc.errno != errno.ENOTEMPTY:
            raise
        _enter(stack, name, parent)
    return True
