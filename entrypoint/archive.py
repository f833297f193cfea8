"""Where a tarball is opened: its format read from its first bytes, and its members streamed.

Every format conda-pack writes is read as one forward stream of members, so memory stays flat
whatever the archive's size: tar formats by tarstream.TarReader over a decoder (decode.py) in a
background thread, zip by zipindex.py. What the members do to the disk is extract.py's business.
"""

from __future__ import annotations

import contextlib
import enum
import queue
import threading
from collections.abc import Callable, Iterator
from typing import IO, Any, BinaryIO, NamedTuple, Protocol, cast

from entrypoint.errors import ArchiveError

# 256 KiB: per-chunk overhead is nil, and below glibc's mmap threshold (1 MiB chunks fragmented the heap).
CHUNK = 256 << 10
# Chunks decoded ahead of the extractor from a local file, 24 MiB: enough to carry the decoder
# through a stretch of small files, where the extractor falls behind, into one of big files, where
# it catches up. The example's cold start (medians of 6): tar.gz 2.04 -> 1.73 s, tar.zst 1.80 ->
# 1.69 s, for a peak RSS of 44-51 MiB instead of 26-30 with PREFETCH_DEPTH.
READ_AHEAD = 96
# Chunks decoded ahead otherwise, 4 MiB (a conda-pack xz stream): a tar.xz's threads hold queues of
# their own (decode.py) and its dictionaries up to 136 MiB; a download holds its ranged reads.
PREFETCH_DEPTH = 16


class Kind(enum.Enum):
    FILE = "file"
    DIR = "directory"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    OTHER = "special file"


class Readable(Protocol):
    def read(self, n: int, /) -> bytes | memoryview: ...  # may return fewer than n bytes; empty at the end
    def __enter__(self) -> Readable: ...
    def __exit__(self, *exc: Any) -> None: ...


class Member(NamedTuple):
    name: str
    kind: Kind
    mode: int
    size: int
    mtime_ns: int
    linkname: str = ""
    describe: str = ""  # for OTHER: "character device", "FIFO", …
    open: Callable[[], Readable] | None = None


def corrupt(reason: object) -> ArchiveError:
    """A decoder's complaint about the bytes, as the one archive error."""
    return ArchiveError(f"corrupt or truncated archive ({reason})", "pack it again")


def detect_format(head: bytes) -> str:
    """The container format, from the first bytes (never from the file name)."""
    if head.startswith(b"\x1f\x8b"):
        return "tar.gz"
    if head.startswith(b"\x28\xb5\x2f\xfd") or (head[1:4] == b"\x2a\x4d\x18" and head[0] & 0xF0 == 0x50):
        return "tar.zst"  # a frame, or a skippable frame first (pzstd writes one before every frame)
    if head.startswith(b"BZh"):
        return "tar.bz2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "tar.xz"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if len(head) >= 512 and (head[257:262] == b"ustar" or _v7_header(head[:512])):
        return "tar"
    raise ArchiveError("not an archive conda-pack writes (tar, tar.gz, tar.bz2, tar.xz, tar.zst or zip)")


def _v7_header(block: bytes) -> bool:
    from entrypoint.tarstream import checksum_ok

    try:
        return block[148:156].strip(b"\0 ") != b"" and checksum_ok(block)
    except ArchiveError:
        return False


def members(raw: BinaryIO, produced: Callable[[], None] | None = None) -> Iterator[Member]:
    """The archive's members in order. `raw` is the file, or a forward-only stream (`seekable()`
    false: a download), which serves every format but zip. `produced` is called after each chunk
    of tar a decoder gives (a download bounds the bytes that give none)."""
    from entrypoint import decode, zipindex
    from entrypoint.tarstream import TarReader

    head = raw.read(512)
    if raw.seekable():
        raw.seek(0)
    else:
        raw = cast(BinaryIO, Replay(head, raw))
    fmt = detect_format(head)
    if fmt == "zip":
        if not raw.seekable():
            raise NeedsRandomAccess("a zip archive needs random access (its index is at its end), not a stream")
        yield from zipindex.members(raw)
        return
    if fmt == "tar":  # nothing to decode: a thread would only add hand-offs
        yield from TarReader(_Chunks(raw, produced).next_chunk)
        return
    depth = READ_AHEAD if raw.seekable() and fmt != "tar.xz" else PREFETCH_DEPTH
    stream = Prefetcher(decode.decoder(fmt, raw), depth, produced)
    try:
        yield from TarReader(stream.next_chunk)
    finally:
        stream.close()


class NeedsRandomAccess(ArchiveError):
    """A zip archive (its index is at its end) given as a forward-only stream."""


class Prefetcher:
    """Decode in a background thread, `depth` chunks at most ahead of the extractor: the
    decoders and the extractor's system calls release the GIL, so the two overlap."""

    def __init__(self, source: IO[bytes], depth: int, produced: Callable[[], None] | None = None) -> None:
        self._source = source
        self._produced = produced
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(depth)
        self._eof = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="decompress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                chunk = self._source.read(CHUNK)
                if chunk and self._produced is not None:
                    self._produced()
                self._queue.put(chunk)
                if not chunk:
                    return
        except BaseException as exc:  # handed to the reader, raised there
            self._queue.put(exc)

    def next_chunk(self) -> bytes:
        """The next decoded chunk, b"" at the end of the stream."""
        if self._eof:
            return b""
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._eof = True
            raise item
        self._eof = not item
        return item

    def close(self) -> None:
        self._stop.set()
        drain(self._thread, self._queue)
        self._source.close()  # a decoding process (decode.py) ends only now: the thread read its pipe until here


def drain(producer: threading.Thread, out: queue.Queue[Any]) -> None:
    """Wait for a producer told to stop, emptying its queue so that a put blocked on it returns."""
    while producer.is_alive():
        with contextlib.suppress(queue.Empty):
            out.get(timeout=0.05)


class _Chunks:
    """An uncompressed tar's chunks, read in the calling thread."""

    def __init__(self, source: IO[bytes], produced: Callable[[], None] | None = None) -> None:
        self._source = source
        self._produced = produced

    def next_chunk(self) -> bytes:
        chunk = self._source.read(CHUNK)
        if chunk and self._produced is not None:
            self._produced()
        return chunk


class Replay:
    """A forward-only stream with the bytes read for format detection put back."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self._head, self._rest = head, rest

    def seekable(self) -> bool:
        return False

    def read(self, n: int = -1) -> bytes:
        if not self._head:
            return self._rest.read(n)
        if 0 <= n < len(self._head):
            out, self._head = self._head[:n], self._head[n:]
            return out
        out, self._head = self._head, b""
        return out + self._rest.read(-1 if n < 0 else n - len(out))

    def readinto(self, buffer: memoryview | bytearray) -> int:  # isal's C gzip reader calls it
        data = self.read(len(buffer))
        memoryview(buffer).cast("B")[: len(data)] = data
        return len(data)
