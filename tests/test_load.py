"""Load (issue 6): the seed model served through the entrypoint, under a bounded load from a second
process on loopback, compared with the same environment's `mlserver start` run directly.

    .venv/bin/python -m pytest -m slow tests/test_load.py -s     # prints the comparison table

Both servers run the same interpreter, packages, model and settings. The entrypoint execs mlserver,
so after the start nothing of it is left in the request path: the test checks that the serving
process is the entrypoint's own PID running the environment's interpreter and that both
configurations answer every request correctly. Throughput and latency are printed, not compared:
after the exec both sides are the same program, so a ratio of them measures only this machine's noise.
Override the load with MLSERVER_TEST_LOAD_CLIENTS / MLSERVER_TEST_LOAD_SECONDS (default 8 / 30).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from conftest import Example
from support import ENTRYPOINT, REPO, entry_env, env_python, free_port, run_entrypoint, stop

CLIENTS = int(os.environ.get("MLSERVER_TEST_LOAD_CLIENTS", "8"))
SECONDS = float(os.environ.get("MLSERVER_TEST_LOAD_SECONDS", "30"))
DIGIT = """
import json, sys, joblib
from sklearn import datasets
d = datasets.load_digits()
x = d.images.reshape((len(d.images), -1))[900:901]
print(json.dumps({"pixels": x[0].tolist(), "digit": int(joblib.load(sys.argv[1]).predict(x)[0])}))
"""

pytestmark = pytest.mark.slow


@contextmanager
def serve(
    argv: list[str], env: Mapping[str, str], timeout: float = 180
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Start a server on free loopback ports; yield its URL and process once the model is ready."""
    port = free_port()
    env = {
        **env,
        "MLSERVER_HTTP_PORT": str(port),
        "MLSERVER_GRPC_PORT": str(free_port()),
        "MLSERVER_METRICS_PORT": str(free_port()),
    }
    proc = subprocess.Popen(
        argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, f"{argv[0]} exited with {proc.returncode}"
            try:
                if requests.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "server not ready in time"
            time.sleep(0.3)
        yield url, proc
    finally:
        stop(proc)


def activated(prefix: Path, env: Mapping[str, str]) -> dict[str, str]:
    """What an activation sets, for the environment's own `mlserver start` run directly."""
    return {**env, "PATH": f"{prefix / 'bin'}:{env.get('PATH', os.defpath)}", "CONDA_PREFIX": str(prefix),
            "PYTHONNOUSERSITE": "1"}  # fmt: skip


def load(url: str, pixels: list[float], digit: int) -> dict[str, object]:
    # Warm up first (the first requests load the model into the worker), then measure.
    for _ in range(5):
        requests.post(
            f"{url}/v2/models/mnist-svm/infer",
            json={"inputs": [{"name": "predict", "shape": [1, 64], "datatype": "FP32", "data": pixels}]},
            timeout=60,
        ).raise_for_status()
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "loadgen.py"), url, "mnist-svm", json.dumps(pixels), str(digit),
         "--clients", str(CLIENTS), "--seconds", str(SECONDS)],
        capture_output=True, text=True, timeout=SECONDS + 120, check=True,
    )  # fmt: skip
    result: dict[str, object] = json.loads(proc.stdout)
    return result


def test_load_through_the_entrypoint_matches_mlserver_started_directly(seed: Example, tmp_path: Path) -> None:
    env = entry_env(
        MLSERVER_ENV_TARBALL=seed.tarball,
        MLSERVER_ENV_CACHE_DIR=tmp_path / "c",
        MLSERVER_MODELS_DIR=seed.models_dir,
        MLSERVER_HOST="127.0.0.1",  # loopback only
    )
    unpacked = run_entrypoint(["unpack"], env)
    assert unpacked.returncode == 0, unpacked.stderr
    prefix = Path(unpacked.stdout.splitlines()[-1])
    sample = env_python(prefix, DIGIT, str(seed.models_dir / "model.joblib"))
    assert isinstance(sample, dict)

    # Interleaved A B B A, so drift in this machine's load hits both alike.
    runs: dict[str, list[dict[str, object]]] = {"entrypoint": [], "direct": []}
    for name in ("entrypoint", "direct", "direct", "entrypoint"):
        if name == "entrypoint":
            argv, run_env = [*ENTRYPOINT], env
        else:
            argv, run_env = [str(prefix / "bin" / "mlserver"), "start", str(seed.models_dir)], activated(prefix, env)
        with serve(argv, run_env) as (url, proc):
            if name == "entrypoint":
                # Nothing of the entrypoint stays between clients and mlserver: its process became
                # the environment's interpreter running mlserver (exec, same PID).
                assert Path(os.readlink(f"/proc/{proc.pid}/exe")).resolve().parent == (prefix / "bin").resolve()
                assert "mlserver" in Path(f"/proc/{proc.pid}/cmdline").read_text()
            runs[name].append(load(url, sample["pixels"], sample["digit"]))

    print(f"\nload: {CLIENTS} clients x {SECONDS:.0f} s per run, loopback, seed model (mnist-svm)")
    print(f"{'server':<12}{'run':>4}{'requests':>10}{'errors':>8}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}")
    for name, results in runs.items():
        for i, r in enumerate(results):
            print(
                f"{name:<12}{i:>4}{r['requests']:>10}{r['errors']:>8}{r['throughput_rps']:>9}{r['p50_ms']:>9}{r['p99_ms']:>9}"
            )

    for name, results in runs.items():
        for r in results:
            assert r["errors"] == 0, (name, r["error_examples"])
            assert r["requests"] > 0, (name, r)
    rps = {name: statistics.median(float(r["throughput_rps"]) for r in rs) for name, rs in runs.items()}  # type: ignore[arg-type]
    p50 = {name: statistics.median(float(r["p50_ms"]) for r in rs) for name, rs in runs.items()}  # type: ignore[arg-type]
    print(f"median req/s: entrypoint {rps['entrypoint']:.1f}, direct {rps['direct']:.1f}; "
          f"median p50: entrypoint {p50['entrypoint']:.1f} ms, direct {p50['direct']:.1f} ms")  # fmt: skip
    # No bound on their ratio: the same program serves in both cases (checked above through
    # /proc/PID/exe), so a difference is this machine's noise, and a bound loose enough for that
    # noise (a factor of 2 on a shared 2-core machine) would catch nothing the exe check does not.
