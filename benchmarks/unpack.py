"""Unpack benchmark: ours against MLServer's ways and the physical limits, in one interleaved run.

Every method runs on the same tarballs, round by round (the order rotates each round), because
this machine is noisy. File creation is measured right before and after every method ("beside
it"), decoding once a round; a method's streaming limit is max(decoding, file creation beside
it), the least any streaming unpack can take, and results are medians over the rounds of each
method's ratio to it. A ratio between two methods is the median over rounds of their ratios to
the file creation beside each.

    python benchmarks/unpack.py           # seed in every format + ~2 GB/100k-file synthetic env
    python benchmarks/unpack.py --quick   # the seed in every format only, 3 rounds of tar.gz
    python benchmarks/unpack.py --tarball T.tar.gz --rounds 1 --out DIR   # one given tarball

Methods (each a separate process, timed wall-clock from spawn to exit; machine CPU from /proc/stat):
  decompress   decoding alone: the format's fastest decoder into /dev/null (isal igzip, zstd,
               bzip2, xz, unzip -p; cat for a plain tar)
  create       file creation alone: `tar -xf` of the already decompressed .tar, fresh dir
  durable      the same, then `sync -f` of that filesystem: with decoding, the CPU floor of a
               start that, as ours does, makes the files durable before it publishes them
  mlserver11   MLServer 1.1's way at every start: the format's tool (`tar -xzf`, `tar --zstd -xf`,
               `tar -xjf`, `tar -xJf`, `unzip`, `tar -xf`) + the env's `conda-unpack`, run with the
               environment's own interpreter
  tarfile      MLServer 1.7: `tarfile.open(T).extractall(D)` (no filter, as MLServer calls it)
               + `conda-unpack`;  tarfile_data: same with filter='data' (the seed's tar.gz only)
  sha256       MLServer 1.7 also hashes the whole tarball at each model load (likewise)
  ours_cold    `mlserver-entrypoint unpack` into a fresh cache dir: tarball -> relocated env ready
               (includes its syncfs durability point; the other methods never sync)
  ours_warm    the same again on that cache (a hit): the whole process, and the entrypoint's own
               work before exec as it logs it (`mlserver-entrypoint -- true`)

Scratch files go to a freshly made ext4 filesystem (a loop device; needs root, else --fs here):
users meet fresh volumes, and this VM's own root filesystem slows file creation down ~10x after
deletions (see FRESH_FS_GIB below). `sync` runs (untimed) before every method, so none pays for
another's dirty pages. Reads come from the page cache for all methods alike unless --cold-cache
(drops it before each method; root). Peak RSS: the entrypoint process and its worker, the larger
(VmHWM at exit), and each method's process tree (GNU time's %M, which includes conda-unpack run
by the entrypoint).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable
BUILD_ENV = REPO / "examples" / "build_env.py"

TARGET_COLD_OVER_LIMIT = 1.3  # ours cold ÷ the streaming limit, max(decoding, file creation)
TARGET_NATIVE_OVER_OURS = 1.1  # (the format's tool + conda-unpack) ÷ ours cold
TARGET_WARM_MS = 50.0
TARGET_RSS_MIB = 64.0
CORES = os.cpu_count() or 1
OTHER_FORMATS = ("tar.zst", "tar.bz2", "tar.xz", "zip", "tar")  # besides tar.gz: every one conda-pack writes

# Runs the entrypoint exactly as `python -m entrypoint` does, and reports its own peak RSS at exit
# (VmHWM: getrusage's ru_maxrss would include the RSS of whatever forked it), also when it ends
# with os._exit, which runs no atexit hook; its worker (a fork) reports its own the same way.
OURS = """\
import atexit, os, runpy, sys
def _peak():
    with open("/proc/self/status") as f:
        kib = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    print(f"bench: peak RSS {kib} KiB", file=sys.stderr, flush=True)
def _exit(code, _os_exit=os._exit):
    _peak()
    _os_exit(code)
atexit.register(_peak)
os._exit = _exit
runpy.run_module("entrypoint", run_name="__main__", alter_sys=True)
"""
# GNU time reports its child's peak RSS (with the child's own children) without adding ours: a
# child forked straight from this process would inherit this process's RSS in its ru_maxrss.
TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None
TARFILE = """\
import sys, tarfile
with tarfile.open(sys.argv[1], "r") as tar:
    if sys.argv[3] == "none":
        tar.extractall(path=sys.argv[2])
    else:
        tar.extractall(path=sys.argv[2], filter=sys.argv[3])
"""
SHA256 = """\
import hashlib, sys
with open(sys.argv[1], "rb") as f:
    print(hashlib.file_digest(f, "sha256").hexdigest())
"""
PHASE = re.compile(r"^mlserver-entrypoint: ([A-Za-z][\w-]*): (\d+(?:\.\d+)?) (ms|s)\b", re.M)
WORK = re.compile(r"entrypoint work (\d+(?:\.\d+)?) ms")
SELF_RSS = re.compile(r"^bench: peak RSS (\d+) KiB", re.M)

LABELS = {
    "decompress": "decompression only",
    "create": "file creation only: tar -xf of the .tar",
    "durable": "durable file creation: tar -xf of the .tar + sync -f",
    "mlserver11": "MLServer 1.1: tar -xzf + conda-unpack",
    "tarfile": "MLServer 1.7: tarfile.extractall + conda-unpack",
    "tarfile_data": "same, filter='data'",
    "sha256": "MLServer 1.7: SHA-256 of the tarball (each load)",
    "ours_cold": "ours cold: mlserver-entrypoint unpack",
    "ours_warm": "ours warm: cache hit, whole process",
    "ours_warm_work": "ours warm: entrypoint work before exec",
}
# Each format's fastest decoder into /dev/null, the first of these installed: lbzip2 and pixz
# decode on every core (pixz only archives of several xz streams or blocks, as `conda-pack -j` writes).
DECODERS = {
    "tar.gz": [("isal igzip -d", [PY, "-m", "isal.igzip", "-d", "-c"])],
    "tar.zst": [("zstd -dc", ["zstd", "-d", "-c", "-q"])],
    "tar.bz2": [("lbzip2 -dc", ["lbzip2", "-d", "-c"]), ("bzip2 -dc", ["bzip2", "-d", "-c"])],
    "tar.xz": [("pixz -d", ["pixz", "-d", "-i"]), ("xz -dc", ["xz", "-d", "-c"])],
    "zip": [("unzip -p", ["unzip", "-p"])],
    "tar": [("cat", ["cat"])],
}
DECOMPRESS = {
    fmt: next((d for d in choices if shutil.which(str(d[1][0]))), choices[-1]) for fmt, choices in DECODERS.items()
}
NATIVE = {
    "tar.gz": "MLServer 1.1: tar -xzf + conda-unpack",
    "tar.zst": "tar --zstd -xf + conda-unpack",
    "tar.bz2": "tar -xjf + conda-unpack",
    "tar.xz": "tar -xJf + conda-unpack",
    "zip": "unzip -q + conda-unpack",
    "tar": "tar -xf + conda-unpack",
}


class BenchError(Exception):
    pass


@dataclass
class Proc:
    seconds: float
    cpu: float  # CPU seconds of the whole machine meanwhile: the kernel's write-back included
    code: int
    tree_rss_kib: int
    stdout: str
    stderr: str


@dataclass
class Dataset:
    name: str
    tarball: Path
    fmt: str
    raw: Path  # the decompressed tar of the same content: the file-creation limit
    methods: list[str]
    rounds: int
    check_change: bool = False
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0
    samples: dict[str, list[float]] = field(default_factory=dict)  # seconds
    ratios: dict[str, list[float]] = field(default_factory=dict)  # per round, / the limit beside it
    limits: dict[str, list[float]] = field(default_factory=dict)  # per round, that limit (seconds)
    cpu: dict[str, list[float]] = field(default_factory=dict)  # machine CPU seconds per run
    rss: dict[str, list[int]] = field(default_factory=dict)  # KiB, the process tree
    self_rss: list[int] = field(default_factory=list)  # KiB, the entrypoint process or its worker, the larger
    parts: dict[str, list[float]] = field(default_factory=dict)  # phases of composite methods
    checks: list[tuple[str, bool, str]] = field(default_factory=list)

    def add(self, table: dict[str, list[float]] | dict[str, list[int]], key: str, value: float) -> None:
        table.setdefault(key, []).append(value)  # type: ignore[arg-type]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(
    cmd: Sequence[str | Path],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    discard_stdout: bool = False,
    check: bool = True,
) -> Proc:
    """Spawn, wait, return wall time, output and the process tree's peak RSS (via GNU time)."""
    argv = [str(c) for c in cmd]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile() as rss:
        spawn = [TIME, "-f", "%M", "-o", rss.name, *argv] if TIME else argv
        cpu0, t0 = machine_cpu(), time.perf_counter()
        proc = subprocess.Popen(
            spawn, stdout=subprocess.DEVNULL if discard_stdout else out, stderr=err, env=env, cwd=cwd
        )
        try:
            _, status, _ = os.wait4(proc.pid, 0)
        except BaseException:  # stopped: the child must not write on while the scratch dir goes
            proc.kill()
            proc.wait()
            raise
        seconds, cpu = time.perf_counter() - t0, machine_cpu() - cpu0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        lines = Path(rss.name).read_text().split() if TIME else []
        result = Proc(
            seconds,
            cpu,
            proc.returncode,
            # Without GNU time, 0 ("–"): wait4's ru_maxrss would be this harness's own peak, which a
            # vfork'ed child inherits across exec.
            int(lines[-1]) if lines and lines[-1].isdigit() else 0,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
        )
    if check and result.code != 0:
        raise BenchError(f"{' '.join(argv)} exited {result.code}:\n{result.stderr[-2000:]}")
    return result


def machine_cpu() -> float:
    """CPU seconds the whole machine spent so far (/proc/stat: user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat") as f:
        ticks = [int(t) for t in f.readline().split()[1:9]]
    return (sum(ticks[:3]) + sum(ticks[5:8])) / os.sysconf("SC_CLK_TCK")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLSERVER", "PYTHON"))}
    env.update(extra)
    return env


def rmtree(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)
    if path.exists():  # read-only directories from an archive
        for dirpath, dirnames, _ in os.walk(path):
            for d in dirnames:
                with contextlib.suppress(OSError):
                    os.chmod(os.path.join(dirpath, d), 0o755, follow_symlinks=False)
        shutil.rmtree(path)


def detect_format(path: Path) -> str:
    from entrypoint.archive import detect_format as from_head

    with open(path, "rb") as f:
        return from_head(f.read(512))


def decompress_to(tarball: Path, fmt: str, out: Path) -> None:
    """The plain tar inside a compressed tarball (untimed preparation for the file-creation limit)."""
    if fmt == "tar":
        shutil.copyfile(tarball, out)
        return
    with open(out, "wb") as f:
        subprocess.run([*map(str, DECOMPRESS[fmt][1]), str(tarball)], stdout=f, check=True)


# --- the methods -------------------------------------------------------------------------------


class Runner:
    def __init__(self, work: Path, warm_runs: int, cold_cache: bool) -> None:
        self.work = work
        self.warm_runs = warm_runs
        self.cold_cache = cold_cache
        self.keep: dict[str, Path] = {}  # trees kept until the end of round 0, to compare

    def fresh(self, name: str) -> Path:
        path = self.work / name
        rmtree(path)
        path.mkdir()
        return path

    def settle(self) -> None:
        """Untimed: no method pays for another's dirty pages; optionally start with a cold page cache."""
        os.sync()
        if self.cold_cache:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")

    def conda_unpack(self, prefix: Path) -> Proc:
        return run([prefix / "bin" / "python", prefix / "bin" / "conda-unpack"], env=clean_env(), cwd=prefix)

    def method(self, ds: Dataset, name: str, round_no: int) -> float:
        self.settle()
        fn = getattr(self, f"m_{name}")
        seconds: float = fn(ds, round_no)
        return seconds

    def m_decompress(self, ds: Dataset, round_no: int) -> float:
        p = run([*DECOMPRESS[ds.fmt][1], ds.tarball], discard_stdout=True)
        ds.add(ds.rss, "decompress", p.tree_rss_kib)
        ds.add(ds.cpu, "decompress", p.cpu)
        return p.seconds

    def m_create(self, ds: Dataset, round_no: int) -> float:
        dest = self.fresh("x")
        p = run(["tar", "-xf", ds.raw, "-C", dest])
        ds.add(ds.rss, "create", p.tree_rss_kib)
        if not ds.files:
            count(ds, dest)
        rmtree(dest)
        return p.seconds

    def m_durable(self, ds: Dataset, round_no: int) -> float:
        dest = self.fresh("xd")
        p = run(["sh", "-c", 'tar -xf "$1" -C "$2" && sync -f "$2"', "durable", ds.raw, dest])
        ds.add(ds.rss, "durable", p.tree_rss_kib)
        ds.add(ds.cpu, "durable", p.cpu)
        rmtree(dest)
        return p.seconds

    def m_mlserver11(self, ds: Dataset, round_no: int) -> float:
        dest = self.fresh("m11")
        if ds.fmt == "zip":
            p = run(["unzip", "-q", ds.tarball, "-d", dest])
        else:
            flag = {"tar.gz": "-xzf", "tar.zst": "--zstd", "tar.bz2": "-xjf", "tar.xz": "-xJf", "tar": "-xf"}[ds.fmt]
            p = run(
                ["tar", flag, ds.tarball, "-C", dest]
                if flag != "--zstd"
                else ["tar", flag, "-xf", ds.tarball, "-C", dest]
            )
        u = self.conda_unpack(dest)
        ds.add(ds.parts, "mlserver11: extract", p.seconds)
        ds.add(ds.parts, "mlserver11: conda-unpack", u.seconds)
        ds.add(ds.rss, "mlserver11", max(p.tree_rss_kib, u.tree_rss_kib))
        ds.add(ds.cpu, "mlserver11", p.cpu + u.cpu)
        if round_no == 0:
            self.keep["mlserver11"] = dest
        else:
            rmtree(dest)
        return p.seconds + u.seconds

    def _tarfile(self, ds: Dataset, name: str, flt: str) -> float:
        dest = self.fresh("tf")
        p = run([PY, "-c", TARFILE, ds.tarball, dest, flt])
        u = self.conda_unpack(dest)
        ds.add(ds.parts, f"{name}: extract", p.seconds)
        ds.add(ds.parts, f"{name}: conda-unpack", u.seconds)
        ds.add(ds.rss, name, max(p.tree_rss_kib, u.tree_rss_kib))
        rmtree(dest)
        return p.seconds + u.seconds

    def m_tarfile(self, ds: Dataset, round_no: int) -> float:
        return self._tarfile(ds, "tarfile", "none")

    def m_tarfile_data(self, ds: Dataset, round_no: int) -> float:
        return self._tarfile(ds, "tarfile_data", "data")

    def m_sha256(self, ds: Dataset, round_no: int) -> float:
        p = run([PY, "-c", SHA256, ds.tarball])
        ds.add(ds.rss, "sha256", p.tree_rss_kib)
        return p.seconds

    def ours(self, tarball: Path, cache: Path, *args: str, check: bool = True) -> Proc:
        env = clean_env(
            MLSERVER_ENV_TARBALL=str(tarball), MLSERVER_ENV_CACHE_DIR=str(cache), MLSERVER_MODELS_DIR=str(self.work)
        )
        return run([PY, "-c", OURS, *args], env=env, cwd=self.work, check=check)

    def m_ours_cold(self, ds: Dataset, round_no: int) -> float:
        cache = self.work / "c"
        rmtree(cache)
        p = self.ours(ds.tarball, cache, "unpack")
        prefix = Path(p.stdout.strip().splitlines()[-1])
        for phase, seconds in phases(p.stderr).items():
            ds.add(ds.parts, f"ours: {phase}", seconds)
        ds.add(ds.rss, "ours_cold", p.tree_rss_kib)
        ds.add(ds.cpu, "ours_cold", p.cpu)
        if peaks := [int(kib) for kib in SELF_RSS.findall(p.stderr)]:  # the entrypoint's and its worker's
            ds.self_rss.append(max(peaks))
        if round_no == 0:
            self.sanity(ds, prefix)
        for _ in range(self.warm_runs):
            self.settle()
            w = self.ours(ds.tarball, cache, "unpack")
            ds.add(ds.samples, "ours_warm", w.seconds)
            ds.add(ds.rss, "ours_warm", w.tree_rss_kib)
            for phase, seconds in phases(w.stderr).items():
                ds.add(ds.parts, f"ours warm: {phase}", seconds)
            if "cache hit" not in w.stderr:
                ds.checks.append(("warm start is a cache hit", False, w.stderr.strip().splitlines()[-1]))
            self.settle()
            e = self.ours(ds.tarball, cache, "--", "true")
            if m := WORK.search(e.stderr):
                ds.add(ds.samples, "ours_warm_work", float(m.group(1)) / 1000)
            ds.add(ds.parts, "ours warm: `-- true` whole process", e.seconds)
        rmtree(cache)
        return p.seconds

    def sanity(self, ds: Dataset, prefix: Path) -> None:
        """Round 0: the environment we made runs, and has the files `tar -xzf` makes."""
        out = run([prefix / "bin" / "python", "-c", "import sys; print(sys.prefix)"], env=clean_env(), check=False)
        ok = out.code == 0 and os.path.realpath(out.stdout.strip()) == os.path.realpath(prefix)
        ds.checks.append(
            ("ours: the env's interpreter runs from the entry", ok, "" if ok else out.stdout + out.stderr[-200:])
        )
        other = self.keep.pop("mlserver11", None)
        if other is not None:
            a, b = tree(prefix), tree(other)
            detail = f"{len(a)} entries" if a == b else f"only ours: {sorted(a - b)[:3]}, only tar: {sorted(b - a)[:3]}"
            ds.checks.append(
                (f"ours: same files, dirs and symlinks as {NATIVE[ds.fmt].split(': ')[-1]}", a == b, detail)
            )
            rmtree(other)

    def change_check(self, ds: Dataset) -> None:
        """A tarball rewritten in place at the same path, same size and mtime, must not be a cache hit."""
        cache = self.work / "chk"
        rmtree(cache)
        first = self.ours(ds.tarball, cache, "unpack")
        hit = self.ours(ds.tarball, cache, "unpack")
        ds.checks.append(("warm start on the same tarball is a cache hit", "cache hit" in hit.stderr, ""))
        st = os.stat(ds.tarball)
        with open(ds.tarball, "r+b") as f:  # the gzip header's MTIME field: still a valid archive
            f.seek(4)
            old = f.read(4)
            f.seek(4)
            f.write(bytes(b ^ 0x5A for b in old))
        os.utime(ds.tarball, ns=(st.st_atime_ns, st.st_mtime_ns))
        after = os.stat(ds.tarball)
        same = (after.st_ino, after.st_size, after.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)
        try:
            changed = self.ours(ds.tarball, cache, "unpack", check=False)
        finally:
            with open(ds.tarball, "r+b") as f:
                f.seek(4)
                f.write(old)
            os.utime(ds.tarball, ns=(st.st_atime_ns, st.st_mtime_ns))
        p1 = first.stdout.strip().splitlines()[-1]
        p2 = changed.stdout.strip().splitlines()[-1] if changed.stdout.strip() else "(none)"
        ok = same and changed.code == 0 and "cache hit" not in changed.stderr and p1 != p2
        detail = f"entry {Path(p1).name} -> {Path(p2).name}"
        ds.checks.append(("a changed tarball at the same path (same inode, size, mtime) is not a hit", ok, detail))
        rmtree(cache)


def phases(stderr: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, value, unit in PHASE.findall(stderr):
        out[name] = float(value) / (1000 if unit == "ms" else 1)
    return out


def count(ds: Dataset, root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if os.path.islink(os.path.join(dirpath, name)):
                ds.symlinks += 1
            elif name in dirnames:
                ds.dirs += 1
            else:
                ds.files += 1
                ds.bytes += st.st_size


def tree(root: Path) -> set[tuple[str, str]]:
    """(relative path, kind or symlink target), bytecode caches left out (conda-unpack may write them)."""
    out: set[tuple[str, str]] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        rel = os.path.relpath(dirpath, root)
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            kind = ("->" + os.readlink(path)) if os.path.islink(path) else ("dir" if name in dirnames else "file")
            out.add((os.path.normpath(os.path.join(rel, name)), kind))
    return out


# --- the run -----------------------------------------------------------------------------------


def build_seed(out: Path, fmt: str) -> Path:
    proc = subprocess.run([PY, str(BUILD_ENV), "--out", str(out), "--format", fmt], capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(f"building the seed tarball ({fmt}) failed:\n{proc.stderr[-3000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def methods_for(fmt: str, only: Sequence[str] | None) -> list[str]:
    """What runs on a tarball of this format: tarfile and SHA-256 rows only for tar.gz (MLServer's)."""
    methods = ["decompress", "create", "durable", "mlserver11", "tarfile", "tarfile_data", "sha256", "ours_cold"]
    if fmt != "tar.gz":
        methods = ["decompress", "create", "durable", "mlserver11", "ours_cold"]
    if fmt not in DECOMPRESS or shutil.which(str(DECOMPRESS[fmt][1][0])) is None:
        methods.remove("decompress")
    if shutil.which("unzip" if fmt == "zip" else "zstd" if fmt == "tar.zst" else "tar") is None:
        methods.remove("mlserver11")
    return [m for m in methods if only is None or m in only]


def make_datasets(a: argparse.Namespace, work: Path) -> list[Dataset]:
    datasets: list[Dataset] = []
    if a.tarball:
        src = Path(a.tarball).resolve()
        tarball = work / "given" / src.name
        tarball.parent.mkdir()
        shutil.copy2(src, tarball)  # a copy: the change check rewrites it in place
        name = "given"
    else:
        log("preparing the seed tarball (examples/build_env.py, cached per machine)")
        tarball, name = build_seed(work / "seed", "tar.gz"), "seed"
    fmt = detect_format(tarball)
    raw = work / f"{name}.tar"
    decompress_to(tarball, fmt, raw)
    check_change = fmt == "tar.gz" and a.change_check
    datasets.append(Dataset(name, tarball, fmt, raw, methods_for(fmt, a.methods), a.rounds, check_change))
    if a.synthetic:
        sys.path.insert(0, str(HERE))
        import synth_env

        recipe = synth_env.Recipe(files=a.synthetic_files, total_bytes=a.synthetic_bytes)
        log("preparing the synthetic environment (benchmarks/synth_env.py, cached per machine)")
        tarball = synth_env.ensure(recipe)
        raw_s = work / "synthetic.tar"
        decompress_to(tarball, "tar.gz", raw_s)
        methods = [m for m in methods_for("tar.gz", a.methods) if m not in ("tarfile", "tarfile_data", "sha256")]
        datasets.append(Dataset("synthetic", tarball, "tar.gz", raw_s, methods, a.synthetic_rounds))
    if a.formats and not a.tarball:
        for fmt in OTHER_FORMATS:
            log(f"preparing the seed tarball as {fmt} (examples/build_env.py, cached per machine)")
            tarball = build_seed(work / f"seed-{fmt}", fmt)
            methods = methods_for(fmt, a.methods)
            datasets.append(Dataset(f"seed.{fmt}", tarball, fmt, raw, methods, a.format_rounds))
    return datasets


def rotate(items: list[str], n: int) -> list[str]:
    k = n % len(items)
    return items[k:] + items[:k]


def run_rounds(runner: Runner, datasets: list[Dataset]) -> None:
    for r in range(max(ds.rounds for ds in datasets)):
        for ds in datasets:
            if r >= ds.rounds:
                continue
            # ours_cold after mlserver11 in round 0 (their trees are compared); rotate later rounds.
            # The file-creation limit is measured before and after every method: the regime can
            # change within minutes, so each result is divided by the limit measured beside it.
            methods = [m for m in ds.methods if m != "create"]
            order = methods if r == 0 else rotate(methods, r)
            before = runner.method(ds, "create", r)
            ds.add(ds.samples, "create", before)
            for m in order:
                t = runner.method(ds, m, r)
                after = runner.method(ds, "create", r)
                local = (before + after) / 2
                log(f"[{ds.name} round {r + 1}/{ds.rounds}] {m}: {t:.2f} s (file-creation limit beside it {local:.2f})")
                ds.add(ds.samples, m, t)
                ds.add(ds.samples, "create", after)
                ds.add(ds.ratios, m, t / local)
                ds.add(ds.limits, m, local)
                before = after
    for ds in datasets:
        if ds.check_change:
            log(f"[{ds.name}] checking that a changed tarball at the same path is detected")
            runner.change_check(ds)


# --- the report --------------------------------------------------------------------------------


def med(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fmt_s(x: float) -> str:
    if x != x:
        return "–"
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s" if x < 10 else f"{x:.1f} s"


def paired(ds: Dataset, num: str, den: str) -> float:
    """Median over rounds of num/den, each first divided by the file-creation limit measured beside it."""
    a, b = ds.ratios.get(num, []), ds.ratios.get(den, [])
    return med([x / y for x, y in zip(a, b, strict=False) if y > 0])


def raw_paired(ds: Dataset, num: str, den: str) -> float:
    """Median over rounds of num/den in plain seconds."""
    a, b = ds.samples.get(num, []), ds.samples.get(den, [])
    return med([x / y for x, y in zip(a, b, strict=False) if y > 0])


def label(ds: Dataset, m: str) -> str:
    if m == "decompress":
        return f"decompression only: {DECOMPRESS[ds.fmt][0]} > /dev/null"
    if m == "mlserver11":
        return NATIVE[ds.fmt]
    return LABELS[m]


def dataset_table(ds: Dataset) -> list[str]:
    head = (
        f"**{ds.name}** (`{ds.tarball.name}`, {ds.tarball.stat().st_size / 1e6:.0f} MB {ds.fmt} → "
        f"{ds.bytes / 1e6:.0f} MB, {ds.files:,} files, {ds.symlinks:,} symlinks; {ds.rounds} rounds)"
    )
    rows = [
        head,
        "",
        "| method | median | ÷ streaming limit beside it | that limit (median) | machine CPU | peak RSS |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m in [*ds.methods, "ours_warm", "ours_warm_work"]:
        if m not in ds.samples:
            continue
        if m in ds.ratios:
            ratio, beside = f"{over_streaming(ds, m):.2f}×", fmt_s(med(streaming(ds, m)))
        else:  # file creation itself, warm starts
            ratio, beside = "–", fmt_s(med(streaming(ds, "ours_cold")))
        cpu = fmt_s(med(ds.cpu[m])) if m in ds.cpu else "–"
        rss = max(ds.rss.get(m, [0])) / 1024
        if m == "ours_cold" and ds.self_rss:
            rss_s = f"{max(ds.self_rss) / 1024:.0f} MiB (tree {rss:.0f})"
        else:
            rss_s = f"{rss:.0f} MiB" if m in ds.rss else "–"
        name = f"**{label(ds, m)}**" if m.startswith("ours") else label(ds, m)
        rows.append(f"| {name} | {fmt_s(med(ds.samples[m]))} | {ratio} | {beside} | {cpu} | {rss_s} |")
    parts = [k for k in ds.parts if k.startswith("ours: ")]
    if parts:
        total = sum(med(ds.parts[k]) for k in parts)
        rows += [
            "",
            "ours cold, phases as the entrypoint logs them (median): "
            + ", ".join(f"{k[6:]} {fmt_s(med(ds.parts[k]))}" for k in parts)
            + f" (sum {fmt_s(total)}; the rest is interpreter start, imports and hashing a tarball not seen before)",
        ]
    floor = cpu_floor(ds)
    if floor == floor:
        rows += [
            "",
            f"CPU floor of a durable streaming unpack on {CORES} cores: (machine CPU of decoding + of durable file "
            f"creation) ÷ {CORES} = {fmt_s(floor)}, {floor / med(streaming(ds, 'ours_cold')):.2f}× the streaming "
            "limit (ours syncs once before publishing; the limit and the baselines never sync)",
        ]
    extra = [k for k in ds.parts if not k.startswith("ours")]
    if extra:
        rows += ["", "baselines' parts (median): " + ", ".join(f"{k} {fmt_s(med(ds.parts[k]))}" for k in extra)]
    return rows


def verdicts(datasets: list[Dataset]) -> list[tuple[bool, str]]:
    out: list[tuple[bool, str]] = []
    for ds in datasets:
        for what, ok, detail in ds.checks:
            out.append((ok, f"{ds.name}: {what}" + (f" ({detail})" if detail else "")))
        out += dataset_verdicts(ds)
    return out


def streaming(ds: Dataset, m: str) -> list[float]:
    """Per round, the streaming limit beside method m: max(decoding that round, file creation beside m)."""
    decode = ds.samples.get("decompress", [])
    return [max(c, decode[r] if r < len(decode) else 0.0) for r, c in enumerate(ds.limits.get(m, []))]


def over_streaming(ds: Dataset, m: str) -> float:
    """Median over rounds of method m ÷ the streaming limit beside it."""
    return med([t / lim for t, lim in zip(ds.samples.get(m, []), streaming(ds, m), strict=False) if lim > 0])


def cpu_floor(ds: Dataset) -> float:
    """The least wall time a durable streaming unpack can take here: (machine CPU of decoding + of
    durable file creation) ÷ cores, however well the two overlap; nan if either was not measured."""
    if "decompress" not in ds.cpu or "durable" not in ds.cpu:
        return float("nan")
    return (med(ds.cpu["decompress"]) + med(ds.cpu["durable"])) / CORES


def dataset_verdicts(ds: Dataset) -> list[tuple[bool, str]]:
    """The issue's targets on one data set, each judged within this run."""
    out: list[tuple[bool, str]] = []
    limit = med(streaming(ds, "ours_cold"))
    r = over_streaming(ds, "ours_cold")
    floor = cpu_floor(ds)
    detail = f"target ≤ {TARGET_COLD_OVER_LIMIT}; limit {fmt_s(limit)}"
    if floor == floor:
        detail += f"; a durable unpack's CPU floor on {CORES} cores {fmt_s(floor)} = {floor / limit:.2f}× the limit"
    detail += f"; ours {fmt_s(med(ds.samples['ours_cold']))} using {med(ds.cpu['ours_cold']):.2f} s of machine CPU"
    out.append((r <= TARGET_COLD_OVER_LIMIT, f"{ds.name}: ours cold ÷ streaming limit = {r:.2f} ({detail})"))
    if "mlserver11" in ds.samples:
        r = paired(ds, "mlserver11", "ours_cold")
        detail = f"target ≥ {TARGET_NATIVE_OVER_OURS}; in plain seconds {raw_paired(ds, 'mlserver11', 'ours_cold'):.2f}"
        out.append((r >= TARGET_NATIVE_OVER_OURS, f"{ds.name}: ({NATIVE[ds.fmt]}) ÷ ours cold = {r:.2f} ({detail})"))
    if "ours_warm_work" in ds.samples:
        w = med(ds.samples["ours_warm_work"]) * 1000
        whole = med(ds.samples["ours_warm"]) * 1000
        detail = f"target ≤ {TARGET_WARM_MS:.0f} ms; whole `unpack` process {whole:.0f} ms"
        out.append((w <= TARGET_WARM_MS, f"{ds.name}: warm start, entrypoint work = {w:.0f} ms ({detail})"))
    else:
        out.append((False, f"{ds.name}: warm start: the entrypoint logged no 'entrypoint work N ms'"))
    rss = max(ds.self_rss or ds.rss["ours_cold"]) / 1024
    tree = max(ds.rss["ours_cold"]) / 1024
    detail = f"target ≤ {TARGET_RSS_MIB:.0f} MiB; with its children {tree:.0f} MiB"
    out.append((rss <= TARGET_RSS_MIB, f"{ds.name}: peak RSS of the entrypoint = {rss:.0f} MiB ({detail})"))
    return out


def code_digest() -> str:
    """A digest of the entrypoint's sources, to tell whether they changed during the run."""
    h = hashlib.sha256()
    for path in sorted((REPO / "entrypoint").rglob("*.py")):
        h.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def machine() -> dict[str, object]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    dirty = bool(git("status", "--porcelain", "--", "entrypoint"))
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "host": f"{platform.system()} {platform.release()}, {os.cpu_count()} CPUs, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM",
        "loadavg": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "entrypoint": git("log", "-1", "--format=%h %s", "--", "entrypoint")
        + (" + uncommitted changes" if dirty else ""),
        "python": platform.python_version(),
        "code": code_digest(),
    }


def plot(datasets: list[Dataset], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heights = [len([m for m in [*ds.methods, "ours_warm"] if m in ds.samples]) for ds in datasets]
    fig, axes = plt.subplots(
        len(datasets),
        1,
        figsize=(9, 1.0 + sum(0.32 * h + 0.5 for h in heights)),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    for ax, ds in zip(axes[:, 0], datasets, strict=True):
        methods = [m for m in [*ds.methods, "ours_warm"] if m in ds.samples][::-1]
        values = [med(ds.samples[m]) for m in methods]
        lows = [v - min(ds.samples[m]) for m, v in zip(methods, values, strict=True)]
        highs = [max(ds.samples[m]) - v for m, v in zip(methods, values, strict=True)]
        colors = [
            "#d62728" if m.startswith("ours") else "#7f7f7f" if m in ("create", "decompress") else "#1f77b4"
            for m in methods
        ]
        ax.barh(range(len(methods)), values, xerr=[lows, highs], color=colors, capsize=2, height=0.7)
        ax.set_yticks(range(len(methods)), [label(ds, m) for m in methods], fontsize=7.5)
        limit = med(streaming(ds, "ours_cold"))
        ax.axvline(limit, color="k", ls="--", lw=0.8, label="streaming limit")
        ax.axvline(limit * TARGET_COLD_OVER_LIMIT, color="k", ls=":", lw=0.8, label="1.3× limit (target)")
        for y, v in enumerate(values):
            ax.text(v, y, f" {fmt_s(v)}", va="center", fontsize=7)
        ax.set_title(
            f"{ds.name}: {ds.bytes / 1e6:.0f} MB, {ds.files:,} files ({ds.fmt}; median of {ds.rounds} rounds, "
            "whiskers min–max)",
            fontsize=8.5,
        )
        ax.set_xlabel("seconds", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_xlim(0, max(v + h for v, h in zip(values, highs, strict=True)) * 1.18)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def report(datasets: list[Dataset], out: Path, info: dict[str, object], command: str) -> list[tuple[bool, str]]:
    results = verdicts(datasets)
    lines = [
        f"`{command}` — {info['date']}, {info['host']}, load average at the end {info['loadavg']}; "
        f"sources digest {info['code']}; "
        f"entrypoint at {info['entrypoint']}. Scratch files on {info.get('filesystem', '?')}. "
        "Reads from the page cache for every method alike"
        + (" except: --cold-cache dropped it before each method." if info.get("cold_cache") else "."),
        "",
    ]
    for ds in datasets:
        lines += [*dataset_table(ds), ""]
    lines += ["Targets (each a ratio within this one interleaved run):", ""]
    lines += [f"- {'PASS' if ok else 'FAIL'} {text}" for ok, text in results]
    out.mkdir(parents=True, exist_ok=True)
    (out / "unpack.md").write_text("\n".join(lines) + "\n")
    raw = {
        "info": info,
        "datasets": [
            {
                "name": ds.name,
                "tarball": str(ds.tarball),
                "format": ds.fmt,
                "decoder": DECOMPRESS[ds.fmt][0],
                "tarball_bytes": ds.tarball.stat().st_size,
                "files": ds.files,
                "dirs": ds.dirs,
                "symlinks": ds.symlinks,
                "bytes": ds.bytes,
                "samples": ds.samples,
                "ratios_to_create": ds.ratios,
                "create_beside": ds.limits,
                "over_streaming": {m: over_streaming(ds, m) for m in ds.ratios},
                "streaming_limit": med(streaming(ds, "ours_cold")),
                "machine_cpu": ds.cpu,
                "cpu_floor": cpu_floor(ds),
                "tree_rss_kib": ds.rss,
                "entrypoint_rss_kib": ds.self_rss,
                "parts": ds.parts,
                "checks": ds.checks,
            }
            for ds in datasets
        ],
        "verdicts": [{"pass": ok, "text": text} for ok, text in results],
    }
    (out / "unpack.json").write_text(json.dumps(raw, indent=1))
    try:
        plot(
            datasets,
            out / "unpack.png",
            f"mlserver-entrypoint unpack benchmark, {info['date']} ({info['entrypoint'][:60]})",
        )
    except ImportError:
        log("matplotlib is not installed (pip install -e '.[bench]'): no plot")
    print("\n".join(lines))
    return results


@contextlib.contextmanager
def workdir(parent: str | None, keep: bool, fs: str, info: dict[str, object]) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mlbench-", dir=parent))  # short: cache entries live below it
    loop = None
    try:
        if fs == "fresh" or (fs == "auto" and can_mount()):
            try:
                loop = mount_fresh_fs(path)
            except (subprocess.CalledProcessError, OSError) as exc:
                if fs == "fresh":
                    raise BenchError(f"cannot mount a fresh filesystem at {path}: {exc}") from None
                log(f"cannot mount a fresh filesystem ({exc}); using {path} as it is")
        if loop is not None:
            info["filesystem"] = f"a fresh ext4 (journaled, {FRESH_FS_GIB} GiB, loop device with direct I/O)"
        else:
            info["filesystem"] = f"{fs_type(path)} at {path.parent} (not fresh: see --fs)"
        yield path
    finally:
        if keep:
            log(f"kept {path}")
        elif loop is None:
            rmtree(path)
        if loop is not None:
            subprocess.run(["umount", str(path)], check=False)
            subprocess.run(["losetup", "-d", loop[0]], check=False)
            loop[1].unlink()
            if not keep:
                path.rmdir()


# Why a fresh filesystem by default: on ext4 without a journal (this VM's root filesystem) the inode
# allocator skips inodes freed in the last minutes, and scans for them on every create; after the
# previous method's tree is deleted, file creation gets up to 10x slower for every method alike
# (the "slow regime" of ../shared/README.md §2, seen in perf as recently_deleted()). A user's first
# start meets a fresh volume, not that; a journaled ext4 never does it.
FRESH_FS_GIB = 24


def can_mount() -> bool:
    return os.geteuid() == 0 and all(shutil.which(t) for t in ("mkfs.ext4", "losetup", "mount", "umount"))


def mount_fresh_fs(path: Path) -> tuple[str, Path]:
    fd, name = tempfile.mkstemp(prefix="mlbench-", suffix=".img", dir="/var/tmp")
    os.close(fd)
    image = Path(name)
    loop = ""
    try:
        os.truncate(image, FRESH_FS_GIB << 30)  # sparse
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
        argv = ["losetup", "--direct-io=on", "-f", "--show", str(image)]
        loop = subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()
        subprocess.run(["mount", loop, str(path)], check=True, capture_output=True)
    except (subprocess.CalledProcessError, OSError):
        if loop:
            subprocess.run(["losetup", "-d", loop], check=False)
        image.unlink()
        raise
    return loop, image


def fs_type(path: Path) -> str:
    best, kind = "", "?"
    for line in Path("/proc/mounts").read_text().splitlines():
        _, where, fstype, *_ = line.split()
        if str(path).startswith(where) and len(where) > len(best):
            best, kind = where, fstype
    return kind


def can_drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(f"stopped by signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="skip the 2 GB synthetic env; 3 rounds")
    p.add_argument("--rounds", type=int, default=None, help="rounds for the seed (default 5, --quick 3)")
    p.add_argument("--synthetic-rounds", type=int, default=3)
    p.add_argument("--format-rounds", type=int, default=3)
    p.add_argument("--warm-runs", type=int, default=5, help="warm starts after each cold one")
    p.add_argument("--tarball", help="benchmark this tarball instead of the seed (no synthetic, no formats)")
    p.add_argument("--no-synthetic", dest="synthetic", action="store_false", default=None)
    p.add_argument("--no-formats", dest="formats", action="store_false", default=True)
    p.add_argument("--synthetic-files", type=int, default=100_000)
    p.add_argument("--synthetic-bytes", type=int, default=2_000_000_000)
    p.add_argument("--cold-cache", action="store_true", help="drop the page cache before each method (root)")
    p.add_argument("--out", type=Path, default=HERE / "results", help="where unpack.md/.json/.png go")
    p.add_argument("--work-dir", default=None, help="parent of the scratch dir (default: the system temp dir)")
    p.add_argument(
        "--fs",
        choices=("auto", "fresh", "here"),
        default="auto",
        help="fresh: mount a new ext4 on a loop device as the scratch dir (root); here: use the work dir's "
        "filesystem as it is; auto (default): fresh when possible",
    )
    p.add_argument("--keep", action="store_true", help="keep the scratch dir")
    p.add_argument("--methods", type=lambda v: v.split(","), default=None, help="a subset, e.g. create,ours_cold")
    p.add_argument("--no-change-check", dest="change_check", action="store_false", help="skip the changed-file check")
    a = p.parse_args(argv)
    if a.methods and not {"create", "ours_cold"} <= set(a.methods):
        p.error("--methods must include create and ours_cold (every ratio is against them)")
    a.rounds = a.rounds or (3 if a.quick else 5)
    if a.synthetic is None:
        a.synthetic = not (a.quick or a.tarball)
    if a.cold_cache and not can_drop_caches():
        p.error("--cold-cache: cannot write /proc/sys/vm/drop_caches here (needs root outside a container)")
    command = "python benchmarks/unpack.py " + " ".join(argv if argv is not None else sys.argv[1:])
    # Stopped by SIGTERM or SIGINT (which background jobs ignore): remove the scratch dir on the way out.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    start = machine()
    where: dict[str, object] = {}
    with workdir(a.work_dir, a.keep, a.fs, where) as work:
        datasets = make_datasets(a, work)
        runner = Runner(work, a.warm_runs, a.cold_cache)
        run_rounds(runner, datasets)
        info = {**machine(), **where, "cold_cache": a.cold_cache, "at_start": start}
        if start["code"] != info["code"]:
            info["entrypoint"] = f"{start['entrypoint']} at the start, {info['entrypoint']} at the end (changed!)"
        results = report(datasets, a.out, info, command.strip())
    print()
    for ok, text in results:
        print(f"{'PASS' if ok else 'FAIL'} {text}")
    print(f"\nwrote {a.out / 'unpack.md'}, {a.out / 'unpack.png'}, {a.out / 'unpack.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
