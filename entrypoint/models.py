"""Per-model environments: the models whose model-settings.json names a tarball
(`parameters.environment_tarball`, MLServer 1.2+), each prepared like the server's environment,
and handed to MLServer, which then loads the model from its entry (`environment_path`, 1.3+).

Models are found as MLServer finds them (every model-settings.json below the folder, with the same
glob), and a relative tarball is resolved as MLServer resolves it: against the folder of its
model-settings.json. The hand-over writes nothing: MLServer's model repository is replaced by its
own subclass (hook/), which sets environment_path on the models whose tarball was prepared. Names,
model files, custom runtimes and the repository API stay MLServer's.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from entrypoint import fs
from entrypoint.errors import ConfigError, EnvError
from entrypoint.settings import is_url, sha256_pin

SETTINGS_FILE = "model-settings.json"
SETTINGS_MAX = 1 << 20  # a model-settings.json is a few hundred bytes; a bigger one is not read
PIN = "environment_tarball_sha256"  # our own parameter; MLServer keeps unknown parameters as extras
ENVIRONMENT_PATH_SINCE = (1, 3)  # the first MLServer that reads parameters.environment_path
DIST_INFO = r"mlserver-([^-]+)\.dist-info"
REPOSITORY_VARIABLE = "MLSERVER_MODEL_REPOSITORY_IMPLEMENTATION"  # MLServer's own setting (1.3+)
REPOSITORY = "mlserver_env_repository.Repository"
ENVIRONMENTS_VARIABLE = "MLSERVER_ENTRYPOINT_MODEL_ENVIRONMENTS"  # read by hook/mlserver_env_repository.py


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
    for path in sorted(glob.glob(os.path.join(root, "**", SETTINGS_FILE), recursive=True)):  # MLServer's glob
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
    """The JSON object in `path`, or None for anything else (missing, unreadable, not JSON)."""
    try:
        data = fs.read_small(path, SETTINGS_MAX)
        doc = json.loads(data) if data is not None else None
    except (OSError, ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


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
    if not is_url(tarball):  # MLServer's to_absolute_path
        tarball = os.path.normpath(os.path.join(settings_file.parent, tarball))
    return ModelEnv(name, settings_file, tarball, sha256)


def mlserver_version(prefix: Path) -> str | None:
    """The mlserver release installed in an environment or virtualenv at `prefix`, if any."""
    for site in sorted(prefix.glob("lib/python*/site-packages")):
        for name in sorted(os.listdir(site)):
            if m := re.fullmatch(DIST_INFO, name):
                return m[1]
    return None


def server_prefix(program: str) -> Path:
    """The environment a server program (<prefix>/bin/mlserver) runs from, symlinks resolved."""
    return Path(os.path.realpath(program)).parent.parent


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


def handover(prepared: Mapping[ModelEnv, Path], env: dict[str, str]) -> None:
    """Make MLServer load each model of `prepared` from its entry: its repository is ours
    (hook/mlserver_env_repository.py), which sets environment_path, told by a variable where each
    tarball was prepared."""
    hook = str(Path(__file__).parent / "hook")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [hook, env.get("PYTHONPATH")]))
    env[REPOSITORY_VARIABLE] = REPOSITORY
    by_tarball = {_tarball_key(m.tarball): str(prefix) for m, prefix in prepared.items()}
    env[ENVIRONMENTS_VARIABLE] = json.dumps(by_tarball)


def _tarball_key(tarball: str) -> str:
    return tarball if is_url(tarball) else os.path.realpath(tarball)


def repository_taken(models_dir: Path, environ: Mapping[str, str]) -> str | None:
    """Where another model repository is configured, which the hand-over would replace."""
    if environ.get(REPOSITORY_VARIABLE):
        return REPOSITORY_VARIABLE
    doc = _read(Path(models_dir) / "settings.json")
    return f"{models_dir}/settings.json" if doc is not None and doc.get("model_repository_implementation") else None
