"""Per-model environments: the models whose model-settings.json names a tarball
(`parameters.environment_tarball`, MLServer 1.2+), and the models folder handed to MLServer with
each of them pointing at its prepared cache entry instead (`parameters.environment_path`, 1.3+).

Models are found as MLServer finds them (every model-settings.json below the folder), and a
relative tarball is resolved as MLServer resolves it: against the folder of its model-settings.json.
The folder handed over is a fresh private folder in $TMPDIR that mirrors the models folder with
symbolic links: only the folders that lead to a rewritten model-settings.json are real, so the
models folder itself (often read-only) is never written, and MLServer still imports a custom
runtime's code from the model's folder and finds every other model as before.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from entrypoint import fs
from entrypoint.errors import ConfigError, EnvError
from entrypoint.settings import sha256_pin

SETTINGS_FILE = "model-settings.json"
SETTINGS_MAX = 1 << 20  # a model-settings.json is a few hundred bytes; a bigger one is not read
PIN = "environment_tarball_sha256"  # our own parameter; MLServer keeps unknown parameters as extras
ENVIRONMENT_PATH_SINCE = (1, 3)  # the first MLServer that reads parameters.environment_path
DIST_INFO = r"mlserver-([^-]+)\.dist-info"


class ModelEnv(NamedTuple):
    name: str
    settings_file: Path
    tarball: str  # a path resolved as MLServer resolves it, or a URL
    sha256: str | None  # parameters.environment_tarball_sha256, when the model pins its tarball

    @property
    def label(self) -> str:
        return f"model {self.name} (environment_tarball {self.tarball})"


def find(models_dir: Path) -> list[ModelEnv]:
    """The models below `models_dir` that name an environment tarball, in MLServer's order.
    A file MLServer cannot read either is left to MLServer, which skips it with its own error."""
    root = os.path.abspath(models_dir)
    found = []
    for path in sorted(glob.glob(os.path.join(glob.escape(root), "**", SETTINGS_FILE), recursive=True)):
        doc = _read(Path(path))
        params = doc.get("parameters") if doc is not None else None
        if doc is None or not isinstance(params, dict) or params.get("environment_path"):
            continue  # an environment_path is MLServer's to use as it is
        tarball = params.get("environment_tarball")
        if tarball is None:
            continue
        name = doc.get("name") or os.path.basename(os.path.dirname(path))
        found.append(_model_env(str(name), Path(path), tarball, params.get(PIN)))
    return found


def _read(path: Path) -> dict[str, Any] | None:
    data = fs.read_small(path, SETTINGS_MAX)
    if data is None:
        return None
    with contextlib.suppress(ValueError):
        doc = json.loads(data)
        return doc if isinstance(doc, dict) else None
    return None


def _model_env(name: str, settings_file: Path, tarball: object, pin: object) -> ModelEnv:
    where = f"model {name} ({settings_file})"
    if not isinstance(tarball, str) or not tarball.strip():
        raise ConfigError(
            f"{where}: parameters.environment_tarball must be a path to a tarball", "give the tarball's path"
        )
    try:
        sha256 = sha256_pin(pin if isinstance(pin, str) else None if pin is None else repr(pin))
    except ValueError as exc:
        raise ConfigError(f"{where}: parameters.{PIN} {exc}", "give the output of `sha256sum TARBALL`") from exc
    if "://" not in tarball:  # MLServer's to_absolute_path
        tarball = os.path.normpath(os.path.join(settings_file.parent, tarball))
    return ModelEnv(name, settings_file, tarball, sha256)


def mlserver_version(prefix: Path) -> str | None:
    """The mlserver release installed in an environment or virtualenv at `prefix`, if any."""
    for site in sorted(prefix.glob("lib/python*/site-packages")):
        for name in sorted(os.listdir(site)):
            if m := re.fullmatch(DIST_INFO, name):
                return m[1]
    return None


def check_versions(models: Mapping[ModelEnv, Path], served: str | None) -> None:
    """Each model's environment can be loaded by a server running mlserver `served`."""
    for model, prefix in models.items():
        problem = version_problem(model, mlserver_version(prefix), served)
        if problem is not None:
            raise problem


def version_problem(model: ModelEnv, has: str | None, served: str | None) -> EnvError | None:
    """MLServer's workers import mlserver from the model's environment: it must be the server's,
    and the server must read environment_path. (An environment without mlserver fails before.)"""
    if served is not None and _release(served) < ENVIRONMENT_PATH_SINCE:
        return EnvError(
            f"{model.label} needs its own environment, but the server runs mlserver {served}, "
            "which cannot load a model in another environment",
            "serve with mlserver 1.3 or later (the image's own, or in MLSERVER_ENV_TARBALL's environment)",
        )
    if served is not None and has is not None and has != served:
        return EnvError(
            f"{model.label}: its environment has mlserver {has}, the server runs {served}",
            f"pack the model's environment with mlserver=={served} (its workers import mlserver from it)",
        )
    return None


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:2])


def handover(models_dir: Path, models: Mapping[ModelEnv, Path]) -> Path:
    """A private folder that MLServer serves in place of `models_dir`: the same models, each of
    `models` loaded from its prepared environment."""
    import shutil
    import tempfile

    root = Path(os.path.abspath(models_dir))
    rewritten = {m.settings_file: _rewritten(m, prefix) for m, prefix in models.items()}
    real = {root, *(p for f in rewritten for p in f.parents if p.is_relative_to(root))}
    mirror = Path(tempfile.mkdtemp(prefix="mlserver-env-models-"))
    try:
        _mirror(root, mirror / root.name, real, rewritten)
    except OSError as exc:
        shutil.rmtree(mirror, ignore_errors=True)
        raise ConfigError(
            f"cannot write the models folder handed to MLServer under {mirror.parent} ({exc.strerror})",
            "give the container a writable /tmp (a tmpfs), or set TMPDIR to a writable folder",
        ) from exc
    return mirror / root.name


def _rewritten(model: ModelEnv, prefix: Path) -> bytes:
    """The model's settings, loading it from `prefix`: the same name and model files as before."""
    doc = _read(model.settings_file)
    assert doc is not None  # read by find() moments ago
    params = dict(doc["parameters"])
    params.pop("environment_tarball", None)
    params["environment_path"] = str(prefix)
    uri = params.get("uri")
    if uri is None:
        params["uri"] = str(model.settings_file.parent)
    elif isinstance(uri, str) and "://" not in uri:
        params["uri"] = os.path.normpath(os.path.join(model.settings_file.parent, uri))
    return json.dumps({**doc, "name": model.name, "parameters": params}, indent=1).encode()


def _mirror(source: Path, target: Path, real: set[Path], rewritten: Mapping[Path, bytes]) -> None:
    os.mkdir(target, 0o755)
    for name in sorted(os.listdir(source)):
        path = source / name
        if path in rewritten:
            (target / name).write_bytes(rewritten[path])
        elif path in real and path.is_dir():
            _mirror(path, target / name, real, rewritten)
        else:
            os.symlink(path, target / name)
