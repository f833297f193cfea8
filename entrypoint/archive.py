"""Where a tarball is opened: format detection from content, fast decompression, member stream.

Every format conda-pack writes that makes sense here is read as one forward stream of members,
so memory stays flat whatever the archive's size. Decompression runs in a background thread, so
it overlaps with the extractor's system calls (which release the GIL).
"""

from __future__ import annotations

import bz2
import contextlib
import enum
import lzma
import queue
import re
import stat
import struct
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any, BinaryIO, Protocol, cast

import zstandard
from isal import igzip, isal_zlib

from entrypoint.errors import ArchiveError

# 256 KiB: big enough that per-chunk overhead is nil, small enough to stay below glibc's mmap
# threshold games (1 MiB chunks fragmented the heap: +20 MB of RSS on the seed environment).
CHUNK = 256 << 10
PREFETCH_DEPTH = 16  # chunks buffered ahead of the extractor: bounds memory at 4 MiB

# Errors a codec or zipfile raises on bad bytes; all become one ArchiveError naming the archive.
CORRUPT = (
    EOFError,
    zlib.error,
    lzma.LZMAError,
    zstandard.ZstdError,
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    UnicodeDecodeError,
    ValueError,
    cast("type[Exception]", isal_zlib.error),  # deflate errors ("Invalid lookback distance"); the stub says instance
)
# What conda-pack writes (ZIP_DEFLATED; stored, as zip tools write empty files). Not bzip2 nor lzma:
# zipfile decodes those without an output bound and lzma with the dictionary the member asks for,
# so a 20 KB zip of one bzip2 member took 1.2 GB resident.
ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
ZIP_METHOD_NAMES = {zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "lzma"}


def corrupt(exc: BaseException, where: str = "") -> ArchiveError:
    """A codec's or zipfile's complaint about the bytes (CORRUPT, or an OSError without errno such
    as gzip.BadGzipFile), as the one line naming the archive (`where`)."""
    return ArchiveError(f"{where + ': ' if where else ''}corrupt or truncated archive ({exc}); pack it again")


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


@dataclass(slots=True)
class Member:
    name: str
    kind: Kind
    mode: int
    size: int
    mtime_ns: int
    linkname: str = ""
    describe: str = ""  # for OTHER: "character device", "FIFO", …
    open: Callable[[], Readable] | None = None


def detect_format(head: bytes) -> str:
    """Name the container format from the first bytes (never from the file name)."""
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
    if len(head) >= 512 and (head[257:262] == b"ustar" or _v7_checksum_ok(head[:512])):
        return "tar"
    raise ArchiveError("not an archive conda-pack writes (tar, tar.gz, tar.bz2, tar.xz, tar.zst or zip)")


def _v7_checksum_ok(block: bytes) -> bool:
    try:
        stored = int(block[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
    except ValueError:
        return False
    return stored in (_header_sum(block), _signed_header_sum(block))


class Prefetcher:
    """Read a decompressing stream in a background thread, a bounded queue of chunks ahead.

    Hand-written (30 lines) because it is what makes decompression overlap file creation: the
    extractor's open/write/close release the GIL, and isal, zstandard, bz2 and lzma release it
    while they work. The overlap is partial (measured with isal 1.9 on two cores: decoding the
    seed beside a busy Python loop took 2.4-2.6 s, against 1.5 and 1.85 s apart), as each chunk's
    hand-over waits for the GIL.
    """

    def __init__(self, source: IO[bytes], produced: Callable[[], None] | None = None) -> None:
        self._source = source
        self._produced = produced
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(PREFETCH_DEPTH)
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
        """The next decompressed chunk, b"" at the end of the stream."""
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
        while self._thread.is_alive():  # unblock a producer waiting on a full queue
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.05)


class _Chunks:
    """The same interface over an uncompressed tar, read in this thread."""

    def __init__(self, source: IO[bytes], produced: Callable[[], None] | None = None) -> None:
        self._source = source
        self._produced = produced

    def next_chunk(self) -> bytes:
        chunk = self._source.read(CHUNK)
        if chunk and self._produced is not None:
            self._produced()
        return chunk


def _decompressor(fmt: str, raw: BinaryIO) -> IO[bytes]:
    if fmt == "tar.gz":
        return cast(IO[bytes], igzip.IGzipFile(fileobj=raw, mode="rb"))  # type: ignore[no-untyped-call]
    if fmt == "tar.zst":
        return zstandard.ZstdDecompressor().stream_reader(raw, read_size=CHUNK, read_across_frames=True)
    if fmt == "tar.bz2":
        return cast(IO[bytes], _Bz2Reader(raw))
    if fmt == "tar.xz":
        return cast(IO[bytes], _XzReader(raw))
    return raw


class _Bz2Reader:
    """Concatenated bzip2 streams (pbzip2 writes several), then zero padding at most.

    Hand-written (BZ2File ignores whatever follows a stream that is not bzip2, where the gzip,
    xz and zstd readers refuse it): anything after the archive but zeros, which bzip2 and GNU
    tar accept (as isal does after gzip), is refused.
    """

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._dec = bz2.BZ2Decompressor()

    def read(self, n: int) -> bytes:
        if n == 0:
            return b""
        while True:
            if self._dec.eof:
                rest = self._dec.unused_data or self._raw.read(CHUNK)
                if not rest:
                    return b""
                if rest[:1] == b"\0":
                    self._padding(rest)
                    return b""
                self._dec = bz2.BZ2Decompressor()
                out = self._dec.decompress(rest, n)  # anything but another stream raises OSError here
            else:
                data = b""
                if self._dec.needs_input and not (data := self._raw.read(CHUNK)):
                    raise EOFError("Compressed file ended before the end-of-stream marker was reached")
                out = self._dec.decompress(data, n)
            if out:
                return out

    def _padding(self, rest: bytes) -> None:
        """Zeros to the end of the file, or an error (nothing may follow padding)."""
        while rest:
            if rest.count(0) != len(rest):
                raise EOFError("data after the bzip2 stream's zero padding")
            rest = self._raw.read(CHUNK)


# What an xz stream may ask its decoder to allocate: a 128 MiB dictionary (zstd's decoder allows
# the same window by default; xz -9 uses 64 MiB, conda-pack's default level 8 MiB) and its state.
XZ_MEMLIMIT = 136 << 20


class _XzReader:
    """Concatenated xz streams, decoded with a memory limit.

    Hand-written (LZMAFile takes no limit) because a stream's header picks the dictionary size,
    up to 1.5 GiB, and the decoder fills that much as it writes: a 64 KB tar.xz of zeros took
    450 MB resident, which a container's memory limit ends with a kill, not an error line.
    """

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._dec = self._decoder()
        self._done = False

    @staticmethod
    def _decoder() -> lzma.LZMADecompressor:
        return lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=XZ_MEMLIMIT)

    def read(self, n: int) -> bytes:
        while not self._done:
            if self._dec.eof:
                self._next_stream(self._dec.unused_data)
                continue
            data = b""
            if self._dec.needs_input and not (data := self._raw.read(CHUNK)):
                raise EOFError("Compressed file ended before the end-of-stream marker was reached")
            try:
                out = self._dec.decompress(data, n)
            except lzma.LZMAError as exc:
                if "memory" not in str(exc).lower():
                    raise
                raise ArchiveError(
                    f"its xz compression needs more than {XZ_MEMLIMIT >> 20} MiB of memory to decode "
                    "(a dictionary over 128 MiB); pack it again with a lower level"
                ) from None
            if out:
                return out
        return b""

    def _next_stream(self, rest: bytes) -> None:
        """After a stream: what follows is the end, or another stream, either after stream padding
        (NUL bytes, a multiple of four, which xz and GNU tar accept)."""
        padding = 0
        while not (data := rest.lstrip(b"\0")):
            padding += len(rest)
            if not (rest := self._raw.read(CHUNK)):
                if padding % 4:
                    raise EOFError("xz stream padding not a multiple of four bytes")
                self._done = True
                return
        if (padding + len(rest) - len(data)) % 4:
            raise EOFError("xz stream padding not a multiple of four bytes")
        rest = data
        self._dec = self._decoder()
        self._dec.decompress(rest, 0)  # buffered, decoded by the next read: anything but xz raises there


BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
MAX_META = 1 << 20  # longest pax header or GNU long name we accept
# Bounds that keep metadata-only archives from costing minutes or gigabytes: real archives have
# at most a pax header, a long name and a long link name before a member, and a few dozen bytes
# of pax records per member (conda-pack: the mtime).
MAX_META_HEADERS = 8  # in a row, before one member
MAX_META_TOTAL = 256 << 20  # pax and long-name bytes in the whole archive
PAX_KEYS = frozenset({"path", "linkpath", "size", "mtime"})  # the pax records we read (and SPARSE ones)
MAX_MTIME_NS = (1 << 63) * 1_000_000_000 - 1  # the last second a 64-bit time_t holds
MAX_TRAILER = 64 << 20  # zero padding after the end-of-archive marker (tar -b 2048 writes 1 MiB records)
TYPES = {
    b"0": Kind.FILE, b"\0": Kind.FILE, b"7": Kind.FILE,
    b"1": Kind.HARDLINK, b"2": Kind.SYMLINK, b"5": Kind.DIR,
}  # fmt: skip
_NO_RECORDS: dict[str, str] = {}  # shared, never written to
SPECIAL = {b"3": "character device", b"4": "block device", b"6": "FIFO", b"S": "GNU sparse file"}
SPARSE = "GNU.sparse."  # pax records of a sparse file (GNU formats 0.x and 1.0): its data is a map, not the file
# The sparse keywords GNU tar reads (it ignores other GNU.sparse.* ones), kept by name: keeping
# every key with the prefix let global headers of distinct ones hold 350,000 strings (91 MiB).
SPARSE_KEYS = frozenset(
    SPARSE + k for k in ("major", "minor", "name", "realsize", "size", "numblocks", "offset", "numbytes", "map")
)
_KEPT_KEYS_BYTES = frozenset(k.encode() for k in PAX_KEYS | SPARSE_KEYS)


def _nts(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _number(field: bytes) -> int:
    try:  # the usual "0000644\0" in one C call; anything else (NULs inside, base-256) below
        return int(field.rstrip(b"\0 ") or b"0", 8)
    except ValueError:
        pass
    if field[:1] == b"\x80":  # GNU base-256, for sizes over 8 GiB
        return int.from_bytes(field[1:], "big")
    if field[:1] == b"\xff":
        raise ArchiveError("negative number in a tar header (corrupt archive)")
    digits = field.split(b"\0", 1)[0].strip(b" ")
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise ArchiveError(f"bad number {digits[:20]!r} in a tar header (corrupt archive)") from None


def _header_sum(block: bytes) -> int:
    """What a 512-byte header's checksum field must hold: the sum of its bytes with the field
    itself counted as eight spaces, in three C calls, not 512 Python additions (~4 µs, twice a
    member). Hand-written trick: Adler-32's low half is 1 + the sum of the bytes modulo 65521,
    and at most 256 bytes sum to at most 65,280, so for each piece (148, 256 and 100 bytes) it
    is exactly 1 + their sum."""
    adler32 = zlib.adler32
    return (adler32(block[:148]) & 0xFFFF) + (adler32(block[156:412]) & 0xFFFF) + (adler32(block[412:]) & 0xFFFF) + 253


def _signed_header_sum(block: bytes) -> int:
    """The same sum with the bytes taken as signed chars, as some old tars (Sun, early GNU)
    wrote it; GNU tar and tarfile accept either. Only computed when the unsigned sum differs."""
    high = sum(1 for b in block[:148] if b & 0x80) + sum(1 for b in block[156:512] if b & 0x80)
    return _header_sum(block) - 256 * high


# The pax header conda-pack (Python's tarfile) writes before nearly every member: the mtime alone.
_PAX_MTIME_ONLY = re.compile(rb"(\d{2}) mtime=(\d{1,20})(?:\.(\d{1,20}))?\n")


def _pax_mtime_only(data: bytes) -> int | None:
    """The mtime in nanoseconds if `data` is that usual header, in a few C calls; else None (the
    general parser then reads it, and refuses it if malformed)."""
    if (m := _PAX_MTIME_ONLY.fullmatch(data)) is None or int(m[1]) != len(data):
        return None
    return int(m[2]) * 1_000_000_000 + (int(m[3][:9].ljust(9, b"0")) if m[3] else 0)


def _pax_records(data: bytes) -> dict[str, str]:
    """Parse "<length> <key>=<value>\\n" records (POSIX.1-2001 extended headers); keep those we read
    (PAX_KEYS, SPARSE_KEYS): a megabyte of distinct keys would otherwise cost tens of MB, and global
    ones would be copied into every member."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos, pos + 20)
        # Decimal digits only (int() also takes "+13", "1_3"), and a record within the header: GNU
        # tar refuses both, tarfile ignores the record, so reading it would unpack another tree.
        digits = data[pos:space] if space > pos else b""
        length = int(digits) if digits.isdigit() else 0
        record = data[space + 1 : pos + length]
        if length <= 0 or pos + length > len(data) or not record.endswith(b"\n") or b"=" not in record:
            raise ArchiveError("malformed pax header (corrupt archive)")
        key, value = record[:-1].split(b"=", 1)
        if key in _KEPT_KEYS_BYTES:
            out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _pax_mtime_ns(value: str) -> int | None:
    """A pax mtime ("1700000000.5") in nanoseconds, None if it is no decimal number ("nan", "1e400")."""
    sec, _, frac = value.partition(".")
    digits = sec.removeprefix("-")
    if not (digits.isascii() and digits.isdigit() and (frac == "" or (frac.isascii() and frac.isdigit()))):
        return None
    try:
        return max(0, int(sec) * 1_000_000_000 + int((frac + "000000000")[:9]))
    except ValueError:  # more than 4,300 digits: Python's bound on converting them
        return None


class TarReader:
    """A forward-only tar reader (ustar, GNU long names, pax) over a decompressed stream.

    Hand-written instead of `tarfile` because tarfile's stream mode copies its whole buffer on
    every header read and keeps every TarInfo for the archive's life: several seconds and tens of
    MiB on a 17,000-file environment. This one parses headers from the stream, keeps nothing,
    and verifies every header checksum.
    """

    def __init__(self, chunks: Prefetcher | _Chunks) -> None:
        # One decompressed chunk at a time, and a position in it: headers are sliced from it and
        # file data handed out as views of it, so no byte is copied between codec and write(2).
        self._next_chunk = chunks.next_chunk
        self._buf = b""
        self._pos = 0
        self.remaining = 0  # unread data bytes of the current member
        self.padding = 0
        self._open = lambda: self  # a member's `open`: the reader itself reads its data (no object a member)
        self._meta_total = 0

    def _end(self) -> None:
        """After the first zero block: read the stream to its end, so the codec checks its CRC and
        length (gzip, xz and zstd check them only there), and refuse anything but zero padding:
        members after a lone zero block or a second archive would otherwise be dropped silently."""
        self._skip_rest()
        left = MAX_TRAILER
        while data := self.view(CHUNK):
            if bytes(data).count(0) != len(data):
                raise ArchiveError(
                    "data after the end-of-archive marker (a lone zero block, or archives concatenated); pack it again"
                )
            left -= len(data)
            if left < 0:
                raise ArchiveError(
                    f"more than {MAX_TRAILER >> 20} MiB after the end-of-archive marker (corrupt or hostile archive)"
                )

    # The current member's data, as Member.open() gives it; what is not read is skipped.
    def __enter__(self) -> TarReader:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def read(self, n: int) -> memoryview | bytes:
        """Up to n bytes of the current member's data, without copying: a view of the
        decompressed chunk they are in."""
        n = min(n, self.remaining)
        if n <= 0:
            return b""
        data = self.view(n)
        if not data:
            raise ArchiveError("archive ends inside a member (truncated or corrupt)")
        self.remaining -= len(data)
        return data

    def view(self, n: int) -> memoryview | bytes:
        """Up to n (> 0) next bytes, as a view of the current chunk; empty only at the end."""
        if self._pos >= len(self._buf):
            self._buf, self._pos = self._next_chunk(), 0
            if not self._buf:
                return b""
        pos = self._pos
        self._pos = end = min(pos + n, len(self._buf))
        return memoryview(self._buf)[pos:end]

    def _read(self, n: int) -> bytes:
        """Exactly n bytes (headers and metadata), or b"" if the archive ends right here."""
        pos, end = self._pos, self._pos + n
        if end <= len(self._buf):  # the usual case: within the current chunk
            self._pos = end
            return self._buf[pos:end]
        parts: list[bytes] = []
        while n > 0:
            data = self.view(n)
            if not data:
                if parts:
                    raise ArchiveError("archive ends inside a member header (truncated or corrupt)")
                return b""
            parts.append(bytes(data))
            n -= len(data)
        return b"".join(parts)

    def _skip_rest(self) -> None:
        n, self.remaining, self.padding = self.remaining + self.padding, 0, 0
        while n > 0:
            left = len(self._buf) - self._pos
            if n <= left:
                self._pos += n
                return
            n -= left
            self._buf, self._pos = self._next_chunk(), 0
            if not self._buf:
                raise ArchiveError("archive ends inside a member (truncated or corrupt)")

    def _meta(self, size: int) -> bytes:
        if size > MAX_META:
            raise ArchiveError(f"tar metadata block of {size} bytes (corrupt or hostile archive)")
        self._meta_total += size
        if self._meta_total > MAX_META_TOTAL:
            raise ArchiveError(f"more than {MAX_META_TOTAL >> 20} MiB of tar metadata (corrupt or hostile archive)")
        data = self._read(size)
        self.padding = -size % BLOCK  # skipped before the next header
        if len(data) != size:
            raise ArchiveError("archive ends inside a member header (truncated or corrupt)")
        return data

    def __iter__(self) -> Iterator[Member]:
        global_pax: dict[str, str] = {}
        pax: dict[str, str] = _NO_RECORDS
        pax_mtime_ns: int | None = None  # the usual mtime-only pax header, parsed at once
        long_name = long_link = None
        metas = 0  # metadata headers since the last member
        file, other = Kind.FILE, Kind.OTHER  # locals: an Enum attribute costs ~0.2 µs on 3.11
        while True:
            self._skip_rest()
            header = self._read(BLOCK)
            if not header:
                raise ArchiveError("archive ends without its end-of-archive marker (truncated)")
            if header == ZERO_BLOCK:
                self._end()
                return
            if (stored := _number(header[148:156])) != _header_sum(header) and stored != _signed_header_sum(header):
                raise ArchiveError("bad tar header checksum (corrupt archive)")
            flag = header[156:157]
            size = _number(header[124:136])
            if size < 0:  # "-5" parses as octal too; it would misalign the next header
                raise ArchiveError("negative size in a tar header (corrupt archive)")
            if flag in (b"x", b"g", b"L", b"K"):
                metas += 1
                if metas > MAX_META_HEADERS:
                    raise ArchiveError(
                        f"more than {MAX_META_HEADERS} tar metadata headers in a row (corrupt or hostile archive)"
                    )
                data = self._meta(size)
                if (flag == b"x" and (pax is not _NO_RECORDS or pax_mtime_ns is not None)) or (
                    (flag == b"L" and long_name is not None) or (flag == b"K" and long_link is not None)
                ):  # GNU tar reads the last, tarfile the first: a tarfile-based check would see another name
                    raise ArchiveError(f"two {flag.decode()!r} headers for one member (corrupt or hostile archive)")
                if flag == b"x":
                    pax_mtime_ns = _pax_mtime_only(data)
                    pax = _NO_RECORDS if pax_mtime_ns is not None else _pax_records(data)
                elif flag == b"g":
                    global_pax.update(_pax_records(data))
                elif flag == b"L":
                    long_name = _nts(data)
                else:
                    long_link = _nts(data)
                continue
            metas = 0
            # What a pax header or a GNU long name gives is not parsed again from the ustar fields.
            fields = {**global_pax, **pax} if global_pax else pax
            if "path" in fields:
                name = fields["path"]
            elif long_name is not None:  # even empty: GNU tar and tarfile do not fall back on the ustar name
                name = long_name
            else:
                name = _nts(header[0:100])
                if header[345] != 0 and header[257:263] == b"ustar\0":  # any version, as GNU tar and tarfile
                    name = _nts(header[345:500]) + "/" + name
            if "size" in fields:
                try:
                    size = int(fields["size"])
                except ValueError:
                    raise ArchiveError(f"member {name}: bad pax size (corrupt archive)") from None
                if size < 0:  # would shrink the unpacked-bytes total and misalign the next header
                    raise ArchiveError(f"member {name}: negative pax size (corrupt archive)")
            if pax_mtime_ns is not None:
                mtime_ns = pax_mtime_ns
            elif fields.get("mtime"):  # an empty value deletes the record (POSIX): the header's time
                if (parsed := _pax_mtime_ns(fields["mtime"])) is None:
                    raise ArchiveError(f"member {name}: bad pax mtime {fields['mtime'][:40]!r} (corrupt archive)")
                mtime_ns = parsed
            else:
                mtime_ns = _number(header[136:148]) * 1_000_000_000
            if mtime_ns > MAX_MTIME_NS:  # what utime(2) would refuse; checked here so `inspect` refuses it too
                raise ArchiveError(f"member {name}: modification time out of range (corrupt archive)")
            mode = _number(header[100:108]) & 0o7777
            kind = TYPES.get(flag, other)
            if fields and any(k.startswith(SPARSE) for k in fields):  # a pax (GNU 1.0) sparse file
                kind, flag, name = other, b"S", fields.get(f"{SPARSE}name", name)
            elif kind is file and name.endswith("/"):  # old tars' directories (v7, BSD): GNU tar makes one too
                kind = Kind.DIR
            if kind is file:
                self.remaining, self.padding = size, -size % BLOCK
                pax, pax_mtime_ns, long_name, long_link = _NO_RECORDS, None, None, None
                yield Member(name, kind, mode, size, mtime_ns, open=self._open)
                continue
            # No data follows a directory or a link, whatever its size field says (POSIX lets a
            # directory's hold an allocation hint): GNU tar and tarfile read the next header right
            # after it. Skipping `size` bytes would drop the members there, or read others that
            # both hide inside a file's data.
            if kind is other:
                self.remaining, self.padding = size, -size % BLOCK
            if "linkpath" in fields:
                linkname = fields["linkpath"]
            else:
                linkname = long_link if long_link is not None else _nts(header[157:257])
            pax, pax_mtime_ns, long_name, long_link = _NO_RECORDS, None, None, None
            describe = SPECIAL.get(flag, f"member of unknown type {flag!r}")
            yield Member(name, kind, mode, 0, mtime_ns, linkname=linkname, describe=describe)


# General-purpose flag bits this reader (like zipfile) cannot decode: encryption, patched data.
ZIP_UNREADABLE = {0x1: "encrypted", 0x20: "compressed patched data", 0x40: "strongly encrypted"}
_ZIP_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")  # a central directory record, as zipfile names its fields
_ZIP_LOCAL = struct.Struct("<4s2B4HL2L2H")
_ZIP_EOCD = struct.Struct("<4s4H2LH")
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
ZIP_INDEX_CHUNK = 1 << 20  # central directory bytes parsed at a time: ~10,000 records


@dataclass(slots=True)
class _ZipEntry:
    name: str
    raw_name: bytes
    flags: int
    method: int
    crc: int
    compress_size: int
    file_size: int
    offset: int
    mode: int
    date_time: tuple[int, int, int, int, int, int]


def _zip_entries(raw: BinaryIO) -> Iterator[_ZipEntry]:
    """The central directory's records in order, parsed a chunk at a time.

    Hand-written because zipfile.ZipFile reads the whole directory into a ZipInfo per member (and a
    dict of them) before the first one: ~800 bytes each, 121 MiB resident for a 100,000-file zip.
    """
    count, size, start, shift = _zip_directory(raw)
    pos, buf, at = start, b"", 0
    for _ in range(count):
        while pos < start + size and len(buf) - at < _zip_record_size(buf, at):
            raw.seek(pos)
            more = raw.read(min(ZIP_INDEX_CHUNK, start + size - pos))
            if not more:
                break
            pos += len(more)
            buf, at = buf[at:] + more, 0
        if len(buf) - at < _ZIP_CENTRAL.size:
            raise zipfile.BadZipFile("truncated central directory")
        rec = _ZIP_CENTRAL.unpack_from(buf, at)
        name_at = at + _ZIP_CENTRAL.size
        end = name_at + rec[12] + rec[13] + rec[14]
        if rec[0] != b"PK\x01\x02" or len(buf) < end:
            raise zipfile.BadZipFile("bad magic number for central directory")
        raw_name = buf[name_at : name_at + rec[12]]
        extra = buf[name_at + rec[12] : name_at + rec[12] + rec[13]]
        at = end
        flags, method, t, d = rec[5], rec[6], rec[7], rec[8]
        name = raw_name.decode("utf-8" if flags & 0x800 else "cp437")
        compress_size, file_size, offset = _zip64_fields(extra, rec[10], rec[11], rec[18])
        offset += shift
        date_time = ((d >> 9) + 1980, (d >> 5) & 0xF, d & 0x1F, t >> 11, (t >> 5) & 0x3F, (t & 0x1F) * 2)
        mode = (rec[17] >> 16) & 0xFFFF
        yield _ZipEntry(name, raw_name, flags, method, rec[9], compress_size, file_size, offset, mode, date_time)
    if at < len(buf) or pos < start + size:  # zipfile and unzip read these records: never drop them unsaid
        raise zipfile.BadZipFile(f"the central directory holds more records than the {count} its end counts")


def _zip_record_size(buf: bytes, at: int) -> int:
    """The length of the central directory record at `at`, as far as the bytes there tell."""
    if len(buf) - at < _ZIP_CENTRAL.size:
        return _ZIP_CENTRAL.size
    return _ZIP_CENTRAL.size + int(sum(struct.unpack_from("<3H", buf, at + 28)))


def _zip_directory(raw: BinaryIO) -> tuple[int, int, int, int]:
    """Number of records, size and absolute start of the central directory (zip64 included), and
    the shift of every offset (bytes prepended to the archive, as zipfile allows)."""
    end = raw.seek(0, 2)
    tail_start = max(0, end - _ZIP_EOCD.size - 0xFFFF)
    raw.seek(tail_start)
    tail = raw.read(end - tail_start)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < _ZIP_EOCD.size:
        raise zipfile.BadZipFile("File is not a zip file")
    _, _, _, _, count, size, offset, _ = _ZIP_EOCD.unpack_from(tail, at)
    where = tail_start + at
    locator = at - _ZIP64_LOCATOR.size
    if locator >= 0 and tail[locator : locator + 4] == b"PK\x06\x07":
        raw.seek(where - _ZIP64_LOCATOR.size - _ZIP64_EOCD.size)
        rec = raw.read(_ZIP64_EOCD.size)
        if len(rec) != _ZIP64_EOCD.size or rec[:4] != b"PK\x06\x06":
            raise zipfile.BadZipFile("Corrupt zip64 end of central directory record")
        count, size, offset = _ZIP64_EOCD.unpack(rec)[7:10]
        where -= _ZIP64_LOCATOR.size + _ZIP64_EOCD.size
    start = where - size
    if start < 0 or offset > start:
        raise zipfile.BadZipFile("Bad offset for central directory")
    return count, size, start, start - offset


def _zip64_fields(extra: bytes, compress_size: int, file_size: int, offset: int) -> tuple[int, int, int]:
    """The sizes and offset, from the zip64 extra field where the record says 0xFFFFFFFF."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        if tag == 1:
            if pos + 4 + min(length, 24) > len(extra):  # as zipfile says it (struct's error is no corrupt-archive one)
                raise zipfile.BadZipFile(f"Corrupt extra field {tag:04x} (size={length})")
            values = list(struct.unpack_from(f"<{min(length, 24) // 8}Q", extra, pos + 4))
            if file_size == 0xFFFFFFFF and values:
                file_size = values.pop(0)
            if compress_size == 0xFFFFFFFF and values:
                compress_size = values.pop(0)
            if offset == 0xFFFFFFFF and values:
                offset = values.pop(0)
            break
        pos += 4 + length
    return compress_size, file_size, offset


def _zip_member(raw: BinaryIO, info: _ZipEntry) -> Member:
    how = next((what for bit, what in ZIP_UNREADABLE.items() if info.flags & bit), None)
    if how is None and info.method not in ZIP_METHODS:
        how = f"compressed with {ZIP_METHOD_NAMES.get(info.method, f'method {info.method}')}"
    if how is not None:
        raise ArchiveError(f"member {info.name}: {how}, which conda-pack never writes; pack it again")
    mode = info.mode
    mtime_ns = 0
    if info.name.endswith("/"):
        return Member(info.name, Kind.DIR, mode & 0o7777 or 0o755, 0, mtime_ns)
    if stat.S_ISLNK(mode):
        if info.file_size > 4096:
            raise ArchiveError(f"member {info.name}: symlink target of {info.file_size} bytes")
        with _ZipData(raw, info) as f:
            target = b"".join(iter(lambda: f.read(4096), b"")).decode("utf-8", "surrogateescape")
        return Member(info.name, Kind.SYMLINK, 0o777, 0, mtime_ns, linkname=target)
    if stat.S_IFMT(mode) and not stat.S_ISREG(mode):  # permission bits alone (ZipFile.writestr): a file, as unzip does
        return Member(info.name, Kind.OTHER, mode, 0, mtime_ns, describe=f"file of mode {oct(mode)}")
    import time

    mtime_ns = int(time.mktime((*info.date_time, 0, 0, -1))) * 1_000_000_000
    return Member(
        info.name, Kind.FILE, mode & 0o7777 or 0o644, info.file_size, mtime_ns, open=lambda: _ZipData(raw, info)
    )


class _ZipData:
    """One member's data, stored or deflated, checked against its size and CRC-32 at its end.

    It seeks before every read: the central directory is read from the same file between members.
    """

    def __init__(self, raw: BinaryIO, info: _ZipEntry) -> None:
        self._raw, self._info = raw, info
        with _zip_reading():
            raw.seek(info.offset)
            header = raw.read(_ZIP_LOCAL.size + len(info.raw_name))
        if len(header) != _ZIP_LOCAL.size + len(info.raw_name) or header[:4] != b"PK\x03\x04":
            raise zipfile.BadZipFile(f"member {info.name}: bad magic number for its file header")
        fields = _ZIP_LOCAL.unpack_from(header)
        if header[_ZIP_LOCAL.size :] != info.raw_name:
            raise zipfile.BadZipFile(f"member {info.name}: named differently in its file header")
        self._pos = info.offset + _ZIP_LOCAL.size + fields[10] + fields[11]
        self._packed = info.compress_size  # compressed bytes not read yet
        self._left = info.file_size  # output bytes not returned yet
        self._crc = 0
        self._inflate = zlib.decompressobj(-15) if info.method == zipfile.ZIP_DEFLATED else None

    def __enter__(self) -> _ZipData:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def read(self, n: int) -> bytes:
        n = min(n, self._left)
        if n <= 0:
            self._check_end()
            return b""
        while True:
            if self._inflate is not None and self._inflate.unconsumed_tail:
                data = self._inflate.unconsumed_tail
            else:
                data = self._packed_bytes(CHUNK if self._inflate is not None else n)
            out = data if self._inflate is None else self._inflate.decompress(data, n)
            if out:
                break
            # At the deflate stream's end nothing more comes out: zlib then keeps what followed
            # the end as unconsumed input too (once output was capped), fed again for nothing.
            if not data or (self._inflate is not None and self._inflate.eof):
                raise EOFError(f"member {self._info.name}: data ends {self._left} bytes before its size")
        self._left -= len(out)
        self._crc = zlib.crc32(out, self._crc)
        if not self._left:  # checked with the last bytes, as zipfile does: the extractor reads no further
            self._check_end()
        return out

    def _packed_bytes(self, n: int) -> bytes:
        n = min(n, self._packed)
        if n <= 0:
            return b""
        with _zip_reading():
            self._raw.seek(self._pos)
            data = self._raw.read(n)
        self._pos += len(data)
        self._packed -= len(data)
        if not data:
            raise EOFError(f"member {self._info.name}: the archive ends inside its data")
        return data

    def _check_end(self) -> None:
        if self._crc != self._info.crc:
            raise zipfile.BadZipFile(f"Bad CRC-32 for file {self._info.name!r}")


@contextlib.contextmanager
def _zip_reading() -> Iterator[None]:
    """An archive's offsets may point before its start (OSError EINVAL on seek), which must not
    read as a failure to write the cache."""
    try:
        yield
    except OSError as exc:
        if exc.errno is None:
            raise  # a codec's complaint: already corrupt-archive material (CORRUPT)
        raise ArchiveError(f"corrupt zip archive ({exc.strerror}); pack it again") from None


class NeedsRandomAccess(ArchiveError):
    """A zip archive (its index is at its end) given as a forward-only stream."""


class Replay:
    """A forward-only stream (a download) with the bytes read for format detection put back."""

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


def members(raw: BinaryIO, produced: Callable[[], None] | None = None) -> Iterator[Member]:
    """Yield the archive's members in order; `raw` is the tarball opened for binary reading, or a
    forward-only stream (`seekable()` false), which serves every format but zip.

    A tar's `produced` is called, in the thread reading `raw`, after each chunk of tar the codec
    gives: a download bounds the bytes it reads without any (a gzip reader skips zero padding
    after its member, and empty members, without a byte of output, so endless ones would hang)."""
    head = raw.read(512)
    if raw.seekable():
        raw.seek(0)
    else:
        raw = cast(BinaryIO, Replay(head, raw))
    fmt = detect_format(head)
    if fmt == "zip":
        if not raw.seekable():
            raise NeedsRandomAccess("a zip archive needs random access (its index is at its end), not a stream")
        with _zip_reading():
            for info in _zip_entries(raw):
                yield _zip_member(raw, info)
        return
    if fmt == "tar":  # nothing to decompress: a thread would only add handoffs
        yield from TarReader(_Chunks(raw, produced))
        return
    stream = Prefetcher(_decompressor(fmt, raw), produced)
    try:
        yield from TarReader(stream)
    finally:
        stream.close()
