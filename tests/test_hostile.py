"""Hostile archives (issue 6): each one is refused with one error line and a non-zero exit; no
file appears outside the environment's directory (a canary folder sits next to the cache); no
entry is published; and the cache, which holds a good environment all along, stays usable.

The archives are generated here (tests/archives.py) in every format the entrypoint reads, and
the entrypoint runs as a subprocess, exactly as a container starts it.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import shutil
import stat
import struct
import subprocess
import threading
import tracemalloc
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, cast

import pytest
from archives import (
    HOST_PYTHON,
    M,
    compress,
    end_of_archive,
    fix_checksum,
    gz_bomb,
    pax_header,
    ram_dir,
    raw_header,
    real_tar_head,
    set_xz_dictionary,
    snapshot,
    tar_bytes,
    tiny_env,
    write_raw,
    write_tar,
    write_zip,
    xz_blocks,
    xz_stream,
    xz_streams,
    zst_bomb,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import entry_env, error_line, run_entrypoint, unavailable

from entrypoint import archive, extract, tarstream
from entrypoint.errors import ARCHIVE_ADVICE, ArchiveError
from entrypoint.extract import MAX_DEPTH, normalize
from entrypoint.tarstream import header_sum as _header_sum
from entrypoint.tarstream import pax_mtime_ns as _pax_mtime_ns
from entrypoint.tarstream import pax_mtime_only as _pax_mtime_only
from entrypoint.tarstream import pax_records as _pax_records

FORMATS = ["tar", "tar.gz", "tar.bz2", "tar.xz", "tar.zst"]
FORMATS_AND_ZIP = [*FORMATS, "zip"]
# Names the cache may gain from a refused start: lock files, in-use marks, remembered keys.
METADATA_SUFFIXES = (".lock", ".use")


@dataclass(frozen=True)
class Site:
    root: Path  # holds cache/, canary/ and the archives
    cache: Path
    canary: Path
    good: Path  # a benign tarball, unpacked into the cache before any hostile one
    good_prefix: Path


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    with ram_dir("mlenv-hostile-") as root:
        yield _site(root)


def _site(root: Path) -> Site:
    canary = root / "canary"
    canary.mkdir()
    (canary / "victim").write_text("must stay as it is\n")
    good = write_tar(root / "good.tar.gz", tiny_env(extra_files=20))
    proc = run_entrypoint(["unpack"], entry_env(MLSERVER_ENV_TARBALL=good, MLSERVER_ENV_CACHE_DIR=root / "cache"))
    assert proc.returncode == 0, proc.stderr
    return Site(root, root / "cache", canary, good, Path(proc.stdout.splitlines()[-1]))


def assert_nothing_escaped(site: Site, before: dict[str, tuple[str, int, int]]) -> None:
    """Compared with `before`: only cache metadata files appeared or changed; nothing else did."""
    after = snapshot(site.root)
    for rel in sorted(set(after) | set(before)):
        if after.get(rel) == before.get(rel):
            continue
        parts = Path(rel).parts
        metadata = (
            rel in ("cache", "cache/.keys")
            or (parts[:2] == ("cache", ".keys") and len(parts) == 3 and after.get(rel, ("f",))[0] == "f")
            or (len(parts) == 2 and parts[0] == "cache" and rel.endswith(METADATA_SUFFIXES) and after[rel][0] == "f")
        )
        assert metadata, f"{rel}: {before.get(rel)} -> {after.get(rel)}"
    assert not [p for p in site.cache.iterdir() if p.name.startswith(".") and p.name != ".keys"]  # no temp files


def refuse(site: Site, tarball: Path, *expected: str, **env: str) -> str:
    """Start with a hostile tarball: one error line containing each of `expected`, nothing cached."""
    before = snapshot(site.root)
    proc = run_entrypoint(
        ["unpack"], entry_env(MLSERVER_ENV_TARBALL=tarball, MLSERVER_ENV_CACHE_DIR=site.cache, **env), timeout=120
    )
    assert proc.returncode == 3, proc.stderr  # exit 3: the archive, not a setting nor the environment
    line = error_line(proc)
    for text in expected:
        assert text in line, line
    assert "\x1b" not in proc.stderr
    assert_nothing_escaped(site, before)
    return line


def canary(site: Site, rel: str = "") -> str:
    return str(site.canary / rel) if rel else str(site.canary)


# Each case: (id, members built from the site, words the error must contain). The tiny benign
# environment comes first, so an archive is refused for its hostile member, not for lacking python.
CASES: list[tuple[str, Callable[[Site], list[M]], tuple[str, ...]]] = [
    ("absolute-path", lambda s: [M(canary(s, "abs"), data=b"pwned")], ("absolute path",)),
    ("dotdot", lambda s: [M("../../canary/dotdot", data=b"pwned")], ("'..'",)),
    ("dotdot-inside-path", lambda s: [M("lib/../../../canary/x", data=b"pwned")], ("'..'",)),
    ("dot-slash-dotdot", lambda s: [M("./../../canary/y", data=b"pwned")], ("'..'",)),
    (
        "symlink-out-then-write-through",
        lambda s: [M("lib/out", "symlink", target="../../../canary"), M("lib/out/pwned", data=b"x")],
        ("outside the environment",),
    ),
    (
        "symlink-absolute-then-write-through",
        lambda s: [M("etc", "symlink", target=canary(s)), M("etc/pwned", data=b"x")],
        ("absolute path",),
    ),
    (
        # Each link looks inside on its own; resolved on the real tree, `out` is the canary.
        "symlink-chain-escapes-only-when-resolved",
        lambda s: [M("d1/d2/up", "symlink", target="../.."), M("d1/d2/out", "symlink", target="up/../../canary")],
        ("outside the environment",),
    ),
    (
        "symlink-chain-then-write-through",
        lambda s: [
            M("d1/d2/up", "symlink", target="../.."),
            M("d1/d2/out", "symlink", target="up/../../canary"),
            M("d1/d2/out/pwned", data=b"x"),
        ],
        ("symlink",),
    ),
    (
        "symlink-chain-to-absolute",
        lambda s: [M("a", "symlink", target="b"), M("b", "symlink", target="c"), M("c", "symlink", target=canary(s))],
        ("absolute path",),
    ),
    (
        "symlink-to-destination-itself-then-write-through",
        lambda s: [M("self", "symlink", target="."), M("self/bin/pwned", data=b"x")],
        ("written through the symlink self",),
    ),
    (
        "symlink-to-parent-of-destination",
        lambda s: [M("up", "symlink", target=".."), M("up/canary/pwned", data=b"x")],
        ("outside the environment",),
    ),
    (
        # os.path.realpath recurses once a link: a chain this long was a RecursionError traceback.
        "symlink-chain-deeper-than-python-recursion",
        lambda s: [M(f"lib/l{i}", "symlink", target=f"l{i + 1}") for i in range(1200)] + [M("lib/l1200", "dir")],
        ("lib/l0", "symlink chain"),
    ),
    (
        # Inside lexically, but longer than symlink(2) takes: it was blamed on the cache's filesystem.
        "symlink-target-longer-than-linux-allows",
        lambda s: [M("lib/ll", "symlink", target="./" * 2100 + "libtiny.so")],
        ("lib/ll", "symlink target of 4210 bytes"),
    ),
    ("hardlink-out", lambda s: [M("h", "hardlink", target="../../canary/victim")], ("'..'",)),
    ("hardlink-absolute", lambda s: [M("h", "hardlink", target=canary(s, "victim"))], ("absolute path",)),
    (
        "hardlink-through-symlink",
        lambda s: [M("l", "symlink", target="bin"), M("h", "hardlink", target="l/python")],
        ("not a file of this archive",),
    ),
    ("hardlink-to-symlink", lambda s: [M("h", "hardlink", target="bin/python")], ("not a file of this archive",)),
    ("hardlink-before-its-target", lambda s: [M("h", "hardlink", target="later"), M("later")], ("hardlink",)),
    ("fifo", lambda s: [M("lib/fifo", "fifo")], ("FIFO",)),
    ("character-device", lambda s: [M("dev/null", "chr")], ("character device",)),
    ("block-device", lambda s: [M("dev/sda", "blk")], ("block device",)),
    ("duplicate-file", lambda s: [M("lib/x", data=b"1"), M("lib/x", data=b"2")], ("duplicate",)),
    ("file-then-directory", lambda s: [M("lib/x", data=b"1"), M("lib/x", "dir")], ("duplicate",)),
    (
        # GNU tar CVE-2025-45582's shape, inside one archive: a symlink, then a directory of
        # the same name, then a member that would land wherever the symlink points.
        "symlink-then-directory-of-same-name",
        lambda s: [M("share", "symlink", target="lib"), M("share", "dir"), M("share/pwned", data=b"x")],
        ("duplicate",),
    ),
    ("file-over-a-file-parent", lambda s: [M("share/doc/README/x", data=b"x")], ("written through the file",)),
    ("deep-path", lambda s: [M("a/" * 1500 + "f", data=b"x")], ("1501 levels deep",)),
    ("component-longer-than-the-filesystem-allows", lambda s: [M("a" * 300 + "/f", data=b"x")], ("name is too long",)),
    (
        # A name that would forge a second log line, or repaint the terminal, must not.
        "newline-in-name",
        lambda s: [M("../x\nmlserver-entrypoint: error: forged", data=b"x")],
        ("'..'",),
    ),
    ("escape-sequence-in-name", lambda s: [M("/\x1b[2J\x1b[31mred", data=b"x")], ("absolute path",)),
]


@pytest.mark.parametrize("build,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_member_is_refused(site: Site, build: Callable[[Site], list[M]], expected: tuple[str, ...]) -> None:
    tarball = write_tar(site.root / "hostile.tar.gz", tiny_env() + build(site))
    refuse(site, tarball, "hostile.tar.gz", *expected)


@pytest.mark.parametrize("fmt", FORMATS_AND_ZIP)
def test_escapes_are_refused_in_every_format(site: Site, fmt: str) -> None:
    escapes = [
        (M("../../canary/fmt", data=b"x"), "'..'"),
        (M("lib/out", "symlink", target="../../../canary"), "outside"),
    ]
    for member, expected in escapes[FORMATS_AND_ZIP.index(fmt) % 2 :][:1]:  # one of the two, alternating
        path = site.root / f"hostile.{fmt}"
        members = [*tiny_env(), member]
        write_zip(path, members) if fmt == "zip" else write_tar(path, members, fmt)
        refuse(site, path, expected)


def test_zip_specific_hostility(site: Site) -> None:
    zpath = site.root / "hostile.zip"
    write_zip(zpath, [*tiny_env(), M("lib/link", "symlink", target="../.."), M("lib/link/pwned", data=b"x")])
    refuse(site, zpath, "outside the environment")
    write_zip(zpath, [*tiny_env(), M("l", "symlink", target="bin"), M("l/pwned", data=b"x")])
    refuse(site, zpath, "written through the symlink l")
    write_zip(zpath, [*tiny_env(), M("lib/fifo", "fifo")])
    refuse(site, zpath, "lib/fifo")
    write_zip(zpath, [*tiny_env(), M("x", data=b"1"), M("x", data=b"2")])
    refuse(site, zpath, "duplicate")


def _patch_zip_entry(
    path: Path, name: str, local: Callable[[bytearray, int], None], central: Callable[[bytearray, int], None]
) -> None:
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(name)
    local(data, info.header_offset)
    at = data.find(b"PK\x01\x02")
    while at >= 0:
        length = int.from_bytes(data[at + 28 : at + 30], "little")
        if data[at + 46 : at + 46 + length] == name.encode():
            central(data, at)
        at = data.find(b"PK\x01\x02", at + 4)
    path.write_bytes(bytes(data))


def test_zip_with_unknown_compression_or_encryption(site: Site) -> None:
    zpath = site.root / "hostile.zip"

    def method(offset: int) -> Callable[[bytearray, int], None]:
        return lambda d, at: d.__setitem__(slice(at + offset, at + offset + 2), (99).to_bytes(2, "little"))

    write_zip(zpath, tiny_env())
    _patch_zip_entry(zpath, "conda-meta/history", method(8), method(10))
    refuse(site, zpath, "hostile.zip", "compressed with method 99")

    def encrypted(offset: int) -> Callable[[bytearray, int], None]:
        return lambda d, at: d.__setitem__(at + offset, d[at + offset] | 1)

    write_zip(zpath, tiny_env())
    _patch_zip_entry(zpath, "conda-meta/history", encrypted(6), encrypted(8))
    refuse(site, zpath, "hostile.zip", "encrypted")

    def size_lie(offset: int) -> Callable[[bytearray, int], None]:
        return lambda d, at: d.__setitem__(slice(at + offset, at + offset + 4), (10**6).to_bytes(4, "little"))

    write_zip(zpath, tiny_env())
    _patch_zip_entry(zpath, "conda-meta/history", size_lie(22), size_lie(24))
    refuse(site, zpath, "hostile.zip", "conda-meta/history")


@pytest.mark.parametrize(("method", "name"), [(zipfile.ZIP_BZIP2, "bzip2"), (zipfile.ZIP_LZMA, "lzma")])
def test_zip_compressed_with_bzip2_or_lzma_is_refused(site: Site, method: int, name: str) -> None:
    """conda-pack's zips are deflated. zipfile decodes a bzip2 or lzma member without an output
    bound (lzma with the dictionary the member asks for): a 20 KB zip holding 600 MB of zeros as one
    bzip2 member took the start 1.2 GB resident, not the promised 64 MiB."""
    zpath = write_zip(site.root / f"{name}.zip", tiny_env())
    with zipfile.ZipFile(zpath, "a", compression=method) as zf:
        zf.writestr("lib/zeros.bin", bytes(1 << 20))
    refuse(site, zpath, f"{name}.zip", f"lib/zeros.bin: compressed with {name}", "conda-pack never writes")


def test_member_sizes_that_lie(site: Site) -> None:
    base = tar_bytes(tiny_env(), end=False)
    path = site.root / "lies.tar.gz"
    # The header claims more data than the archive holds.
    write_raw(path, base + raw_header("lib/big", b"%011o\0" % 100_000) + b"a" * 1000)
    refuse(site, path, "truncated")
    # The data runs on past the size its header claims: the rest is read as a (bad) header.
    write_raw(path, base + raw_header("lib/small", b"%011o\0" % 10) + b"a" * 3000 + end_of_archive())
    refuse(site, path, "corrupt")
    # A negative size in base-256.
    write_raw(path, base + raw_header("lib/neg", b"\xff" * 12) + end_of_archive())
    refuse(site, path, "negative")
    # A negative size in octal digits (int() reads "-5" in base 8 too).
    write_raw(path, base + raw_header("lib/neg", b"-0000000005\0") + b"a" * 512 + end_of_archive())
    refuse(site, path, "negative")


def test_negative_pax_size(site: Site) -> None:
    """Accepted, it would shrink the unpacked-bytes total (beating MLSERVER_ENV_MAX_UNPACKED_BYTES)
    and realign the reader onto bytes the attacker chose."""
    base = tar_bytes(tiny_env(), end=False)
    path = site.root / "lies.tar.gz"
    pax = pax_header({"size": "-1000"})
    write_raw(path, base + pax + raw_header("lib/neg", b"%011o\0" % 0) + end_of_archive())
    refuse(site, path, "lib/neg", "negative")


def test_modification_time_out_of_range(site: Site) -> None:
    base = tar_bytes(tiny_env(), end=False)
    path = site.root / "lies.tar.gz"
    data = b"a" + bytes(511)
    write_raw(
        path, base + raw_header("lib/t", b"%011o\0" % 1, mtime_field=b"\x80" + b"\xff" * 11) + data + end_of_archive()
    )
    refuse(site, path, "lib/t", "modification time")
    pax = pax_header({"mtime": "9" * 30})
    write_raw(path, base + pax + raw_header("lib/t", b"%011o\0" % 1) + data + end_of_archive())
    refuse(site, path, "lib/t", "modification time")


def test_decompression_bombs_stop_at_the_limits(site: Site) -> None:
    # 1 GiB of zeros in a 1 MB tar.gz and in a few-kB tar.zst, against a 100 MB limit.
    for bomb in (
        gz_bomb(site.root / "bomb.tar.gz", "lib/bomb", 1 << 30),
        zst_bomb(site.root / "bomb.tar.zst", "lib/bomb", 1 << 30),
    ):
        assert bomb.stat().st_size < 2_000_000
        line = refuse(
            site, bomb, "MLSERVER_ENV_MAX_UNPACKED_BYTES", "100000000", MLSERVER_ENV_MAX_UNPACKED_BYTES="100000000"
        )
        assert "lib/bomb" in line
    # The default limit (64 GiB) stops an 80 GiB bomb at once, before writing it.
    bomb = zst_bomb(site.root / "bomb80.tar.zst", "lib/bomb", 80 << 30)
    assert bomb.stat().st_size < 10_000_000
    refuse(site, bomb, "MLSERVER_ENV_MAX_UNPACKED_BYTES", str(64 << 30))
    # Many small members add up too.
    many = write_tar(
        site.root / "many.tar.zst", tiny_env() + [M(f"lib/z{i}", data=bytes(1 << 20)) for i in range(120)], "tar.zst"
    )
    refuse(site, many, "MLSERVER_ENV_MAX_UNPACKED_BYTES", MLSERVER_ENV_MAX_UNPACKED_BYTES="50000000")


def test_absurd_member_count_stops_at_the_limit(site: Site) -> None:
    many = write_tar(site.root / "members.tar.gz", tiny_env() + [M(f"lib/m{i}") for i in range(3000)])
    refuse(site, many, "more than 1000 members", "MLSERVER_ENV_MAX_MEMBERS", MLSERVER_ENV_MAX_MEMBERS="1000")


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_and_corrupt_streams(site: Site, fmt: str) -> None:
    members = tiny_env(extra_files=30)
    data = compress(tar_bytes(members), fmt)
    # A plain tar ends in zero padding that is no loss to cut; compressed streams end in a trailer.
    end = len(tar_bytes(members, end=False)) if fmt == "tar" else len(data)
    path = site.root / f"damaged.{fmt}"
    for cut in (end // 2, end - 700):
        path.write_bytes(data[:cut])
        refuse(site, path, f"damaged.{fmt}")
    if fmt in ("tar.gz", "tar.bz2", "tar.xz"):  # plain tar and zstd frames carry no checksum of the data
        flipped = bytearray(data)
        for at in range(len(data) // 4, len(data) - 16, len(data) // 5):
            flipped[at] ^= 0x5A
        path.write_bytes(bytes(flipped))
        refuse(site, path, f"damaged.{fmt}")


@pytest.mark.parametrize("magic", [b"", b"\x1f\x8b", b"\x28\xb5\x2f\xfd", b"BZh9", b"\xfd7zXZ\x00", b"PK\x03\x04"])
def test_random_bytes(site: Site, magic: bytes) -> None:
    path = site.root / "random.bin"
    path.write_bytes(magic + os.urandom(20_000))
    refuse(site, path, "random.bin")


def test_setuid_and_writable_bits_are_dropped(site: Site) -> None:
    members = [
        *tiny_env(),
        M("bin/suid", data=b"#!/bin/sh\n", mode=0o4755),
        M("bin/sgid", data=b"#!/bin/sh\n", mode=0o2755),
        M("lib/world-writable", data=b"x", mode=0o666),
        M("shared", "dir", mode=0o3777),  # setgid + sticky + world-writable directory
        M("shared/f", data=b"x", mode=0o600),
    ]
    path = write_tar(site.root / "modes.tar.gz", members)
    proc = run_entrypoint(["unpack"], entry_env(MLSERVER_ENV_TARBALL=path, MLSERVER_ENV_CACHE_DIR=site.cache))
    assert proc.returncode == 0, proc.stderr
    prefix = Path(proc.stdout.splitlines()[-1])
    modes = {
        rel: stat.S_IMODE((prefix / rel).lstat().st_mode)
        for rel in ("bin/suid", "bin/sgid", "lib/world-writable", "shared", "shared/f")
    }
    assert modes == {
        "bin/suid": 0o755,
        "bin/sgid": 0o755,
        "lib/world-writable": 0o644,
        "shared": 0o755,
        "shared/f": 0o600,
    }
    assert (prefix / "bin" / HOST_PYTHON.name).stat().st_mode & 0o111


# --- Mutants of a real conda-pack tarball's headers -------------------------------------------

FIELDS = {"name": (0, 100), "mode": (100, 8), "size": (124, 12), "mtime": (136, 12), "checksum": (148, 8),
          "type": (156, 1), "linkname": (157, 100), "magic": (257, 8), "prefix": (345, 155)}  # fmt: skip
HOSTILE_NAMES = [
    b"../../canary/m",
    b"/tmp/abs",
    b"a/" * 45,
    b"bin/python",
    b"bin",
    b".",
    b"",
    b"x\nforged",
    b"lib/\xff\xfe",
]


@st.composite
def numbers(draw: st.DrawFn, width: int) -> bytes:
    kind = draw(st.sampled_from(["octal", "base256", "negative", "bytes", "spaces"]))
    if kind == "octal":
        return b"%0*o\0" % (width - 1, draw(st.integers(0, 8 ** (width - 1) - 1)))
    if kind == "base256":
        return b"\x80" + draw(st.integers(0, 256 ** (width - 1) - 1)).to_bytes(width - 1, "big")
    if kind == "negative":
        return b"\xff" * width
    if kind == "spaces":
        return b" " * width
    return draw(st.binary(min_size=width, max_size=width))


@st.composite
def field_values(draw: st.DrawFn, field: str) -> bytes:
    width = FIELDS[field][1]
    if field in ("mode", "size", "mtime", "checksum"):
        return draw(numbers(width))
    if field == "type":
        return draw(st.sampled_from([bytes([c]) for c in b"0123456789xgLKSVA\0"]))
    if field == "magic":
        return draw(st.sampled_from([b"ustar\x0000", b"ustar  \0", bytes(8), b"garbage!"]))
    value = draw(st.one_of(st.sampled_from(HOSTILE_NAMES), st.binary(max_size=width)))
    return value[:width].ljust(width, b"\0")


@dataclass(frozen=True)
class Mutant:
    data: bytes = field(repr=False)
    fmt: str
    ops: tuple[str, ...]  # what was done, for the report of a failing example


@st.composite
def mutants(draw: st.DrawFn, base: bytes, offsets: list[int]) -> Mutant:
    data = bytearray(base)
    ops = []
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.sampled_from(offsets))
        field_ = draw(st.sampled_from(sorted(FIELDS)))
        start, width = FIELDS[field_]
        value = draw(field_values(field_))
        data[at + start : at + start + width] = value
        fixed = field_ != "checksum" and draw(st.booleans())
        if fixed:
            data[at : at + 512] = fix_checksum(bytes(data[at : at + 512]))
        ops.append(f"header@{at}.{field_}={value!r}{' +checksum' if fixed else ''}")
    structural = draw(st.sampled_from(["none", "none", "truncate", "pax"]))
    if structural == "truncate":
        cut = draw(st.integers(0, len(data) - 1))
        del data[cut:]
        ops.append(f"truncate@{cut}")
    elif structural == "pax":
        at = draw(st.sampled_from(offsets))
        records = draw(st.dictionaries(st.sampled_from(["path", "linkpath", "size", "mtime", "uid"]),
                                       st.text(st.characters(codec="utf-8", exclude_characters="\n"), max_size=40),
                                       min_size=1, max_size=3))  # fmt: skip
        data[at:at] = pax_header(records)
        ops.append(f"pax@{at}={records!r}")
    return Mutant(bytes(data), draw(st.sampled_from(["tar", "tar.gz", "tar.zst"])), tuple(ops))


def check_mutant(site: Site, data: bytes, fmt: str) -> None:
    tarball = site.root / f"mutant.{fmt}"
    tarball.write_bytes(compress(data, fmt))
    before = snapshot(site.root)
    entries = {p.name for p in site.cache.iterdir()}
    proc = run_entrypoint(
        ["unpack"], entry_env(MLSERVER_ENV_TARBALL=tarball, MLSERVER_ENV_CACHE_DIR=site.cache), timeout=120
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    if proc.returncode != 0:
        error_line(proc)
        assert_nothing_escaped(site, before)
        return
    # Accepted: then it is a sane environment, inside its directory, and nothing else changed.
    prefix = Path(proc.stdout.splitlines()[-1])
    assert prefix.parent == site.cache and (site.cache / f"{prefix.name}.ready").is_file()
    real_root = os.path.realpath(prefix)
    for dirpath, dirnames, filenames in os.walk(prefix):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st_ = os.lstat(path)
            assert stat.S_ISREG(st_.st_mode) or stat.S_ISDIR(st_.st_mode) or stat.S_ISLNK(st_.st_mode), path
            if not stat.S_ISLNK(st_.st_mode):
                assert not st_.st_mode & (stat.S_ISUID | stat.S_ISGID | stat.S_IWOTH), path
            if stat.S_ISLNK(st_.st_mode):
                real = os.path.realpath(path)
                assert real == real_root or real.startswith(real_root + "/"), (path, real)
    if prefix.name not in entries:
        for name in (prefix.name, f"{prefix.name}.ready", f"{prefix.name}.manifest"):
            before.update(
                {k: v for k, v in snapshot(site.root).items() if k == f"cache/{name}" or k.startswith(f"cache/{name}/")}
            )
    assert_nothing_escaped(site, before)


@pytest.fixture(scope="module")
def real_head(small_tarball: Path) -> tuple[bytes, list[int]]:
    """The first ~250 kB of the real bare Python 3.8 tarball: conda-pack's own headers, and a real
    interpreter (bin/python3.8), so the unmutated head is an environment the entrypoint accepts."""
    data, offsets = real_tar_head(small_tarball)
    assert len(offsets) > 10
    return data, offsets


def test_unmutated_real_head_is_accepted(site: Site, real_head: tuple[bytes, list[int]]) -> None:
    check_mutant(site, real_head[0], "tar.gz")
    assert list(site.cache.glob("*.ready"))


@settings(max_examples=15, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_header_mutants(site: Site, real_head: tuple[bytes, list[int]], data: st.DataObject) -> None:
    mutant = data.draw(mutants(*real_head))
    check_mutant(site, mutant.data, mutant.fmt)


@pytest.mark.slow
@settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_header_mutants_many(site: Site, real_head: tuple[bytes, list[int]], data: st.DataObject) -> None:
    mutant = data.draw(mutants(*real_head))
    check_mutant(site, mutant.data, mutant.fmt)


def test_cache_still_serves_after_every_hostile_archive(site: Site) -> None:
    """Runs last in this module: the good entry is still a cache hit, and its interpreter runs."""
    env = entry_env(MLSERVER_ENV_TARBALL=site.good, MLSERVER_ENV_CACHE_DIR=site.cache)
    proc = run_entrypoint(["python", "-c", "import sys; print(sys.prefix != '')"], env)
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stderr
    assert "cache hit" in proc.stderr
    # And a new environment still unpacks into it.
    fresh = write_tar(site.root / "fresh.tar.gz", [*tiny_env(extra_files=3), M("lib/fresh", data=os.urandom(64))])
    proc = run_entrypoint(["unpack"], entry_env(MLSERVER_ENV_TARBALL=fresh, MLSERVER_ENV_CACHE_DIR=site.cache))
    assert proc.returncode == 0 and "extract:" in proc.stderr, proc.stderr
    assert (
        subprocess.run([Path(proc.stdout.splitlines()[-1]) / "bin" / "python", "-c", "pass"], check=False).returncode
        == 0
    )


def _normal_by_components(name: str) -> str | None:
    """What a member name means, component by component (None: it must be refused)."""
    if "\0" in name or name.startswith("/"):
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    return None if ".." in parts or len(parts) > MAX_DEPTH else "/".join(parts)


@given(
    st.lists(st.sampled_from(["", ".", "..", "a", ".a", "a.", "..a", "a..", "...", "lib", "\0"]), max_size=8),
    st.sampled_from(["", "./", "/"]),
    st.sampled_from(["", "/", "//", "/."]),
)
def test_member_names_mean_what_their_components_say(parts: list[str], lead: str, trail: str) -> None:
    """The extractor's fast path for already-normal names agrees with the component-wise rule."""
    name = lead + "/".join(parts) + trail
    expected = _normal_by_components(name)
    if expected is None:
        with pytest.raises(ArchiveError):
            normalize(name)
    else:
        assert normalize(name) == expected


def test_member_names_deeper_than_allowed_are_refused() -> None:
    assert normalize("/".join(["d"] * MAX_DEPTH)) == "/".join(["d"] * MAX_DEPTH)
    for name in ("/".join(["d"] * (MAX_DEPTH + 1)), "/".join(["d"] * (MAX_DEPTH + 1)) + "/"):
        with pytest.raises(ArchiveError, match="levels deep"):
            normalize(name)


@given(st.binary(min_size=512, max_size=512))
def test_header_sum_is_the_plain_sum(block: bytes) -> None:
    """The checksum's Adler-32 shortcut is exact for every 512-byte block (all 0xff included)."""
    assert _header_sum(block) == sum(block[:148]) + 8 * 32 + sum(block[156:])
    assert _header_sum(b"\xff" * 512) == 255 * 504 + 8 * 32


@given(st.from_regex(r"\A[0-9]{1,12}(\.[0-9]{1,9})?\Z"), st.integers(-3, 3), st.sampled_from(["", "\0", "\n"]))
def test_pax_mtime_shortcut_agrees_with_the_general_parser(mtime: str, skew: int, tail: str) -> None:
    """The one-call path for conda-pack's usual pax header gives what the record rules give, also
    when its length field lies or something follows it."""
    body = f" mtime={mtime}\n"
    length = len(body) + 2 if len(body) + 2 < 100 else len(body) + 3
    data = f"{length + skew}{body}{tail}".encode()
    try:
        expected: dict[str, str] | None = _pax_records(data)
    except ArchiveError:
        expected = None
    fast = _pax_mtime_only(data)
    if fast is not None:  # taken only where the general parser reads exactly this mtime
        assert expected == {"mtime": mtime} and fast == _pax_mtime_ns(mtime)
    if skew == 0 and not tail:
        assert expected == {"mtime": mtime} and fast is not None


# --- The end of the stream, metadata floods, sparse files, zip oddities (found by a review) -------


def accept(site: Site, tarball: Path) -> Path:
    """A start with an unusual but sound archive: unpacked, its prefix returned."""
    proc = run_entrypoint(["unpack"], entry_env(MLSERVER_ENV_TARBALL=tarball, MLSERVER_ENV_CACHE_DIR=site.cache))
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("fmt", ["tar.gz", "tar.xz"])
def test_a_damaged_stream_is_found_past_a_padded_end(site: Site, fmt: str) -> None:
    """`tar -b 2048` pads to 1 MiB records: the reader still reads to the stream's end, where gzip
    and xz check their CRC, instead of stopping at the end-of-archive marker."""
    tar = tar_bytes([*tiny_env(), M("lib/b.txt", data=b"hello")]) + bytes(1 << 20)
    data = bytearray(gzip.compress(tar, compresslevel=0, mtime=0) if fmt == "tar.gz" else compress(tar, fmt))
    padded = site.root / f"padded.{fmt}"
    padded.write_bytes(bytes(data))
    assert (accept(site, padded) / "lib/b.txt").read_bytes() == b"hello"
    if fmt == "tar.gz":  # stored deflate blocks: the text is there to change
        at = data.index(b"hello")
        data[at : at + 5] = b"HELLO"
    else:
        data[-10] ^= 0xFF  # xz's index and footer: checked only at the stream's end
    damaged = site.root / f"damaged-end.{fmt}"
    damaged.write_bytes(bytes(data))
    refuse(site, damaged, "damaged-end", "corrupt")


def test_members_after_the_end_marker_are_refused_not_dropped(site: Site) -> None:
    """A lone zero block, or two archives concatenated: what follows would be silently lost."""
    head = tar_bytes(tiny_env(), end=False)
    lone = write_raw(site.root / "lone.tar.gz", head + bytes(512) + tar_bytes([M("lib/lost", data=b"x")]))
    refuse(site, lone, "after the end-of-archive marker")
    two = site.root / "two.tar.gz"
    two.write_bytes(compress(tar_bytes(tiny_env()), "tar.gz") + compress(tar_bytes([M("lib/lost")]), "tar.gz"))
    refuse(site, two, "after the end-of-archive marker")


def test_pax_sparse_file_is_refused(site: Site) -> None:
    """GNU tar's pax sparse format (1.0): the member's data is a map then the data, under a made-up
    name; extracted as is, it would be a wrong file where the real one is missing."""
    base = tar_bytes(tiny_env(), end=False)
    pax = pax_header({"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "lib/sparse",
                      "GNU.sparse.realsize": "10485760"})  # fmt: skip
    body = b"1\n5242880\n4\n".ljust(512, b"\0") + b"data".ljust(512, b"\0")
    path = write_raw(
        site.root / "sparse.tar.gz",
        base + pax + raw_header("lib/GNUSparseFile.1/sparse", b"%011o\0" % 1024) + body + end_of_archive(),
    )
    refuse(site, path, "lib/sparse", "sparse")


def test_metadata_headers_cannot_flood_the_reader(site: Site) -> None:
    """Pax headers cost no member and no unpacked byte: a few-kB tar.zst of them would otherwise
    keep a start busy for minutes."""
    base = tar_bytes(tiny_env(), end=False)
    flood = b"".join(pax_header({"comment": "x"}, typeflag=b"g") for _ in range(100_000))
    path = write_raw(
        site.root / "flood.tar.zst", base + flood + raw_header("lib/f", b"%011o\0" % 0) + end_of_archive(), "tar.zst"
    )
    assert path.stat().st_size < 100_000
    refuse(site, path, "metadata headers in a row")


def test_pax_records_keep_only_what_is_read() -> None:
    """Records the reader never uses are not kept: a megabyte of distinct keys in a global header
    would otherwise be held, and copied into every member's fields."""
    pax = pax_header({"path": "lib/a", "uname": "me", "SCHILY.xattr.user.x": "y", "GNU.sparse.major": "1"})
    assert _pax_records(pax[512:].rstrip(b"\0")) == {"path": "lib/a", "GNU.sparse.major": "1"}


@pytest.mark.parametrize(
    "body", [b"+13 path=abc\n", b"1_3 path=abc\n", b"99 path=abc\n"], ids=["sign", "underscore", "past-end"]
)
def test_pax_record_length_is_plain_decimal_within_the_header(body: bytes) -> None:
    """A record length int() takes but the format does not ("+13", "1_3"), or one past the header's
    end: GNU tar refuses the archive, tarfile skips the record and names the member from its
    ustar header; reading the record unpacked it under another name than either."""
    tar = raw_header("././@PaxHeader", b"%011o\0" % len(body), b"x") + body.ljust(512, b"\0")
    tar += raw_header("a", b"%011o\0" % 0) + end_of_archive()
    with pytest.raises(ArchiveError, match="malformed pax header"):
        list(archive.members(io.BytesIO(tar)))


@pytest.mark.parametrize("flag,kind", [(b"L", b"0"), (b"K", b"2")], ids=["long-name", "long-link"])
def test_an_empty_gnu_long_name_is_not_replaced_by_the_ustar_one(flag: bytes, kind: bytes, tmp_path: Path) -> None:
    """A GNU long name or link record holding nothing names the next member (or its target) "":
    GNU tar and tarfile fail on it; the reader took the ustar field instead, unpacking a member
    neither of them would."""
    tar = raw_header("././@LongLink", b"%011o\0" % 1, flag) + bytes(512)
    member = bytearray(raw_header("decoy", b"%011o\0" % 0, kind))
    member[157:162] = b"decoy"
    tar += fix_checksum(bytes(member)) + end_of_archive()
    with pytest.raises(ArchiveError, match=r"root|empty"):
        extract.extract(archive.members(io.BytesIO(tar)), tmp_path, extract.Limits(100, 1 << 20))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("flag", [b"x", b"L", b"K"])
def test_two_extended_headers_for_one_member_are_refused(flag: bytes, tmp_path: Path) -> None:
    """Two pax headers (or two GNU long names, or links) before one member: GNU tar takes the last,
    tarfile the first, so a tarfile-based check of the archive would see another name than the one
    unpacked. No tar writes that; it is refused."""

    def meta(value: str) -> bytes:
        if flag == b"x":
            return pax_header({"path": value})
        data = value.encode() + b"\0"
        return raw_header("././@LongLink", b"%011o\0" % len(data), flag) + data.ljust(512, b"\0")

    member = bytearray(raw_header("lib/plain", b"%011o\0" % 0, b"0" if flag != b"K" else b"2"))
    member[157:162] = b"other"
    tar = meta("lib/seen") + meta("lib/unpacked") + fix_checksum(bytes(member)) + end_of_archive()
    with pytest.raises(ArchiveError, match=f"two '{flag.decode()}' headers for one member"):
        extract.extract(archive.members(io.BytesIO(tar)), tmp_path, extract.Limits(100, 1 << 20))
    assert not list(tmp_path.iterdir())


def test_metadata_total_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Metadata that comes one header per member stays under the in-a-row bound; the archive's
    total is bounded too (lowered here: the real bound is 256 MiB)."""
    monkeypatch.setattr(tarstream, "MAX_META_TOTAL", 10_000)
    tar = tar_bytes([M(f"lib/{'x' * 200}{i}", data=b"") for i in range(100)])  # a pax path record each
    with pytest.raises(ArchiveError, match="MiB of tar metadata"):
        list(archive.members(io.BytesIO(tar)))


def test_zip_flags_zipfile_cannot_read_are_refused(site: Site) -> None:
    zpath = site.root / "flags.zip"
    for bit, words in ((0x20, "compressed patched data"), (0x40, "strongly encrypted")):

        def flag(offset: int, bit: int = bit) -> Callable[[bytearray, int], None]:
            return lambda d, at: d.__setitem__(at + offset, d[at + offset] | bit)

        write_zip(zpath, tiny_env())
        _patch_zip_entry(zpath, "conda-meta/history", flag(6), flag(8))
        refuse(site, zpath, "flags.zip", words)


def test_zip_with_bytes_cut_out_is_the_archive_s_fault(site: Site) -> None:
    """The central directory survives, the local headers it points at are gone: zipfile seeks
    before the file's start (EINVAL), which is the archive's fault, not the cache's."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("bin/python", HOST_PYTHON.read_bytes()[:3000])
        zf.writestr("lib/e", bytes(range(256)) * 100)
    whole = buf.getvalue()
    cut = site.root / "cut.zip"
    cut.write_bytes(whole[:200] + whole[-200:])
    line = refuse(site, cut, "cut.zip", "corrupt")
    assert "MLSERVER_ENV_CACHE_DIR" not in line


def test_zip_entries_with_permission_bits_only_are_files(site: Site) -> None:
    """ZipFile.writestr records 0o600 without a file type: a file, as unzip reads it."""
    zpath = write_zip(site.root / "plain.zip", tiny_env())
    with zipfile.ZipFile(zpath, "a") as zf:
        zf.writestr("lib/plain.txt", b"plain")
        assert zf.getinfo("lib/plain.txt").external_attr >> 16 == 0o600
    assert (accept(site, zpath) / "lib/plain.txt").read_bytes() == b"plain"


def test_a_tar_zst_from_pzstd_is_read(site: Site) -> None:
    """pzstd writes a skippable frame (the next frame's size) before every frame: a legitimate
    .tar.zst that zstd and GNU tar read. Its first bytes were not taken for zstd's."""
    if shutil.which("pzstd") is None:
        unavailable("needs pzstd (the zstd package; scripts/install-system-deps installs it)")
    tar = write_tar(site.root / "env.tar", tiny_env(extra_files=5), "tar")
    subprocess.run(["pzstd", "-q", "-f", "-p", "2", str(tar), "-o", str(site.root / "env.tar.zst")], check=True)
    assert (site.root / "env.tar.zst").read_bytes()[:4] == b"\x50\x2a\x4d\x18"
    env = entry_env(MLSERVER_ENV_TARBALL=site.root / "env.tar.zst", MLSERVER_ENV_CACHE_DIR=site.root / "pzstd-cache")
    proc = run_entrypoint(["unpack"], env)
    assert proc.returncode == 0, proc.stderr
    assert (Path(proc.stdout.splitlines()[-1]) / "share/doc/README").read_bytes() == b"tiny\n"


def test_xz_dictionary_too_big_to_decode_in_bounded_memory(site: Site) -> None:
    """An xz block header picks the dictionary size, up to 3 GiB, and the decoder fills that much
    as it writes (a 64 KB tar.xz of zeros once took 450 MB resident): past 128 MiB (zstd's
    default window limit) the archive is refused with one line, before anything is decoded."""
    path = site.root / "bigdict.tar.xz"
    path.write_bytes(set_xz_dictionary(compress(tar_bytes(tiny_env()), "tar.xz"), 37))
    refuse(site, path, "bigdict.tar.xz", "xz", "MiB of memory")


def test_xz_stream_padding_is_read(site: Site) -> None:
    """xz streams may be followed by stream padding (NUL bytes, a multiple of four), and xz and GNU
    tar read such a file; LZMAFile took the padding for a cut-short stream. Other padding is not xz."""
    import lzma

    tar = tar_bytes(tiny_env(extra_files=5))
    good = lzma.compress(tar[:5000]) + bytes(4) + lzma.compress(tar[5000:]) + bytes(8)
    path = site.root / "padded.tar.xz"
    path.write_bytes(good)
    env = entry_env(MLSERVER_ENV_TARBALL=path, MLSERVER_ENV_CACHE_DIR=site.root / "xz-cache")
    proc = run_entrypoint(["unpack"], env)
    assert proc.returncode == 0, proc.stderr
    assert (Path(proc.stdout.splitlines()[-1]) / "share/doc/README").read_bytes() == b"tiny\n"
    path.write_bytes(good[:-1])
    refuse(site, path, "padded.tar.xz", "padding")


def _many_cores_and_one(site: Site, path: Path) -> list[tuple[int, set[str], str]]:
    """What a start makes of `path` on every core it may use, and on one: exit code, tree, error."""
    return [
        _outcome(site, path, {}, preexec_fn=lambda cores=cores: os.sched_setaffinity(0, cores))
        for cores in (os.sched_getaffinity(0), {min(os.sched_getaffinity(0))})
    ]


def _outcome(site: Site, path: Path, env: dict[str, str], **kw: object) -> tuple[int, set[str], str]:
    """What a start with `env` added makes of `path` in an empty cache: exit code, tree and error line."""
    shutil.rmtree(site.cache, ignore_errors=True)
    proc = run_entrypoint(
        ["unpack"], {**entry_env(MLSERVER_ENV_TARBALL=path, MLSERVER_ENV_CACHE_DIR=site.cache), **env}, **kw
    )
    prefix = Path(proc.stdout.splitlines()[-1]) if proc.returncode == 0 else None
    tree = {str(p.relative_to(prefix)) for p in prefix.rglob("*")} if prefix else set()
    return proc.returncode, tree, error_line(proc) if proc.returncode else ""


def test_xz_streams_read_and_refuse_alike_on_one_thread_and_several(site: Site) -> None:
    """The streams of a tar.xz (conda-pack -j writes one per 4 MiB) are decoded on several threads
    when there are cores for them, else in one: the same archives are read into the same trees,
    and the same refused, for the same reason."""
    if len(os.sched_getaffinity(0)) < 2:
        unavailable("decoding xz streams on several threads needs two cores")
    tar = tar_bytes([*tiny_env(extra_files=40), M("lib/b.txt", data=b"hello")])
    parts = xz_streams(tar, 4096)
    index_flipped = bytearray(parts[1])
    index_flipped[-14] ^= 0x01  # the second stream's index: its CRC-32, before the footer
    flipped = bytearray(parts[2])
    flipped[len(flipped) // 2] ^= 0x5A
    big = b"".join(parts[:-1]) + set_xz_dictionary(parts[-1], 30)
    cases = {
        "streams": b"".join(parts),
        "padding between": bytes(4).join(parts) + bytes(8),
        "every stream asks for 64 MiB": b"".join(set_xz_dictionary(part, 28) for part in parts),
        "a later stream asks for 128 MiB": big,
        "a later stream asks for 1.5 GiB": b"".join(parts[:-1]) + set_xz_dictionary(parts[-1], 37),
        "padding of three": bytes(3).join(parts),
        "junk between": b"JUNK".join(parts),
        "junk after": b"".join(parts) + b"JUNK",
        "a stream's data flipped": b"".join([*parts[:2], bytes(flipped), *parts[3:]]),
        "a stream's index flipped": b"".join([parts[0], bytes(index_flipped), *parts[2:]]),
        "cut": b"".join(parts)[:-100],
        "an escape in the first stream": b"".join(xz_streams(tar_bytes([M("../evil", data=b"x")]) + tar, 4096)),
        "an index hiding a block's 128 MiB dictionary": _two_blocks_listed_as_one(parts) + b"".join(parts[2:]),
    }
    for name, data in cases.items():
        path = site.root / "env.tar.xz"
        path.write_bytes(data)
        several, one = _many_cores_and_one(site, path)
        assert several[:2] == one[:2], name
        reasons = [re.sub(r" \(.*?\);", ";", outcome[2]) for outcome in (several, one)]  # a codec's words may differ
        assert reasons[0] == reasons[1], name
        assert (several[0] == 0) == (name in list(cases)[:4]), (name, several)


def _two_blocks_listed_as_one(parts: list[bytes]) -> bytes:
    """A stream of two blocks, the second asking for a 128 MiB dictionary, whose index lists them
    as one block: the one header read before decoding asks for little."""
    (a, b) = (xz_blocks(parts[0])[0], xz_blocks(set_xz_dictionary(parts[1], 30))[0])
    return xz_stream([a, b], records=[(len(a[0]) + b[1], a[2] + b[2])])


def _decoded(raw: io.BufferedIOBase) -> bytes | None:
    """The bytes decoded, or None if they were refused as a corrupt archive."""
    from entrypoint import decode

    stream = decode.decoder("tar.xz", cast(BinaryIO, raw))
    try:
        return b"".join(iter(lambda: stream.read(1000), b""))  # less than a chunk: the rest is kept
    except ArchiveError as exc:
        assert "corrupt or truncated archive" in str(exc)
        return None
    finally:
        stream.close()


@given(
    st.lists(st.tuples(st.binary(min_size=0, max_size=3000), st.sampled_from([0, 3, 4, 8])), min_size=2, max_size=6),
    st.sampled_from(["none", "flip", "cut", "junk", "zeros"]),
    st.integers(0, 1 << 20),
)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_xz_streams_told_from_the_end_decode_as_the_whole_does(
    tmp_path: Path, streams: list[tuple[bytes, int]], damage: str, where: int
) -> None:
    """The streams found from a file's end and decoded apart give the same bytes as the file
    decoded from its start in one stream, or are refused where it is (the reason may differ:
    decoded apart, a damaged stream can look cut short)."""
    data = bytearray(b"".join(compress(piece, "tar.xz") + bytes(pad) for piece, pad in streams))
    if damage == "flip":
        data[where % len(data)] ^= 0x10
    elif damage == "cut":
        del data[where % len(data) :]
    else:
        data += b"JUNK" if damage == "junk" else bytes(4)
    path = tmp_path / "s.xz"
    path.write_bytes(data)
    with path.open("rb") as raw:
        assert _decoded(raw) == _decoded(io.BytesIO(data))  # BytesIO has no file descriptor: one stream
    if damage == "none" and not any(pad % 4 for _, pad in streams):
        with path.open("rb") as raw:
            assert _decoded(raw) == b"".join(piece for piece, _ in streams)


def test_xz_streams_are_told_apart_only_within_bounds(tmp_path: Path) -> None:
    """Past MAX_PARTS streams and blocks, or with a block header cut short, a file's streams are
    not told apart (it is then decoded from its start, as one stream)."""
    from entrypoint import xzindex

    empty = compress(b"", "tar.xz")  # a stream without blocks
    cut = compress(b"x", "tar.xz")[:13]  # the stream header, then a block header's first byte
    listed = empty + xz_stream([], records=[(0, 0)] * (xzindex.MAX_INDEX // 2 - 8))  # a 1 MiB index
    for data, parts in [(empty * 1000, 1000), (empty * (xzindex.MAX_PARTS + 1), None), (cut, None), (listed, None)]:
        path = tmp_path / "s.xz"
        path.write_bytes(data)
        with path.open("rb") as raw:
            tracemalloc.start()
            found = xzindex.streams(raw.fileno(), len(data))
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert (found and len(found)) == parts
            assert data != listed or peak < 2 * xzindex.MAX_INDEX  # the index read, never a list made of it
            assert data != cut or xzindex.dictionary(raw.fileno(), 12) is None


def test_xz_streams_decoded_apart_fail_for_good_and_start_or_fall_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read after a refusal is refused again (the thread that failed is gone); when a thread
    cannot be started, the file is decoded in one, and no thread is left behind."""
    from entrypoint import decode

    tar = tar_bytes(tiny_env(extra_files=40))
    parts = xz_streams(tar, 4096)
    flipped = bytearray(parts[2])
    flipped[len(flipped) // 2] ^= 0x5A
    path = tmp_path / "s.xz"
    path.write_bytes(b"".join([*parts[:2], bytes(flipped), *parts[3:]]))
    with path.open("rb") as raw:
        stream = decode.decoder("tar.xz", raw)
        with pytest.raises(ArchiveError):
            while stream.read(archive.CHUNK):
                pass
        with pytest.raises(ArchiveError):
            stream.read(archive.CHUNK)
        stream.close()

    path.write_bytes(b"".join(parts))
    before, start = threading.active_count(), threading.Thread.start
    started: list[threading.Thread] = []

    def second_fails(thread: threading.Thread) -> None:
        if started:
            raise RuntimeError("can't start new thread")
        started.append(thread)
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", second_fails)
    with path.open("rb") as raw:
        stream = decode.decoder("tar.xz", raw)
        assert b"".join(iter(lambda: stream.read(archive.CHUNK), b"")) == tar
        stream.close()
    assert started and threading.active_count() == before


def test_zip_deflate_stream_ending_before_its_size_is_refused_not_looped(site: Site) -> None:
    """A deflated member whose stream ends before the size the directory gives, more bytes after it
    inside its compressed size: zlib keeps those bytes as its unconsumed input once output was
    capped, and feeding them again decodes nothing, for good (the start spun at 100% CPU)."""
    packer = zlib.compressobj(6, zlib.DEFLATED, -15)
    stream = packer.compress(bytes(range(256)) * 4096) + packer.flush()  # 1 MiB: decoded in capped pieces
    zpath = write_zip(site.root / "short-deflate.zip", tiny_env())
    with zipfile.ZipFile(zpath, "a", zipfile.ZIP_STORED) as zf:  # a stand-in of the size, made deflated below
        zf.writestr("lib/short.bin", stream + b"junk" * 1024)
        info = zf.getinfo("lib/short.bin")
    data = bytearray(zpath.read_bytes())
    for at in (info.header_offset + 4, data.rindex(b"PK\x01\x02") + 6):  # local header, then central record
        struct.pack_into("<H", data, at + 4, zipfile.ZIP_DEFLATED)
        struct.pack_into("<L", data, at + 18, 2 << 20)  # the size: more than the stream decodes to
    zpath.write_bytes(bytes(data))
    refuse(site, zpath, "short-deflate.zip", "lib/short.bin", "before its size")


def test_zip64_extra_field_longer_than_its_record_is_refused(site: Site) -> None:
    """A zip64 extra field (tag 1) claiming 24 bytes where the record holds 8: struct's error,
    which no handler took for a corrupt archive, ended the start with a traceback."""
    zpath = write_zip(site.root / "zip64-extra.zip", tiny_env())
    with zipfile.ZipFile(zpath, "a") as zf:
        info = zipfile.ZipInfo("lib/big.bin")
        info.extra = struct.pack("<HHQ", 0x9999, 8, 0)  # an unknown field, made a zip64 one below
        zf.writestr(info, b"data")
    data = bytearray(zpath.read_bytes())
    central = data.rindex(b"PK\x01\x02")
    struct.pack_into("<L", data, central + 24, 0xFFFFFFFF)  # the size: in the zip64 field
    extra = central + 46 + len("lib/big.bin")
    struct.pack_into("<HH", data, extra, 1, 24)
    zpath.write_bytes(bytes(data))
    refuse(site, zpath, "zip64-extra.zip", "corrupt")


def test_zip_directory_holding_more_records_than_counted_is_refused(site: Site) -> None:
    """The end record counts fewer members than the central directory holds: zipfile and unzip
    read every record (unzip then fails), the start unpacked the counted ones and dropped the
    rest without a word, an environment missing files."""
    zpath = write_zip(site.root / "count.zip", tiny_env())
    data = bytearray(zpath.read_bytes())
    end = data.rindex(b"PK\x05\x06")
    count = int.from_bytes(data[end + 10 : end + 12], "little")
    struct.pack_into("<HH", data, end + 8, count - 1, count - 1)
    zpath.write_bytes(bytes(data))
    with zipfile.ZipFile(zpath) as zf:
        assert len(zf.infolist()) == count
    refuse(site, zpath, "count.zip", "corrupt")


# --- Found by a review: pax times no clock holds, bytes after a stream, advice in every line ----


@pytest.mark.parametrize("value", ["nan", "1e400", "1.5e9", "12abc", "+5", "."])
def test_a_pax_mtime_that_is_no_decimal_number_is_refused(site: Site, value: str) -> None:
    """It was read as "no time", and the file got the time of the start (docs/safety.md: a time no clock can hold)."""
    base = tar_bytes(tiny_env(), end=False)
    path = site.root / "pax-mtime.tar.gz"
    write_raw(path, base + pax_header({"mtime": value}) + raw_header("lib/t", b"%011o\0" % 1) + b"a" + bytes(511))
    refuse(site, path, "lib/t", "bad pax mtime", "corrupt")


def test_an_empty_pax_mtime_leaves_the_header_s_time(site: Site) -> None:
    """POSIX: an empty value deletes the record, so the ustar header's mtime holds."""
    base = tar_bytes(tiny_env(), end=False)
    path = site.root / "pax-mtime-empty.tar.gz"
    header = raw_header("lib/t", b"%011o\0" % 1, mtime_field=b"%011o\0" % 1_600_000_000)
    write_raw(path, base + pax_header({"mtime": ""}) + header + b"a" + bytes(511) + end_of_archive())
    assert (accept(site, path) / "lib/t").stat().st_mtime == 1_600_000_000


@pytest.mark.parametrize("fmt", ["tar.gz", "tar.bz2", "tar.xz", "tar.zst"])
def test_bytes_after_the_compressed_stream_are_refused_and_more_streams_are_read(site: Site, fmt: str) -> None:
    """bzip2's reader ignored what followed its stream (gzip, xz and zstd refused it); a second
    stream of the same format (pbzip2, pigz -i, pzstd) is the archive's continuation."""
    tar = tar_bytes([*tiny_env(), M("lib/b.txt", data=b"hello")])
    two = site.root / f"two-streams.{fmt}"
    two.write_bytes(compress(tar[: len(tar) // 2], fmt) + compress(tar[len(tar) // 2 :], fmt))
    assert (accept(site, two) / "lib/b.txt").read_bytes() == b"hello"
    junk = site.root / f"junk-after.{fmt}"
    junk.write_bytes(compress(tar, fmt) + b"JUNK" * 64)
    refuse(site, junk, "junk-after", "corrupt")
    if fmt != "tar.zst":  # zero padding after the stream: bzip2, gzip and xz (and GNU tar with them) accept it
        padded = site.root / f"zeros-after.{fmt}"
        padded.write_bytes(compress(tar, fmt) + bytes(1024))
        assert (accept(site, padded) / "lib/b.txt").read_bytes() == b"hello"
        padded.write_bytes(compress(tar, fmt) + bytes(1024) + b"JUNK")
        refuse(site, padded, "zeros-after", "corrupt")


@given(
    st.lists(st.tuples(st.binary(max_size=3000), st.sampled_from([b"", b"\0" * 16, b"JUNK"])), min_size=1, max_size=3),
    st.integers(0, 40),
    st.integers(1, 5000),
    st.booleans(),
)
@settings(max_examples=300, deadline=None)
def test_what_lbzip2_would_skip_is_told_at_every_bit_offset_and_chunking(
    streams: list[tuple[bytes, bytes]], zeros: int, chunk: int, junk: bool
) -> None:
    """lbzip2 skips, without a word, whatever follows a stream but another stream: the decoder
    tells from the bytes fed to it whether each stream starts where one ends and whether they end
    as a bzip2 stream does (whose CRC may itself end in zero bytes), then zeros at most."""
    from entrypoint.decode import StreamEnds

    gaps = [gap for _, gap in streams[:-1]]
    data = b"".join(compress(p, "tar.bz2") + gap for p, gap in streams[:-1]) + compress(streams[-1][0], "tar.bz2")
    data += bytes(zeros) + (b"JUNK" if junk else b"")
    ends = StreamEnds()
    for at in range(0, len(data), chunk):
        ends.update(data[at : at + chunk])
    assert ends.complete() is (not junk and not any(gaps))


def _lbzip2_and_libbz2(site: Site, path: Path, hidden: Path) -> list[tuple[int, set[str], str]]:
    """What a start makes of `path` with lbzip2 and with libbz2 (lbzip2 off the PATH): exit code,
    tree and error line."""
    options = {"LBZIP2": "-f", "BZIP2": "-f", "BZIP": "-f"}  # lbzip2's option variables: -f passes other bytes through
    return [_outcome(site, path, {"PATH": path_var, **options}) for path_var in (os.environ["PATH"], str(hidden))]


def test_lbzip2_and_libbz2_read_and_refuse_alike(site: Site, tmp_path: Path) -> None:
    """bzip2 is decoded by lbzip2 when it is installed, else by Python's bz2: the same archives
    are read into the same trees, and the same refused."""
    if shutil.which("lbzip2") is None:
        unavailable("lbzip2 is not installed (scripts/install-system-deps)")

    hidden = tmp_path / "bin"  # a PATH without lbzip2
    hidden.mkdir()
    tar = tar_bytes([*tiny_env(extra_files=30), M("lib/b.txt", data=b"hello")])
    one = compress(tar, "tar.bz2")
    two = compress(tar_bytes([*tiny_env(), M("lib/c.txt", data=b"second")]), "tar.bz2")
    flipped = bytearray(one)
    flipped[len(one) // 2] ^= 0x5A
    cases = {
        "one": one,
        "two streams": compress(tar[:5000], "tar.bz2") + compress(tar[5000:], "tar.bz2"),
        "zero padding": one + bytes(1024),
        "junk after": one + b"JUNK" * 64,
        "zeros then junk": one + bytes(1024) + b"JUNK",
        "many zeros then junk": one + bytes(1 << 20) + b"JUNK",  # more than lbzip2 reads after its last stream
        "zeros between streams": one + bytes(16) + two,
        "junk between streams": one + b"JUNK" + two,
        "junk then an empty stream": one + b"JUNK" + compress(b"", "tar.bz2"),
        "not bzip2 past its magic": tar_bytes([M("BZh0", data=b"x"), *tiny_env()]),
        "cut": one[: len(one) // 2],
        "cut at the end": one[:-5],
        "flipped": bytes(flipped),
        "empty": b"",
    }
    for name, data in cases.items():
        path = site.root / "env.tar.bz2"
        path.write_bytes(data)
        with_tool, without = _lbzip2_and_libbz2(site, path, hidden)
        assert with_tool[:2] == without[:2], name
        assert (with_tool[0] == 0) == (name in ("one", "two streams", "zero padding")), (name, with_tool[0])
        lbzip2_said = ("cut", "cut at the end", "flipped", "not bzip2 past its magic")
        assert ("lbzip2" in with_tool[2]) == (name in lbzip2_said), (name, with_tool[2])


def test_lbzip2_failing_for_another_reason_than_the_bytes_says_so(site: Site, tmp_path: Path) -> None:
    """lbzip2 killed (as by the OOM killer) is not a corrupt archive: exit 2, and what to do."""
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "lbzip2").write_text("#!/bin/sh\nkill -9 $$\n")
    (tools / "lbzip2").chmod(0o755)
    path = site.root / "env.tar.bz2"
    path.write_bytes(compress(tar_bytes(tiny_env()), "tar.bz2"))
    env = entry_env(MLSERVER_ENV_TARBALL=path, MLSERVER_ENV_CACHE_DIR=site.cache, PATH=f"{tools}:/usr/bin:/bin")
    proc = run_entrypoint(["unpack"], env)
    assert proc.returncode == 2, proc.stderr
    line = error_line(proc)
    assert "lbzip2 was killed by signal 9" in line and "take lbzip2 off its PATH" in line, line


def test_every_refusal_says_what_to_do(site: Site) -> None:
    """The extractor's rules name what is wrong ("'..' in path"); the line also says what to do,
    and an error with its own advice does not get the general one as well."""
    path = write_tar(site.root / "dotdot.tar.gz", [*tiny_env(), M("../evil", data=b"x")])
    line = refuse(site, path, "'..' in path")
    assert line.endswith(f"; {ARCHIVE_ADVICE}"), line
    for name in ("lib/a; b/../../x", "lib/sda"):  # "; " in a name, or in a refusal's words, is no advice
        member = M(name, data=b"x") if name.endswith("x") else M(name, "blk")
        path = write_tar(site.root / "semicolon.tar.gz", [*tiny_env(), member])
        line = refuse(site, path, name)
        assert line.endswith(f"; {ARCHIVE_ADVICE}"), line
    cut = site.root / "cut.tar.gz"
    cut.write_bytes(site.good.read_bytes()[:-100])
    line = refuse(site, cut, "corrupt or truncated")
    assert line.endswith("pack it again") and ARCHIVE_ADVICE not in line, line
