"""Where a tarball is opened: format detection from content, fast decompression, member stream.

Every format conda-pack writes that makes sense here is read as one forward stream of members,
so memory stays flat whatever the archive's size. Decompression runs in a background thread
(the codecs release the GIL) so it overlaps with the file writes in the extractor.
"""

from __future__ import annotations

import bz2
import contextlib
import enum
import lzma
import queue
import stat
import tarfile
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, BinaryIO, cast

import zstandard
from isal import igzip

from entrypoint.errors import ArchiveError

CHUNK = 1 << 20
PREFETCH_DEPTH = 8  # chunks buffered ahead of the extractor: bounds memory at ~8 MiB

# Errors a codec or tarfile raises on bad bytes; all become one ArchiveError naming the archive.
CORRUPT = (
    tarfile.TarError,
    EOFError,
    zlib.error,
    lzma.LZMAError,
    zstandard.ZstdError,
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    UnicodeDecodeError,
    ValueError,
)


class Kind(enum.Enum):
    FILE = "file"
    DIR = "directory"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    OTHER = "special file"


@dataclass
class Member:
    name: str
    kind: Kind
    mode: int
    size: int
    mtime_ns: int
    linkname: str = ""
    describe: str = ""  # for OTHER: "character device", "FIFO", …
    open: Callable[[], IO[bytes]] | None = None


def detect_format(head: bytes) -> str:
    """Name the container format from the first bytes (never from the file name)."""
    if head.startswith(b"\x1f\x8b"):
        return "tar.gz"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "tar.zst"
    if head.startswith(b"BZh"):
        return "tar.bz2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "tar.xz"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if len(head) >= 512 and (head[257:262] == b"ustar" or _v7_checksum_ok(head[:512])):
        return "tar"
    raise ArchiveError("not an archive conda-pack writes (tar, tar.gz, tar.bz2, tar.xz, tar.zst or zip)")


def _v7_checksum_ok(block: bytes) -> bool:
    try:
        stored = int(block[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
    except ValueError:
        return False
    return stored == sum(block[:148]) + 256 + sum(block[156:512])


class Prefetcher:
    """Read a decompressing stream in a background thread, a bounded queue of chunks ahead.

    Hand-written (30 lines) because it is what makes decompression overlap file creation; the
    codecs release the GIL while they work.
    """

    def __init__(self, source: IO[bytes]) -> None:
        self._source = source
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(PREFETCH_DEPTH)
        self._buf = b""
        self._pos = 0
        self._eof = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="decompress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                chunk = self._source.read(CHUNK)
                self._queue.put(chunk)
                if not chunk:
                    return
        except BaseException as exc:  # handed to the reader, raised there
            self._queue.put(exc)

    def read(self, n: int = -1) -> bytes:
        out = []
        while (n < 0 or n > 0) and not self._eof:
            if self._pos >= len(self._buf):
                item = self._queue.get()
                if isinstance(item, BaseException):
                    self._eof = True
                    raise item
                if not item:
                    self._eof = True
                    break
                self._buf, self._pos = item, 0
            take = len(self._buf) - self._pos if n < 0 else min(n, len(self._buf) - self._pos)
            out.append(self._buf[self._pos : self._pos + take])
            self._pos += take
            if n > 0:
                n -= take
        return b"".join(out)

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():  # unblock a producer waiting on a full queue
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.05)


def _decompressor(fmt: str, raw: BinaryIO) -> IO[bytes]:
    if fmt == "tar.gz":
        return cast(IO[bytes], igzip.IGzipFile(fileobj=raw, mode="rb"))  # type: ignore[no-untyped-call]
    if fmt == "tar.zst":
        return zstandard.ZstdDecompressor().stream_reader(raw, read_size=CHUNK, read_across_frames=True)
    if fmt == "tar.bz2":
        return bz2.BZ2File(raw)
    if fmt == "tar.xz":
        return lzma.LZMAFile(raw)
    return raw


def _tar_member(tf: tarfile.TarFile, ti: tarfile.TarInfo) -> Member:
    mtime_ns = int(ti.mtime * 1_000_000_000) if ti.mtime >= 0 else 0
    if ti.isreg():
        return Member(ti.name, Kind.FILE, ti.mode, ti.size, mtime_ns, open=lambda: tf.extractfile(ti))  # type: ignore[arg-type,return-value]
    if ti.isdir():
        return Member(ti.name, Kind.DIR, ti.mode, 0, mtime_ns)
    if ti.issym():
        return Member(ti.name, Kind.SYMLINK, ti.mode, 0, mtime_ns, linkname=ti.linkname)
    if ti.islnk():
        return Member(ti.name, Kind.HARDLINK, ti.mode, 0, mtime_ns, linkname=ti.linkname)
    what = {tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device", tarfile.FIFOTYPE: "FIFO"}
    return Member(ti.name, Kind.OTHER, ti.mode, 0, mtime_ns, describe=what.get(ti.type, f"type {ti.type!r}"))


def _zip_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Member:
    mode = (info.external_attr >> 16) & 0xFFFF
    mtime_ns = 0
    if info.is_dir():
        return Member(info.filename, Kind.DIR, mode & 0o7777 or 0o755, 0, mtime_ns)
    if stat.S_ISLNK(mode):
        if info.file_size > 4096:
            raise ArchiveError(f"member {info.filename}: symlink target of {info.file_size} bytes")
        target = zf.read(info).decode("utf-8", "surrogateescape")
        return Member(info.filename, Kind.SYMLINK, 0o777, 0, mtime_ns, linkname=target)
    if mode and not stat.S_ISREG(mode):
        return Member(info.filename, Kind.OTHER, mode, 0, mtime_ns, describe=f"file of mode {oct(mode)}")
    import time

    mtime_ns = int(time.mktime((*info.date_time, 0, 0, -1))) * 1_000_000_000
    return Member(
        info.filename, Kind.FILE, mode & 0o7777 or 0o644, info.file_size, mtime_ns, open=lambda: zf.open(info)
    )


def members(raw: BinaryIO) -> Iterator[Member]:
    """Yield the archive's members in order; `raw` is the tarball opened for binary reading."""
    head = raw.read(512)
    raw.seek(0)
    fmt = detect_format(head)
    if fmt == "zip":
        with zipfile.ZipFile(raw) as zf:
            for info in zf.infolist():
                yield _zip_member(zf, info)
        return
    stream = Prefetcher(_decompressor(fmt, raw))
    try:
        with tarfile.open(fileobj=stream, mode="r|", bufsize=CHUNK) as tf:  # type: ignore[call-overload]
            for ti in tf:
                yield _tar_member(tf, ti)
    finally:
        stream.close()
