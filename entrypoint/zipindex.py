"""Members of a zip archive, read from its central directory a chunk at a time.

Hand-written rather than zipfile.ZipFile, which reads the whole directory into a ZipInfo per
member before the first one (121 MiB resident for 100,000 files). Members are stored or deflated,
as conda-pack writes them; each one's size and CRC-32 are checked as its last bytes are read.
"""

from __future__ import annotations

import contextlib
import stat
import struct
import time
import zipfile
import zlib
from collections.abc import Iterator
from typing import BinaryIO, NamedTuple

from entrypoint.archive import CHUNK, Kind, Member, corrupt
from entrypoint.errors import ArchiveError

# Flag bits a reader cannot decode: encryption, patched data.
UNREADABLE = {0x1: "encrypted", 0x20: "compressed patched data", 0x40: "strongly encrypted"}
# Not bzip2 nor lzma: zipfile decodes those without an output bound, lzma with the dictionary the
# member asks for, which a few KB of zip can make gigabytes.
METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
METHOD_NAMES = {zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "lzma"}
_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")  # a central directory record, as zipfile names its fields
_LOCAL = struct.Struct("<4s2B4HL2L2H")
_EOCD = struct.Struct("<4s4H2LH")
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
INDEX_CHUNK = 1 << 20  # central directory bytes parsed at a time: ~10,000 records
SYMLINK_MAX = 4096


class Record(NamedTuple):
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


def members(raw: BinaryIO) -> Iterator[Member]:
    with _reading():
        for record in _records(raw):
            yield _member(raw, record)


@contextlib.contextmanager
def _reading() -> Iterator[None]:
    """An offset before the file's start fails a seek with EINVAL: the archive's fault, not the
    cache's."""
    try:
        yield
    except OSError as exc:
        raise ArchiveError(f"corrupt zip archive ({exc.strerror})", "pack it again") from exc


def _records(raw: BinaryIO) -> Iterator[Record]:
    count, size, start, shift = _directory(raw)
    pos, buf, at = start, b"", 0
    for _ in range(count):
        while pos < start + size and len(buf) - at < _record_size(buf, at):
            raw.seek(pos)
            more = raw.read(min(INDEX_CHUNK, start + size - pos))
            if not more:
                break
            pos += len(more)
            buf, at = buf[at:] + more, 0
        record, at = _record(buf, at, shift)
        yield record
    if at < len(buf) or pos < start + size:  # zipfile and unzip read these: never drop them unsaid
        raise corrupt(f"the central directory holds more records than the {count} its end counts")


def _record_size(buf: bytes, at: int) -> int:
    if len(buf) - at < _CENTRAL.size:
        return _CENTRAL.size
    return _CENTRAL.size + int(sum(struct.unpack_from("<3H", buf, at + 28)))


def _record(buf: bytes, at: int, shift: int) -> tuple[Record, int]:
    """The central directory record at `at`, and where the next one starts."""
    if len(buf) - at < _CENTRAL.size:
        raise corrupt("truncated central directory")
    rec = _CENTRAL.unpack_from(buf, at)
    name_at = at + _CENTRAL.size
    end = name_at + rec[12] + rec[13] + rec[14]
    if rec[0] != b"PK\x01\x02" or len(buf) < end:
        raise corrupt("bad magic number for central directory")
    raw_name = buf[name_at : name_at + rec[12]]
    extra = buf[name_at + rec[12] : name_at + rec[12] + rec[13]]
    flags, method, t, d = rec[5], rec[6], rec[7], rec[8]
    try:
        name = raw_name.decode("utf-8" if flags & 0x800 else "cp437")
    except UnicodeDecodeError as exc:
        raise corrupt(exc) from exc
    compress_size, file_size, offset = _zip64_fields(extra, rec[10], rec[11], rec[18])
    date_time = ((d >> 9) + 1980, (d >> 5) & 0xF, d & 0x1F, t >> 11, (t >> 5) & 0x3F, (t & 0x1F) * 2)
    mode = (rec[17] >> 16) & 0xFFFF
    return Record(name, raw_name, flags, method, rec[9], compress_size, file_size, offset + shift, mode, date_time), end


def _directory(raw: BinaryIO) -> tuple[int, int, int, int]:
    """Number of records, size and start of the central directory (zip64 included), and the shift
    of every offset (bytes prepended to the archive, as zipfile allows)."""
    end = raw.seek(0, 2)
    tail_start = max(0, end - _EOCD.size - 0xFFFF)
    raw.seek(tail_start)
    tail = raw.read(end - tail_start)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < _EOCD.size:
        raise corrupt("File is not a zip file")
    _, _, _, _, count, size, offset, _ = _EOCD.unpack_from(tail, at)
    where = tail_start + at
    locator = at - _ZIP64_LOCATOR.size
    if locator >= 0 and tail[locator : locator + 4] == b"PK\x06\x07":
        raw.seek(where - _ZIP64_LOCATOR.size - _ZIP64_EOCD.size)
        rec = raw.read(_ZIP64_EOCD.size)
        if len(rec) != _ZIP64_EOCD.size or rec[:4] != b"PK\x06\x06":
            raise corrupt("Corrupt zip64 end of central directory record")
        count, size, offset = _ZIP64_EOCD.unpack(rec)[7:10]
        where -= _ZIP64_LOCATOR.size + _ZIP64_EOCD.size
    start = where - size
    if start < 0 or offset > start:
        raise corrupt("Bad offset for central directory")
    return count, size, start, start - offset


def _zip64_fields(extra: bytes, compress_size: int, file_size: int, offset: int) -> tuple[int, int, int]:
    """The sizes and offset, from the zip64 extra field where the record says 0xFFFFFFFF."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        if tag == 1:
            if pos + 4 + min(length, 24) > len(extra):
                raise corrupt(f"Corrupt extra field {tag:04x} (size={length})")
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


def _member(raw: BinaryIO, record: Record) -> Member:
    how = next((what for bit, what in UNREADABLE.items() if record.flags & bit), None)
    if how is None and record.method not in METHODS:
        how = f"compressed with {METHOD_NAMES.get(record.method, f'method {record.method}')}"
    if how is not None:
        raise ArchiveError(f"member {record.name}: {how}, which conda-pack never writes", "pack it again")
    mode = record.mode
    if record.name.endswith("/"):
        return Member(record.name, Kind.DIR, mode & 0o7777 or 0o755, 0, 0)
    if stat.S_ISLNK(mode):
        if record.file_size > SYMLINK_MAX:
            raise ArchiveError(f"member {record.name}: symlink target of {record.file_size} bytes")
        data = _Data(raw, record)
        target = b"".join(iter(lambda: bytes(data.read(SYMLINK_MAX)), b"")).decode("utf-8", "surrogateescape")
        return Member(record.name, Kind.SYMLINK, 0o777, 0, 0, linkname=target)
    if stat.S_IFMT(mode) and not stat.S_ISREG(
        mode
    ):  # permission bits alone (ZipFile.writestr): a file, as unzip reads it
        return Member(record.name, Kind.OTHER, mode, 0, 0, describe=f"file of mode {oct(mode)}")
    mtime_ns = int(time.mktime((*record.date_time, 0, 0, -1))) * 1_000_000_000
    return Member(
        record.name, Kind.FILE, mode & 0o7777 or 0o644, record.file_size, mtime_ns, open=lambda: _Data(raw, record)
    )


class _Data:
    """One member's data, checked against its size and CRC-32 with its last bytes. It seeks before
    every read: the central directory is read from the same file between members."""

    def __init__(self, raw: BinaryIO, record: Record) -> None:
        self._raw, self._record = raw, record
        with _reading():
            raw.seek(record.offset)
            header = raw.read(_LOCAL.size + len(record.raw_name))
        if len(header) != _LOCAL.size + len(record.raw_name) or header[:4] != b"PK\x03\x04":
            raise corrupt(f"member {record.name}: bad magic number for its file header")
        fields = _LOCAL.unpack_from(header)
        if header[_LOCAL.size :] != record.raw_name:
            raise corrupt(f"member {record.name}: named differently in its file header")
        self._pos = record.offset + _LOCAL.size + fields[10] + fields[11]
        self._packed = record.compress_size  # compressed bytes not read yet
        self._left = record.file_size  # output bytes not returned yet
        self._crc = 0
        self._inflate = zlib.decompressobj(-15) if record.method == zipfile.ZIP_DEFLATED else None

    def __enter__(self) -> _Data:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def read(self, n: int) -> bytes:
        n = min(n, self._left)
        if n <= 0:
            self._check_end()
            return b""
        out = self._decoded(n)
        self._left -= len(out)
        self._crc = zlib.crc32(out, self._crc)
        if not self._left:  # checked with the last bytes: the extractor reads no further
            self._check_end()
        return out

    def _decoded(self, n: int) -> bytes:
        inflate = self._inflate
        while True:
            if inflate is not None and inflate.unconsumed_tail:
                data = inflate.unconsumed_tail
            else:
                data = self._packed_bytes(CHUNK if inflate is not None else n)
            try:
                out = data if inflate is None else inflate.decompress(data, n)
            except zlib.error as exc:
                raise corrupt(exc) from exc
            if out:
                return out
            # At the deflate stream's end nothing more comes out, and zlib keeps what followed as
            # unconsumed input: feeding it again would loop for ever.
            if not data or (inflate is not None and inflate.eof):
                raise corrupt(f"member {self._record.name}: data ends {self._left} bytes before its size")

    def _packed_bytes(self, n: int) -> bytes:
        n = min(n, self._packed)
        if n <= 0:
            return b""
        with _reading():
            self._raw.seek(self._pos)
            data = self._raw.read(n)
        self._pos += len(data)
        self._packed -= len(data)
        if not data:
            raise corrupt(f"member {self._record.name}: the archive ends inside its data")
        return data

    def _check_end(self) -> None:
        if self._crc != self._record.crc:
            raise corrupt(f"Bad CRC-32 for file {self._record.name!r}")
