"""Configuration from environment variables (``MLSERVER_ENV_*``), read once at start."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, ByteSize, Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from entrypoint import log
from entrypoint.constants import (
    DEFAULT_INIT,
    DEFAULT_MODELS_DIR,
    DEFAULT_STOP_GRACE,
    ENV_PREFIX,
    InitMode,
    RelocateMode,
    default_cache_dir,
)
from entrypoint.errors import ConfigError


class Settings(BaseSettings):
    """Every setting is documented in README.md ("Settings"); keep the two in step."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    tarball: str | None = Field(
        default=None,
        description="conda-pack archive to serve from; unset: <models dir>/environment.tar.gz if "
        "present; empty: no environment (stock mlserver)",
    )
    tarball_sha256: str | None = Field(default=None, description="refuse a tarball with another SHA-256")
    remote_retries: int = Field(default=4, ge=0, description="a URL tarball's retries after a transient error")
    # Finite: aiohttp took `inf` for a timer it could not arm, and fsspec reported a 404 ("not found").
    remote_timeout: float = Field(
        default=60.0, gt=0, allow_inf_nan=False, description="seconds a URL tarball's transfer may stall"
    )
    cache_dir: Path = Field(default_factory=default_cache_dir, description="where unpacked envs live")
    lock_timeout: float = Field(default=1800.0, gt=0, description="seconds to wait for another unpack")
    max_members: int = Field(default=2_000_000, gt=0, description="refuse archives with more members")
    max_unpacked_bytes: int = Field(default=64 << 30, gt=0, description="refuse archives unpacking larger")
    relocate: RelocateMode = Field(
        default="auto",
        description="auto: a conda-unpack of a known conda-pack release is reproduced in-process; "
        "conda-unpack: always run the packed script",
    )
    verify: Literal["quick", "full"] = Field(default="quick", description="how a cached entry is checked at start")
    stop_grace: float = Field(
        default=DEFAULT_STOP_GRACE, ge=0, description="seconds between SIGTERM and SIGKILL of mlserver"
    )
    init: InitMode = Field(
        default=DEFAULT_INIT,
        description="run the command under a tiny init that forwards signals (auto: when PID 1); "
        "see entrypoint/supervise.py",
    )
    cache_max_bytes: ByteSize | None = Field(
        default=None, description="at start, remove unused entries, oldest-used first, until the cache fits"
    )
    cache_max_age: float | None = Field(  # finite, as gc --max-age takes it
        default=None,
        ge=0,
        allow_inf_nan=False,
        description="at start, remove entries unused this many days (0: all unused ones)",
    )
    models_dir: Path = Field(
        default=Path(DEFAULT_MODELS_DIR),
        validation_alias=AliasChoices("MLSERVER_MODELS_DIR"),
        description="models folder; `mlserver start` serves it",
    )

    @field_validator("tarball_sha256")
    @classmethod
    def _hex_digest(cls, value: str | None) -> str | None:
        if not value:
            return None
        value = value.strip().lower()
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise ValueError("must be 64 hex digits (the output of `sha256sum TARBALL`)")
        return value

    @field_validator("cache_dir", "models_dir", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object, info: ValidationInfo) -> object:
        # `MLSERVER_ENV_CACHE_DIR=` (an empty compose or pod value) was Path(""), the working
        # directory: the cache went wherever the start ran, and the warm path (which reads empty
        # as unset) never found it there.
        if value != "":
            return value
        return default_cache_dir() if info.field_name == "cache_dir" else Path(DEFAULT_MODELS_DIR)

    @field_validator("cache_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        # The entry's path becomes the environment's prefix: a ":" would split PATH where its bin/
        # is added (conda refuses one in a prefix too), and conda-unpack writes the prefix as UTF-8.
        if ":" in str(value):
            raise ValueError("must not contain ':' (it would split PATH)")
        try:
            str(value).encode()
        except UnicodeEncodeError:
            raise ValueError("must be valid UTF-8 (conda-unpack writes it into files)") from None
        return Path(os.path.abspath(value))


def load_settings() -> Settings:
    """Read the settings; a bad value becomes one line naming the variable."""
    _warn_unknown(os.environ)
    try:
        return Settings()
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "?"
        var = "MLSERVER_MODELS_DIR" if field == "models_dir" else f"MLSERVER_ENV_{field.upper()}"
        # pydantic's words, less the prefix it puts before a validator's own ("Value error, must be…")
        msg = str(err["msg"]).removeprefix("Value error, ")
        if field == "cache_max_bytes":
            msg += " (write e.g. 20GiB, 500MB or a number of bytes)"
        raise ConfigError(f"{var}: {msg}; fix the value or unset it") from None


def _warn_unknown(environ: Mapping[str, str]) -> None:
    """A misspelt MLSERVER_ENV_ variable is otherwise silently ignored (MLSERVER_ENV_TARBAL: the
    command runs without its environment); a warning, not an error, so newer settings can be set
    before the image that reads them rolls out."""
    known = [name.upper() for name in Settings.model_fields if name != "models_dir"]
    for name in sorted(k for k in environ if k.startswith(ENV_PREFIX) and k[len(ENV_PREFIX) :] not in known):
        import difflib  # only for a name to warn about: every cold start reads the settings

        close = difflib.get_close_matches(name[len(ENV_PREFIX) :], known, n=1, cutoff=0.75)
        hint = f" (did you mean {ENV_PREFIX}{close[0]}?)" if close else ""
        log.info(f"warning: {name} is not a setting of this entrypoint and is ignored{hint}; see README.md Settings")
