"""The manifest: size, permission bits and mtime of every file and directory of an entry, written
before publishing and checked at every start.

Lines are `SIZE:MODE<tab>MTIME<tab>PATH` (SIZE -1 for a directory). The quick section, before the
QUICK_END line, holds at most QUICK_LINES lines, so a warm start costs the same for 500 files or
100,000: the shallow directories (a package added or removed changes site-packages' mtime), bin/
and the shared libraries, as many deeper directories as fit, then an even sample of the other
files. The rest follows for MLSERVER_ENV_VERIFY=full; MANIFEST_END ends a manifest written whole.

Python's bytecode caches (`__pycache__`) are left out: Python rewrites a .pyc whose source's time
it does not match, which must not make the entry look damaged. Permission bits are recorded
because a mode change (`chmod -x`) keeps size and mtime.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from entrypoint import fs
from entrypoint.entry import Entry

QUICK_END = "--\n"
MANIFEST_END = "==\n"
QUICK_LINES = 2048  # quick mode's budget: ~15 ms of stats
QUICK_DEPTH = 4  # directories this shallow are always in it: prefix, lib/, site-packages/<pkg>/
QUICK_LINE_MAX = 512  # longer lines stay out of the quick section, which is held in memory
QUICK_MAX = QUICK_LINES * QUICK_LINE_MAX * 4  # bytes: a longer quick section is no manifest's
LINE_MAX = 2 * 4096 + 64  # a size, a mode, a time and a path of PATH_MAX bytes, escaped
# Bits that may be added after unpacking without damage: what a pod's fsGroup adds (group rw, and
# x and setgid on directories), read or search for others. Not world-write, setuid, nor setgid on
# a file: extraction never makes them, and they let others change what runs.
TOLERATED_FILE_BITS = 0o775
TOLERATED_DIR_BITS = 0o3775


def write(entry: Entry) -> None:
    """Walk the entry and write its manifest atomically, in memory bounded by QUICK_LINES: lines
    that cannot make the quick section go to an anonymous temporary file as they come."""
    import tempfile

    base = len(str(entry.prefix)) + 1
    with tempfile.TemporaryFile(dir=entry.root, prefix=f".{entry.name}.manifest.", suffix=".tmp") as spill:
        lines = _Lines(spill)
        stack = [(str(entry.prefix), 0)]
        while stack:
            path, depth = stack.pop()
            lines.directory(_line(-1, os.stat(path), path[base:]), depth)
            with os.scandir(path) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False) and e.name != "__pycache__":
                        stack.append((e.path, depth + 1))
                    elif e.is_file(follow_symlinks=False):
                        st = e.stat(follow_symlinks=False)
                        lines.file(_line(st.st_size, st, e.path[base:]), e.path[base:])
            if depth == 0:  # bin/ walked first: the interpreter makes the quick section past many libraries
                stack.sort(key=lambda item: item[0] == f"{path}/bin")
        head = lines.head()
        spill.write(MANIFEST_END.encode())
        spill.seek(0)
        fs.write_atomic(entry.manifest, _chain(head, spill))


class _Lines:
    """The quick section's candidates, in bounded memory; the rest spilled to `spill`."""

    def __init__(self, spill: IO[bytes]) -> None:
        self.spill = spill
        self.must: list[str] = []  # shallow directories, bin/, shared libraries
        self.deep_dirs: list[str] = []  # the shallowest QUICK_LINES deeper directories
        self.sample = _Sample(QUICK_LINES)

    def _out(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.spill.write(line.encode("utf-8", "surrogateescape"))

    def directory(self, line: str, depth: int) -> None:
        if len(line) > QUICK_LINE_MAX:
            self._out([line])
        elif depth <= QUICK_DEPTH and len(self.must) < QUICK_LINES:
            self.must.append(line)
        else:
            self.deep_dirs.append(line)
            if len(self.deep_dirs) >= 2 * QUICK_LINES:
                self.deep_dirs.sort(key=_depth)
                self._out(self.deep_dirs[QUICK_LINES:])
                del self.deep_dirs[QUICK_LINES:]

    def file(self, line: str, rel: str) -> None:
        if len(line) > QUICK_LINE_MAX:
            self._out([line])
        elif (rel.startswith("bin/") or ".so" in rel) and len(self.must) < QUICK_LINES:
            self.must.append(line)
        else:
            self._out(self.sample.add(line))

    def head(self) -> bytes:
        """The quick section, QUICK_END, and the deeper directories and sample lines left over."""
        self.deep_dirs.sort(key=_depth)  # shallowest first: they cover the most files
        room = max(0, QUICK_LINES - len(self.must))
        quick = [*self.must, *self.deep_dirs[:room]]
        chosen, left = self.sample.spread(max(0, QUICK_LINES - len(quick)))
        return "".join([*quick, *chosen, QUICK_END, *self.deep_dirs[room:], *left]).encode("utf-8", "surrogateescape")


def _line(size: int, st: os.stat_result, rel: str) -> str:
    return f"{size}:{st.st_mode & 0o7777:o}\t{st.st_mtime_ns}\t{_escape(rel)}\n"


def _escape(rel: str) -> str:
    """A newline in a name (tar and Linux allow it) would end the line: written as backslash-n."""
    return rel.replace("\\", "\\\\").replace("\n", "\\n") if "\\" in rel or "\n" in rel else rel


def _unescape(rel: str) -> str:
    return "\\".join(part.replace("\\n", "\n") for part in rel.split("\\\\")) if "\\" in rel else rel


def _depth(line: str) -> int:
    return line.count("/")


class _Sample:
    """An even sample of at most `size` lines from a stream of unknown length, in O(size) memory:
    every `step`-th line is kept; when full, the step doubles and every other kept line goes.
    `add` returns the lines not (or no longer) kept."""

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
        return [x for i, x in enumerate(self.kept) if i in picked], [
            x for i, x in enumerate(self.kept) if i not in picked
        ]


def _chain(head: bytes, rest: IO[bytes]) -> Iterator[bytes]:
    yield head
    while block := rest.read(1 << 16):
        yield block


def verify(entry: Entry, full: bool) -> str | None:
    """What is wrong with a published entry, or None. Quick mode checks the quick section (~15 ms
    whatever the size); full mode every line, so it also finds any truncated file."""
    try:
        if full:
            return _verify_full(entry.manifest, str(entry.prefix))
        text = _quick_section(entry.manifest).decode("utf-8", "surrogateescape")
    except OSError:
        return "its manifest is missing"
    if not _starts_right(text):
        return "its manifest is damaged"
    return _check_lines(str(entry.prefix), text.removesuffix("\n").split("\n"))  # not splitlines: \r, \x1c…


def _verify_full(manifest: Path, prefix: str) -> str | None:
    """Read the manifest a line at a time, twice: first that it is whole, then each line checked."""
    with _open(manifest) as f:
        first = f.readline(LINE_MAX)
        quick_end = last = False
        while line := f.readline(LINE_MAX):
            if not line.endswith(b"\n") and len(line) == LINE_MAX:
                return "its manifest is damaged"
            quick_end = quick_end or line == QUICK_END.encode()
            last = line == MANIFEST_END.encode()
        if not (quick_end and last and _starts_right(first.decode("utf-8", "surrogateescape"))):
            return "its manifest is damaged"
        f.seek(0)
        return _check_lines(prefix, (line[:-1].decode("utf-8", "surrogateescape") for line in f))


def _starts_right(text: str) -> bool:
    """A manifest starts with the prefix's own line (a directory, no path)."""
    first = text.partition("\n")[0].split("\t")
    return len(first) == 3 and first[0].partition(":")[0] == "-1" and first[2] == ""


def _check_lines(prefix: str, lines: Iterable[str]) -> str | None:
    for line in lines:
        if line in (QUICK_END[:-1], MANIFEST_END[:-1]):
            continue
        try:
            size_mode, mtime, rel = line.split("\t", 2)
            rel = _unescape(rel)
            st = os.stat(f"{prefix}/{rel}" if rel else prefix, follow_symlinks=False)
            changed = _changed(st, size_mode, int(mtime))
        except ValueError:
            return "its manifest is damaged"
        except OSError:
            return f"{rel or '.'} is missing"
        if changed:
            return f"{rel or '.'} was changed after unpacking"
    return None


def _changed(st: os.stat_result, size_mode: str, mtime: int) -> bool:
    """A permission bit taken away is damage, an owner or group bit added is not (TOLERATED_*);
    a different type (a symlink in place of a directory or file) always is."""
    size, _, mode = size_mode.partition(":")
    directory = size[:1] == "-"
    bits = st.st_mode & 0o7777
    recorded = int(mode, 8) if mode else bits  # no mode: a manifest written before modes were recorded
    tolerated = TOLERATED_DIR_BITS if directory else TOLERATED_FILE_BITS
    return (
        st.st_mtime_ns != mtime
        or (not directory and st.st_size != int(size))
        or recorded & ~bits != 0
        or bits & ~recorded & ~tolerated != 0
        or stat.S_IFMT(st.st_mode) != (stat.S_IFDIR if directory else stat.S_IFREG)
    )


def _open(manifest: Path, buffering: int = -1) -> IO[bytes]:
    """The manifest, never through a symlink nor blocking on a FIFO; anything but a regular file
    is an OSError (read as "missing")."""
    fd = os.open(manifest, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise IsADirectoryError(errno.EISDIR, "not a regular file", str(manifest))
    return open(fd, "rb", buffering=buffering)


def _quick_section(manifest: Path) -> bytes:
    """The lines before the QUICK_END line, read no further and no more than QUICK_MAX bytes,
    each block searched once; empty if there is no such line (a manifest cut short)."""
    mark = b"\n" + QUICK_END.encode()
    with _open(manifest, buffering=0) as f:
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
