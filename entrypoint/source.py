"""Where the tarball is, and its content key, computed once per file version (keys.py).

An unpinned tarball's key is its BLAKE3: it hashes the example's 515 MB tar in 0.15 s where
SHA-256 (OpenSSL with SHA-NI) takes 0.48 s, and a tarball whose version is not remembered (a
copy made per pod) is hashed at every start, also when its entry is already there.
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import blake3

from entrypoint import keys
from entrypoint.errors import ArchiveError, ConfigError
from entrypoint.keys import Digest
from entrypoint.settings import Settings, is_url

if TYPE_CHECKING:
    from entrypoint.remote import RemoteTarball

CHUNK = 1 << 20


class Tarball(NamedTuple):
    path: Path
    size: int
    identity: tuple[int, ...]  # keys.file_identity when it was located

    @property
    def display(self) -> str:
        return str(self.path)


def locate(config: Settings, label: str | None = None) -> Tarball | RemoteTarball | None:
    """The configured tarball (a file, or a URL: remote.py), or None to run without an environment.
    `label` names it in errors (default: the setting)."""
    if config.tarball is not None and is_url(config.tarball):
        from entrypoint import remote

        return remote.locate(config.tarball.strip(), config)
    path = config.local_tarball()
    if path is None or not config.names_environment():
        return None
    if label is None:
        unset = config.tarball is None
        label = f"{path} (MLSERVER_ENV_TARBALL unset)" if unset else f"MLSERVER_ENV_TARBALL={config.tarball}"
    st = _stat(path, label)
    if not stat.S_ISREG(st.st_mode):
        fix = "point it at the .tar.gz itself" if config.tarball is not None else (
            "remove it, or set MLSERVER_ENV_TARBALL to the archive (empty: no environment)")  # fmt: skip
        raise ConfigError(f"{label}: not a regular file", fix)
    return Tarball(path, st.st_size, keys.file_identity(st))


def _stat(path: Path, label: str) -> os.stat_result:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # a FIFO must not block the start
    except FileNotFoundError as exc:
        raise ConfigError(f"{label}: no such file", "check the path and that its folder is mounted") from exc
    except PermissionError as exc:
        raise ConfigError(
            f"{label}: not readable by uid {os.getuid()}", "make it world-readable (chmod a+r) or run as a user who can"
        ) from exc
    except OSError as exc:
        raise ConfigError(f"{label}: cannot open: {exc.strerror}", "check the path") from exc
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)


def digests_of(fd: int, *digests: Digest) -> dict[Digest, str]:
    """The digests of an open file, read once."""
    return dict(zip(digests, _digests(fd, digests)[0], strict=True))


def _digests(fd: int, digests: tuple[Digest, ...]) -> tuple[list[str], tuple[int, ...]]:
    """The digests of an open file, and its identity if it did not change meanwhile (else ())."""
    before = keys.file_identity(os.fstat(fd))
    hashes = [blake3.blake3() if d == "blake3" else hashlib.sha256() for d in digests]
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    at = 0
    while n := os.preadv(fd, [buf], at):
        at += n
        for h in hashes:
            h.update(view[:n])  # releases the GIL: the settings are read meanwhile (prehash)
    after = keys.file_identity(os.fstat(fd))
    return [h.hexdigest() for h in hashes], before if before == after else ()


def _hashed(tarball: Tarball, digest: Digest) -> str:
    """The digest of the very file located, unchanged: the one a pin is checked on, and the one
    extracted (prepare.py checks it with `unchanged`)."""
    fd = os.open(tarball.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        hexdigests, identity = _digests(fd, (digest,))
    finally:
        os.close(fd)
    if identity != tarball.identity:
        raise _replaced(tarball)
    return hexdigests[0]


def unchanged(tarball: Tarball, fd: int) -> None:
    """Refuse a file opened again that is not the one located, as it was then."""
    if keys.file_identity(os.fstat(fd)) != tarball.identity:
        raise _replaced(tarball)


def _replaced(tarball: Tarball) -> ConfigError:
    return ConfigError(f"{tarball.display} was replaced or changed while starting", "start again")


class _Prehash(threading.Thread):
    def __init__(self, path: Path, digest: Digest) -> None:
        super().__init__(name="hash", daemon=True)
        self.path, self.digest = path, digest
        self.result: tuple[str, tuple[int, ...]] | None = None

    def run(self) -> None:
        try:  # regular files only: a FIFO must neither block this thread nor lose its bytes to it
            with open(os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK), "rb", buffering=0) as f:
                if stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    sniff(f.fileno())
                    hexdigests, identity = _digests(f.fileno(), (self.digest,))
                    self.result = hexdigests[0], identity
        except (OSError, ArchiveError):
            pass  # locate() and content_key() say what is wrong, in the settings' words


_prehash: _Prehash | None = None


def prehash(path: Path, digest: Digest) -> None:
    """Hash the tarball in a thread while the settings are read: the key names the entry and its
    lock, so it is needed first, and reading the settings costs ~0.3 s. A short switch interval
    hands the GIL back to the hashing thread sooner after each block it reads."""
    global _prehash
    sys.setswitchinterval(0.0005)
    _prehash = _Prehash(path, digest)
    _prehash.start()


def _prehashed(tarball: Tarball, digest: Digest) -> str | None:
    if _prehash is None or _prehash.path != tarball.path or _prehash.digest != digest:
        return None
    _prehash.join()
    result = _prehash.result
    return result[0] if result is not None and result[1] == tarball.identity else None


def content_key(tarball: Tarball | RemoteTarball, root: Path, pin: str | None) -> tuple[str, bool]:
    """The tarball's key, and whether it was remembered rather than computed. A URL's key is the
    pin or comes from what the server says of the object (remote.content_key)."""
    if not isinstance(tarball, Tarball):
        from entrypoint import remote

        return remote.content_key(tarball, pin)
    digest = keys.key_digest(pin)
    key = keys.remembered(root, tarball.path, tarball.identity, digest)
    remembered = key is not None
    if key is None:
        key = _prehashed(tarball, digest)
    if key is None:
        _refuse_non_archive(tarball)
        key = _hashed(tarball, digest)
    if pin is not None and key != pin:
        raise ConfigError(f"{tarball.display}: {pin_mismatch(key, pin, 'nothing was extracted')}", PIN_ADVICE)
    if not remembered and _unchanged(tarball):
        keys.remember(root, tarball.path, tarball.identity, digest, key)
    return key, remembered


PIN_ADVICE = "use the pinned tarball or update the pin"


def pin_mismatch(digest: str, pin: str, outcome: str) -> str:
    return f"SHA-256 is {digest}, but MLSERVER_ENV_TARBALL_SHA256 pins {pin}; {outcome}"


def sniff(fd: int) -> None:
    """Refuse a file that does not start like an archive before hashing it."""
    from entrypoint.archive import detect_format

    detect_format(os.pread(fd, 512, 0))


def _refuse_non_archive(tarball: Tarball) -> None:
    try:
        fd = os.open(tarball.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # hashing names the problem
    try:
        sniff(fd)
    except ArchiveError as exc:
        raise ArchiveError(
            f"{tarball.display}: {exc.message}", "point MLSERVER_ENV_TARBALL at the packed environment"
        ) from exc
    finally:
        os.close(fd)


def _unchanged(tarball: Tarball) -> bool:
    try:
        return keys.file_identity(os.stat(tarball.path)) == tarball.identity
    except OSError:
        return False
