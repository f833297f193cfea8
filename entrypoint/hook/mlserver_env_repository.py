"""MLServer's model repository, with each model's environment_tarball served from the environment
the entrypoint prepared for it (parameters.environment_path, MLServer 1.3+).

The entrypoint puts this folder on the server's PYTHONPATH and names this class in
MLSERVER_MODEL_REPOSITORY_IMPLEMENTATION; it imports nothing but mlserver and the standard
library, as it runs in whichever environment the server runs in. Models are found, named and
resolved by MLServer's own repository; only environment_path is set, for the tarballs listed in
MLSERVER_ENTRYPOINT_MODEL_ENVIRONMENTS (a JSON object: the tarball's real path, or its URL, to
the prepared prefix). Another tarball is left to MLServer, which extracts it itself.
"""

from __future__ import annotations

import json
import os
from typing import Any

from mlserver.repository import SchemalessModelRepository

VARIABLE = "MLSERVER_ENTRYPOINT_MODEL_ENVIRONMENTS"


class Repository(SchemalessModelRepository):  # type: ignore[misc]
    async def list(self) -> list[Any]:
        prepared = json.loads(os.environ.get(VARIABLE) or "{}")
        found = await super().list()
        for settings in found:
            params = settings.parameters
            tarball = getattr(params, "environment_tarball", None)
            if tarball and not params.environment_path:
                key = tarball if "://" in tarball else os.path.realpath(_resolved(settings, tarball))
                if key in prepared:
                    params.environment_path = prepared[key]
        return found  # type: ignore[no-any-return]


def _resolved(settings: Any, path: str) -> str:
    """As mlserver.utils.to_absolute_path: relative to the folder of the model's settings file."""
    source = getattr(settings, "_source", None)
    return path if source is None else os.path.normpath(os.path.join(os.path.dirname(source), path))
