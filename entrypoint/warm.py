"""The warm start: a published entry found with a few stats, without pydantic and without a fork."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

from entrypoint import activate, entry, keys, lease, settings
from entrypoint.entry import Entry
from entrypoint.errors import EntrypointError
from entrypoint.models import ModelEnv


class Ready(NamedTuple):
    prefix: Path | None  # None: run without an environment
    config: settings.Settings
    models: Mapping[ModelEnv, Path] = MappingProxyType({})  # each per-model environment's prefix (models.py)


def lookup(environ: Mapping[str, str], require: tuple[str, ...], wanted: Sequence[ModelEnv] = ()) -> Ready | None:
    """The published entries this start would use, if the settings are plain and nothing is amiss;
    None sends the start down the cold path, which says what is wrong in one line."""
    config = settings.plain(environ)
    if config is None or config.cache_max_bytes is not None or config.cache_max_age is not None:
        return None  # the cold path applies the cache bounds (gc.at_start) on every start
    unset = not config.names_environment()
    prefix = None if unset else _found(config, require)
    by_tarball: dict[tuple[str, str | None], Path | None] = {}  # models sharing a tarball share its entry
    for m in wanted:
        if (m.tarball, m.sha256) not in by_tarball:
            by_tarball[m.tarball, m.sha256] = _found(for_model(config, m), ("mlserver",))
    found = {m: by_tarball[m.tarball, m.sha256] for m in wanted}
    if (prefix is None and not unset) or None in found.values():
        return None
    return Ready(prefix, config, {m: p for m, p in found.items() if p is not None})


def for_model(config: settings.Settings, model: ModelEnv) -> settings.Settings:
    """The settings a model's environment is prepared with: its own tarball and pin."""
    return config._replace(tarball=model.tarball, tarball_sha256=model.sha256)


def _found(config: settings.Settings, require: tuple[str, ...]) -> Path | None:
    key = _key(config)
    if key is None:
        return None
    found = Entry(config.cache_dir, key)
    try:
        if not lease.hold(found, wait=False):  # gc is removing it right now
            return None
        if entry.problem(found, config.verify == "full") is not None:
            return None
        activate.require(found.prefix, require)
        activate.find_python(found.prefix)
    except EntrypointError:
        return None
    return found.prefix


def _key(config: settings.Settings) -> str | None:
    """The remembered key of a local tarball, or a plain URL's pin (its key, remote.content_key)."""
    tarball = config.local_tarball()
    if tarball is not None:
        try:
            identity = keys.file_identity(os.stat(tarball))
        except OSError:
            return None
        pin = config.tarball_sha256
        key = keys.remembered(config.cache_dir, tarball, identity, keys.key_digest(pin))
        return key if pin in (None, key) else None
    if config.tarball and settings.plain_url(config.tarball):
        return config.tarball_sha256
    return None


def to_hash(environ: Mapping[str, str]) -> tuple[Path, keys.Digest] | None:
    """The local tarball a cold start will hash, when its key is not remembered, and the digest
    that is its key: hashed while the settings are read."""
    config = settings.plain(environ, only=("tarball", "models_dir", "cache_dir", "tarball_sha256"))
    tarball = config.local_tarball() if config is not None else None
    if config is None or tarball is None:
        return None
    try:
        identity = keys.file_identity(os.stat(tarball))
    except OSError:
        return None
    digest = keys.key_digest(config.tarball_sha256)
    return (tarball, digest) if keys.remembered(config.cache_dir, tarball, identity, digest) is None else None
