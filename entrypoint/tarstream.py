"""A forward-only tar reader (ustar, GNU long names, pax) over a stream of decompressed chunks.

Hand-written rather than `tarfile`, whose stream mode copies its buffer at every header and keeps
every TarInfo for the archive's life (seconds and tens of MiB on a 17,000-file environment). This
one keeps nothing per member, hands out file data as views of the decompressed chunk, checks every
header's checksum, and refuses what GNU tar and tarfile would read differently.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Iterator

from entrypoint.archive import CHUNK, Kind, Member
from entrypoint.errors import ArchiveError

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
MAX_META = 1 << 20  # bytes of one pax header or GNU long name
MAX_META_HEADERS = 8  # metadata headers in a row before one member (real archives have up to 3)
MAX_META_TOTAL = 256 << 20  # pax and long-name bytes in the whole archive
MAX_MTIME_NS = (1 << 63) * 1_000_000_000 - 1  # the last second a 64-bit time_t holds
MAX_TRAILER = 64 << 20  # zero padding after the end-of-archive marker (`tar -b 2048` pads to 1 MiB)
_FILE, _DIR, _OTHER = Kind.FILE, Kind.DIR, Kind.OTHER  # an Enum attribute costs ~0.2 µs, several a member
TYPES = {
    b"0": Kind.FILE, b"\0": Kind.FILE, b"7": Kind.FILE,
    b"1": Kind.HARDLINK, b"2": Kind.SYMLINK, b"5": Kind.DIR,
}  # fmt: skip
META = (b"x", b"g", b"L", b"K")  # pax, pax global, GNU long name, GNU long link
SPECIAL = {b"3": "character device", b"4": "block device", b"6": "FIFO", b"S": "GNU sparse file"}
SPARSE = "GNU.sparse."  # pax records of a sparse file (GNU formats 0.x and 1.0)
# The records read: a megabyte of others (or of global ones, copied into every member) would cost
# tens of MB to keep.
KEPT_KEYS = frozenset(
    [b"path", b"linkpath", b"size", b"mtime"]
    + [
        f"{SPARSE}{k}".encode()
        for k in ("major", "minor", "name", "realsize", "size", "numblocks", "offset", "numbytes", "map")
    ]
)
_NONE: dict[str, str] = {}  # shared, never written to
# The pax header conda-pack (Python's tarfile) writes before nearly every member: the mtime alone.
_PAX_MTIME_ONLY = re.compile(rb"(\d{2}) mtime=(\d{1,20})(?:\.(\d{1,20}))?\n")


def nts(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def number(field: bytes) -> int:
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
    except ValueError as exc:
        raise ArchiveError(f"bad number {digits[:20]!r} in a tar header (corrupt archive)") from exc


def header_sum(block: bytes) -> int:
    """The checksum a header must hold: its bytes summed, the checksum field as eight spaces. Three
    C calls instead of 512 additions: Adler-32's low half is 1 + the sum of at most 256 bytes."""
    adler32 = zlib.adler32
    return (adler32(block[:148]) & 0xFFFF) + (adler32(block[156:412]) & 0xFFFF) + (adler32(block[412:]) & 0xFFFF) + 253


def signed_header_sum(block: bytes) -> int:
    """The same sum of the bytes as signed chars, as old tars wrote it (GNU tar accepts either)."""
    high = sum(1 for b in block[:148] if b & 0x80) + sum(1 for b in block[156:512] if b & 0x80)
    return header_sum(block) - 256 * high


def checksum_ok(block: bytes) -> bool:
    stored = number(block[148:156])
    return stored == header_sum(block) or stored == signed_header_sum(block)


def pax_mtime_only(data: bytes) -> int | None:
    """The mtime in ns if `data` is conda-pack's usual mtime-only pax header; else None (the
    general parser reads it)."""
    if (m := _PAX_MTIME_ONLY.fullmatch(data)) is None or int(m[1]) != len(data):
        return None
    return int(m[2]) * 1_000_000_000 + (int(m[3][:9].ljust(9, b"0")) if m[3] else 0)


def pax_records(data: bytes) -> dict[str, str]:
    """Parse "<length> <key>=<value>\\n" records, keeping KEPT_KEYS. The length must be plain
    decimal and the record within the header: GNU tar refuses others, tarfile skips them, so
    reading them would unpack another tree than either."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos, pos + 20)
        digits = data[pos:space] if space > pos else b""
        length = int(digits) if digits.isdigit() else 0
        record = data[space + 1 : pos + length]
        if length <= 0 or pos + length > len(data) or not record.endswith(b"\n") or b"=" not in record:
            raise ArchiveError("malformed pax header (corrupt archive)")
        key, value = record[:-1].split(b"=", 1)
        if key in KEPT_KEYS:
            out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def pax_mtime_ns(value: str) -> int | None:
    """A pax mtime ("1700000000.5") in ns; None if it is no decimal number ("nan", "1e400")."""
    sec, _, frac = value.partition(".")
    digits = sec.removeprefix("-")
    if not (digits.isascii() and digits.isdigit() and (frac == "" or (frac.isascii() and frac.isdigit()))):
        return None
    try:
        return max(0, int(sec) * 1_000_000_000 + int((frac + "000000000")[:9]))
    except ValueError:  # more digits than Python converts
        return None


class TarReader:
    """Members of a tar, read from `next_chunk` (decompressed chunks, b"" at the end)."""

    def __init__(self, next_chunk: Callable[[], bytes]) -> None:
        self._next_chunk = next_chunk
        self._buf = b""
        self._pos = 0
        self.remaining = 0  # unread data bytes of the current member
        self.padding = 0
        self._open = lambda: self  # a member's `open`: the reader itself reads its data
        self._meta_total = 0
        self._global: dict[str, str] = {}
        # What metadata headers said of the next member.
        self._pax: dict[str, str] = _NONE
        self._mtime_ns: int | None = None  # from the usual mtime-only pax header
        self._long_name: str | None = None
        self._long_link: str | None = None
        self._metas = 0

    # The current member's data, as Member.open() gives it; what is not read is skipped.
    def __enter__(self) -> TarReader:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def read(self, n: int) -> memoryview | bytes:
        """Up to n bytes of the current member's data, as a view of the chunk they are in."""
        n = min(n, self.remaining)
        if n <= 0:
            return b""
        data = self._view(n)
        if not data:
            raise ArchiveError("archive ends inside a member (truncated or corrupt)")
        self.remaining -= len(data)
        return data

    def _view(self, n: int) -> memoryview | bytes:
        """Up to n (> 0) next bytes; empty only at the end of the stream."""
        if self._pos >= len(self._buf):
            self._buf, self._pos = self._next_chunk(), 0
            if not self._buf:
                return b""
        pos = self._pos
        self._pos = end = min(pos + n, len(self._buf))
        return memoryview(self._buf)[pos:end]

    def _read(self, n: int) -> bytes:
        """Exactly n bytes, or b"" if the stream ends right here."""
        pos, end = self._pos, self._pos + n
        if end <= len(self._buf):
            self._pos = end
            return self._buf[pos:end]
        parts: list[bytes] = []
        while n > 0:
            data = self._view(n)
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

    def __iter__(self) -> Iterator[Member]:
        while True:
            self._skip_rest()
            header = self._read(BLOCK)
            if not header:
                raise ArchiveError("archive ends without its end-of-archive marker (truncated)")
            if header == ZERO_BLOCK:
                self._end()
                return
            stored = number(header[148:156])
            if stored != header_sum(header) and stored != signed_header_sum(header):
                raise ArchiveError("bad tar header checksum (corrupt archive)")
            flag = header[156:157]
            if flag in META:
                self._metadata(header, flag)
                continue
            yield self._member(header, flag)
            if self._metas:
                self._pax, self._mtime_ns, self._long_name, self._long_link, self._metas = _NONE, None, None, None, 0

    def _end(self) -> None:
        """Read the stream to its end, so the codec checks its CRC and length there, and refuse
        anything but zero padding: members after a lone zero block, or a second archive, would
        otherwise be dropped without a word."""
        left = MAX_TRAILER
        while data := self._view(CHUNK):
            if bytes(data).count(0) != len(data):
                raise ArchiveError(
                    "data after the end-of-archive marker (a lone zero block, or archives concatenated)",
                    "pack it again",
                )
            left -= len(data)
            if left < 0:
                raise ArchiveError(
                    f"more than {MAX_TRAILER >> 20} MiB after the end-of-archive marker (corrupt or hostile archive)"
                )

    def _metadata(self, header: bytes, flag: bytes) -> None:
        self._metas += 1
        if self._metas > MAX_META_HEADERS:
            raise ArchiveError(
                f"more than {MAX_META_HEADERS} tar metadata headers in a row (corrupt or hostile archive)"
            )
        size = number(header[124:136])
        if not 0 <= size <= MAX_META:
            raise ArchiveError(f"tar metadata block of {size} bytes (corrupt or hostile archive)")
        self._meta_total += size
        if self._meta_total > MAX_META_TOTAL:
            raise ArchiveError(f"more than {MAX_META_TOTAL >> 20} MiB of tar metadata (corrupt or hostile archive)")
        data = self._read(size)
        self.padding = -size % BLOCK
        if len(data) != size:
            raise ArchiveError("archive ends inside a member header (truncated or corrupt)")
        if (  # GNU tar reads the last, tarfile the first: a check with either would see another name
            (flag == b"x" and (self._pax is not _NONE or self._mtime_ns is not None))
            or (flag == b"L" and self._long_name is not None)
            or (flag == b"K" and self._long_link is not None)
        ):
            raise ArchiveError(f"two {flag.decode()!r} headers for one member (corrupt or hostile archive)")
        if flag == b"x":
            self._mtime_ns = pax_mtime_only(data)
            self._pax = _NONE if self._mtime_ns is not None else pax_records(data)
        elif flag == b"g":
            self._global.update(pax_records(data))
        elif flag == b"L":
            self._long_name = nts(data)
        else:
            self._long_link = nts(data)

    def _member(self, header: bytes, flag: bytes) -> Member:
        fields = {**self._global, **self._pax} if self._global else self._pax
        if fields or self._long_name is not None or header[345] != 0:
            name = _name(header, fields, self._long_name)
        else:  # the usual: the ustar name field alone
            name = nts(header[0:100])
        size = number(header[124:136])
        if "size" in fields:
            size = _pax_size(fields, name)
        elif size < 0:  # "-5" parses as octal too; it would misalign the next header
            raise ArchiveError("negative size in a tar header (corrupt archive)")
        mtime_ns = self._mtime_ns
        if mtime_ns is None or mtime_ns > MAX_MTIME_NS:
            mtime_ns = _mtime(header, fields, mtime_ns, name)
        mode = number(header[100:108]) & 0o7777
        kind = TYPES.get(flag, _OTHER)
        if fields and any(k.startswith(SPARSE) for k in fields):  # a pax (GNU 1.0) sparse file
            kind, flag, name = _OTHER, b"S", fields.get(f"{SPARSE}name", name)
        elif kind is _FILE and name.endswith("/"):  # old tars' directories (v7): GNU tar makes one too
            kind = _DIR
        # No data follows a directory or a link, whatever its size field says (GNU tar and tarfile
        # read the next header right after it); a file's and an unknown type's data is skipped.
        if kind is _FILE or kind is _OTHER:
            self.remaining, self.padding = size, -size % BLOCK
        if kind is _FILE:
            return Member(name, kind, mode, size, mtime_ns, open=self._open)
        link = fields.get("linkpath", self._long_link)
        link = nts(header[157:257]) if link is None else link
        describe = SPECIAL.get(flag, f"member of unknown type {flag!r}")
        return Member(name, kind, mode, 0, mtime_ns, linkname=link, describe=describe)


def _name(header: bytes, fields: dict[str, str], long_name: str | None) -> str:
    """The member's name: a pax path, else a GNU long name (even empty: GNU tar and tarfile do not
    fall back on the ustar name), else the ustar prefix and name."""
    if "path" in fields:
        return fields["path"]
    if long_name is not None:
        return long_name
    name = nts(header[0:100])
    if header[345] != 0 and header[257:263] == b"ustar\0":
        name = nts(header[345:500]) + "/" + name
    return name


def _pax_size(fields: dict[str, str], name: str) -> int:
    try:
        size = int(fields["size"])
    except ValueError as exc:
        raise ArchiveError(f"member {name}: bad pax size (corrupt archive)") from exc
    if size < 0:  # would shrink the unpacked-bytes total and misalign the next header
        raise ArchiveError(f"member {name}: negative pax size (corrupt archive)")
    return size


def _mtime(header: bytes, fields: dict[str, str], pax_mtime: int | None, name: str) -> int:
    if pax_mtime is not None:
        mtime_ns = pax_mtime
    elif fields.get("mtime"):  # an empty value deletes the record (POSIX): the header's time holds
        parsed = pax_mtime_ns(fields["mtime"])
        if parsed is None:
            raise ArchiveError(f"member {name}: bad pax mtime {fields['mtime'][:40]!r} (corrupt archive)")
        mtime_ns = parsed
    else:
        mtime_ns = number(header[136:148]) * 1_000_000_000
    if mtime_ns > MAX_MTIME_NS:  # what utime(2) would refuse
        raise ArchiveError(f"member {name}: modification time out of range (corrupt archive)")
    return mtime_ns
