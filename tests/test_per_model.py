"""Per-model environments (models.py): each model-settings.json naming `environment_tarball` gets
its environment prepared through the cache, and MLServer is handed a models folder in which each
of those models names its entry as `environment_path`.

The command here is a stand-in `mlserver` that reports what MLServer 1.7 would read from the
folder it is given (its discovery, name default, relative paths and environment choice, as in
mlserver/repository/load.py, utils.to_absolute_path and parallel/registry.py); the real MLServer
serving two models from two environments is tests/test_container.py's per-model test.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from archives import M, snapshot, tiny_env, write_tar
from support import entry_env, error_line, run_entrypoint

# What MLServer 1.7 makes of the folder `mlserver start` is given, as JSON on stdout.
REPORT = """\
import glob, json, os, sys
root = os.path.abspath(sys.argv[2])
models = {}
for path in glob.glob(os.path.join(root, "**", "model-settings.json"), recursive=True):
    doc = json.load(open(path))
    params = doc.get("parameters") or {}
    name = doc.get("name") or os.path.basename(os.path.dirname(path))
    uri = os.path.normpath(os.path.join(os.path.dirname(path), params.get("uri") or "."))
    env = params.get("environment_path") or params.get("environment_tarball")
    models[name] = {"uri": os.path.realpath(uri), "env": env, "extra": params.get("extra"),
                    "files": sorted(os.listdir(uri)) if os.path.isdir(uri) else None}
print(json.dumps({"models": models, "folder": root}))
"""


def _server(tmp_path: Path, version: str = "1.7.1") -> dict[str, str]:
    """A virtualenv-like prefix whose bin/mlserver reports; the entrypoint's env with it on PATH."""
    prefix = tmp_path / "server"
    (prefix / "bin").mkdir(parents=True, exist_ok=True)
    (prefix / "lib" / "python3.11" / "site-packages" / f"mlserver-{version}.dist-info").mkdir(
        parents=True, exist_ok=True
    )
    script = prefix / "bin" / "mlserver"
    script.write_text(f"#!{sys.executable}\n{REPORT}")
    script.chmod(0o755)
    return {"PATH": f"{prefix / 'bin'}:{os.environ['PATH']}"}


def _env_tarball(path: Path, mlserver: str | None = "1.7.1", marker: str = "") -> Path:
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    members = [*tiny_env(), M("share/which", data=marker.encode())]
    if mlserver is not None:
        metadata = f"Metadata-Version: 2.1\nName: mlserver\nVersion: {mlserver}\n"
        members += [
            M("bin/mlserver", data=b"#!/bin/sh\n", mode=0o755),
            M(f"lib/{version}/site-packages/mlserver-{mlserver}.dist-info/METADATA", data=metadata.encode()),
        ]
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_tar(path, members)


def _model(folder: Path, **params: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.joblib").write_bytes(b"weights of " + folder.name.encode())
    (folder / "model-settings.json").write_text(
        json.dumps({"implementation": "mlserver_sklearn.SKLearnModel", "parameters": params})
    )
    return folder


@pytest.fixture
def models(tmp_path: Path) -> Path:
    """Two models with environments of their own (one a level deeper, one by a path up and out of
    its folder), one sharing a tarball, and one without."""
    root = tmp_path / "models"
    _env_tarball(root / "iris" / "env-a.tar.gz", marker="a")
    _env_tarball(tmp_path / "shared" / "env-b.tar.gz", marker="b")
    _model(root / "iris", environment_tarball="env-a.tar.gz", extra={"kept": True})
    _model(root / "group" / "digits", environment_tarball="../../../shared/env-b.tar.gz")
    _model(root / "digits-too", environment_tarball=str(tmp_path / "shared" / "env-b.tar.gz"), uri="./model.joblib")
    _model(root / "plain")
    (root / "settings.json").write_text("{}")
    return root


def _start(tmp_path: Path, models: Path, **extra: str) -> tuple[dict[str, object], str]:
    env = entry_env(MLSERVER_ENV_CACHE_DIR=tmp_path / "c", **_server(tmp_path), **extra)
    proc = run_entrypoint(["mlserver", "start", str(models)], env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr


def test_each_model_is_served_from_its_own_prepared_environment(tmp_path: Path, models: Path) -> None:
    before = snapshot(models)
    seen, log = _start(tmp_path, models)
    got = seen["models"]
    assert isinstance(got, dict) and set(got) == {"iris", "digits", "digits-too", "plain"}
    envs = {name: got[name]["env"] for name in got}
    assert envs["plain"] is None
    for name in ("iris", "digits", "digits-too"):
        prefix = Path(envs[name])
        assert prefix.parent == tmp_path / "c" and (prefix / "bin" / "python").exists()
    assert (Path(envs["iris"]) / "share" / "which").read_text() == "a"
    assert (Path(envs["digits"]) / "share" / "which").read_text() == "b"
    assert envs["digits"] == envs["digits-too"]  # one tarball, one entry
    # The model files are the originals; everything else in the settings is kept.
    assert got["iris"]["uri"] == str(models / "iris") and "model.joblib" in got["iris"]["files"]
    assert got["iris"]["extra"] == {"kept": True}
    assert got["digits-too"]["uri"] == str(models / "digits-too" / "model.joblib")
    assert got["plain"]["uri"] == str(models / "plain")
    assert snapshot(models) == before  # the models folder (often mounted read-only) is not written
    assert "models with an environment of their own: digits-too, digits, iris" in log


def test_a_restart_is_a_cache_hit_for_every_model(tmp_path: Path, models: Path) -> None:
    first, log = _start(tmp_path, models)
    assert log.count("extract:") == 2
    again, log = _start(tmp_path, models)
    assert "extract:" not in log and "cache hit" in log, log
    assert {n: m["env"] for n, m in first["models"].items()} == {n: m["env"] for n, m in again["models"].items()}


def test_unpack_prepares_every_models_environment(tmp_path: Path, models: Path) -> None:
    """An init container's `unpack` leaves the serving container a warm start."""
    env = entry_env(MLSERVER_ENV_CACHE_DIR=tmp_path / "c", MLSERVER_MODELS_DIR=models)
    proc = run_entrypoint(["unpack"], env)
    assert proc.returncode == 0, proc.stderr
    prefixes = proc.stdout.split()
    assert len(prefixes) == 3 and len(set(prefixes)) == 2
    _, log = _start(tmp_path, models)
    assert "extract:" not in log


def test_other_commands_leave_the_models_alone(tmp_path: Path, models: Path) -> None:
    env = entry_env(MLSERVER_ENV_CACHE_DIR=tmp_path / "c", MLSERVER_MODELS_DIR=models)
    proc = run_entrypoint(["true"], env)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "c").exists()


def _refused(tmp_path: Path, models: Path, code: int, **server: str) -> str:
    env = entry_env(MLSERVER_ENV_CACHE_DIR=tmp_path / "c", **_server(tmp_path, **server))
    proc = run_entrypoint(["mlserver", "start", str(models)], env)
    assert proc.returncode == code, proc.stderr
    assert proc.stdout == ""  # MLServer never started
    return error_line(proc)


def test_model_environment_without_mlserver_names_the_model_and_the_fix(tmp_path: Path) -> None:
    root = tmp_path / "models"
    _env_tarball(root / "iris" / "env.tar.gz", mlserver=None)
    _model(root / "iris", environment_tarball="env.tar.gz")
    line = _refused(tmp_path, root, 4)
    assert f"model iris (environment_tarball {root / 'iris' / 'env.tar.gz'})" in line
    assert "has no mlserver" in line and "add `mlserver`" in line


def test_model_environment_with_another_mlserver_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "models"
    _env_tarball(root / "iris" / "env.tar.gz", mlserver="1.6.0")
    _model(root / "iris", environment_tarball="env.tar.gz")
    line = _refused(tmp_path, root, 4)
    assert "model iris" in line and "has mlserver 1.6.0, the server runs 1.7.1" in line
    assert "mlserver==1.7.1" in line


def test_a_server_too_old_for_per_model_environments_is_refused(tmp_path: Path, models: Path) -> None:
    line = _refused(tmp_path, models, 4, version="1.1.0")
    assert "the server runs mlserver 1.1.0" in line and "1.3 or later" in line


def test_a_missing_model_tarball_names_the_model(tmp_path: Path) -> None:
    root = tmp_path / "models"
    _model(root / "iris", environment_tarball="gone.tar.gz")
    line = _refused(tmp_path, root, 2)
    assert f"model iris (environment_tarball {root / 'iris' / 'gone.tar.gz'}): no such file" in line


def test_a_model_can_pin_its_tarball(tmp_path: Path) -> None:
    root = tmp_path / "models"
    _env_tarball(root / "iris" / "env.tar.gz")
    _model(root / "iris", environment_tarball="env.tar.gz", environment_tarball_sha256="0" * 64)
    line = _refused(tmp_path, root, 2)
    assert "model iris" in line and "0" * 64 in line
    _model(root / "iris", environment_tarball="env.tar.gz", environment_tarball_sha256="not hex")
    line = _refused(tmp_path, root, 2)
    assert "model iris" in line and "environment_tarball_sha256 must be 64 hex digits" in line


def test_inspect_reports_each_models_environment(tmp_path: Path, models: Path) -> None:
    env = entry_env(MLSERVER_ENV_CACHE_DIR=tmp_path / "c", MLSERVER_MODELS_DIR=models, **_server(tmp_path))
    proc = run_entrypoint(["inspect"], env)
    assert proc.returncode == 0, proc.stderr
    for name in ("iris", "digits", "digits-too"):
        assert f"model {name} ({models / name if name != 'digits' else models / 'group' / name}" in proc.stdout
    doc = json.loads(run_entrypoint(["inspect", "--json"], env).stdout)
    assert doc["server"] is None and set(doc["models"]) == {"iris", "digits", "digits-too"}
    assert doc["models"]["iris"]["packages"] == {"mlserver": "1.7.1"}
    assert not (tmp_path / "c").exists()  # inspect unpacks nothing


def test_inspect_says_which_model_will_not_work_and_why(tmp_path: Path, models: Path) -> None:
    """inspect is the promise of what a start will do: the same exit code and the same model."""
    _env_tarball(models / "iris" / "env-a.tar.gz", mlserver="1.6.0")
    env = entry_env(MLSERVER_ENV_CACHE_DIR=tmp_path / "c", MLSERVER_MODELS_DIR=models, **_server(tmp_path))
    inspected = run_entrypoint(["inspect"], env)
    started = run_entrypoint(["mlserver", "start", str(models)], env)
    assert inspected.returncode == started.returncode == 4
    for line in (error_line(inspected), error_line(started)):
        assert "model iris" in line and "mlserver 1.6.0" in line and "mlserver==1.7.1" in line
