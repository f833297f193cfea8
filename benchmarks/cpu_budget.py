"""CPU budget of a durable streaming unpack on this machine, beside ours (docs/performance.md).

A streaming unpack on N cores cannot take less than (CPU of decoding + CPU of durable file
creation) / N, however well it overlaps them. For each method: wall time, CPU of its process tree
(user+sys), and CPU of the whole machine (/proc/stat: it includes the kernel's writeback threads).
Interleaved rounds, medians.

    python benchmarks/cpu_budget.py TARBALL FRESH_EXT4_MOUNT [ROUNDS]   # tar.gz or tar.zst
"""

import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARBALL = Path(sys.argv[1])
FS = Path(sys.argv[2])  # a fresh ext4 mount
ROUNDS = int(sys.argv[3]) if len(sys.argv) > 3 else 5
PY = sys.executable
TAR = FS / "plain.tar"


def machine_cpu() -> float:
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    ticks = sum(int(p) for p in parts[:3]) + sum(int(p) for p in parts[5:8])  # user nice system irq softirq steal
    return ticks / os.sysconf("SC_CLK_TCK")


def run(cmd: str, env: dict[str, str] | None = None) -> tuple[float, float, float]:
    subprocess.run(["sync"], check=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    m0, t0 = machine_cpu(), time.perf_counter()
    subprocess.run(["bash", "-c", cmd], check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall, m1 = time.perf_counter() - t0, machine_cpu()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    tree = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, tree, m1 - m0


def fresh(name: str) -> Path:
    d = FS / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    return d


def main() -> None:
    decode = f"zstd -dc {TARBALL}" if TARBALL.name.endswith(".zst") else f"{PY} -m isal.igzip -d -c {TARBALL}"
    subprocess.run(f"{decode} > {TAR}", shell=True, check=True)
    env = {**os.environ, "MLSERVER_ENV_TARBALL": str(TARBALL)}
    methods = {
        "decode (to /dev/null)": lambda: run(f"{decode} > /dev/null"),
        "create (tar -xf of the .tar)": lambda: run(f"tar -xf {TAR} -C {fresh('t')}"),
        "durable create (tar -xf + sync -f)": lambda: run(f"tar -xf {TAR} -C {fresh('t')} && sync -f {FS}"),
        "ours cold (unpack)": lambda: run(
            f"{PY} -m entrypoint unpack", {**env, "MLSERVER_ENV_CACHE_DIR": str(fresh("c"))}
        ),
    }
    results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in methods}
    for r in range(ROUNDS):
        for name in list(methods)[r % len(methods) :] + list(methods)[: r % len(methods)]:
            results[name].append(methods[name]())
    print(f"{TARBALL.name}, {ROUNDS} rounds, medians: wall, CPU of the process tree, CPU of the machine")
    for name, rows in results.items():
        w, t, m = (statistics.median(x[i] for x in rows) for i in range(3))
        print(f"  {name:40s} wall {w * 1000:6.0f} ms  tree {t * 1000:6.0f} ms  machine {m * 1000:6.0f} ms")


if __name__ == "__main__":
    main()
