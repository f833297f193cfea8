"""Names and defaults shared by the settings model and the pydantic-free warm path."""

from __future__ import annotations

import os
from pathlib import Path

ENV_PREFIX = "MLSERVER_ENV_"
DEFAULT_TARBALL_NAME = "environment.tar.gz"  # what MLServer's own images look for in the models dir
DEFAULT_MODELS_DIR = "/mnt/models"


def default_cache_dir() -> Path:
    # Short on purpose: conda-unpack can only put a prefix no longer than the packed one into
    # binary files, and entries live at <cache dir>/<8 hex digits>. Per user, so hosts shared by
    # several users never read each other's environments.
    return Path(f"/tmp/mlenv-{os.getuid()}")
