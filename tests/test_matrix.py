"""Compatibility matrix (issue 7): environments built offline like the seed, for each Python with an
mlserver release it supports, and the seed's stack in every archive format conda-pack writes.

Each combination is built (cached per machine by build_env's recipe key), inspected, unpacked and
served through the entrypoint, and must answer V2 inference requests with the predictions the
environment's own interpreter makes. docs/compatibility.md lists the same combinations.

Budget: not every Python × mlserver × format, but each Python once in tar.gz and each format once
on the seed's stack (the tar.gz seed is the default suite's own fixture). A fresh machine builds 8
environments (pip, conda-pack; xz is the slowest codec) and each combination then takes ~1 min to
inspect, unpack and serve: ~20 min estimated on an idle 2-core CI machine. Measured on a shared
machine at load 5-13: 42 min for the nine with four built during the run, 1-2.5 min each once
built; the xz build alone took 22 min there.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import requests
from conftest import _build
from support import REPO, entry_env, env_python, infer, run_entrypoint, serving
from test_serve import DIGITS

MATRIX = REPO / "examples" / "matrix"
SEED_STACK = "py3.8-mlserver1.1.txt"  # a link to examples/seed/requirements.txt: the seed's own build

COMBINATIONS = [
    *[(f, "tar.gz") for f in (SEED_STACK, "py3.9-mlserver1.3.txt", "py3.10-mlserver1.3.txt")],
    *[(f, "tar.gz") for f in ("py3.11-mlserver1.7.txt", "py3.12-mlserver1.7.txt")],
    *[(SEED_STACK, fmt) for fmt in ("tar.bz2", "tar.xz", "tar.zst", "zip")],
]


@pytest.mark.slow
@pytest.mark.parametrize(("requirements", "fmt"), COMBINATIONS, ids=[f"{r[:-4]}-{f}" for r, f in COMBINATIONS])
def test_combination_serves_the_environments_own_predictions(requirements: str, fmt: str, tmp_path: Path) -> None:
    python = re.match(r"py(\d+\.\d+)-", requirements).group(1)  # type: ignore[union-attr]
    pins = dict(re.findall(r"^(mlserver|scikit-learn)==(\S+)$", (MATRIX / requirements).read_text(), re.M))
    out = tmp_path / "models"
    # Same name as the seed fixture, so py3.8-mlserver1.1 in tar.gz is that very (cached) build.
    tarball = _build(out, "--python", python, "--requirements", str(MATRIX / requirements), "--format", fmt)
    shutil.copy(REPO / "examples" / "seed" / "model-settings.json", out)
    env = entry_env(MLSERVER_ENV_TARBALL=tarball, MLSERVER_ENV_CACHE_DIR=tmp_path / "c", MLSERVER_MODELS_DIR=out)

    inspected = run_entrypoint(["inspect", "--json"], env)
    assert inspected.returncode == 0, inspected.stderr
    report = json.loads(inspected.stdout)
    assert report["format"] == fmt and report["python"].startswith(f"{python}.")
    assert report["packages"]["mlserver"] == pins["mlserver"]
    assert report["packages"]["scikit-learn"] == pins["scikit-learn"]

    unpacked = run_entrypoint(["unpack"], env, timeout=600)
    assert unpacked.returncode == 0, unpacked.stderr
    prefix = Path(unpacked.stdout.splitlines()[-1])
    expected = env_python(prefix, DIGITS, str(out / "model.joblib"))
    assert isinstance(expected, dict)

    log = tmp_path / "server.log"
    with serving({**env, "TEST_LOG": str(log)}) as url:
        server = requests.get(f"{url}/v2", timeout=10).json()  # V2 server metadata: the env's mlserver
        got = [infer(url, "mnist-svm", pixels) for pixels in expected["pixels"]]
    assert server["version"] == pins["mlserver"]
    assert got == expected["predicted"], log.read_text()[-3000:]
    assert len(set(got)) > 3  # several different digits, not a constant answer
