"""A large synthetic conda environment (about 2 GB, 100k files), packed by conda-pack itself.

It looks like what `conda create` + `conda pack` produce for a big ML stack, at scale:

- a real, relocatable CPython prefix (the `bare` recipe of examples/build_env.py), so the
  environment's own interpreter runs the packed `conda-unpack`;
- one conda-managed package, `synthlib`, with a `conda-meta/*.json` record and a package-cache
  folder (`info/paths.json`) its files are hard-linked from, as conda installs them: ~95k small
  `.py` modules in ~1,000 folders, ~300 shared libraries of random-ish bytes (compressing about
  2.5x, like real ones) with `.so` symlinks, and a few dozen text and binary files that contain
  conda-build's long prefix placeholder, so `conda-unpack` has text *and* binary records;
- packed with `conda-pack` (the test extras' version), so `bin/conda-unpack` is the real one.

The tarball is cached under ~/.cache/mlserver-env-bench, keyed by the recipe's parameters and
GENERATOR_VERSION (bump it when the generated content changes):

    python benchmarks/synth_env.py                      # build (or find) the default 2 GB one
    python benchmarks/synth_env.py --files 2000 --bytes 20000000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from filelock import FileLock

REPO = Path(__file__).resolve().parent.parent
GENERATOR_VERSION = 1
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlserver-env-bench"
# conda-build's placeholder is 255 characters long, so binaries can be relocated to long paths.
PLACEHOLDER = "/home/conda/feedstock_root/build_artifacts/synthlib_1700000000000/_h_env_placehold" + "_placehold" * 17
_VOCABULARY = """self def return import from class if else for in while None True False value data result
args kwargs array dtype shape index key item module config path name tensor weight bias layer model
batch loss grad step state cache buffer stream reader writer parse encode"""
WORDS = tuple(_VOCABULARY.split())


@dataclass(frozen=True)
class Recipe:
    files: int = 100_000  # regular files in the whole environment, interpreter included
    total_bytes: int = 2_000_000_000  # their total size, interpreter included
    binary_share: float = 0.8  # of the synthetic bytes, in shared libraries
    libraries: int = 300
    text_prefix_files: int = 40
    binary_prefix_files: int = 8
    python: str = "3.8"
    seed: int = 0
    fmt: str = "tar.gz"

    def key(self) -> str:
        text = json.dumps({**asdict(self), "generator": GENERATOR_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def ensure(recipe: Recipe, cache_dir: Path = CACHE, log: bool = True) -> Path:
    """The packed tarball for `recipe`, built once per machine (concurrent callers wait)."""
    entry = cache_dir / f"synth-{recipe.key()}"
    tarball = entry / f"synth.{recipe.fmt}"
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry) + ".lock"):
        if not (entry / ".done").exists():
            if log:
                print(f"synth_env: building {recipe} once (cached in {entry})", file=sys.stderr, flush=True)
            work = Path(tempfile.mkdtemp(prefix=f"{entry.name}.", dir=cache_dir))
            try:
                stats = _build(recipe, work)
                (work / "meta.json").write_text(json.dumps({"recipe": asdict(recipe), **stats}, indent=1))
                (work / ".done").write_text(recipe.key() + "\n")
                if entry.exists():
                    shutil.rmtree(entry)
                work.rename(entry)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    return tarball


def _build(recipe: Recipe, work: Path) -> dict[str, int]:
    sys.path.insert(0, str(REPO / "examples"))
    import build_env  # the same interpreter recipe as the test fixtures

    empty = work / "requirements.txt"
    empty.write_text("")
    prefix = work / "env"
    build_env.build_prefix(build_env.find_python(recipe.python), prefix, recipe.python, empty)
    empty.unlink()
    base_files, base_bytes = _count(prefix)
    pkg = work / "pkgs" / "synthlib-1.0-0"
    paths = _generate(recipe, prefix, pkg, recipe.files - base_files, recipe.total_bytes - base_bytes)
    (pkg / "info" / "paths.json").write_text(json.dumps({"paths": paths, "paths_version": 1}))
    index = {"name": "synthlib", "version": "1.0", "build": "0", "build_number": 0, "depends": []}
    (pkg / "info" / "index.json").write_text(json.dumps(index))
    meta = {
        **index,
        "channel": "local",
        "url": "file:///synthetic/synthlib-1.0-0.tar.bz2",
        "files": [p["_path"] for p in paths],
        "link": {"source": str(pkg), "type": 1},
    }
    (prefix / "conda-meta" / "synthlib-1.0-0.json").write_text(json.dumps(meta))
    files, size = _count(prefix)
    out = work / f"synth.{recipe.fmt}"
    pack = ["-q", "-p", str(prefix), "--format", recipe.fmt, "-o", str(out), "--n-threads", "-1"]
    subprocess.run([sys.executable, "-m", "conda_pack.cli", *pack], check=True)
    os.chmod(out, 0o644)
    shutil.rmtree(prefix)
    shutil.rmtree(work / "pkgs")
    return {"files": files, "bytes": size, "python_files": base_files}


def _count(prefix: Path) -> tuple[int, int]:
    files = size = 0
    for dirpath, _, names in os.walk(prefix):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            if not os.path.islink(os.path.join(dirpath, name)):
                files += 1
                size += st.st_size
    return files, size


def _sizes(rng: random.Random, n: int, total: int, sigma: float, low: int, high: int) -> list[int]:
    """`n` log-normal sizes (clipped to [low, high]) scaled to sum to about `total`."""
    raw = [rng.lognormvariate(0.0, sigma) for _ in range(n)]
    scale = total / sum(raw)
    return [max(low, min(high, int(r * scale))) for r in raw]


def _corpus(rng: random.Random, size: int) -> str:
    """Python-looking text: compresses like real source (about 4x with gzip)."""
    lines: list[str] = []
    length = 0
    while length < size:
        w = rng.choices(WORDS, k=5)
        n = rng.randrange(10_000)
        kind = rng.random()
        if kind < 0.15:
            line = f"def {w[0]}_{w[1]}_{n}({w[2]}, {w[3]}=None):\n"
        elif kind < 0.25:
            line = f'    """{w[0].capitalize()} the {w[1]} of {w[2]} {n} times."""\n'
        elif kind < 0.35:
            line = f"    # {w[0]} {w[1]} {w[2]} {w[3]} {w[4]}\n"
        elif kind < 0.45:
            line = f"    if {w[0]}.{w[1]} is not None and {w[2]} > {n}:\n        return {w[3]}[{w[4]}]\n"
        else:
            line = f"    {w[0]}_{w[1]} = {w[2]}.{w[3]}({w[4]}, {n % 97}, {rng.random():.4f})\n"
        lines.append(line)
        length += len(line)
    return "".join(lines)


def _records(rng: random.Random, size: int) -> bytes:
    """Structured bytes (relocation-table-like records with a growing counter): compress well."""
    out = bytearray()
    counter = rng.randrange(1 << 30)
    while len(out) < size:
        counter += rng.randrange(1, 64)
        out += counter.to_bytes(8, "little") + b"\x00\x00\x00\x00\x10\x00\x00\x00"
    return bytes(out)


def _binary(rng: random.Random, size: int, table: bytes, records: bytes) -> bytearray:
    """Random-ish bytes: per 64 KiB, 20% random, 40% from 16 symbols, 40% structured records."""
    out = bytearray()
    while len(out) < size:
        out += rng.randbytes(13_000)
        out += rng.randbytes(26_000).translate(table)
        at = rng.randrange(len(records) - 26_000) & ~15
        out += records[at : at + 26_000]
    del out[size:]
    return out


def _generate(recipe: Recipe, prefix: Path, pkg: Path, files: int, size: int) -> list[dict[str, str]]:
    """Write synthlib's files into the package cache, hard-link them into the prefix, list them."""
    rng = random.Random(recipe.seed)
    site = f"lib/python{recipe.python}/site-packages"
    table = bytes(rng.choice(b"\x00\x01\x02\x03\x08\x0f\x10\x20\x24\x41\x48\x89\x8b\xc3\xe8\xff") for _ in range(256))
    records = _records(rng, 1 << 20)
    paths: list[dict[str, str]] = []

    def write(rel: str, data: bytes, mode: int = 0o644, **record: str) -> None:
        src = pkg / rel
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_bytes(data)
        os.chmod(src, mode)
        dst = prefix / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.link(src, dst)
        paths.append({"_path": rel, "path_type": "hardlink", **record})

    (pkg / "info").mkdir(parents=True)
    n_text_prefix, n_bin_prefix = recipe.text_prefix_files, recipe.binary_prefix_files
    n_py = max(0, files - recipe.libraries - n_text_prefix)
    binary_bytes = int(size * recipe.binary_share)
    text_bytes = max(0, size - binary_bytes)

    # Shared libraries, a few with the placeholder embedded as C strings (conda-unpack pads them).
    for i, nbytes in enumerate(_sizes(rng, recipe.libraries, binary_bytes, 1.0, 16_384, 200_000_000)):
        data = _binary(rng, nbytes, table, records)
        record: dict[str, str] = {}
        if i < n_bin_prefix:
            needle = b"\x00" + PLACEHOLDER.encode() + f"/lib/python{recipe.python}/site-packages\x00".encode()
            for at in range(4096, max(4097, nbytes - len(needle)), max(1, nbytes // 4)):
                data[at : at + len(needle)] = needle
            record = {"prefix_placeholder": PLACEHOLDER, "file_mode": "binary"}
        rel = f"lib/libsynth_{i:03d}.so.1"
        write(rel, bytes(data[:nbytes]), 0o755, **record)
        link = f"lib/libsynth_{i:03d}.so"
        os.symlink(os.path.basename(rel), pkg / link)
        os.symlink(os.path.basename(rel), prefix / link)
        paths.append({"_path": link, "path_type": "softlink"})

    # Text files with the prefix in them, outside bin/ (conda-pack rewrites bin/ shebangs itself).
    for i in range(n_text_prefix):
        text = (
            f"prefix={PLACEHOLDER}\nlibdir=${{prefix}}/lib\nincludedir=${{prefix}}/include\n\n"
            f"Name: synth{i}\nVersion: 1.0.{i}\nLibs: -L{PLACEHOLDER}/lib -lsynth_{i:03d}\n"
        )
        rel = f"lib/pkgconfig/synth_{i:02d}.pc" if i % 2 else f"etc/synth/synth_{i:02d}.cfg"
        write(rel, text.encode(), prefix_placeholder=PLACEHOLDER, file_mode="text")

    # Python modules: ~95 per folder, two levels deep, sizes log-normal (median ~2 KB).
    corpus = _corpus(rng, 8_000_000)
    for i, nbytes in enumerate(_sizes(rng, n_py, text_bytes, 1.0, 120, 400_000)):
        package, sub, mod = i // 950, (i // 95) % 10, i % 95
        rel = f"{site}/synth_{package:03d}/sub_{sub}/mod_{mod:02d}.py"
        start = rng.randrange(max(1, len(corpus) - nbytes))
        body = f'"""synth_{package:03d}.sub_{sub}.mod_{mod:02d}"""\n' + corpus[start : start + nbytes]
        write(rel, body.encode())
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=Recipe.files)
    parser.add_argument("--bytes", type=int, default=Recipe.total_bytes)
    parser.add_argument("--format", default=Recipe.fmt)
    parser.add_argument("--cache-dir", type=Path, default=CACHE)
    a = parser.parse_args()
    print(ensure(Recipe(files=a.files, total_bytes=a.bytes, fmt=a.format), a.cache_dir))


if __name__ == "__main__":
    main()
