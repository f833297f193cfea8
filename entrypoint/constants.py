"""Names and defaults shared by the settings model and the pydantic-free warm path."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, get_args

ENV_PREFIX = "MLSERVER_ENV_"
DEFAULT_TARBALL_NAME = "environment.tar.gz"  # what MLServer's own images look for in the models dir
DEFAULT_MODELS_DIR = "/mnt/models"
URL_SCHEMES = ("http", "https", "s3", "gs")  # what remote.SCHEMES reads
DEFAULT_STOP_GRACE = 8.0  # seconds between the first SIGTERM/SIGINT and SIGKILL of the server's group
InitMode = Literal["auto", "always", "never"]  # MLSERVER_ENV_INIT; see entrypoint/supervise.py
INIT_MODES: tuple[InitMode, ...] = get_args(InitMode)
DEFAULT_INIT: InitMode = "auto"  # a tiny init only when the entrypoint is PID 1
RelocateMode = Literal["auto", "conda-unpack"]  # MLSERVER_ENV_RELOCATE; see entrypoint/relocate.py
RELOCATE_MODES: tuple[RelocateMode, ...] = get_args(RelocateMode)


def default_cache_dir() -> Path:
    # Short on purpose: conda-unpack can only put a prefix no longer than the packed one into
    # binary files, and entries live at <cache dir>/<8 hex digits>. Per user, so hosts shared by
    # several users never read each other's environments.
    return Path(f"/tmp/mlenv-{os.getuid()}")
