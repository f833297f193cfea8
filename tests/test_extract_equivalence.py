"""The hand-written tar reader and extractor produce the tree GNU tar produces (issues 3 and 5)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest
from archives import content_tree, end_of_archive, fix_checksum, raw_header, xz_streams
from support import unavailable

from entrypoint import archive, extract, xzindex

LIMITS = extract.Limits(max_members=10**6, max_unpacked_bytes=1 << 40)


@pytest.mark.parametrize("fixture", ["small_tarball", "seed"])
def test_same_tree_as_gnu_tar(fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    value = request.getfixturevalue(fixture)
    tarball = value if isinstance(value, Path) else value.tarball
    stats = _ours(tarball, tmp_path / "ours")
    files = _assert_same_tree(tmp_path / "ours", _gnu_tar(tarball, tmp_path / "theirs"))
    assert stats.files == files


# Each format conda-pack writes, made from the tar of a real conda-pack tarball by the format's
# usual tool (tar.xz as `conda-pack -j` writes it, one stream per 4 MiB, and as one stream).
WRITERS: dict[str, Callable[[Path, Path], None]] = {
    "tar": lambda tar, out: shutil.copyfile(tar, out),
    "tar.bz2": lambda tar, out: _pipe(["lbzip2", "-c", str(tar)], out),
    "tar.xz": lambda tar, out: out.write_bytes(b"".join(xz_streams(tar.read_bytes(), 4 << 20))),
    "tar.xz-one-stream": lambda tar, out: _pipe(["xz", "-0", "-T1", "-c", str(tar)], out),
    "tar.zst": lambda tar, out: _pipe(["zstd", "-q", "-c", str(tar)], out),
}


TOOLS = {"tar.bz2": ("lbzip2",), "tar.xz-one-stream": ("xz",), "tar.zst": ("zstd",), "zip": ("zip",)}


@pytest.fixture(scope="module")
def gnu_tree(small_tarball: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The small tarball's tar, and the tree GNU tar makes of it."""
    work = tmp_path_factory.mktemp("formats")
    tar = work / "env.tar"
    _pipe(["gzip", "-dc", str(small_tarball)], tar)
    return tar, _gnu_tar(tar, work / "gnu")


@pytest.mark.parametrize("fmt", [*WRITERS, "zip"])
def test_same_tree_as_gnu_tar_in_every_format(fmt: str, gnu_tree: tuple[Path, Path], tmp_path: Path) -> None:
    """Every format is read by its own decoder (a multi-stream tar.xz by two threads), then the same
    reader and extractor: each gives GNU tar's tree. The zip is Info-ZIP's of that tree, whose
    times keep 2-second steps."""
    tar, theirs = gnu_tree
    for tool in TOOLS.get(fmt, ()):
        if shutil.which(tool) is None:
            unavailable(f"{tool} writes the {fmt} (scripts/install-system-deps installs it)")
    archive_path = tmp_path / f"env.{fmt}"
    if fmt == "zip":
        subprocess.run(["zip", "-q", "-r", "-y", str(archive_path), "."], cwd=theirs, check=True)
    else:
        WRITERS[fmt](tar, archive_path)
    if fmt == "tar.xz":  # as conda-pack -j writes it: found from its end, so decoded on two threads
        with open(archive_path, "rb") as f:
            assert len(xzindex.streams(f.fileno(), archive_path.stat().st_size) or []) > 1
    stats = _ours(archive_path, tmp_path / "ours")
    files = _assert_same_tree(tmp_path / "ours", theirs, mtime_step=2 if fmt == "zip" else 1)
    assert stats.files == files


def _pipe(argv: list[str], out: Path) -> None:
    with open(out, "wb") as f:
        subprocess.run(argv, stdout=f, check=True)


def _ours(tarball: Path, dest: Path) -> extract.Stats:
    dest.mkdir()
    with open(tarball, "rb") as raw:
        return extract.extract(archive.members(raw), dest, LIMITS)


def _gnu_tar(tarball: Path, dest: Path) -> Path:
    dest.mkdir()
    subprocess.run(["tar", "-xf", str(tarball), "-C", str(dest), "--no-same-owner"], check=True)
    return dest


def _assert_same_tree(ours: Path, theirs: Path, mtime_step: int = 1) -> int:
    """Same names, kinds, content, links and mtimes (in seconds, what .pyc files record, to within
    `mtime_step`); the permission bits are GNU tar's minus group/other write, as documented. The
    number of files."""
    a, b = content_tree(ours, mtimes=True), content_tree(theirs, mtimes=True)
    assert a.keys() == b.keys()
    for rel, (kind, mode, content) in b.items():
        assert a[rel][0] == kind, rel
        if kind != "file":
            assert a[rel][2] == content, rel
            continue
        (digest, mtime), (our_digest, our_mtime) = cast(tuple[str, int], content), cast(tuple[str, int], a[rel][2])
        assert our_digest == digest and abs(our_mtime - mtime) < mtime_step, rel
        assert a[rel][1] == (mode & 0o755) | 0o600, rel
    return sum(1 for kind, _, _ in b.values() if kind == "file")


def _trees(tar: bytes, tmp_path: Path) -> tuple[dict[str, tuple[str, object]], dict[str, tuple[str, object]]]:
    """What our reader and extractor, and GNU tar, make of an uncompressed tar: kind and content."""
    tarball, ours, theirs = tmp_path / "t.tar", tmp_path / "ours", tmp_path / "theirs"
    tmp_path.mkdir()
    tarball.write_bytes(tar)
    ours.mkdir()
    theirs.mkdir()
    with open(tarball, "rb") as raw:
        extract.extract(archive.members(raw), ours, LIMITS)
    subprocess.run(["tar", "-xf", str(tarball), "-C", str(theirs), "--no-same-owner"], check=True)
    a, b = ({rel: (kind, data) for rel, (kind, _, data) in content_tree(root).items()} for root in (ours, theirs))
    return a, b


def _header(name: str, size: int, flag: bytes, link: str = "") -> bytes:
    h = bytearray(raw_header(name, b"%011o\0" % size, flag))
    h[157:257] = link.encode().ljust(100, b"\0")
    return fix_checksum(bytes(h))


def _file(name: str, data: bytes) -> bytes:
    return raw_header(name, b"%011o\0" % len(data)) + data + bytes(-len(data) % 512)


@pytest.mark.parametrize("flag,link", [(b"5", ""), (b"2", "after"), (b"1", "x")], ids=["dir", "symlink", "hardlink"])
def test_no_data_after_a_directory_or_link_whatever_its_size(flag: bytes, link: str, tmp_path: Path) -> None:
    """POSIX stores no data after a directory (whose size field may be an allocation hint) or a
    link; GNU tar and tarfile read the next header right after one. Skipping the size's bytes
    dropped the members there silently, and read members that tar sees as a file's data."""
    before = _file("x", b"x")
    hidden = _file("smuggled", b"!")  # where a reader that skips 1024 bytes would land
    plain = before + _header("d", 1024, flag, link) + _file("after", b"ok") + end_of_archive()
    ours, theirs = _trees(plain, tmp_path / "plain")
    assert ours == theirs and "after" in ours
    cover = _file("cover", bytes(512) + hidden + bytes(512))
    smuggle = before + _header("d", 1024, flag, link) + cover + end_of_archive()
    ours, theirs = _trees(smuggle, tmp_path / "smuggle")
    assert ours == theirs and "smuggled" not in ours


@pytest.mark.parametrize("flag", [b"0", b"\0", b"7"], ids=["regular", "old-regular", "contiguous"])
def test_a_file_member_named_with_a_slash_is_a_directory(flag: bytes, tmp_path: Path) -> None:
    """Old tars (v7, early BSD) wrote directories as file members whose name ends in "/"; GNU tar
    makes a directory of one. It was written as an empty file, so its members were refused."""
    tar = _header("share/old/", 0, flag) + _file("share/old/f", b"in") + end_of_archive()
    ours, theirs = _trees(tar, tmp_path / "t")
    assert ours == theirs and ours["share/old"] == ("dir", None)


@pytest.mark.parametrize("version", [b"00", b"\0\0", b"  "], ids=["posix", "nul", "spaces"])
def test_a_ustar_prefix_is_read_whatever_the_version_field(version: bytes, tmp_path: Path) -> None:
    """GNU tar and tarfile join the prefix field (345-500) to the name whenever the magic is
    "ustar\\0", whatever the two version bytes after it; requiring "00" put such a member at its
    name alone, outside the directory its archive gave it, without a word."""
    h = bytearray(_header("n", 1, b"0"))
    h[257:265] = b"ustar\0" + version
    h[345 : 345 + 9] = b"share/doc"
    tar = fix_checksum(bytes(h)) + b"x" + bytes(511) + end_of_archive()
    ours, theirs = _trees(tar, tmp_path / "t")
    assert ours == theirs and ours["share/doc/n"][0] == "file"


def test_a_checksum_summed_as_signed_bytes_is_accepted(tmp_path: Path) -> None:
    """Some old tars (Sun, early GNU) summed the header as signed chars, which differs once a name
    holds a byte over 0x7f; GNU tar and tarfile accept either sum, the start refused the archive
    as corrupt."""
    h = bytearray(_header("café/é", 1, b"0"))
    h[148:156] = b" " * 8
    signed = sum(b - 256 if b > 127 else b for b in h)
    assert signed != sum(h)
    h[148:156] = b"%06o\0 " % signed
    tar = bytes(h) + b"x" + bytes(511) + end_of_archive()
    ours, theirs = _trees(tar, tmp_path / "t")
    assert ours == theirs and ours["café/é"][0] == "file"
