"""Init container and shared cache (issue 7): `unpack` in one process prepares the entry, the main
process then starts warm; concurrent starts on one cache unpack once (flock across processes)."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

from conftest import Example
from support import ENTRYPOINT, REPO, entry_env, run_entrypoint


def test_main_container_starts_warm_after_the_init_container(seed: Example, tmp_path: Path) -> None:
    shared = tmp_path / "cache"  # the volume both containers mount at the same path
    env = entry_env(
        MLSERVER_ENV_TARBALL=seed.tarball, MLSERVER_ENV_CACHE_DIR=shared, MLSERVER_MODELS_DIR=seed.models_dir
    )
    init = run_entrypoint(["unpack"], env)
    assert init.returncode == 0 and "extract:" in init.stderr, init.stderr
    prefix = init.stdout.splitlines()[-1]

    # The main container's start, up to the exec of its command; best of five (a busy CI machine).
    walls, work = [], []
    for _ in range(5):
        t0 = time.monotonic()
        main = run_entrypoint(["true"], env)
        walls.append(time.monotonic() - t0)
        assert main.returncode == 0, main.stderr
        assert re.search(f"cache hit:? {re.escape(prefix)}", main.stderr) and "extract:" not in main.stderr
        work.append(float(re.findall(r"entrypoint work (\d+) ms", main.stderr)[-1]))
    assert min(work) < 500, work  # the entrypoint's own part; typically tens of ms
    assert min(walls) < 1.0, walls  # interpreter start included


def test_concurrent_starts_on_one_cache_unpack_once(small_tarball: Path, tmp_path: Path) -> None:
    env = entry_env(MLSERVER_ENV_TARBALL=small_tarball, MLSERVER_ENV_CACHE_DIR=tmp_path / "cache")
    procs = [
        subprocess.Popen([*ENTRYPOINT, "unpack"], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
        for _ in range(3)
    ]  # fmt: skip
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    assert len({out.splitlines()[-1] for out, _ in results}) == 1  # one entry
    assert sum("extract:" in err for _, err in results) == 1  # unpacked once; the others waited for it
    assert sum("cache hit" in err for _, err in results) == 2
