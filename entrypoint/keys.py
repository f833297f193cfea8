"""Remembered keys: a local tarball's digests, kept per file version so a warm start hashes nothing.

`<cache>/.keys/<16 hex>` (two zlib checksums of the tarball's absolute path: hashlib costs a warm
start ~6 ms) holds the path, the file's identity and its digests: BLAKE3, the key of an unpinned
tarball, and SHA-256, the key of a pinned one once its pin was checked. A memo is read, written and
swept only in a `.keys` that is a real directory, never through a symlink; two paths with the
same checksums only cost a hash, since the identity would not match.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
import time
from pathlib import Path
from typing import Literal, TypeGuard, get_args

from entrypoint import fs, log

MEMO_MAX = 1 << 16  # a memo holds a path, an identity and a key: a few hundred bytes
MEMO = re.compile(r"[0-9a-f]{16}")
MEMO_TMP = re.compile(r"[0-9a-f]{16}\.[0-9]+(?:\.[0-9a-f]{16})?\.tmp")
HEX_DIGITS = frozenset("0123456789abcdef")
SWEEP_GRACE = 60.0  # seconds: a start writes its memo just before it creates the entry's files


# The digests a memo may hold: BLAKE3, a tarball's key; SHA-256, what a pin names (its key then).
Digest = Literal["blake3", "sha256"]
DIGESTS: tuple[Digest, ...] = get_args(Digest)


def key_digest(pin: str | None) -> Digest:
    """What names a local tarball's entry: the SHA-256 its pin names, once checked (a pinned URL's
    key too), else its BLAKE3, 3x as fast (source.py)."""
    return "blake3" if pin is None else "sha256"


def file_identity(st: os.stat_result) -> tuple[int, ...]:
    """What changes whenever a file's bytes may have changed (no user can set ctime back)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _memo_name(tarball: Path) -> str:
    import zlib

    raw = str(tarball).encode("utf-8", "surrogateescape")
    return f"{zlib.crc32(raw):08x}{zlib.adler32(raw):08x}"


def memo_path(root: Path, tarball: Path) -> Path:
    return root / ".keys" / _memo_name(tarball)


def keys_dir(root: Path, warn: bool = False) -> int | None:
    """`<root>/.keys` opened as a directory, never through a symlink; None if it is missing, a
    symlink or no directory (then it is not the cache's own, and nothing is kept there)."""
    path = root / ".keys"
    try:
        return os.open(path, fs.DIR_OPEN)
    except OSError as exc:
        if warn and exc.errno in (errno.ELOOP, errno.ENOTDIR):
            log.info(
                f"warning: {path} is a symbolic link or not a directory, so not the cache's own: tarball keys are "
                f"neither remembered nor swept there (each start hashes the tarball again); remove it (rm {path})"
            )
        return None


def _read(dfd: int, name: str) -> dict[str, object] | None:
    try:
        data = fs.read_small(name, MEMO_MAX, dir_fd=dfd, flags=os.O_NOFOLLOW)
        memo = json.loads(data) if data is not None else None
    except (OSError, ValueError):
        return None
    return memo if isinstance(memo, dict) else None


def remembered(root: Path, tarball: Path, identity: tuple[int, ...], digest: Digest) -> str | None:
    """The `digest` remembered for this very version of `tarball`, if any. Only 64 hex digits
    count: an entry's name is taken from it."""
    return _remembered(root, tarball, identity).get(digest)


def _remembered(root: Path, tarball: Path, identity: tuple[int, ...]) -> dict[str, str]:
    dfd = keys_dir(root)
    if dfd is None:
        return {}
    try:
        memo = _read(dfd, _memo_name(tarball))
    finally:
        os.close(dfd)
    if memo is None or memo.get("identity") != list(identity):
        return {}
    return {name: value for name in DIGESTS if _is_digest(value := memo.get(name))}


def _is_digest(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and len(value) == 64 and HEX_DIGITS.issuperset(value)


def remember(root: Path, tarball: Path, identity: tuple[int, ...], digest: Digest, value: str) -> None:
    """Best effort (a read-only cache only means hashing again), beside the other digest already
    remembered for this version: written to a temporary created exclusively under a name no one
    can guess, then renamed over the memo."""
    with contextlib.suppress(OSError):
        root.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(root / ".keys", 0o755)
    digests = {**_remembered(root, tarball, identity), digest: value}
    dfd = keys_dir(root, warn=True)
    if dfd is None:
        return
    name = _memo_name(tarball)
    tmp = f"{name}.{os.getpid()}.{os.urandom(8).hex()}.tmp"
    record = {"path": str(tarball), "identity": list(identity), **digests}
    try:
        with open(os.open(tmp, fs.NEW_FILE, 0o644, dir_fd=dfd), "wb") as out:
            out.write(json.dumps(record).encode())
        os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
    finally:
        os.close(dfd)


def sweep(root: Path, entries: set[str]) -> None:
    """Drop memos whose entry (by its 8-digit name) is gone, and temporaries of killed starts,
    after SWEEP_GRACE; only regular files named as `remember` names them."""
    dfd = keys_dir(root, warn=True)
    if dfd is None:
        return
    try:
        with os.scandir(dfd) as it:
            names = [e.name for e in it if MEMO.fullmatch(e.name) or MEMO_TMP.fullmatch(e.name)]
        for name in names:
            with contextlib.suppress(OSError):
                if _stale(dfd, name, entries):
                    os.unlink(name, dir_fd=dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def _stale(dfd: int, name: str, entries: set[str]) -> bool:
    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    if not stat.S_ISREG(st.st_mode) or time.time() - st.st_mtime <= SWEEP_GRACE:
        return False
    memo = (_read(dfd, name) or {}) if MEMO.fullmatch(name) else {}
    return not any(isinstance(key := memo.get(d), str) and key[:8] in entries for d in DIGESTS)
