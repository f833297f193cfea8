"""End to end without a container: the seed example served through the entrypoint (issue 3)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import Example
from support import entry_env, env_python, error_line, infer, run_entrypoint, serving

DIGITS = """
import json, sys, joblib
from sklearn import datasets
d = datasets.load_digits()
X = d.images.reshape((len(d.images), -1))[899:911]
model = joblib.load(sys.argv[1])
print(json.dumps({"pixels": X.tolist(), "predicted": model.predict(X).tolist()}))
"""


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("c")


def test_unpack_prints_prefix_then_serves_from_cache(seed: Example, cache_dir: Path, tmp_path: Path) -> None:
    env = entry_env(
        MLSERVER_ENV_TARBALL=seed.tarball, MLSERVER_ENV_CACHE_DIR=cache_dir, MLSERVER_MODELS_DIR=seed.models_dir
    )
    unpacked = run_entrypoint(["unpack"], env)
    assert unpacked.returncode == 0, unpacked.stderr
    prefix = Path(unpacked.stdout.splitlines()[-1])
    assert prefix.parent == cache_dir and (prefix / "bin" / "python").exists()
    for phase in ("locate:", "extract:", "relocate:", "publish:"):
        assert f"mlserver-entrypoint: {phase}" in unpacked.stderr

    # The env's own interpreter says what the model predicts: the server must say the same.
    expected = env_python(prefix, DIGITS, str(seed.models_dir / "model.joblib"))
    assert isinstance(expected, dict)

    log = tmp_path / "server.log"
    with serving({**env, "TEST_LOG": str(log)}) as url:
        got = [infer(url, "mnist-svm", pixels) for pixels in expected["pixels"]]
    assert got == expected["predicted"]
    assert len(set(got)) > 3  # several different digits, not a constant answer
    text = log.read_text()
    assert "cache hit" in text and "extract:" not in text
    assert f"exec: {prefix}/bin/mlserver start {seed.models_dir}" in text


def test_commands_run_inside_the_environment(seed: Example, cache_dir: Path) -> None:
    env = entry_env(
        MLSERVER_ENV_TARBALL=seed.tarball,
        MLSERVER_ENV_CACHE_DIR=cache_dir,
        PYTHONPATH="/nonexistent-leak",
        PYTHONHOME=sys.base_prefix,
    )
    code = (
        "import json, os, sys, sklearn, mlserver; print(json.dumps([sys.version_info[:2], sklearn.__version__, "
        "mlserver.__version__, sys.prefix, os.environ.get('CONDA_PREFIX'), os.environ.get('PYTHONNOUSERSITE'), "
        "'PYTHONPATH' in os.environ or 'PYTHONHOME' in os.environ]))"
    )
    proc = run_entrypoint(["python", "-c", code], env)
    assert proc.returncode == 0, proc.stderr
    version, sklearn, mlserver, sys_prefix, conda_prefix, nousersite, leaked = json.loads(proc.stdout)
    assert version == [3, 8] and sklearn == "0.24.2" and mlserver == "1.1.0"
    assert sys_prefix == conda_prefix and Path(sys_prefix).parent == cache_dir
    assert nousersite == "1" and leaked is False

    version_out = run_entrypoint(["mlserver", "--version"], env)
    assert version_out.returncode == 0 and "1.1.0" in version_out.stdout
    # The example's own pip too: its #! named the build machine's interpreter (another pip, other packages)
    pip = run_entrypoint(["pip", "--version"], env)
    assert pip.returncode == 0 and f"from {sys_prefix}/lib/python3.8/site-packages/pip" in pip.stdout, pip.stdout


def test_second_tarball_gets_its_own_entry(seed: Example, cache_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "same.tar.gz"
    copy.write_bytes(seed.tarball.read_bytes())
    env = entry_env(MLSERVER_ENV_TARBALL=copy, MLSERVER_ENV_CACHE_DIR=cache_dir)
    same = run_entrypoint(["unpack"], env)
    assert same.returncode == 0 and "cache hit" in same.stderr  # same content, other path: same entry

    other = tmp_path / "other.tar.gz"
    other.write_bytes(seed.tarball.read_bytes() + b"\0" * 1024)  # tar.gz with trailing zeros: other content
    env = entry_env(MLSERVER_ENV_TARBALL=other, MLSERVER_ENV_CACHE_DIR=cache_dir)
    proc = run_entrypoint(["unpack"], env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() != same.stdout.strip() and "extract:" in proc.stderr


def test_no_tarball_runs_the_command_as_is(tmp_path: Path) -> None:
    for value in ("", None):  # empty means "no environment"; unset with no environment.tar.gz likewise
        env = entry_env(MLSERVER_ENV_TARBALL=value, MLSERVER_MODELS_DIR=tmp_path, MLSERVER_ENV_CACHE_DIR=tmp_path / "c")
        proc = run_entrypoint(["python", "-c", "import sys; print(sys.version_info[:2])"], env)
        assert proc.returncode == 0, proc.stderr
        assert "(3, 8)" not in proc.stdout and "no environment tarball" in proc.stderr
        assert not (tmp_path / "c").exists()


def test_environment_tar_gz_in_models_dir_is_found(seed: Example, cache_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "environment.tar.gz").symlink_to(seed.tarball)
    env = entry_env(MLSERVER_MODELS_DIR=tmp_path, MLSERVER_ENV_CACHE_DIR=cache_dir)
    proc = run_entrypoint(["python", "-c", "import sklearn; print(sklearn.__version__)"], env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "0.24.2"


def test_env_without_mlserver_is_refused_for_mlserver(small_tarball: Path, tmp_path: Path) -> None:
    env = entry_env(
        MLSERVER_ENV_TARBALL=small_tarball, MLSERVER_ENV_CACHE_DIR=tmp_path / "c", MLSERVER_MODELS_DIR=tmp_path
    )
    proc = run_entrypoint([], env)
    assert proc.returncode != 0
    line = error_line(proc)
    assert "has no mlserver" in line and "mlserver-sklearn" in line
    assert not list((tmp_path / "c").glob("*.ready"))  # nothing cached
    # The same environment still runs other commands.
    proc = run_entrypoint(["python", "-c", "print('ok')"], env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok"
