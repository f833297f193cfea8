"""Where files are written: the archive rules, in one place, applied while members are extracted
into one empty directory. `inspect` runs the same code on a scratch tree (`data_of`), so its
verdict is a start's.

Hand-written rather than `tarfile.extractall(filter="data")` (Python 3.11.4+ only, five CVE fixes
in 2025, a stat, chmod and chown per member). The rules: a member is written only into
directories this run created, never through a symlink, never over an existing path (O_EXCL: the
filesystem finds duplicates, so nothing is kept per file); names are relative, without `..`, and
fit the cache's filesystem; every symlink is resolved on the real tree before anything runs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import re
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from entrypoint import fs
from entrypoint.archive import CHUNK, Kind, Member
from entrypoint.errors import ArchiveError, ConfigError

O_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_DEPTH = 128  # path components of a member; real environments stay under 20
DISK_BLOCK = 4096  # what a file or directory occupies is rounded up to this (ext4, xfs, tmpfs)
SYMLINK_MAX = 4095  # bytes a symlink's target may hold on Linux (PATH_MAX, its NUL excluded)
PATH_MAX = 4096  # bytes in a path the kernel takes, its NUL included
MANIFEST_LINE = 128  # bytes the manifest spends per member, generously
# Memory the directories and symlinks kept may cost (a path each, plus ~100 bytes of objects): the
# seed environment needs 0.2 MiB.
MAX_KEPT_PATHS = 6 << 20
KEPT_PATH_COST = 100
_FILE, _DIR, _SYMLINK, _OTHER = Kind.FILE, Kind.DIR, Kind.SYMLINK, Kind.OTHER  # an Enum attribute costs ~0.2 µs
TOO_LONG_ADVICE = (
    "point MLSERVER_ENV_CACHE_DIR at a filesystem that allows it (ext4, xfs), or pack the environment with "
    "shorter paths"
)


@dataclass(frozen=True)
class Limits:
    max_members: int
    max_unpacked_bytes: int
    name_max: int = 255  # bytes of one path component on the cache's filesystem
    path_room: int = PATH_MAX  # bytes left for a member's path after the entry's prefix and a "/"


def limits_for(max_members: int, max_unpacked_bytes: int, prefix: Path) -> Limits:
    """The limits of an unpack into `prefix`, an entry of the cache (which may not exist yet)."""
    name_max = 255
    for folder in prefix.parents:  # the nearest that exists
        with contextlib.suppress(OSError, ValueError):
            name_max = os.pathconf(folder, "PC_NAME_MAX")
            break
    return Limits(max_members, max_unpacked_bytes, name_max, PATH_MAX - len(os.fsencode(prefix)) - 2)


@dataclass
class Stats:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    bytes: int = 0
    disk_bytes: int = 0  # space taken: files rounded up to whole blocks, directories, manifest lines

    @property
    def members(self) -> int:
        return self.files + self.dirs + self.symlinks + self.hardlinks


class Refused(ArchiveError):
    """A member (or the whole) refused by a rule of this module; inspect reports it as a problem."""


def disk_bytes(m: Member) -> int:
    blocks = -(-m.size // DISK_BLOCK) if m.kind is _FILE else 1 if m.kind is _DIR else 0
    return blocks * DISK_BLOCK + MANIFEST_LINE


def normalize(name: str) -> str:
    """The member's path relative to the destination, or an ArchiveError if it could escape."""
    if "\0" in name:
        raise Refused(f"member {name!r}: NUL byte in name")
    if name.startswith("/"):
        raise Refused(f"member {name}: absolute path")
    # The usual name ("lib/python3.8/os.py", "lib/" for a directory) is already normal: no empty,
    # "." or ".." component (each would show as "//" or "/." in "/" + name), few components.
    if "//" not in name and "/." not in f"/{name}" and name.count("/") < MAX_DEPTH:
        return name[:-1] if name.endswith("/") else name
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise Refused(f"member {name}: '..' in path")
    if len(parts) > MAX_DEPTH:  # deeper trees break recursive walkers (ours, rmtree, os.walk)
        raise Refused(f"member {name[:200]}…: {len(parts)} levels deep, more than the {MAX_DEPTH} allowed")
    return "/".join(parts)


def check_symlink(name: str, rel: str, target: str) -> None:
    """A symlink's target must be relative, non-empty, within Linux's length, and lexically inside."""
    if not target or "\0" in target:
        raise Refused(f"member {name}: symlink with an empty or NUL target")
    if target.startswith("/"):
        raise Refused(f"member {name}: symlink to absolute path {target}")
    if len(target) >= SYMLINK_MAX // 4 and len(encoded := target.encode("utf-8", "surrogateescape")) > SYMLINK_MAX:
        raise Refused(f"member {name}: symlink target of {len(encoded)} bytes, more than Linux allows")
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
    if resolved == ".." or resolved.startswith("../"):
        raise Refused(f"member {name}: symlink to {target}, outside the environment")


class Extractor:
    """Extract members into `dest`, an empty directory of this run. With `data_of` (a dry run), a
    file's data is read through and written only where `data_of(path)` says so: the tree has every
    name, type, mode and time, and the bytes a check needs."""

    def __init__(self, dest: Path, limits: Limits, data_of: Callable[[str], bool] | None = None) -> None:
        self.dest = str(dest)
        self.limits = limits
        self.data_of = data_of
        # The directories this run created: parents are only ever these, so nothing is written
        # through a symlink or a file. Memory grows with them and the symlinks, not with files.
        self.dirs: set[str] = {""}
        self.symlinks: list[str] = []
        self.stats = Stats()
        self.count = 0
        self._declared = 0  # bytes of file members seen
        self._kept = 0  # memory held by `dirs` and `symlinks`
        # Longer than what fits whatever the characters are (UTF-8 takes at most 4 bytes a character).
        self._short_path = limits.path_room // 4
        self._long_part = re.compile(f"[^/]{{{limits.name_max // 4 + 1}}}").search

    def run(self, members: Iterable[Member], held: int = 0) -> Stats:
        """Extract every member and check the symlinks; OSErrors become one line naming the cache
        (`held`: bytes of it the caller occupies meanwhile, such as a downloaded zip)."""
        stream = iter(members)
        old_umask = os.umask(0o022)
        try:
            for m in stream:
                self.add(m)
            self.finish()
        except OSError as exc:
            raise self._write_failure(exc, stream, held) from exc
        finally:
            os.umask(old_umask)
        return self.stats

    def add(self, m: Member) -> None:
        self.count += 1
        self.stats.disk_bytes += disk_bytes(m)
        if self.count > self.limits.max_members:
            raise Refused(
                f"more than {self.limits.max_members} members",
                "raise MLSERVER_ENV_MAX_MEMBERS if this environment is really that large",
            )
        rel = normalize(m.name)
        kind = m.kind
        if kind is _OTHER:
            raise Refused(f"member {m.name}: is a {m.describe}; environments never contain one")
        if rel in self.dirs:  # the root ("") among them
            if kind is _DIR:
                return
            if rel == "":
                raise Refused(f"member {m.name}: a {kind.value} in place of the environment's root")
            raise Refused(f"member {m.name}: duplicate name (already a directory)")
        if len(rel) > self._short_path or self._long_part(rel):
            self._check_name_length(rel, m.name)  # may not fit: checked in bytes
        self._parents(rel, m.name)
        path = f"{self.dest}/{rel}"
        try:
            if kind is _FILE:
                self._write_file(m, path, rel)
            elif kind is _DIR:
                self._mkdir(rel, m.name)
            elif kind is _SYMLINK:
                check_symlink(m.name, rel, m.linkname)
                self._keep(rel, m.name)
                os.symlink(m.linkname, path)
                self.symlinks.append(rel)
                self.stats.symlinks += 1
            else:
                os.link(self._hardlink_target(m), path, follow_symlinks=False)
                self.stats.hardlinks += 1
        except FileExistsError as exc:  # everything in dest was written by this run: a member of that name
            raise Refused(f"member {m.name}: duplicate name (already a {self._kind(rel)})") from exc

    def _check_name_length(self, rel: str, name: str) -> None:
        limits = self.limits
        encoded = rel.encode("utf-8", "surrogateescape")
        if len(encoded) > limits.path_room or any(len(c) > limits.name_max for c in encoded.split(b"/")):
            raise Refused(f"member {name[:200]}: its name is too long for the cache's filesystem", TOO_LONG_ADVICE)

    def _keep(self, rel: str, name: str) -> None:
        """Count a kept directory or symlink path against MAX_KEPT_PATHS."""
        self._kept += KEPT_PATH_COST + len(rel)
        if self._kept > MAX_KEPT_PATHS:
            raise Refused(
                f"member {name[:200]}: more than {MAX_KEPT_PATHS >> 20} MiB of directory and symlink paths, far "
                "beyond any environment (corrupt or hostile archive)",
                "pack the environment again with conda-pack",
            )

    def _mkdir(self, rel: str, name: str) -> None:
        self._keep(rel, name)
        os.mkdir(f"{self.dest}/{rel}", 0o755)
        self.dirs.add(rel)
        self.stats.dirs += 1

    def _parents(self, rel: str, name: str) -> None:
        """Create missing parent directories; never go through anything but this run's own."""
        parent = rel.rpartition("/")[0]
        if parent in self.dirs:
            return
        self._parents(parent, name)
        try:
            self._mkdir(parent, name)
        except FileExistsError as exc:  # a file or symlink of this archive
            raise Refused(f"member {name}: would be written through the {self._kind(parent)} {parent}") from exc
        self.stats.disk_bytes += DISK_BLOCK + MANIFEST_LINE

    def _kind(self, rel: str) -> str:
        """What this run wrote at `rel`, for an error (a hardlink shows as a file)."""
        mode = os.lstat(f"{self.dest}/{rel}").st_mode
        return "symlink" if stat.S_ISLNK(mode) else "directory" if stat.S_ISDIR(mode) else "file"

    def _hardlink_target(self, m: Member) -> str:
        """A regular file this archive already wrote, named without going through a symlink."""
        target = normalize(m.linkname)
        path = f"{self.dest}/{target}"
        try:  # its parent is one of our directories, so the lstat goes through no symlink
            is_file = target.rpartition("/")[0] in self.dirs and stat.S_ISREG(os.lstat(path).st_mode)
        except FileNotFoundError:
            is_file = False
        if not is_file:
            raise Refused(f"member {m.name}: hardlink to {m.linkname}, which is not a file of this archive")
        return path

    def _write_file(self, m: Member, path: str, rel: str) -> None:
        self._declared += m.size
        if self._declared > self.limits.max_unpacked_bytes:
            raise Refused(
                f"unpacks to more than {self.limits.max_unpacked_bytes} bytes (member {m.name})",
                "raise MLSERVER_ENV_MAX_UNPACKED_BYTES if this environment is really that large",
            )
        assert m.open is not None
        src = m.open()
        fd = os.open(path, O_CREATE, (m.mode & 0o755) | 0o600)  # no setuid/setgid/sticky, no group/other write
        try:
            out = fd if self.data_of is None or self.data_of(rel) else None
            remaining = m.size
            while remaining > 0:
                data = src.read(CHUNK if remaining > CHUNK else remaining)
                if not data:
                    raise ArchiveError(f"member {m.name}: archive ends inside it (truncated or corrupt)")
                remaining -= len(data)
                written = os.write(out, data) if out is not None else len(data)
                while written < len(data):  # a short write (rare): write the rest
                    data = memoryview(data)[written:]
                    written = os.write(fd, data)
            if m.mtime_ns:  # keeps .pyc files valid: they record their source's mtime
                try:
                    os.utime(fd, ns=(m.mtime_ns, m.mtime_ns))
                except OverflowError as exc:
                    raise ArchiveError(f"member {m.name}: modification time out of range (corrupt archive)") from exc
        finally:
            os.close(fd)
        self.stats.files += 1
        self.stats.bytes += m.size

    def finish(self) -> None:
        """Resolve every symlink on the real tree: a chain may escape where no single link does."""
        root = os.path.realpath(self.dest)
        for rel in self.symlinks:
            try:
                real = os.path.realpath(f"{self.dest}/{rel}")
            except RecursionError as exc:  # realpath recurses once a link; the kernel follows at most 40
                raise Refused(f"member {rel}: symlink chain too long to resolve") from exc
            if real != root and not real.startswith(root + "/"):
                raise Refused(f"member {rel}: symlink chain resolves outside the environment ({real})")

    def _write_failure(self, exc: OSError, rest: Iterator[Member], held: int) -> Exception:
        if exc.errno == errno.ENAMETOOLONG:
            return Refused(f"a member's name is too long for this filesystem ({exc.filename})", TOO_LONG_ADVICE)
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            return write_error(exc, Path(self.dest))
        needed, count = self.stats.disk_bytes, self.count  # read on without writing: what the whole needs
        for m in rest:
            needed += disk_bytes(m)
            count += 1
        return no_space_error(Path(self.dest), needed, count, held)


def extract(members: Iterable[Member], dest: Path, limits: Limits, held: int = 0) -> Stats:
    """Extract every member into the empty directory `dest` (the caller removes it on failure)."""
    return Extractor(dest, limits).run(members, held)


def no_space_error(dest: Path, needed: int, members: int, held: int = 0) -> ConfigError:
    """A full cache: how much the environment needs, and what is free once the partial entry is gone."""
    out_of_inodes = os.statvfs(dest.parent).f_favail == 0  # before the removal frees them again
    with contextlib.suppress(OSError):
        fs.remove_tree(str(dest))
    st = os.statvfs(dest.parent)
    where = f"cache directory {dest.parent} (MLSERVER_ENV_CACHE_DIR)"
    if out_of_inodes:
        return ConfigError(
            f"no free inodes left in {where}: the environment needs one per file and directory (it has {members} "
            f"members), {st.f_favail} are free with it removed",
            "free some or point MLSERVER_ENV_CACHE_DIR at a volume with more inodes",
        )
    download = f" (with the {-(-held // 1_000_000)} MB download it is unpacked from)" if held else ""
    return ConfigError(
        f"no space left in {where}: the environment needs {-(-(needed + held) // 1_000_000)} MB{download}, "
        f"{(st.f_bavail * st.f_frsize + held) / 1e6:.0f} MB are free with it removed",
        "free space or point MLSERVER_ENV_CACHE_DIR at a bigger volume",
    )


def write_error(exc: OSError, dest: Path) -> ConfigError:
    """An OSError from writing the cache, naming the setting to change."""
    where = f"cache directory {dest.parent} (MLSERVER_ENV_CACHE_DIR)"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ConfigError(
            f"{where} is not writable ({exc.strerror})", "set MLSERVER_ENV_CACHE_DIR to a writable volume"
        )
    return ConfigError(f"writing {exc.filename or dest}: {exc.strerror}", f"check {where}")
