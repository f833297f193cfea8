"""Peak memory does not grow with the number of files: the promise is 64 MiB whatever the
environment's size, and a 300,000-file environment once took 69 MiB before its manifest was even
listed (a dict entry per member in the extractor, a string per file in the manifest).

Measured with tracemalloc, which counts every Python allocation exactly, so the comparison of a
small and a large tree is deterministic; the benchmark (`make bench`) reports the process's RSS.
"""

from __future__ import annotations

import io
import os
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from archives import M, end_of_archive, raw_header, tiny_env, write_tar, write_zip, xz_streams
from support import unavailable

from entrypoint import archive, inspection, manifest, settings, zipindex
from entrypoint import entry as entries
from entrypoint.archive import Kind, Member
from entrypoint.errors import ArchiveError
from entrypoint.extract import Limits, extract

DIRS = 40
PER_FILE_BYTES = 10  # allowed growth per extra file; a dict entry or a manifest line is 70-120


def peak(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def members(files: int) -> Iterator[Member]:
    for d in range(DIRS):
        yield Member(f"lib/pkg{d}/", Kind.DIR, 0o755, 0, 0)
    for i in range(files):
        data = b"x = 1\n"
        yield Member(f"lib/pkg{i % DIRS}/m{i}.py", Kind.FILE, 0o644, len(data), 0, open=lambda d=data: io.BytesIO(d))


def extract_peak(root: Path, files: int) -> int:
    dest = root / f"x{files}"
    dest.mkdir()
    return peak(lambda: extract(members(files), dest, Limits(10**7, 10**12)))


def test_extraction_keeps_nothing_per_file(tmp_path: Path) -> None:
    small, large = extract_peak(tmp_path, 500), extract_peak(tmp_path, 4500)
    assert large - small < 4000 * PER_FILE_BYTES, (small, large)


def manifest_peak(root: Path, files: int) -> tuple[int, entries.Entry]:
    entry = entries.Entry(root / f"c{files}", f"{files:x}".rjust(64, "e"))
    for i in range(files):
        d = entry.prefix / "lib" / "python3.8" / "site-packages" / f"pkg{i % DIRS}" / f"sub{i // 2}"  # deep ones too
        d.mkdir(parents=True, exist_ok=True)
        (d / f"m{i}.py").write_bytes(b"x")
    return peak(lambda: manifest.write(entry)), entry


def test_manifest_listing_keeps_nothing_per_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifest, "QUICK_LINES", 64)  # the sample it holds is full in both trees
    (small, _), (large, entry) = manifest_peak(tmp_path, 500), manifest_peak(tmp_path, 4500)
    assert large - small < 4000 * PER_FILE_BYTES, (small, large)
    # Nothing lost or doubled by spilling lines to a temporary file: every file and directory
    # once, the quick section first, the end line last, and the temporary file gone.
    quick, _, rest = entry.manifest.read_text().partition("\n" + manifest.QUICK_END)
    assert rest.endswith("\n" + manifest.MANIFEST_END)
    rest = rest.removesuffix(manifest.MANIFEST_END)
    listed = [line.split("\t", 2)[2] for line in (quick + "\n" + rest).splitlines()]
    on_disk = [""] + [str(p.relative_to(entry.prefix)) for p in entry.prefix.rglob("*")]
    assert sorted(listed) == sorted(on_disk)
    assert len(quick.splitlines()) <= manifest.QUICK_LINES
    assert sorted(os.listdir(entry.root)) == sorted([entry.name, f"{entry.name}.manifest"])
    assert manifest.verify(entry, full=True) is None


def test_full_verification_keeps_nothing_per_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLSERVER_ENV_VERIFY=full read the whole manifest and split it into lines: 200,000 files
    took a warm start to 55 MiB (2,000,000 members, to hundreds). A damaged one is still found."""
    monkeypatch.setattr(manifest, "QUICK_LINES", 64)
    (_, small), (_, large) = manifest_peak(tmp_path, 500), manifest_peak(tmp_path, 4500)
    used = [peak(lambda e=e: manifest.verify(e, full=True)) for e in (small, large)]
    assert used[1] - used[0] < 4000 * PER_FILE_BYTES, used
    assert manifest.verify(large, full=True) is None
    text = large.manifest.read_bytes()
    for damaged in (
        text[:-1],
        text.replace(b"\n" + manifest.QUICK_END.encode(), b"\n", 1),
        text[text.index(b"\n") + 1 :],
    ):
        large.manifest.write_bytes(damaged)
        assert manifest.verify(large, full=True) == "its manifest is damaged"
    large.manifest.unlink()
    assert manifest.verify(large, full=True) == "its manifest is missing"


def test_manifest_of_many_shared_libraries_or_long_names_is_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bin/ and the shared libraries always made the quick section, however many: 60,000 files
    named "*.so" (a 150 kB tar.zst) took a start to 93 MiB and every warm start to 60,000 stats.
    Lines of thousands of characters were held in memory the same way."""
    monkeypatch.setattr(manifest, "QUICK_LINES", 64)

    def listing_peak(files: int) -> tuple[int, entries.Entry]:
        entry = entries.Entry(tmp_path / f"c{files}", f"{files:x}".rjust(64, "e"))
        lib = entry.prefix / "lib"
        long = lib / "/".join(["d" * 250] * 4)
        long.mkdir(parents=True)
        for i in range(files):
            (lib / f"lib{i}{'s' * 150}.so").write_bytes(b"x")
            (long / f"m{i}.py").write_bytes(b"x")
        return peak(lambda: manifest.write(entry)), entry

    (small, _), (large, entry) = listing_peak(300), listing_peak(3300)
    assert large - small < 3000 * 2 * PER_FILE_BYTES, (small, large)
    quick = entry.manifest.read_text().partition("\n" + manifest.QUICK_END)[0]
    assert len(quick.splitlines()) <= manifest.QUICK_LINES
    assert manifest.verify(entry, full=False) is None and manifest.verify(entry, full=True) is None


def test_the_interpreter_makes_the_quick_section_past_its_budget_of_shared_libraries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With more shared libraries than the quick section holds, bin/ still makes it (walked first):
    a deleted or truncated bin/python is what a warm start must not miss."""
    monkeypatch.setattr(manifest, "QUICK_LINES", 64)
    entry = entries.Entry(tmp_path / "c", "e" * 64)
    for top in (f"pkg{i}" for i in range(100)):  # bin/ would be walked among the first few by chance only
        (entry.prefix / top).mkdir(parents=True)
        for i in range(10):
            (entry.prefix / top / f"lib{i}.so").write_bytes(b"x")
    (entry.prefix / "bin").mkdir()
    for name in ("python", "python3.8", "mlserver"):
        (entry.prefix / "bin" / name).write_bytes(b"x")
    manifest.write(entry)
    quick = entry.manifest.read_text().partition("\n" + manifest.QUICK_END)[0]
    assert len(quick.splitlines()) <= manifest.QUICK_LINES
    for name in ("python", "python3.8", "mlserver"):
        assert f"\tbin/{name}\n" in quick + "\n", quick
    (entry.prefix / "bin" / "python").write_bytes(b"")
    assert manifest.verify(entry, full=False) is not None


def inspect_peak(root: Path, files: int) -> tuple[int, inspection.Report]:
    many = [M(f"lib/pkg{i % DIRS}/m{i}.py", data=b"x = 1\n") for i in range(files)]
    # Plain tar: read in this thread, so no decompressed chunks queue up ahead (up to 4 MiB, by timing).
    tarball = write_tar(root / f"many{files}.tar", [*tiny_env(), *many], fmt="tar")
    config = settings.Settings(cache_dir=root / "cache")
    reports: list[inspection.Report] = []
    used = peak(lambda: reports.append(inspection.inspect(tarball, config, lambda _: None)))
    return used, reports[0]


def test_inspect_keeps_nothing_per_file(tmp_path: Path) -> None:
    (small, _), (large, report) = inspect_peak(tmp_path, 500), inspect_peak(tmp_path, 4500)
    assert large - small < 4000 * PER_FILE_BYTES, (small, large)
    assert report.files >= 4500 and report.interpreter is not None  # links are still followed to the interpreter


def zip_peak(root: Path, files: int) -> int:
    many = [M(f"lib/pkg{i % DIRS}/m{i}.py", data=b"x = 1\n") for i in range(files)]
    zpath = write_zip(root / f"many{files}.zip", [*tiny_env(), *many])

    def read_all() -> None:
        with open(zpath, "rb") as raw:
            for m in archive.members(raw):
                if m.open is not None:
                    with m.open() as f:
                        f.read(1 << 16)

    return peak(read_all)


def test_zip_reading_keeps_nothing_per_member(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """conda-pack writes zips too: zipfile.ZipFile reads the whole central directory into a
    ZipInfo per member (and a dict of them) before the first one, ~800 bytes each: a 100,000-file
    zip took the start 121 MiB resident."""
    monkeypatch.setattr(zipindex, "INDEX_CHUNK", 4096)  # the index bytes held at once: as few in both
    small, large = zip_peak(tmp_path, 500), zip_peak(tmp_path, 4500)
    assert large - small < 4000 * PER_FILE_BYTES, (small, large)


def test_sample_is_even_bounded_and_loses_nothing() -> None:
    for total in (0, 1, 7, 8, 9, 100, 1000, 12345):
        sample = manifest._Sample(8)
        out = [line for i in range(total) for line in sample.add(f"{i}\n")]
        assert len(sample.kept) <= 8
        assert sorted(out + sample.kept, key=int) == [f"{i}\n" for i in range(total)]
        kept = [int(line) for line in sample.kept]
        # Every step-th line: evenly spread over the whole stream, not its start.
        assert kept == list(range(sample.step - 1, total, sample.step))
        assert total < 16 or kept[-1] >= total - 2 * sample.step
        for room in (0, 3, 8, 20):
            chosen, left = sample.spread(room)
            assert len(chosen) == min(room, len(kept)) and sorted(chosen + left, key=int) == sample.kept


def test_global_pax_headers_of_sparse_keys_keep_a_few_records() -> None:
    """Global pax headers hold records for every later member, and the reader kept every key
    starting with "GNU.sparse.": eight 1 MiB headers of distinct ones (a 100 kB tar.gz) held
    350,000 strings, a 91 MiB start. Only the keys GNU tar reads are kept, a few at most."""
    tar = b""
    for h in range(8):
        body = b"".join(b"24 GNU.sparse.%07d=1\n" % n for n in range(h * 40_000, (h + 1) * 40_000))
        tar += raw_header("././@PaxHeader", b"%011o\0" % len(body), b"g") + body + bytes(-len(body) % 512)
    tar += raw_header("lib/a", b"%011o\0" % 0) + end_of_archive()
    assert len(tar) > 7 << 20
    used = peak(lambda: next(iter(archive.members(io.BytesIO(tar)))))
    assert used < 6 << 20, used


@pytest.mark.parametrize("kind", [Kind.DIR, Kind.SYMLINK])
def test_directories_and_symlinks_kept_are_bounded(kind: Kind, tmp_path: Path) -> None:
    """The extractor keeps every directory's and symlink's path: 20,000 directories named with
    3,800 characters each (a 100 kB tar.zst) took a start to 123 MiB. Past a few MiB of them the
    archive is refused, with one line, long before the 64 MiB promise."""
    deep = "/".join(["d" * 250] * 15)

    def members() -> Iterator[Member]:
        yield Member(f"{deep}/", Kind.DIR, 0o755, 0, 0)
        for i in range(5000):
            yield Member(f"{deep}/{i:06d}", kind, 0o755, 0, 0, linkname="." if kind is Kind.SYMLINK else "")

    dest = tmp_path / "x"
    dest.mkdir()

    def run() -> None:
        with pytest.raises(ArchiveError, match="MiB of directory and symlink paths"):
            extract(members(), dest, Limits(10**7, 10**12))

    assert peak(run) < 12 << 20


def test_removing_an_entry_keeps_nothing_per_file(tmp_path: Path) -> None:
    """shutil.rmtree lists a directory whole before removing it: a refused archive of 200,000
    empty files in one directory (a 600 kB tar.zst) took the start to 74 MiB while its partial
    entry was removed. The removal holds one directory per level, follows no symlink, and makes
    directories without owner write bits removable."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"x")

    def tree(files: int) -> entries.Entry:
        entry = entries.Entry(tmp_path / f"c{files}", f"{files:x}".rjust(64, "e"))
        top = entry.prefix
        flat = top / "lib" / "flat"
        flat.mkdir(parents=True)
        for i in range(files):
            (flat / f"f{i:07d}").write_bytes(b"")
        for d in ("a", "a/b", "a/b/c", "ro"):
            (top / d).mkdir()
        (top / "a/b/c/f").write_bytes(b"x")
        (top / "a/out").symlink_to(outside)
        (top / "ro/f").write_bytes(b"x")
        (top / "ro").chmod(0o555)
        return entry

    small, large = tree(500), tree(4500)
    used = [peak(lambda e=e: entries.discard(e)) for e in (small, large)]
    assert used[1] - used[0] < 4000 * PER_FILE_BYTES, used
    assert not small.prefix.exists() and not large.prefix.exists()
    assert (outside / "keep").read_bytes() == b"x"


def test_xz_streams_decoded_ahead_are_bounded(tmp_path: Path) -> None:
    """Threads decoding an xz file's streams ahead of a slow reader hold at most their queues'
    chunks, however many streams wait."""
    from entrypoint import decode
    from entrypoint.archive import CHUNK, PREFETCH_DEPTH

    if len(os.sched_getaffinity(0)) < 2:
        unavailable("decoding xz streams on several threads needs two cores")
    path = tmp_path / "many.xz"
    path.write_bytes(b"".join(xz_streams(bytes(range(256)) * (48 << 12), 1 << 20)))  # 48 streams of 1 MiB

    def read_slowly() -> None:
        with path.open("rb") as raw:
            stream = decode.decoder("tar.xz", raw)
            while stream.read(CHUNK):
                time.sleep(0.002)
            stream.close()

    workers = min(decode.XZ_THREADS, len(os.sched_getaffinity(0)))
    assert peak(read_slowly) < (workers * (PREFETCH_DEPTH + 2) + 2) * CHUNK


@pytest.mark.parametrize("fmt", ["tar.gz", "tar.zst", "tar.bz2", "tar.xz"])
def test_chunks_decoded_ahead_of_a_slow_extractor_are_bounded(fmt: str, tmp_path: Path) -> None:
    """The decoder runs at most READ_AHEAD chunks ahead of an extractor slower than it, however big
    the member; a tar.xz, whose threads keep queues of their own, only PREFETCH_DEPTH."""
    from entrypoint.archive import CHUNK, PREFETCH_DEPTH, READ_AHEAD

    path = write_tar(tmp_path / f"zeros.{fmt}", [M("zeros", data=bytes(64 << 20))], fmt)

    def read_slowly() -> None:
        with path.open("rb") as raw:
            for m in archive.members(raw):
                assert m.open is not None
                with m.open() as data:
                    while data.read(CHUNK):
                        time.sleep(0.001)

    depth = PREFETCH_DEPTH if fmt == "tar.xz" else READ_AHEAD
    assert peak(read_slowly) < depth * CHUNK + (2 << 20)  # and the decoder's own buffers
