"""Where the tarball is, and its content key (SHA-256), computed once per file version."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import stat
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from entrypoint.cache import file_identity, key_memo, remembered_key
from entrypoint.constants import DEFAULT_TARBALL_NAME
from entrypoint.errors import ArchiveError, ConfigError

if TYPE_CHECKING:
    from entrypoint.remote import RemoteTarball
    from entrypoint.settings import Settings

CHUNK = 1 << 20


@dataclass(frozen=True)
class Tarball:
    path: Path
    size: int
    identity: tuple[int, ...]  # what changes whenever the file's bytes can have changed

    @property
    def display(self) -> str:
        return str(self.path)


def locate(settings: Settings) -> Tarball | RemoteTarball | None:
    """The configured tarball (a file, or a URL: entrypoint/remote.py), or None to run without an environment."""
    label = "MLSERVER_ENV_TARBALL={}"
    if settings.tarball is None:
        fallback = settings.models_dir / DEFAULT_TARBALL_NAME
        if not os.path.lexists(fallback):
            return None
        # A dangling symlink (to a volume not mounted) or a directory there is an environment meant and
        # missed: an error, not the image's own mlserver serving the model with other libraries.
        path, label = fallback, "{} (MLSERVER_ENV_TARBALL unset)"
    elif settings.tarball.strip() == "":
        return None
    elif "://" in settings.tarball:  # only now is the remote module (and, later, fsspec) imported
        from entrypoint import remote

        return remote.locate(settings.tarball.strip(), settings)
    else:
        path = Path(settings.tarball)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # a FIFO must not block the start
    except FileNotFoundError:
        raise ConfigError(
            f"{label.format(path)}: no such file; check the path and that its folder is mounted"
        ) from None
    except PermissionError:
        raise ConfigError(
            f"{label.format(path)}: not readable by uid {os.getuid()}; make it world-readable "
            "(chmod a+r) or run with a user that can read it"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{label.format(path)}: cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(st.st_mode):
        fix = (
            "point it at the .tar.gz itself"
            if settings.tarball is not None
            else ("remove it, or set MLSERVER_ENV_TARBALL to the archive (empty: no environment)")
        )
        raise ConfigError(f"{label.format(path)}: not a regular file; {fix}")
    return Tarball(Path(os.path.abspath(path)), st.st_size, file_identity(st))


def sha256_file(path: Path) -> str:
    """Stream the whole file through SHA-256 (OpenSSL's, so SHA-NI where the CPU has it)."""
    with open(path, "rb", buffering=0) as f:
        return _sha256(f)[0]


def _sha256(f: io.RawIOBase) -> tuple[str, tuple[int, ...]]:
    """The digest of an open file, and its identity before and after (equal: nothing changed)."""
    before = file_identity(os.fstat(f.fileno()))
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while n := f.readinto(buf):
        h.update(view[:n])  # releases the GIL: the settings load meanwhile (see prehash)
    after = file_identity(os.fstat(f.fileno()))
    return h.hexdigest(), before if before == after else ()


class _Prehash(threading.Thread):
    def __init__(self, path: Path) -> None:
        super().__init__(name="sha256", daemon=True)
        self.path = path
        self.result: tuple[str, tuple[int, ...]] | None = None

    def run(self) -> None:
        try:  # a FIFO must neither block this thread nor lose its bytes to it: regular files only
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            with open(fd, "rb", buffering=0) as f:
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    _sniff(fd)
                    self.result = _sha256(f)
        except (OSError, ArchiveError):
            pass  # locate() and content_key() report what is wrong with the file, with the settings' wording


_prehash: _Prehash | None = None


def prehash(path: Path) -> None:
    """Start hashing the tarball of a cold start in a thread, before the settings are even loaded.

    The key must be known before anything else (it names the cache entry and its lock), and the
    settings model's import alone takes ~0.3 s: on two cores both now overlap. The hashing
    thread needs the GIL back after every 1 MiB it reads or hashes, and the importing thread only
    hands it over at the switch interval: at the default 5 ms the hash finished ~110 ms after the
    imports, at 0.5 ms ~40 ms (seed tarball, 170 MB). The rest of the start is as fast either way.
    """
    global _prehash
    sys.setswitchinterval(0.0005)
    _prehash = _Prehash(path)
    _prehash.start()


def _prehashed(tarball: Tarball) -> str | None:
    """The early hash of exactly this file version, if prehash() computed one."""
    if _prehash is None or _prehash.path != tarball.path:
        return None
    _prehash.join()
    if _prehash.result is None or _prehash.result[1] != tarball.identity:
        return None
    return _prehash.result[0]


def content_key(tarball: Tarball | RemoteTarball, cache_dir: Path, pin: str | None) -> tuple[str, bool]:
    """SHA-256 of the tarball, and whether it was remembered rather than computed.

    Hashing 170 MB costs ~0.2 s, too much for a warm start, so the key is remembered by the file's
    device, inode, size, mtime and ctime: replacing or rewriting the file changes ctime, which no
    user can set back. A URL's key is the pin, or derived from its ETag/Last-Modified and size
    (remote.content_key): hashing it would mean downloading it twice.
    """
    if not isinstance(tarball, Tarball):
        from entrypoint import remote

        return remote.content_key(tarball, pin)
    memo = key_memo(cache_dir, tarball.path)
    if (key := remembered_key(cache_dir, tarball.path, tarball.identity)) is not None:
        _check_pin(tarball, key, pin)
        return key, True
    prehashed = _prehashed(tarball)
    if prehashed is None:
        _refuse_non_archive(tarball)
    key = prehashed or sha256_file(tarball.path)
    _check_pin(tarball, key, pin)
    if _unchanged(tarball):
        _remember(memo, {"path": str(tarball.path), "identity": list(tarball.identity), "sha256": key})
    return key, False


def _sniff(fd: int) -> None:
    """Refuse a file that does not start like an archive before hashing it: hashing a wrong file
    (a 20 GiB model named by mistake took 29 s) only delayed the error its first bytes give."""
    from entrypoint.archive import detect_format  # the cold path imports it next anyway

    detect_format(os.pread(fd, 512, 0))


def _refuse_non_archive(tarball: Tarball) -> None:
    try:
        fd = os.open(tarball.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # hashing names the problem
    try:
        _sniff(fd)
    except ArchiveError as exc:
        raise ArchiveError(f"{tarball.display}: {exc}; point MLSERVER_ENV_TARBALL at the packed environment") from None
    finally:
        os.close(fd)


def _unchanged(tarball: Tarball) -> bool:
    try:
        st = os.stat(tarball.path)
    except OSError:
        return False
    return file_identity(st) == tarball.identity


def _check_pin(tarball: Tarball, key: str, pin: str | None) -> None:
    if pin is not None and key != pin:
        raise ConfigError(f"{tarball.display}: {pin_mismatch(key, pin, 'nothing was extracted')}")


def pin_mismatch(digest: str, pin: str, outcome: str) -> str:
    """What a start says of a tarball its pin refuses (`inspect` says the same)."""
    return (
        f"SHA-256 is {digest}, but MLSERVER_ENV_TARBALL_SHA256 pins {pin}; {outcome}; use the pinned tarball "
        "or update the pin"
    )


def _remember(memo: Path, record: dict[str, object]) -> None:
    """Best effort: a read-only cache just means hashing again next time.

    Written in `.keys` opened without following a symlink (gc.keys_dir: a `.keys` that is a symlink
    or a file is not the cache's own, and gets nothing), to a temporary created exclusively, under
    a name no one can guess (as a container's PID 1, the pid alone always is 1), never through a
    symlink planted there; then renamed over the memo."""
    from entrypoint import gc

    try:
        memo.parent.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(memo.parent, 0o755)
    except FileExistsError:
        pass
    except OSError:
        return
    dfd = gc.keys_dir(memo.parent.parent)
    if dfd is None:
        return
    tmp = f"{memo.name}.{os.getpid()}.{os.urandom(8).hex()}.tmp"  # gc.MEMO_TMP
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dfd)
        with open(fd, "wb") as out:  # closes fd
            out.write(json.dumps(record).encode())
        os.replace(tmp, memo.name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
    finally:
        os.close(dfd)
