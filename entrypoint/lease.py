"""Leases on entries: "in use" is a shared flock on `<key8>.use`, held by every process using the
entry for as long as it (and the server it execs) lives; gc removes an entry only under the
exclusive flock, taken without waiting, so never one in use. The kernel drops a lock when its last
holder exits, even by kill -9. "Last used" is the file's mtime, touched at each start.

Both sides check, once locked, that the path still names the file they locked: gc unlinks `.use`
when it removes an entry.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from entrypoint import fs
from entrypoint.entry import Entry
from entrypoint.errors import ConfigError

_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # never through a symlink, never blocking on a FIFO
_held: dict[Path, int] = {}  # leases of this process: never closed, inherited by what it execs


def hold(entry: Entry, wait: bool = True) -> bool:
    """Mark `entry` used by this process and what it execs, and touch its "last used" time. Waits
    only while gc removes this very entry (or, `wait` false, says False then). Best effort on a
    cache this user cannot write: True without a lease, as nobody can gc it from here either."""
    path = entry.use
    if path in _held:
        return True
    for _ in range(100):
        fd = _open_use(entry)
        if fd is None:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        if _names(fd, path):
            os.set_inheritable(fd, True)
            with contextlib.suppress(OSError):
                os.utime(fd)
            _held[path] = fd
            return True
        os.close(fd)  # gc removed the file locked: lock the new one
    return True


def _open_use(entry: Entry) -> int | None:
    """`.use` opened, created if this user can; None if it cannot be opened at all."""
    create = os.O_RDWR | os.O_CREAT
    for flags in (create, create, os.O_RDONLY):  # the second try after creating the cache directory
        try:
            fd = os.open(entry.use, flags | _FLAGS, 0o644)
        except FileNotFoundError:
            if not flags & os.O_CREAT:
                return None
            with contextlib.suppress(OSError):
                entry.root.mkdir(parents=True, exist_ok=True)
            continue
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise fs.not_ours(entry.use, "a symbolic link") from exc
            continue
        _regular(fd, entry.use)
        return fd
    return None


def _regular(fd: int, path: Path) -> None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise fs.not_ours(path, fs.kind(st))


def _names(fd: int, path: Path) -> bool:
    """Whether `path` still is the file open as `fd`."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def exclusive(entry: Entry, create: bool) -> Iterator[bool]:
    """Hold the entry's exclusive lease while no process uses it; yields whether it was taken (a
    dry run, `create` false, only reads, so it works on a cache mounted read-only)."""
    path = entry.use
    try:
        fd = os.open(path, (os.O_RDWR | os.O_CREAT if create else os.O_RDONLY) | _FLAGS, 0o644)
    except FileNotFoundError:
        yield True  # a dry run: no start ever held it
        return
    except OSError as exc:
        raise _exclusive_error(entry, exc) from exc
    _regular(fd, path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield _names(fd, path)
    finally:
        os.close(fd)


def _exclusive_error(entry: Entry, exc: OSError) -> Exception:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return ConfigError(
            f"cannot lock {entry.use} (uid {os.getuid()} may not write it)", "run gc as the cache's owner"
        )
    if exc.errno in (errno.ELOOP, errno.EISDIR):
        return fs.not_ours(entry.use, "a symbolic link" if exc.errno == errno.ELOOP else "a directory")
    if exc.errno == errno.EROFS:
        return ConfigError(
            f"cache directory {entry.root} is read-only here: gc can remove nothing",
            "run it where the cache is mounted writable (or add --dry-run to list what it would remove)",
        )
    return exc
