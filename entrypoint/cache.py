"""The cache directory: one entry per tarball content, published only when complete.

Layout under MLSERVER_ENV_CACHE_DIR (short names: the entry path is the environment's prefix,
and conda-unpack cannot write a prefix longer than the packed one into binary files):

    <key8>/          the unpacked, relocated environment (its prefix)
    <key8>.lock      held while the entry is being made (flock: released if the process dies)
    <key8>.ready     JSON written last, atomically, after the data is durable: "this entry is complete"
    <key8>.manifest  size and mtime of every file and directory, to check the entry cheaply at start
    <key8>.use       held (shared) by every process using the entry; its mtime is "last used" (gc.py)
    .keys/<16 hex>   a tarball path's remembered SHA-256 (key_memo; only ever read, written and swept
                     in a real directory, never through a symlink)

Every one of these is a regular file (or, for <key8>, a directory) the cache made: a symlink,
directory or FIFO in its place is never followed, but removed where nothing can be lost, or
refused in one line naming it (not_ours).

An entry without `.ready` is never used: a start killed at any moment leaves at most a partial
directory, which the next start removes under the lock before extracting again.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, NamedTuple

from entrypoint.errors import ConfigError

KEY_CHARS = 8
DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC  # a directory, never through a symlink


class Entry(NamedTuple):  # not a dataclass: importing dataclasses costs the warm start ~15 ms
    root: Path
    key: str

    @property
    def name(self) -> str:
        return self.key[:KEY_CHARS]

    @property
    def prefix(self) -> Path:
        return self.root / self.name

    @property
    def marker(self) -> Path:
        return self.root / f"{self.name}.ready"

    @property
    def lock(self) -> Path:
        return self.root / f"{self.name}.lock"

    @property
    def manifest(self) -> Path:
        return self.root / f"{self.name}.manifest"


def not_ours(path: Path, what: str) -> ConfigError:
    """`path`, one of the cache's own names, holds what the cache never makes there (a symlink, a
    directory, a FIFO): nothing is followed, written or removed through it; the user removes it."""
    return ConfigError(
        f"{path} is {what}, which the cache never makes there; nothing was written through it: "
        f"remove it (rm -r '{path}') and try again"
    )


def kind(st: os.stat_result) -> str:
    """What a file is, for not_ours: `a directory`, `a symbolic link`…"""
    if stat.S_ISDIR(st.st_mode):
        return "a directory"
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link"
    if stat.S_ISFIFO(st.st_mode):
        return "a FIFO"
    return "not a regular file"


def file_identity(st: os.stat_result) -> tuple[int, ...]:
    """What changes whenever a file's bytes can have changed (ctime: no user can set it back)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def key_memo(root: Path, tarball: Path) -> Path:
    """Where the SHA-256 of the tarball at this absolute path is remembered (see source.content_key).

    Named by two zlib checksums of the path, not by SHA-256: importing hashlib would cost the warm
    start ~6 ms. A clash of two paths is harmless: the memo also holds the file's identity, so the
    other file would not match and would be hashed again.
    """
    import zlib

    raw = str(tarball).encode("utf-8", "surrogateescape")
    return root / ".keys" / f"{zlib.crc32(raw):08x}{zlib.adler32(raw):08x}"


# A marker holds a key, two paths (or a URL) and a few numbers: a few KB at most, JSON-escaped. One
# bigger is damage (the entry is unpacked again), never read whole: 300 MB took a start to 600 MB.
MARKER_MAX = 1 << 16


def read_small(path: Path | str, limit: int, dir_fd: int | None = None, flags: int = 0) -> bytes | None:
    """A small file of the cache's whole, or None if it is bigger than `limit`, or not a regular
    file (a FIFO there must not block the start, a directory is not a marker)."""
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


MEMO_MAX = 1 << 16  # a memo holds a path, an identity and a key: a few hundred bytes


def read_memo(root: Path, tarball: Path) -> bytes | None:
    """The memo of `tarball`'s key (key_memo), read only from a `.keys` that is the cache's own
    directory, never through a symlink there or at the memo's name (it is then neither written
    nor swept: source._remember, gc.keys_dir); None if there is none or it is oversized."""
    memo = key_memo(root, tarball)
    try:
        dfd = os.open(memo.parent, DIR_OPEN)
    except OSError:
        return None
    try:
        return read_small(memo.name, MEMO_MAX, dir_fd=dfd, flags=os.O_NOFOLLOW)
    except OSError:
        return None
    finally:
        os.close(dfd)


HEX_DIGITS = frozenset("0123456789abcdef")


def remembered_key(root: Path, tarball: Path, identity: tuple[int, ...]) -> str | None:
    """The SHA-256 remembered for this very version of `tarball` (file_identity), if any. A key
    not made of 64 hex digits is none: the entry's name is taken from it (`../x` would put the
    entry outside the cache)."""
    try:
        saved = json.loads(read_memo(root, tarball) or b"")
    except ValueError:
        return None
    if not isinstance(saved, dict) or saved.get("identity") != list(identity):
        return None
    key = saved.get("sha256")
    return key if isinstance(key, str) and len(key) == 64 and HEX_DIGITS.issuperset(key) else None


def read_marker(entry: Entry) -> dict[str, object] | None:
    """The entry's completion record, if it is complete and for this very tarball content."""
    try:
        data = read_small(entry.marker, MARKER_MAX, flags=os.O_NOFOLLOW)  # a symlink there: ELOOP, damage
        record = json.loads(data) if data is not None else None
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("sha256") != entry.key:
        return None
    return record


def unpacked_here(entry: Entry, record: dict[str, object]) -> bool:
    """Whether the entry's marker was written at this very path (or one naming the same directory,
    as through a symlink): its relocated files name that path (scripts' shebangs, text files)."""
    recorded = record.get("prefix")
    if recorded == str(entry.prefix):
        return True
    try:
        return isinstance(recorded, str) and os.path.samefile(recorded, entry.prefix)
    except OSError:
        return False


def moved_error(entry: Entry, record: dict[str, object]) -> ConfigError:
    recorded = Path(str(record.get("prefix")))
    return ConfigError(
        f"the cached environment {entry.prefix} was unpacked at {recorded}, and its files name that path; "
        f"mount the cache volume at {recorded.parent} here too, or give this start its own MLSERVER_ENV_CACHE_DIR"
    )


def ensure_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create cache directory {root} ({exc.strerror}); set MLSERVER_ENV_CACHE_DIR to a "
            "writable directory or mount a volume there"
        ) from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise ConfigError(
            f"cache directory {root} is not writable by uid {os.getuid()}; set MLSERVER_ENV_CACHE_DIR "
            "to a writable directory or mount a writable volume there"
        )
    ensure_executable(root)


def ensure_executable(root: Path) -> None:
    """The environment's programs run from the cache: on a filesystem mounted noexec (a Docker
    tmpfs unless told `exec`) none can, and a command would resolve to the host's instead."""
    try:
        noexec = os.statvfs(root).f_flag & os.ST_NOEXEC
    except OSError:
        return  # not there yet: ensure_writable creates it, then checks again
    if noexec:
        raise ConfigError(
            f"cache directory {root} is on a filesystem mounted noexec, so the environment's programs cannot "
            f"run from it; mount it with exec (docker run --tmpfs {root}:exec) or set MLSERVER_ENV_CACHE_DIR "
            "to a directory on another filesystem"
        )


def discard(entry: Entry, deadline: float | None = None) -> bool:
    """Remove an entry, marker first, so a crash half-way never leaves a marked partial entry.
    With a `deadline` (time.monotonic()), stop removing there and return False: what is left is
    an unmarked directory, which the next start (or gc) removes, as after a kill -9.

    Also the temporaries of its marker and manifest (`_write_atomic`) that a start killed while
    publishing left behind: only the holder of the entry's unpack lock (or gc's exclusive lock)
    calls this, so no live process is writing them.

    What the cache never makes at these names is not followed: a non-directory at the entry's
    path (a FIFO, a symlink) is unlinked, an empty directory at a temporary's name removed; a
    directory at the marker's or the manifest's name, or anything that cannot be removed (an
    immutable file), is one line (ConfigError) naming it."""
    marked = remove_file(entry.marker)
    remove_file(entry.manifest)
    for path in entry.root.glob(f".{entry.name}.*.tmp"):
        remove_file(path, empty_dir_too=True)
    if marked:  # the marker's removal is durable before the tree's begins
        _fsync_dir(entry.root)
    try:
        st = os.lstat(entry.prefix)
    except FileNotFoundError:
        return True
    try:
        if stat.S_ISDIR(st.st_mode):
            return remove_tree(str(entry.prefix), deadline)
        entry.prefix.unlink()
        return True
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename and exc.filename != str(entry.prefix) else ""
        raise ConfigError(
            f"cannot remove the cache entry {entry.prefix} to unpack it again ({exc.strerror}{where}); remove it "
            f"by hand (rm -rf '{entry.prefix}', after chattr -i of any immutable file) and try again"
        ) from None


def remove_file(path: Path, empty_dir_too: bool = False) -> bool:
    """Unlink one of the cache's own files (never following a symlink there); a directory in its
    place is one line, or, if `empty_dir_too` (a stale temporary's name), removed when empty.
    Whether there was something to remove."""
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False
    except IsADirectoryError:
        if empty_dir_too:
            with contextlib.suppress(OSError):
                os.rmdir(path)
                return True
        if os.path.isdir(path):
            raise not_ours(path, "a directory") from None
        return False
    except OSError as exc:
        raise ConfigError(f"cannot remove {path} ({exc.strerror}); remove it by hand and try again") from None


def remove_tree(top: str, deadline: float | None = None) -> bool:
    """shutil.rmtree in bounded memory: it lists each directory whole before removing it (a
    directory of 200,000 files took a refused start to 74 MiB; the 2,000,000 members allowed, to
    hundreds), while this removes entries as it reads them, one open listing per level. Returns
    False if it stopped at `deadline` (time.monotonic()) with part of the tree still there.

    Through directory descriptors opened with O_NOFOLLOW, as rmtree does; each directory is made
    0755 first (one packed without owner write bits would make the removal fail for a non-root user).
    """
    os.chmod(top, 0o755)
    # Per open directory: its descriptor, its listing, its name and its parent's descriptor.
    stack: list[tuple[int, os._ScandirIterator[str], str, int | None]] = []

    def enter(name: str, parent: int | None) -> None:
        fd = os.open(name, DIR_OPEN, dir_fd=parent)
        try:
            stack.append((fd, os.scandir(fd), name, parent))
        except BaseException:
            os.close(fd)
            raise

    enter(top, None)
    try:
        while stack:
            fd, listing, name, parent = stack[-1]
            for e in listing:
                if deadline is not None and time.monotonic() > deadline:
                    return False
                if e.is_dir(follow_symlinks=False):
                    os.chmod(e.name, 0o755, dir_fd=fd)
                    enter(e.name, fd)
                    break
                os.unlink(e.name, dir_fd=fd)
            else:
                stack.pop()
                listing.close()
                os.close(fd)
                try:
                    os.rmdir(name, dir_fd=parent)
                except OSError as exc:  # a listing that missed entries removed meanwhile (NFS may): read it again
                    if exc.errno != errno.ENOTEMPTY:
                        raise
                    enter(name, parent)
        return True
    finally:
        for fd, listing, _, _ in stack:
            listing.close()
            os.close(fd)


QUICK_END = "--\n"  # the manifest lists what quick mode checks first, then the rest after this line
MANIFEST_END = "==\n"  # its last line: a manifest cut short (or emptied) must not pass for a complete one
QUICK_LINES = 2048  # quick mode's budget: ~15 ms of stats, whatever the environment's size
QUICK_DEPTH = 4  # directories this shallow are always checked: prefix, lib/, site-packages/<pkg>/
# Longer lines never make the quick section (real paths stay under 200 characters): held in
# memory by the thousand, lines of 4,000 characters would cost tens of MiB.
QUICK_LINE_MAX = 512
# Permission bits that may appear on an entry after unpacking without it being damaged: what a
# pod's fsGroup adds (kubelet: rw for owner and group, plus x and setgid on directories), a
# `chmod g=u` as images for arbitrary uids do, read or search for others. Not world-write, setuid,
# nor setgid on a file: extraction drops them, and they would let others change what runs.
TOLERATED_FILE_BITS = 0o775
TOLERATED_DIR_BITS = 0o3775


def write_manifest(entry: Entry) -> None:
    """Record size, permission bits and mtime of every directory (size -1) and regular file of the
    entry, as `SIZE:MODE<tab>MTIME<tab>PATH` lines. The bits because a mode change keeps size and
    mtime: a `chmod -x` of the interpreter was served, and every start then failed on it.

    Except Python's bytecode caches (`__pycache__`): Python rewrites a .pyc whose source's time
    differs from the one it recorded (a zip keeps times to 2 s only, so about half of a zipped
    environment's), and one run of the environment's python outside the entrypoint (which sets
    PYTHONDONTWRITEBYTECODE) made every later start find the entry "changed" and unpack it again,
    under any server running from it. A missing or stale .pyc only costs a recompile.

    Quick verification reads only the lines before QUICK_END, at most about QUICK_LINES of them
    so a warm start costs the same for 500 files or 100,000: the shallow directories (a package
    added or removed changes site-packages' mtime), bin/ and the shared libraries always, then as
    many deeper directories as fit, then an even sample of the other files.

    Memory does not grow with the number of files or directories: every line that cannot make
    the quick section (past QUICK_LINES, or longer than QUICK_LINE_MAX) goes to an anonymous
    temporary file as the tree is walked (300,000 files held as lines cost ~30 MB, half the memory
    budget), copied after the quick section. bin/ and the shared libraries are capped too: 60,000
    files named "*.so" took a start to 93 MiB, and every warm start to 60,000 stats.
    """
    import tempfile  # the cold path only

    must: list[str] = []
    deep_dirs: list[str] = []
    sample = _Sample(QUICK_LINES)
    base = len(str(entry.prefix)) + 1
    stack = [(str(entry.prefix), 0)]
    with tempfile.TemporaryFile(dir=entry.root, prefix=f".{entry.name}.manifest.", suffix=".tmp") as spill:
        while stack:
            d, depth = stack.pop()
            line = _line(-1, os.stat(d), d[base:])
            if len(line) > QUICK_LINE_MAX:
                spill.write(line.encode("utf-8", "surrogateescape"))
            else:
                (must if depth <= QUICK_DEPTH and len(must) < QUICK_LINES else deep_dirs).append(line)
            if len(deep_dirs) >= 2 * QUICK_LINES:  # only the shallowest can make the quick section
                deep_dirs.sort(key=_depth)
                for line in deep_dirs[QUICK_LINES:]:
                    spill.write(line.encode("utf-8", "surrogateescape"))
                del deep_dirs[QUICK_LINES:]
            with os.scandir(d) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        if e.name != "__pycache__":  # Python's own to rewrite: see the docstring
                            stack.append((e.path, depth + 1))
                    elif e.is_file(follow_symlinks=False):
                        st = e.stat(follow_symlinks=False)
                        rel = e.path[base:]
                        line = _line(st.st_size, st, rel)
                        if len(line) > QUICK_LINE_MAX:
                            spill.write(line.encode("utf-8", "surrogateescape"))
                        elif (rel.startswith("bin/") or ".so" in rel) and len(must) < QUICK_LINES:
                            must.append(line)
                        else:
                            for other in sample.add(line):
                                spill.write(other.encode("utf-8", "surrogateescape"))
            if depth == 0:  # bin/ walked first (last on the stack): past QUICK_LINES shared libraries,
                stack.sort(key=lambda item: item[0] == f"{d}/bin")  # the interpreter still makes the quick section
        deep_dirs.sort(key=_depth)  # shallowest first: they cover the most files
        room = max(0, QUICK_LINES - len(must))
        quick = [*must, *deep_dirs[:room]]
        chosen, left = sample.spread(max(0, QUICK_LINES - len(quick)))
        head = "".join([*quick, *chosen, QUICK_END, *deep_dirs[room:], *left])
        spill.write(MANIFEST_END.encode())
        spill.seek(0)
        _write_atomic(entry.manifest, _chain(head.encode("utf-8", "surrogateescape"), spill))


def _line(size: int, st: os.stat_result, rel: str) -> str:
    """One manifest line: `SIZE:MODE<tab>MTIME<tab>PATH` (what _check_lines compares)."""
    return f"{size}:{st.st_mode & 0o7777:o}\t{st.st_mtime_ns}\t{_escape(rel)}\n"


def _escape(rel: str) -> str:
    """A path as one manifest line holds it: a newline (which tar and Linux allow in a name) would
    end the line early, so it is written as backslash-n, and a backslash doubled."""
    return rel.replace("\\", "\\\\").replace("\n", "\\n") if "\\" in rel or "\n" in rel else rel


def _unescape(rel: str) -> str:
    return "\\".join(part.replace("\\n", "\n") for part in rel.split("\\\\")) if "\\" in rel else rel


def _depth(line: str) -> int:
    return line.count("/")


class _Sample:
    """An even sample of at most `size` lines from a stream of unknown length, in O(size) memory.

    Hand-written (a dozen lines): every `step`-th line is kept; when the sample is full, the step
    doubles and every other kept line is let go. What is not (or no longer) kept is returned by
    `add`, for the caller to write elsewhere."""

    def __init__(self, size: int) -> None:
        self.size = max(1, size)
        self.kept: list[str] = []
        self.step = 1
        self.seen = 0

    def add(self, line: str) -> list[str]:
        self.seen += 1
        if self.seen % self.step:
            return [line]
        self.kept.append(line)
        if len(self.kept) <= self.size:
            return []
        self.step *= 2
        dropped, self.kept = self.kept[::2], self.kept[1::2]
        return dropped

    def spread(self, room: int) -> tuple[list[str], list[str]]:
        """At most `room` of the kept lines, evenly spread, and the others."""
        if len(self.kept) <= room:
            return self.kept, []
        picked = {i * len(self.kept) // room for i in range(room)}
        chosen: list[str] = []
        left: list[str] = []
        for i, line in enumerate(self.kept):
            (chosen if i in picked else left).append(line)
        return chosen, left


def _chain(head: bytes, rest: IO[bytes]) -> Iterator[bytes]:
    yield head
    while block := rest.read(1 << 16):
        yield block


def verify(entry: Entry, full: bool) -> str | None:
    """What is wrong with a published entry, or None.

    Quick mode (~15 ms, bounded): the mtime of the shallow directories (and of deeper ones as the
    budget allows), which any file added, deleted or renamed in them changes, plus size and mtime
    of bin/, the shared libraries and a sample of other files. Full mode stats every file (~100 ms
    for 15,000 files here), so it also catches any truncated file.
    """
    if full:
        return _verify_full(entry)
    try:
        raw = _quick_section(entry.manifest)
    except OSError:
        return "its manifest is missing"
    text = raw.decode("utf-8", "surrogateescape")
    if not _complete(text, full):
        return "its manifest is damaged"
    return _check_lines(entry, text.removesuffix("\n").split("\n"))  # not splitlines(): a name may hold \r, \x1c…


def _verify_full(entry: Entry) -> str | None:
    """Full mode, reading the manifest a line at a time, twice (whole first, then checked): read
    and split at once, the manifest of 200,000 files took a warm start to 55 MiB, of the 2,000,000
    members allowed to hundreds. Binary lines end at b"\n" only, as the manifest's do."""
    try:
        with _open_manifest(entry.manifest) as f:
            first = f.readline(LINE_MAX)
            quick_end = last = False
            quick_end_line, end_line = QUICK_END.encode(), MANIFEST_END.encode()
            while line := f.readline(LINE_MAX):  # bounded: gigabytes without a newline are no line to hold
                if not line.endswith(b"\n") and len(line) == LINE_MAX:
                    return "its manifest is damaged"
                quick_end = quick_end or line == quick_end_line
                last = line == end_line
            if not (quick_end and last and _complete(first.decode("utf-8", "surrogateescape"), False)):
                return "its manifest is damaged"
            f.seek(0)
            return _check_lines(entry, (line[:-1].decode("utf-8", "surrogateescape") for line in f))
    except OSError:
        return "its manifest is missing"


def _check_lines(entry: Entry, lines: Iterable[str]) -> str | None:
    prefix = str(entry.prefix)
    for line in lines:
        if line in (QUICK_END[:-1], MANIFEST_END[:-1]):
            continue
        try:
            size_mode, mtime_s, rel = line.split("\t", 2)
        except ValueError:
            return "its manifest is damaged"
        size_s, _, mode_s = size_mode.partition(":")
        rel = _unescape(rel)
        try:
            st = os.stat(f"{prefix}/{rel}" if rel else prefix, follow_symlinks=False)
        except OSError:
            return f"{rel or '.'} is missing"
        # A permission bit taken away (`chmod -x`) is damage, an owner or group bit added is not:
        # Kubernetes adds group read/write (setgid and x to directories) to a volume's whole tree at
        # each mount when the pod sets an fsGroup, which equality would turn into an unpack at every
        # start. World-write, setuid and a setgid file are damage (TOLERATED_*_BITS).
        directory = size_s[:1] == "-"
        bits = st.st_mode & 0o7777
        try:
            recorded = int(mode_s, 8) if mode_s else bits  # no mode: written before modes were recorded
            changed = (
                st.st_mtime_ns != int(mtime_s)
                or (not directory and st.st_size != int(size_s))
                or recorded & ~bits != 0  # taken away
                or bits & ~recorded & ~(TOLERATED_DIR_BITS if directory else TOLERATED_FILE_BITS) != 0  # added
                # the type too: a symlink in place of a directory or file (its own mode bits are all
                # set) would otherwise pass, and lead anywhere
                or stat.S_IFMT(st.st_mode) != (stat.S_IFDIR if directory else stat.S_IFREG)
            )
        except ValueError:
            return "its manifest is damaged"
        if changed:
            return f"{rel or '.'} was changed after unpacking"
    return None


def _complete(text: str, full: bool) -> bool:
    """Whether a manifest (its quick section, unless `full`) was written whole: it starts with the
    prefix's own line and, read whole, ends with MANIFEST_END (quick mode reads no further than its
    QUICK_END line, which `_quick_section` requires)."""
    first = text.partition("\n")[0].split("\t")
    if len(first) != 3 or first[0].partition(":")[0] != "-1" or first[2] != "":
        return False
    return not full or (text.endswith(f"\n{MANIFEST_END}") and f"\n{QUICK_END}" in text)


# Quick lines are at most QUICK_LINE_MAX characters, of up to 4 bytes each in UTF-8: a quick section
# longer than this is no manifest's.
QUICK_MAX = QUICK_LINES * QUICK_LINE_MAX * 4


# A manifest line: a size, a mode, a time and a path of at most PATH_MAX bytes, escaped (a newline
# or a backslash doubled).
LINE_MAX = 2 * 4096 + 64


def _open_manifest(manifest: Path, buffering: int = -1) -> IO[bytes]:
    """The manifest for reading, never through a symlink (ELOOP) nor blocking on a FIFO; anything
    but a regular file is an OSError, which verify reads as "missing"."""
    fd = os.open(manifest, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise IsADirectoryError(errno.EISDIR, "not a regular file", str(manifest))
    return open(fd, "rb", buffering=buffering)


def _quick_section(manifest: Path) -> bytes:
    """The manifest's lines before the QUICK_END line, read no further: the rest can be 10 MB.
    Empty if there is no such line (the manifest was cut short) within QUICK_MAX bytes.

    Linear and bounded: each block is searched once (with the few bytes before it a match may
    start in), and no more than QUICK_MAX is held (100 MB of garbage took 86 s and 232 MB)."""
    mark = b"\n" + QUICK_END.encode()
    with _open_manifest(manifest, buffering=0) as f:
        data = bytearray(b"\n")
        while len(data) <= QUICK_MAX + 1:
            block = f.read(1 << 18)
            if not block:
                return b""
            start = max(0, len(data) - len(mark) + 1)
            data += block
            if (end := data.find(mark, start)) >= 0:
                return bytes(data[1 : end + 1])
    return b""


def publish(entry: Entry, record: dict[str, object]) -> None:
    """Make the entry durable, then visible: one filesystem sync, then the marker by rename."""
    _syncfs(entry.root)
    record = {**record, "sha256": entry.key, "prefix": str(entry.prefix), "published": time.time()}
    _write_atomic(entry.marker, json.dumps(record, indent=1).encode())


def _write_atomic(path: Path, data: bytes | Iterable[bytes]) -> None:
    # Created exclusively under a name no one can guess, never through a symlink planted there.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(8).hex()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with open(fd, "wb", buffering=1 << 16) as out:
            for chunk in [data] if isinstance(data, bytes) else data:
                out.write(chunk)  # a full disk raises ENOSPC here, possibly after a short write
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.cache
def _libc_syncfs() -> Callable[[int], int] | None:
    import ctypes

    try:
        # The process's own symbols (libc's among them), not ctypes.util.find_library, which forks
        # ldconfig: a fork while a stop signal's handler is armed can lose the signal (relocate.py).
        fn: Callable[[int], int] = ctypes.CDLL(None, use_errno=True).syncfs
        return fn
    except (OSError, AttributeError):
        return None


def _syncfs(path: Path) -> None:
    """syncfs(2) on the cache's filesystem only (Python has no binding); os.sync() if unavailable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        syncfs = _libc_syncfs()
        if syncfs is None or syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


class BackgroundSync:
    """Write the cache back to disk while an entry is being extracted and relocated.

    The one durability point before publishing (a syncfs) would otherwise wait for every byte
    the extraction left dirty in the page cache, seconds for a large environment; syncing
    periodically in a thread (syncfs releases the GIL) overlaps that with the extraction,
    relocation and the manifest's listing. Every 0.5 s: with 1 s the final sync of the seed
    environment still took ~0.8 s one start in two (measured on a fresh ext4).
    """

    def __init__(self, root: Path, interval: float = 0.5) -> None:
        self._root = root
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="syncfs", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with contextlib.suppress(OSError):
                _syncfs(self._root)

    def __enter__(self) -> BackgroundSync:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.stop()
        else:  # failed or stopped: no wait for a sync in flight (a daemon thread; the start ends)
            self._stop.set()
