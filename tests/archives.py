"""Archives made by the tests: benign tiny environments, hostile members, bombs, mutants.

Everything here writes real files in the formats conda-pack writes (tar, tar.gz, tar.bz2,
tar.xz, tar.zst, zip) with the standard library and zstandard; the entrypoint then reads them
as it would any tarball. Headers are written by hand only where a hostile archive needs a lie
that `tarfile` refuses to write (a size the data does not match, a negative number).
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

BLOCK = 512
# The interpreter running the tests: an ELF for this very machine, so `find_python` accepts it.
HOST_PYTHON = Path(os.path.realpath(sys.executable))


@dataclass
class M:
    """One member to write. kind: file, dir, symlink, hardlink, fifo, chr, blk."""

    name: str
    kind: str = "file"
    data: bytes = b""
    mode: int | None = None
    target: str = ""
    mtime: float = 1_700_000_000
    pax: dict[str, str] = field(default_factory=dict)


TAR_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "fifo": tarfile.FIFOTYPE,
    "chr": tarfile.CHRTYPE,
    "blk": tarfile.BLKTYPE,
}


def entry_name(tarball: Path) -> str:
    """The name of the tarball's cache entry: the first 8 hex digits of its BLAKE3."""
    import blake3

    return blake3.blake3().update_mmap(tarball).hexdigest()[:8]


def tiny_env(extra_files: int = 0) -> list[M]:
    """A minimal environment the entrypoint accepts: bin/python is a real interpreter of this
    machine (the tests' own, whose libpython is found by absolute RUNPATH), plus some files."""
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    members = [
        M("bin", "dir", mode=0o755),
        M(f"bin/{version}", data=HOST_PYTHON.read_bytes(), mode=0o755),
        M("bin/python", "symlink", target=version),
        M("bin/python3", "symlink", target=version),
        M("conda-meta/history", data=b"# tiny test environment\n"),
        M("lib/libtiny.so.1", data=b"\x7fELF-not-really" * 64, mode=0o755),
        M("lib/libtiny.so", "symlink", target="libtiny.so.1"),
        M("share/doc/README", data=b"tiny\n"),
    ]
    for i in range(extra_files):
        members.append(
            M(f"lib/{version}/site-packages/pkg{i % 7}/mod{i}.py", data=f"X = {i}\n".encode() * (i % 50 + 1))
        )
    return members


def tar_bytes(members: Iterable[M], fmt: int = tarfile.PAX_FORMAT, end: bool = True) -> bytes:
    """An uncompressed tar of `members` (without the end-of-archive blocks if `end` is False)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for m in members:
            ti = tarfile.TarInfo(m.name)
            ti.type = TAR_TYPES[m.kind]
            ti.mtime = m.mtime
            ti.mode = m.mode if m.mode is not None else (0o755 if m.kind == "dir" else 0o644)
            ti.linkname = m.target
            ti.pax_headers = dict(m.pax)
            if m.kind == "file":
                ti.size = len(m.data)
                tf.addfile(ti, io.BytesIO(m.data))
            else:
                tf.addfile(ti)
        members_end = tf.offset
    return buf.getvalue() if end else buf.getvalue()[:members_end]


def raw_header(name: str, size_field: bytes, typeflag: bytes = b"0", mtime_field: bytes | None = None) -> bytes:
    """A ustar header whose numeric fields are given as raw bytes (for lies tarfile won't write)."""
    h = bytearray(BLOCK)
    h[0:100] = name.encode().ljust(100, b"\0")[:100]
    h[100:108] = b"0000644\0"
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = size_field.ljust(12, b"\0")[:12]
    h[136:148] = (mtime_field or b"14531074240\0").ljust(12, b"\0")[:12]
    h[156:157] = typeflag
    h[257:265] = b"ustar\x0000"
    return fix_checksum(bytes(h))


def fix_checksum(header: bytes) -> bytes:
    h = bytearray(header[:BLOCK])
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % (sum(h) & 0o777777)
    return bytes(h)


def pax_header(records: dict[str, str], name: str = "././@PaxHeader", typeflag: bytes = b"x") -> bytes:
    """A pax extended header block ('x', or 'g' for a global one) carrying `records`, with its data, padded."""
    body = b""
    for key, value in records.items():
        rec = f" {key}={value}\n".encode()
        length = len(rec) + 1
        while len(str(length)) + len(rec) != length:
            length = len(str(length)) + len(rec)
        body += str(length).encode() + rec
    head = raw_header(name, b"%011o\0" % len(body), typeflag)
    return head + body + b"\0" * (-len(body) % BLOCK)


def end_of_archive() -> bytes:
    return b"\0" * (2 * BLOCK)


def compress(data: bytes, fmt: str) -> bytes:
    if fmt in ("tar", ""):
        return data
    if fmt == "tar.gz":
        return gzip.compress(data, compresslevel=1, mtime=0)
    if fmt == "tar.bz2":
        return bz2.compress(data, 1)
    if fmt == "tar.xz":
        return lzma.compress(data, preset=0)
    if fmt == "tar.zst":
        return zstandard.ZstdCompressor(level=1).compress(data)
    raise ValueError(fmt)


def xz_streams(data: bytes, size: int) -> list[bytes]:
    """`data` as xz streams of `size` bytes each, as `conda-pack -j` writes tar.xz."""
    return [lzma.compress(data[at : at + size], preset=0) for at in range(0, len(data), size)]


def xz_stream(blocks: list[tuple[bytes, int, int]], records: list[tuple[int, int]] | None = None) -> bytes:
    """An xz stream of `blocks` (bytes with their padding, unpadded size, uncompressed size, as
    xz_blocks gives them), whose index lists `records` (unpadded, uncompressed), else the blocks."""
    listed = records if records is not None else [(unpadded, size) for _, unpadded, size in blocks]
    index = b"\0" + _xz_varint(len(listed)) + b"".join(_xz_varint(u) + _xz_varint(n) for u, n in listed)
    index += bytes(-len(index) % 4)
    index += zlib.crc32(index).to_bytes(4, "little")
    flags = b"\0\x04"  # CRC64, as xz and Python's lzma write
    rest = (len(index) // 4 - 1).to_bytes(4, "little") + flags
    footer = zlib.crc32(rest).to_bytes(4, "little") + rest + b"YZ"
    header = b"\xfd7zXZ\0" + flags + zlib.crc32(flags).to_bytes(4, "little")
    return header + b"".join(block for block, _, _ in blocks) + index + footer


def xz_blocks(stream: bytes) -> list[tuple[bytes, int, int]]:
    """The blocks of a one-stream xz file, as xz_stream takes them."""
    size = (int.from_bytes(stream[-8:-4], "little") + 1) * 4
    index, at, pos = stream[-12 - size : -12], 1, 12
    count, at = _xz_read_varint(index, at)
    blocks = []
    for _ in range(count):
        unpadded, at = _xz_read_varint(index, at)
        uncompressed, at = _xz_read_varint(index, at)
        padded = -(-unpadded // 4) * 4
        blocks.append((stream[pos : pos + padded], unpadded, uncompressed))
        pos += padded
    return blocks


def _xz_varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes([*out, n])


def _xz_read_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while data[at] & 0x80:
        value |= (data[at] & 0x7F) << shift
        at, shift = at + 1, shift + 7
    return value | data[at] << shift, at + 1


def set_xz_dictionary(stream: bytes, code: int) -> bytes:
    """The xz stream with its first block asking for LZMA2 dictionary `code` (28: 64 MiB, 30:
    128 MiB, 37: 1.5 GiB)."""
    data, block = bytearray(stream), 12  # after the stream header: the block header, its size first
    size = (data[block] + 1) * 4
    props = data.index(b"\x21\x01", block + 2) + 2  # the LZMA2 filter's id, its properties' size
    data[props] = code
    data[block + size - 4 : block + size] = zlib.crc32(data[block : block + size - 4]).to_bytes(4, "little")
    return bytes(data)


def write_tar(path: Path, members: Iterable[M], fmt: str = "tar.gz", tar_format: int = tarfile.PAX_FORMAT) -> Path:
    path.write_bytes(compress(tar_bytes(members, tar_format), fmt))
    return path


def write_raw(path: Path, tar: bytes, fmt: str = "tar.gz") -> Path:
    path.write_bytes(compress(tar, fmt))
    return path


def write_zip(path: Path, members: Iterable[M]) -> Path:
    """A zip as conda-pack writes it: symlinks as entries whose mode says S_IFLNK, data = target."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for m in members:
            info = zipfile.ZipInfo(m.name + ("/" if m.kind == "dir" and not m.name.endswith("/") else ""))
            info.date_time = (2024, 1, 1, 0, 0, 0)
            info.create_system = 3  # Unix: external_attr carries st_mode
            mode = m.mode if m.mode is not None else 0o644
            if m.kind == "file":
                info.external_attr = (stat.S_IFREG | mode) << 16
                zf.writestr(info, m.data)
            elif m.kind == "dir":
                info.external_attr = (stat.S_IFDIR | 0o755) << 16 | 0x10
                zf.writestr(info, b"")
            elif m.kind == "symlink":
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
                zf.writestr(info, m.target.encode())
            elif m.kind == "fifo":
                info.external_attr = (stat.S_IFIFO | 0o644) << 16
                zf.writestr(info, b"")
            elif m.kind == "chr":
                info.external_attr = (stat.S_IFCHR | 0o644) << 16
                zf.writestr(info, b"")
            else:
                raise ValueError(f"zip cannot hold a {m.kind}")
    return path


def zero_stream_zst(size: int, frame: int = 1 << 20) -> Iterator[bytes]:
    """`size` zero bytes as concatenated zstd frames: a bomb costs kilobytes to write."""
    one = zstandard.ZstdCompressor(level=19).compress(bytes(frame))
    for _ in range(size // frame):
        yield one
    if size % frame:
        yield zstandard.ZstdCompressor(level=19).compress(bytes(size % frame))


def zst_bomb(path: Path, name: str, size: int, before: Iterable[M] = ()) -> Path:
    """A tar.zst whose member `name` unpacks to `size` zero bytes; the file is tiny."""
    cctx = zstandard.ZstdCompressor(level=3)
    head = tar_bytes(before, end=False) + raw_header(name, _octal_or_base256(size))
    with open(path, "wb") as f:
        f.write(cctx.compress(head))
        for frame in zero_stream_zst(size):
            f.write(frame)
        f.write(cctx.compress(b"\0" * (-size % BLOCK) + end_of_archive()))
    return path


def _octal_or_base256(n: int) -> bytes:
    if n < 8**11:
        return b"%011o\0" % n
    return b"\x80" + n.to_bytes(11, "big")


def gz_bomb(path: Path, name: str, size: int) -> Path:
    """A tar.gz (concatenated gzip members, which gzip readers must accept) of `size` zero bytes."""
    chunk = 1 << 20
    one = gzip.compress(bytes(chunk), 9, mtime=0)
    with open(path, "wb") as f:
        f.write(gzip.compress(raw_header(name, _octal_or_base256(size)), mtime=0))
        for _ in range(size // chunk):
            f.write(one)
        f.write(gzip.compress(bytes(size % chunk) + b"\0" * (-size % BLOCK) + end_of_archive(), mtime=0))
    return path


def snapshot(root: Path, skip: Path | None = None) -> dict[str, tuple[str, int, int]]:
    """Every path under `root` (but `skip`) with its kind, size and mtime: to prove nothing changed."""
    out: dict[str, tuple[str, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if skip is not None and Path(dirpath) == skip:
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            if skip is not None and p == skip:
                continue
            st = p.lstat()
            kind = "l" if stat.S_ISLNK(st.st_mode) else "d" if stat.S_ISDIR(st.st_mode) else "f"
            out[str(p.relative_to(root))] = (kind, st.st_size if kind == "f" else 0, st.st_mtime_ns)
    return out


def content_tree(root: Path, mtimes: bool = False) -> dict[str, tuple[str, int, object]]:
    """Kind, permission bits and content (SHA-256, with the mtime in seconds if `mtimes`, or the link
    target) of everything under root: to compare two trees."""
    out: dict[str, tuple[str, int, object]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", 0, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), None)
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                out[rel] = ("file", stat.S_IMODE(st.st_mode), (digest, st.st_mtime_ns // 10**9) if mtimes else digest)
    return out


def real_tar_head(tarball: Path, limit: int = 256 << 10) -> tuple[bytes, list[int]]:
    """The first members of a real gzip tarball, cut at a member boundary at most `limit` bytes in
    and closed with an end-of-archive marker; plus the offset of every header block in it."""
    with gzip.open(tarball, "rb") as f:
        data = f.read(limit + (1 << 20))
    offsets: list[int] = []
    at = 0
    while at + BLOCK <= len(data):
        header = data[at : at + BLOCK]
        if header == bytes(BLOCK):
            break
        field = header[124:136]
        size = int.from_bytes(field[1:], "big") if field[0] & 0x80 else int(field.split(b"\0")[0].strip() or b"0", 8)
        end = at + BLOCK + size + (-size % BLOCK)
        if end > limit:
            break
        offsets.append(at)
        at = end
    return data[:at] + end_of_archive(), offsets


CONDA_PACK = (sys.executable, "-m", "conda_pack.cli")  # the release the tests install


def conda_pack_tiny(
    out: Path,
    placeholder: str,
    managed: dict[str, tuple[bytes, str]] | None = None,
    unmanaged: dict[str, bytes] | None = None,
    cli: Iterable[str] = CONDA_PACK,
    env: dict[str, str] | None = None,
) -> Path:
    """A real conda-pack tarball (written by `cli`) of a tiny prefix whose package "tiny" has the
    `managed` files (path: (data, file mode)), recorded with the prefix `placeholder`, plus the
    `unmanaged` files. By default one binary lib/libtiny.so: conda-unpack can only write a prefix
    no longer than `placeholder` into it. conda-pack reads managed files from the package cache,
    so one is made here too."""
    prefix, pkg = out / "prefix", out / "pkgs" / "tiny-1.0-0"
    if managed is None:
        managed = {"lib/libtiny.so": (b"\x7fELF\0\0" + placeholder.encode() + b"/lib/libz.so\0\0\0trailer", "binary")}
    for d in (prefix / "bin", prefix / "conda-meta", pkg / "info"):
        d.mkdir(parents=True, exist_ok=True)
    shutil.copy(HOST_PYTHON, prefix / "bin" / HOST_PYTHON.name)
    (prefix / "bin" / "python").symlink_to(HOST_PYTHON.name)
    (prefix / "conda-meta" / "history").write_text("# tiny\n")
    for rel, (data, _) in managed.items():
        for root in (pkg, prefix):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
    for rel, data in (unmanaged or {}).items():
        (prefix / rel).parent.mkdir(parents=True, exist_ok=True)
        (prefix / rel).write_bytes(data)
    (pkg / "info" / "index.json").write_text(json.dumps({"name": "tiny", "version": "1.0", "build": "0"}))
    paths = [
        {"_path": rel, "path_type": "hardlink", "prefix_placeholder": placeholder, "file_mode": mode}
        for rel, (_, mode) in managed.items()
    ]
    (pkg / "info" / "paths.json").write_text(json.dumps({"paths_version": 1, "paths": paths}))
    meta = {"name": "tiny", "version": "1.0", "build": "0", "build_number": 0, "files": list(managed),
            "link": {"source": str(pkg), "type": 1}}  # fmt: skip
    (prefix / "conda-meta" / "tiny-1.0-0.json").write_text(json.dumps(meta))
    tarball = out / "tiny.tar.gz"
    subprocess.run(
        [*cli, "-q", "-p", str(prefix), "-o", str(tarball)],
        check=True, capture_output=True, env=env,
    )  # fmt: skip
    return tarball


def unpack_script_with(tarball: Path, records: Iterable[str]) -> bytes:
    """The bin/conda-unpack of a real conda-pack `tarball` with its records replaced by `records`
    (lines such as "('lib/x.txt', '/opt/old', 'text')"): a script the entrypoint recognises."""
    with tarfile.open(tarball) as tf:
        member = tf.extractfile("bin/conda-unpack")
        assert member is not None
        source = member.read().decode()
    start = source.index("_prefix_records = [") + len("_prefix_records = [")
    end = source.index("\n]\n", start)
    return (source[:start] + "\n" + ",\n".join(records) + source[end:]).encode()


@contextmanager
def ram_dir(prefix: str, need: int = 3 << 30) -> Iterator[Path]:
    """A scratch directory in /dev/shm when it has room, else in the system temp dir. What is under
    test does not depend on the filesystem, and publishing syncs the cache's filesystem: on a busy
    disk that costs seconds per start, in RAM nothing."""
    shm = Path("/dev/shm")
    where = shm if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > need else None
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=where))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
