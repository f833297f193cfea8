"""Session fixtures: the seed example built offline as a real conda-pack tarball (cached per machine)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import REPO, unavailable

BUILD = REPO / "examples" / "build_env.py"


def pytest_configure(config: pytest.Config) -> None:
    """Children start as a foreground shell job's do, with SIGINT and SIGQUIT at their defaults:
    a suite launched as a background job (`make test &`) inherits them ignored, and the entrypoint
    keeps inherited-ignored signals ignored."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


@pytest.fixture(scope="session")
def mlserver_python() -> Path:
    """The interpreter of a virtualenv with the image's MLServer (docker/constraints.txt), built
    once per machine: MLServer's own model discovery for tests that need no running server."""
    import hashlib

    from filelock import FileLock

    pins = (REPO / "docker" / "constraints.txt").read_bytes()
    cache = Path.home() / ".cache" / "mlserver-env-fixtures"
    venv = cache / f"mlserver-venv-{hashlib.sha256(pins).hexdigest()[:12]}"
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(venv) + ".lock"):
        if not (venv / ".done").exists():
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            install = [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check"]
            proc = subprocess.run(
                [*install, "mlserver", "-c", str(REPO / "docker" / "constraints.txt")], capture_output=True, text=True
            )
            if proc.returncode != 0:
                pytest.fail(f"installing MLServer for the tests failed:\n{proc.stderr[-3000:]}")
            (venv / ".done").write_text("")
    return venv / "bin" / "python"


@dataclass(frozen=True)
class Example:
    models_dir: Path  # model-settings.json, model.joblib, old-sklearn.tar.gz
    tarball: Path


def _build(out: Path, *args: str) -> Path:
    proc = subprocess.run(
        [sys.executable, str(BUILD), "--out", str(out), *args], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        pytest.fail(f"building the test environment failed:\n{proc.stderr[-3000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def seed(tmp_path_factory: pytest.TempPathFactory) -> Example:
    """The MLServer example: Python 3.8, scikit-learn 0.24.2, mlserver 1.1.0, SVC on digits."""
    out = tmp_path_factory.mktemp("seed")
    tarball = _build(out)
    shutil.copy(REPO / "examples" / "seed" / "model-settings.json", out)
    return Example(out, tarball)


@pytest.fixture(scope="session")
def small_tarball(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real but small conda-pack tarball: bare CPython 3.8, no mlserver (fast, for fault tests)."""
    out = tmp_path_factory.mktemp("small")
    empty = out / "requirements.txt"
    empty.write_text("")
    return _build(out, "--requirements", str(empty), "--name", "bare", "--no-model")


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A mount point for small tmpfs volumes (unmounted at the end, however the test ends)."""
    point = tmp_path / "vol"
    point.mkdir()
    probe = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(point)], capture_output=True, text=True
    )
    if probe.returncode != 0:
        unavailable(f"cannot mount a tmpfs here: {probe.stderr.strip()}")
    subprocess.run(["umount", str(point)], check=True)
    yield point
    while subprocess.run(["umount", str(point)], capture_output=True).returncode == 0:
        pass
