"""Where files are written: a safe, streaming extractor into one empty directory.

Hand-written rather than `tarfile.extractall(filter="data")` because (a) the filter only exists
from Python 3.11.4 / 3.12 and Debian's 3.11.2 lacks it, (b) it needed five CVE fixes in 2025, and
(c) it costs a stat/chmod/chown per member that we do not need. The rules here are simple enough
to prove: we write only into directories we created ourselves in this run, never through a
symlink, never over an existing path, and every symlink is checked against the real tree before
the environment is used.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from entrypoint.archive import CHUNK, Kind, Member, corrupt
from entrypoint.cache import remove_tree
from entrypoint.errors import ArchiveError, ConfigError

O_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_DEPTH = 128  # path components of a member; real environments stay under 20
DISK_BLOCK = 4096  # what a file or directory occupies is rounded up to this (ext4, xfs, tmpfs)
SYMLINK_MAX = 4095  # bytes a symlink's target may hold on Linux (PATH_MAX, its NUL excluded)
MANIFEST_LINE = 128  # bytes the cache's manifest spends per member, generously
# Memory the extractor may spend on the directories and symlinks it keeps (a path each, ~100 bytes
# of Python objects besides its characters): the seed environment needs 0.2 MiB, while 20,000
# directories named with 3,800 characters each (a 100 kB tar.zst) took a start to 123 MiB.
MAX_KEPT_PATHS = 6 << 20
KEPT_PATH_COST = 100
# Module names for the kinds: an Enum attribute costs ~0.2 µs on Python 3.11, several times a member.
_FILE, _DIR, _SYMLINK, _OTHER = Kind.FILE, Kind.DIR, Kind.SYMLINK, Kind.OTHER


@dataclass(frozen=True)
class Limits:
    max_members: int
    max_unpacked_bytes: int


@dataclass
class Stats:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    bytes: int = 0
    disk_bytes: int = 0  # space taken: files rounded up to whole blocks, directories, manifest lines


def disk_bytes(m: Member) -> int:
    blocks = -(-m.size // DISK_BLOCK) if m.kind is _FILE else 1 if m.kind is _DIR else 0
    return blocks * DISK_BLOCK + MANIFEST_LINE


def normalize(name: str) -> str:
    """The member's path relative to the destination, or an ArchiveError if it could escape."""
    if "\0" in name:
        raise ArchiveError(f"member {name!r}: NUL byte in name")
    if name.startswith("/"):
        raise ArchiveError(f"member {name}: absolute path")
    # The usual name ("lib/python3.8/os.py", "lib/" for a directory) is already normal: no empty,
    # "." or ".." component (each would show as "//" or "/." in "/" + name), few components.
    if "//" not in name and "/." not in f"/{name}" and name.count("/") < MAX_DEPTH:
        return name[:-1] if name.endswith("/") else name
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"member {name}: '..' in path")
    if len(parts) > MAX_DEPTH:  # deeper trees break recursive walkers (ours, rmtree, os.walk) and no env has one
        raise ArchiveError(f"member {name[:200]}…: {len(parts)} levels deep, more than the {MAX_DEPTH} allowed")
    return "/".join(parts)


def too_many_members(limit: int) -> str:
    return f"more than {limit} members; raise MLSERVER_ENV_MAX_MEMBERS if this environment is really that large"


def too_many_bytes(limit: int, member: str) -> str:
    return (
        f"unpacks to more than {limit} bytes (member {member}); raise MLSERVER_ENV_MAX_UNPACKED_BYTES if this "
        "environment is really that large"
    )


def too_many_paths(member: str) -> str:
    return (
        f"member {member[:200]}: more than {MAX_KEPT_PATHS >> 20} MiB of directory and symlink paths, far beyond "
        "any environment (corrupt or hostile archive); pack the environment again with conda-pack"
    )


def check_symlink(name: str, rel: str, target: str) -> None:
    """Refuse a symlink member whose target is empty, absolute or lexically outside the environment
    (`inspect` applies the same rule without writing)."""
    if not target or "\0" in target:
        raise ArchiveError(f"member {name}: symlink with an empty or NUL target")
    if target.startswith("/"):
        raise ArchiveError(f"member {name}: symlink to absolute path {target}")
    if len(target) >= SYMLINK_MAX // 4 and len(encoded := target.encode("utf-8", "surrogateescape")) > SYMLINK_MAX:
        # symlink(2) says ENAMETOOLONG on every filesystem: not "a member's name", no other cache helps
        raise ArchiveError(f"member {name}: symlink target of {len(encoded)} bytes, more than Linux allows")
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
    if resolved == ".." or resolved.startswith("../"):
        raise ArchiveError(f"member {name}: symlink to {target}, outside the environment")


class Extractor:
    """Extract members into `dest`, an empty directory owned by this run."""

    def __init__(self, dest: Path, limits: Limits) -> None:
        self.dest = str(dest)
        self.limits = limits
        # Every directory this run created, by relative path: parents are only ever these, so no
        # write goes through a symlink or a file. Nothing is kept per file (the filesystem already
        # knows them: O_EXCL and EEXIST find duplicates), so memory grows with the directories
        # (and symlinks) only, up to MAX_KEPT_PATHS, not with the files (300,000 files would
        # otherwise cost ~20 MB).
        self.dirs: set[str] = {""}
        self.symlinks: list[str] = []
        self.stats = Stats()
        self._declared = 0  # bytes of file members seen, written or not
        self._count = 0
        self._kept = 0  # memory held by `dirs` and `symlinks`, as KEPT_PATH_COST + characters a path

    def _keep(self, rel: str, name: str) -> None:
        """Count a kept directory or symlink path against MAX_KEPT_PATHS (the 64 MiB promise)."""
        self._kept += KEPT_PATH_COST + len(rel)
        if self._kept > MAX_KEPT_PATHS:
            raise ArchiveError(too_many_paths(name))

    def _path(self, rel: str) -> str:
        return f"{self.dest}/{rel}"

    def _parents(self, rel: str, name: str) -> None:
        """Create missing parent directories; refuse to go through anything but our own dirs."""
        parent = rel.rpartition("/")[0]
        if parent in self.dirs:
            return
        self._parents(parent, name)
        try:
            os.mkdir(self._path(parent), 0o755)
        except FileExistsError:  # not one of our directories: a file or symlink of this archive
            raise ArchiveError(f"member {name}: would be written through the {self._kind(parent)} {parent}") from None
        self._keep(parent, name)
        self.dirs.add(parent)
        self.stats.dirs += 1
        self.stats.disk_bytes += DISK_BLOCK + MANIFEST_LINE

    def add(self, m: Member) -> None:
        self._count += 1
        self.stats.disk_bytes += disk_bytes(m)
        if self._count > self.limits.max_members:
            raise ArchiveError(too_many_members(self.limits.max_members))
        rel = normalize(m.name)
        kind = m.kind
        if kind is _OTHER:
            raise ArchiveError(f"member {m.name}: is a {m.describe}; environments never contain one")
        if rel == "":
            if kind is _DIR:
                return
            raise ArchiveError(f"member {m.name}: a {kind.value} in place of the environment's root")
        if rel in self.dirs:
            if kind is _DIR:
                return
            raise ArchiveError(f"member {m.name}: duplicate name (already a directory)")
        self._parents(rel, m.name)
        path = self._path(rel)
        try:
            if kind is _FILE:
                self._write_file(m, path)
            elif kind is _DIR:
                self._keep(rel, m.name)
                os.mkdir(path, 0o755)
                self.dirs.add(rel)
                self.stats.dirs += 1
            elif kind is _SYMLINK:
                self._check_link_target(m, rel)
                self._keep(rel, m.name)
                os.symlink(m.linkname, path)
                self.symlinks.append(rel)
                self.stats.symlinks += 1
            else:
                self._check_hardlink_target(m)
                os.link(self._path(normalize(m.linkname)), path, follow_symlinks=False)
                self.stats.hardlinks += 1
        except FileExistsError:  # everything in dest was written by this run: a member of the same name
            raise ArchiveError(f"member {m.name}: duplicate name (already a {self._kind(rel)})") from None

    def _kind(self, rel: str) -> str:
        """What this run wrote at `rel`, for an error message (hardlinks show as files)."""
        mode = os.lstat(self._path(rel)).st_mode
        return "symlink" if stat.S_ISLNK(mode) else "directory" if stat.S_ISDIR(mode) else "file"

    def _check_hardlink_target(self, m: Member) -> None:
        """Only to a regular file this archive already wrote, named without going through a symlink."""
        target = normalize(m.linkname)
        try:  # a parent we created is a real directory: the lstat cannot go through a symlink
            is_file = target.rpartition("/")[0] in self.dirs and stat.S_ISREG(os.lstat(self._path(target)).st_mode)
        except FileNotFoundError:
            is_file = False
        if not is_file:
            raise ArchiveError(f"member {m.name}: hardlink to {m.linkname}, which is not a file of this archive")

    def _write_file(self, m: Member, path: str) -> None:
        self._declared += m.size
        if self._declared > self.limits.max_unpacked_bytes:
            raise ArchiveError(too_many_bytes(self.limits.max_unpacked_bytes, m.name))
        # Drop setuid/setgid/sticky and group/other write; the owner can always read and write.
        mode = (m.mode & 0o755) | 0o600
        assert m.open is not None
        src = m.open()
        fd = os.open(path, O_CREATE, mode)
        try:
            remaining = m.size
            while remaining > 0:
                data = src.read(CHUNK if remaining > CHUNK else remaining)
                if not data:
                    raise ArchiveError(f"member {m.name}: archive ends inside it (truncated or corrupt)")
                remaining -= len(data)
                written = os.write(fd, data)
                while written < len(data):  # a short write (rare): write the rest
                    data = memoryview(data)[written:]
                    written = os.write(fd, data)
            if m.mtime_ns:  # keeps .pyc files valid: they record their source's mtime
                try:
                    os.utime(fd, ns=(m.mtime_ns, m.mtime_ns))
                except OverflowError:
                    raise ArchiveError(f"member {m.name}: modification time out of range (corrupt archive)") from None
        finally:
            os.close(fd)
        self.stats.files += 1
        self.stats.bytes += m.size

    def _check_link_target(self, m: Member, rel: str) -> None:
        check_symlink(m.name, rel, m.linkname)

    def finish(self) -> None:
        """Resolve every symlink on the real tree: chains of links may escape where no single one does."""
        root = os.path.realpath(self.dest)
        for rel in self.symlinks:
            try:
                real = os.path.realpath(self._path(rel))
            except RecursionError:  # it recurses once a link; no environment's chain is near that deep
                raise ArchiveError(
                    f"member {rel}: symlink chain too long to resolve (the kernel follows at most 40 links)"
                ) from None
            if real != root and not real.startswith(root + "/"):
                raise ArchiveError(f"member {rel}: symlink chain resolves outside the environment ({real})")


def extract(members: Iterable[Member], dest: Path, limits: Limits, held: int = 0) -> Stats:
    """Extract all members into the empty directory `dest` (which the caller removes on failure).
    `held`: bytes of the cache the caller occupies meanwhile and frees on failure (a downloaded
    zip): a full disk's error counts them as needed, and as free once the start is over."""
    ex = Extractor(dest, limits)
    stream = iter(members)
    old_umask = os.umask(0o022)
    try:
        for m in stream:
            ex.add(m)
        ex.finish()
    except OSError as exc:
        if exc.errno is None:  # not a failed system call: a codec's complaint (gzip.BadGzipFile, bz2)
            raise corrupt(exc) from None
        if exc.errno == errno.ENAMETOOLONG:
            raise ArchiveError(
                f"a member's name is too long for this filesystem ({exc.filename}); point MLSERVER_ENV_CACHE_DIR "
                "at a filesystem that allows it (ext4, xfs), or pack the environment with shorter paths"
            ) from None
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            # Read on without writing, so the error can say how much space the environment needs.
            needed, count = ex.stats.disk_bytes, ex._count
            for m in stream:
                needed += disk_bytes(m)
                count += 1
            raise no_space_error(dest, needed, count, held) from None
        raise write_error(exc, dest) from None
    finally:
        os.umask(old_umask)
    return ex.stats


def no_space_error(dest: Path, needed: int, members: int, held: int = 0) -> ConfigError:
    out_of_inodes = os.statvfs(dest.parent).f_favail == 0  # before the removal frees them again
    with contextlib.suppress(OSError):  # so the free space reported is what a retry gets
        remove_tree(str(dest))
    st = os.statvfs(dest.parent)
    free = st.f_bavail * st.f_frsize + held
    if out_of_inodes:
        return ConfigError(
            f"no free inodes left in cache directory {dest.parent} (MLSERVER_ENV_CACHE_DIR): the environment "
            f"needs one per file and directory (it has {members} members), {st.f_favail} are free with it removed; "
            "free some or point MLSERVER_ENV_CACHE_DIR at a volume with more inodes"
        )
    return ConfigError(
        f"no space left in cache directory {dest.parent} (MLSERVER_ENV_CACHE_DIR): the environment needs "
        f"{-(-(needed + held) // 1_000_000)} MB{_with_download(held)}, {free / 1e6:.0f} MB are free with it removed; "
        "free space or point MLSERVER_ENV_CACHE_DIR at a bigger volume"
    )


def _with_download(held: int) -> str:
    return f" (with the {-(-held // 1_000_000)} MB download it is unpacked from)" if held else ""


def write_error(exc: OSError, dest: Path) -> ConfigError:
    """An OSError from writing the cache, as a one-line error naming the setting to change."""
    where = f"cache directory {dest.parent} (MLSERVER_ENV_CACHE_DIR)"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ConfigError(f"{where} is not writable ({exc.strerror}); set MLSERVER_ENV_CACHE_DIR to a writable volume")
    return ConfigError(f"writing {exc.filename or dest}: {exc.strerror}; check {where}")
