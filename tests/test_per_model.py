"""Per-model environments (models.py): each model-settings.json naming `environment_tarball` gets
its environment prepared through the cache, and MLServer loads the model from that entry.

The command here is `mlserver` as a report of what MLServer 1.7.1 (the image's, installed in a
virtualenv) makes of the folder: its own settings loading, model discovery and uri resolution,
through the repository the entrypoint hands it, and which environment each model's inference pool
would use (environment_path before environment_tarball, as in mlserver/parallel/registry.py).
Starting the real server with two models in two environments is tests/test_container.py's.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from archives import M, snapshot, tiny_env, write_tar
from support import entry_env, error_line, run_entrypoint

# What MLServer 1.7.1 makes of the folder `mlserver start` is given, as JSON on stdout.
REPORT = """\
import asyncio, json, os, sys
from mlserver.cli.serve import load_settings
from mlserver.repository.factory import ModelRepositoryFactory
from mlserver.utils import get_model_uri

async def report():
    settings, found = await load_settings(sys.argv[2])
    models = {}
    for m in found:
        params = m.parameters
        uri = await get_model_uri(m)
        models[m.name] = {"uri": os.path.realpath(uri), "env": params.environment_path or params.environment_tarball,
                          "extra": params.extra, "files": sorted(os.listdir(uri)) if os.path.isdir(uri) else None}
        # A load through the repository API (POST /v2/repository/models/NAME/load) finds it so too.
        (again,) = await ModelRepositoryFactory.resolve_model_repository(settings).find(m.name)
        assert again.parameters.environment_path == params.environment_path
    print(json.dumps({"models": models, "repository": str(settings.model_repository_implementation)}))

asyncio.run(report())
"""


@pytest.fixture
def server(tmp_path: Path, mlserver_python: Path) -> Callable[..., dict[str, str]]:
    """A virtualenv-like prefix whose bin/mlserver reports (with the mlserver release `version`
    recorded in it); the entrypoint's environment with it on PATH."""

    def make(version: str | None = "1.7.1") -> dict[str, str]:
        prefix = tmp_path / "server"
        (prefix / "bin").mkdir(parents=True, exist_ok=True)
        site = prefix / "lib" / "python3.11" / "site-packages"
        shutil.rmtree(site, ignore_errors=True)
        site.mkdir(parents=True)
        if version is not None:
            (site / f"mlserver-{version}.dist-info").mkdir()
        script = prefix / "bin" / "mlserver"
        script.write_text(f"#!{mlserver_python}\n{REPORT}")
        script.chmod(0o755)
        return {"PATH": f"{prefix / 'bin'}:{os.environ['PATH']}", "TMPDIR": str(tmp_path)}

    return make


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


Server = Callable[..., dict[str, str]]


def _start(tmp_path: Path, models: Path, server: Server, **extra: str) -> tuple[dict[str, Any], str]:
    env = entry_env(MLSERVER_ENV_CACHE_DIR=tmp_path / "c", **server(), **extra)
    proc = run_entrypoint(["mlserver", "start", str(models)], env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr


def test_each_model_is_served_from_its_own_prepared_environment(tmp_path: Path, models: Path, server: Server) -> None:
    before = snapshot(models)
    seen, log = _start(tmp_path, models, server)
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
    assert seen["repository"] == "<class 'mlserver_env_repository.Repository'>"
    assert "models with an environment of their own: digits-too, digits, iris" in log


def test_models_without_an_environment_are_found_as_mlserver_finds_them(
    tmp_path: Path, models: Path, server: Server
) -> None:
    """Beside models with environments of their own, a model named by a variable, with a uri out of
    the models folder, or with a custom runtime in its folder, is MLServer's as before."""
    (tmp_path / "outside.joblib").write_bytes(b"weights")
    _model(models / "out", uri="../../outside.joblib")
    (models / "custom" / "runtime.py").parent.mkdir()
    (models / "custom" / "runtime.py").write_text("from mlserver import MLModel\nclass Mine(MLModel):\n    pass\n")
    (models / "custom" / "model-settings.json").write_text(json.dumps({"implementation": "runtime.Mine"}))
    (models / "broken").mkdir()
    (models / "broken" / "model-settings.json").symlink_to(tmp_path / "nowhere")  # MLServer skips it
    seen, _ = _start(tmp_path, models, server)
    assert seen["models"]["out"]["uri"] == str(tmp_path / "outside.joblib")
    assert seen["models"]["custom"]["env"] is None and "broken" not in seen["models"]


def test_cache_bounds_never_remove_an_environment_of_the_same_start(
    tmp_path: Path, models: Path, server: Server
) -> None:
    _start(tmp_path, models, server, MLSERVER_ENV_CACHE_MAX_BYTES="1")
    seen, log = _start(tmp_path, models, server, MLSERVER_ENV_CACHE_MAX_BYTES="1")
    assert "extract:" not in log and "gc: removed" not in log, log
    assert all(Path(m["env"]).is_dir() for m in seen["models"].values() if m["env"])


def test_another_model_repository_leaves_the_tarballs_to_mlserver(tmp_path: Path, models: Path, server: Server) -> None:
    (models / "settings.json").write_text(json.dumps({"model_repository_implementation": "mine.Repository"}))
    env = entry_env(MLSERVER_ENV_CACHE_DIR=tmp_path / "c", **server())
    proc = run_entrypoint(["mlserver", "start", str(models)], env)
    assert "names a model repository of its own" in proc.stderr and "extract:" not in proc.stderr


def test_a_restart_is_a_cache_hit_for_every_model(tmp_path: Path, models: Path, server: Server) -> None:
    first, log = _start(tmp_path, models, server)
    assert log.count("extract:") == 2
    again, log = _start(tmp_path, models, server)
    assert "extract:" not in log and "cache hit" in log, log
    assert {n: m["env"] for n, m in first["models"].items()} == {n: m["env"] for n, m in again["models"].items()}


def test_unpack_prepares_every_models_environment(tmp_path: Path, models: Path, server: Server) -> None:
    """An init container's `unpack` leaves the serving container a warm start."""
    env = entry_env(MLSERVER_ENV_CACHE_DIR=tmp_path / "c", MLSERVER_MODELS_DIR=models)
    proc = run_entrypoint(["unpack"], env)
    assert proc.returncode == 0, proc.stderr
    prefixes = proc.stdout.split()
    assert len(prefixes) == 3 and len(set(prefixes)) == 2
    _, log = _start(tmp_path, models, server)
    assert "extract:" not in log


def test_other_commands_leave_the_models_alone(tmp_path: Path, models: Path, server: Server) -> None:
    env = entry_env(MLSERVER_ENV_CACHE_DIR=tmp_path / "c", MLSERVER_MODELS_DIR=models)
    proc = run_entrypoint(["true"], env)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "c").exists()


def _refused(tmp_path: Path, models: Path, server: Server, code: int, **version: str) -> str:
    env = entry_env(MLSERVER_ENV_CACHE_DIR=tmp_path / "c", **server(**version))
    proc = run_entrypoint(["mlserver", "start", str(models)], env)
    assert proc.returncode == code, proc.stderr
    assert proc.stdout == ""  # MLServer never started
    return error_line(proc)


def test_model_environment_without_mlserver_names_the_model_and_the_fix(tmp_path: Path, server: Server) -> None:
    root = tmp_path / "models"
    _env_tarball(root / "iris" / "env.tar.gz", mlserver=None)
    _model(root / "iris", environment_tarball="env.tar.gz")
    line = _refused(tmp_path, root, server, 4)
    assert f"model iris (environment_tarball {root / 'iris' / 'env.tar.gz'})" in line
    assert "has no mlserver" in line and "add `mlserver`" in line


def test_model_environment_with_another_mlserver_is_refused(tmp_path: Path, server: Server) -> None:
    root = tmp_path / "models"
    _env_tarball(root / "iris" / "env.tar.gz", mlserver="1.6.0")
    _model(root / "iris", environment_tarball="env.tar.gz")
    line = _refused(tmp_path, root, server, 4)
    assert "model iris" in line and "has mlserver 1.6.0, the server runs 1.7.1" in line
    assert "mlserver==1.7.1" in line


def test_a_server_too_old_for_per_model_environments_is_refused(tmp_path: Path, models: Path, server: Server) -> None:
    line = _refused(tmp_path, models, server, 4, version="1.1.0")
    assert "the server runs mlserver 1.1.0" in line and "1.3 or later" in line


def test_a_missing_model_tarball_names_the_model(tmp_path: Path, server: Server) -> None:
    root = tmp_path / "models"
    _model(root / "iris", environment_tarball="gone.tar.gz")
    line = _refused(tmp_path, root, server, 2)
    assert f"model iris (environment_tarball {root / 'iris' / 'gone.tar.gz'}): no such file" in line


def test_a_model_can_pin_its_tarball(tmp_path: Path, server: Server) -> None:
    root = tmp_path / "models"
    _env_tarball(root / "iris" / "env.tar.gz")
    _model(root / "iris", environment_tarball="env.tar.gz", environment_tarball_sha256="0" * 64)
    line = _refused(tmp_path, root, server, 2)
    assert "model iris" in line and "0" * 64 in line
    _model(root / "iris", environment_tarball="env.tar.gz", environment_tarball_sha256="not hex")
    line = _refused(tmp_path, root, server, 2)
    assert "model iris" in line and "environment_tarball_sha256 must be 64 hex digits" in line


def test_inspect_reports_each_models_environment(tmp_path: Path, models: Path, server: Server) -> None:
    env = entry_env(MLSERVER_ENV_CACHE_DIR=tmp_path / "c", MLSERVER_MODELS_DIR=models, **server())
    proc = run_entrypoint(["inspect"], env)
    assert proc.returncode == 0, proc.stderr
    for name in ("iris", "digits", "digits-too"):
        assert f"model {name} ({models / name if name != 'digits' else models / 'group' / name}" in proc.stdout
    doc = json.loads(run_entrypoint(["inspect", "--json"], env).stdout)
    assert doc["server"] is None and set(doc["models"]) == {"iris", "digits", "digits-too"}
    assert doc["models"]["iris"]["packages"] == {"mlserver": "1.7.1"}
    assert not (tmp_path / "c").exists()  # inspect unpacks nothing


def test_inspect_says_which_model_will_not_work_and_why(tmp_path: Path, models: Path, server: Server) -> None:
    """inspect is the promise of what a start will do: the same exit code and the same model."""
    _env_tarball(models / "iris" / "env-a.tar.gz", mlserver="1.6.0")
    env = entry_env(MLSERVER_ENV_CACHE_DIR=tmp_path / "c", MLSERVER_MODELS_DIR=models, **server())
    inspected = run_entrypoint(["inspect"], env)
    started = run_entrypoint(["mlserver", "start", str(models)], env)
    assert inspected.returncode == started.returncode == 4
    for line in (error_line(inspected), error_line(started)):
        assert "model iris" in line and "mlserver 1.6.0" in line and "mlserver==1.7.1" in line


def test_a_server_whose_mlserver_cannot_be_told_is_warned_about(tmp_path: Path, models: Path, server: Server) -> None:
    env = entry_env(MLSERVER_ENV_CACHE_DIR=tmp_path / "c", **server(version=None))
    proc = run_entrypoint(["mlserver", "start", str(models)], env)
    assert proc.returncode == 0, proc.stderr
    assert "warning: no mlserver-*.dist-info under" in proc.stderr and "(not checked)" in proc.stderr
    assert "no environment tarball configured" not in proc.stderr  # the models have theirs


def test_inspect_skips_a_model_whose_tarball_is_a_url(tmp_path: Path, models: Path, server: Server) -> None:
    _model(models / "remote", environment_tarball="https://example.com/env.tar.gz")
    env = entry_env(MLSERVER_ENV_CACHE_DIR=tmp_path / "c", MLSERVER_MODELS_DIR=models, **server())
    proc = run_entrypoint(["inspect"], env)
    assert proc.returncode == 0, proc.stderr
    assert "model remote (environment_tarball https://example.com/env.tar.gz): not inspected" in proc.stderr
    assert "model iris" in proc.stdout
