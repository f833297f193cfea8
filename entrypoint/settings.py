"""Every setting, declared once: its variable, type, default, rule and meaning (`Settings`).

Two readers share these declarations. `load` validates the environment with pydantic-settings,
whose model is built from them. `plain` reads them without importing pydantic (that import costs
~0.3 s, several warm starts): it takes only values in their plainest form (`30`, `0.5`, `full`),
checks them against the same rules, and returns None for anything else, which `load` then reads
or refuses in one line.
"""

import functools
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, get_args, get_origin

from entrypoint import log
from entrypoint.errors import ConfigError

PREFIX = "MLSERVER_ENV_"
DEFAULT_TARBALL_NAME = "environment.tar.gz"  # what MLServer's own images look for in the models folder
InitMode = Literal["auto", "always", "never"]
RelocateMode = Literal["auto", "conda-unpack"]


class Rule(NamedTuple):
    """How a setting is read, beyond its type."""

    help: str
    ge: float | None = None
    gt: float | None = None
    finite: bool = False  # inf and nan refused
    empty_is_default: bool = False  # `NAME=` (an empty compose or pod value) means unset
    check: Callable[[Any], Any] | None = None  # normalizes the value, or raises ValueError("must …")
    variable: str = ""  # the variable, when it is not PREFIX + NAME
    size: bool = False  # also "20GiB", "500MB" (pydantic's ByteSize)


def sha256_pin(value: str | None) -> str | None:
    if not value or not value.strip():
        return None
    value = value.strip().lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError("must be 64 hex digits (the output of `sha256sum TARBALL`)")
    return value


def prefix_path(value: Path) -> Path:
    """The cache directory becomes part of every environment's prefix: a ':' would split PATH where
    its bin/ is added, and conda-unpack writes the prefix into files as UTF-8."""
    if ":" in str(value):
        raise ValueError("must not contain ':' (it would split PATH)")
    try:
        str(value).encode()
    except UnicodeEncodeError as exc:
        raise ValueError("must be valid UTF-8 (conda-unpack writes it into files)") from exc
    return Path(os.path.abspath(value))


# Short: an entry's path is <cache dir>/<8 hex digits>, and conda-unpack cannot write a prefix longer
# than the packed one into binary files. Per user: users of one host never read each other's.
DEFAULT_CACHE_DIR = Path(f"/tmp/mlenv-{os.getuid()}")


class Settings(NamedTuple):
    # fmt: off
    tarball: Annotated[str | None, Rule(
        "conda-pack archive (a path or an http(s)://, s3:// or gs:// URL); unset: <models dir>/environment.tar.gz "
        "if present; empty: no environment")] = None
    tarball_sha256: Annotated[str | None, Rule("refuse a tarball with another SHA-256", check=sha256_pin)] = None
    cache_dir: Annotated[Path, Rule(
        "where unpacked environments live", empty_is_default=True, check=prefix_path)] = DEFAULT_CACHE_DIR
    models_dir: Annotated[Path, Rule(
        "the models folder `mlserver start` serves", empty_is_default=True,
        variable="MLSERVER_MODELS_DIR")] = Path("/mnt/models")
    verify: Annotated[Literal["quick", "full"], Rule("how a cached entry is checked at start")] = "quick"
    lock_timeout: Annotated[float, Rule("seconds to wait for another process unpacking", gt=0)] = 1800.0
    max_members: Annotated[int, Rule("refuse archives with more members", gt=0)] = 2_000_000
    max_unpacked_bytes: Annotated[int, Rule("refuse archives that unpack larger", gt=0)] = 64 << 30
    relocate: Annotated[RelocateMode, Rule(
        "auto: a known conda-pack release's conda-unpack is done in-process; conda-unpack: always run the "
        "packed script")] = "auto"
    init: Annotated[InitMode, Rule(
        "run the command under a tiny init that forwards signals (auto: when PID 1)")] = "auto"
    stop_grace: Annotated[float, Rule(
        "seconds between the first SIGTERM and SIGKILL of the command's process group (init)",
        ge=0, finite=True)] = 8.0
    cache_max_bytes: Annotated[int | None, Rule(
        "at start, remove unused entries, oldest used first, until the cache fits", size=True)] = None
    cache_max_age: Annotated[float | None, Rule(
        "at start, remove entries unused this many days (0: every unused one)", ge=0, finite=True)] = None
    remote_retries: Annotated[int, Rule("a URL tarball's retries after a transient error", ge=0)] = 4
    remote_timeout: Annotated[float, Rule("seconds a URL tarball's transfer may stall", gt=0, finite=True)] = 60.0
    debug: Annotated[bool, Rule("print the traceback behind an error line")] = False
    # fmt: on

    def names_environment(self) -> bool:
        """Whether a server environment is asked for: a tarball set (empty: none), or, unset,
        anything at MLServer's default name in the models folder (a dangling symlink or a
        directory there is an environment meant and missed)."""
        if self.tarball is None:
            return os.path.lexists(self.models_dir / DEFAULT_TARBALL_NAME)
        return bool(self.tarball.strip())

    def local_tarball(self) -> Path | None:
        """The local tarball these settings name (unset: the one MLServer's images look for in the
        models folder); None for a URL or no environment."""
        if self.tarball is None:
            return Path(os.path.abspath(self.models_dir / DEFAULT_TARBALL_NAME))
        if not self.tarball.strip() or is_url(self.tarball):
            return None
        return Path(os.path.abspath(self.tarball))


URL_SCHEMES = ("http", "https", "s3", "gs")


def is_url(tarball: str) -> bool:
    """Whether a tarball setting (or a model's) names a URL rather than a file: "://" in it, as
    MLServer's own to_absolute_path tells them apart."""
    return "://" in tarball


def plain_url(value: str) -> bool:
    """A URL of the plainest form remote.locate accepts: a known scheme, a host, a file path,
    nothing to decode. Anything else is left to remote.locate."""
    scheme, sep, rest = value.partition("://")
    host, _, path = rest.partition("/")
    host, colon, port = host.partition(":")
    return (
        bool(sep) and scheme.lower() in URL_SCHEMES and bool(host) and path.strip("/") != ""
        and (not colon or (port.isdigit() and int(port) <= 65535))
        and value.isascii() and value.isprintable() and not any(c in value for c in " []%?#@")
    )  # fmt: skip


def variable(name: str) -> str:
    rule = _rules()[name][1]
    return rule.variable or PREFIX + name.upper()


@functools.cache
def _rules() -> dict[str, tuple[Any, Rule]]:
    """Each field's type and rule, from its annotation (evaluated: this module has no `from
    __future__ import annotations`, whose strings would cost a warm start milliseconds to read)."""
    return {name: get_args(hint)[:2] for name, hint in Settings.__annotations__.items()}


def dump(config: Settings) -> dict[str, object]:
    """The settings as JSON values (for the worker to hand them over)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in config._asdict().items()}


def restore(values: Mapping[str, Any]) -> Settings:
    paths = {name for name, (kind, _) in _rules().items() if kind is Path}
    converted: dict[str, Any] = {k: Path(v) if k in paths else v for k, v in values.items()}
    return Settings()._replace(**converted)


# --- the pydantic-free reader -------------------------------------------------------------------


def plain(environ: Mapping[str, str], only: tuple[str, ...] = ()) -> Settings | None:
    """The settings (or `only` these, the others left at their defaults), if every variable set
    holds a plain value its rule accepts; else None."""
    rules = _rules()
    known = {variable(name): name for name in rules if not only or name in only}
    if not only and any(k.startswith(PREFIX) and k not in known for k in environ):
        return None  # `load` warns about it
    values: dict[str, Any] = {}
    for var, name in known.items():
        if var in environ:
            value = _plain_value(environ[var], *rules[name], Settings._field_defaults[name])
            if value is _DECLINE:
                return None
            values[name] = value
    return Settings()._replace(**values)


_DECLINE = object()


def _plain_value(raw: str, kind: Any, rule: Rule, default: object) -> object:
    if raw == "" and rule.empty_is_default:
        return default
    try:
        value = _parse(raw, _base(kind))
        if isinstance(value, int | float) and not isinstance(value, bool) and not _in_range(value, rule):
            return _DECLINE
        return rule.check(value) if rule.check is not None else value
    except ValueError:
        return _DECLINE


def _base(kind: Any) -> Any:
    """`int` of `int | None`: the type a value is read as."""
    args = [a for a in get_args(kind) if a is not type(None)]
    return args[0] if get_origin(kind) is not Literal and len(args) == 1 else kind


BOOLEANS = {
    word: value
    for value, words in ((True, "1 on t true y yes"), (False, "0 off f false n no"))
    for word in words.split()
}


def _parse(raw: str, kind: Any) -> object:
    """`raw` as `kind`, if it is written the plainest way; ValueError otherwise."""
    whole, dot, fraction = raw.partition(".")
    digits = whole.isascii() and whole.isdigit() and (not dot or (fraction.isascii() and fraction.isdigit()))
    if get_origin(kind) is Literal and raw in get_args(kind):
        return raw
    if kind is bool and raw.lower() in BOOLEANS:  # pydantic's spellings, so both readers agree
        return BOOLEANS[raw.lower()]
    if (kind is int and digits and not dot) or (kind is float and digits):
        return kind(raw)
    if kind is Path or kind is str:
        return kind(raw)
    raise ValueError(raw)


def _in_range(value: float, rule: Rule) -> bool:
    return (rule.ge is None or value >= rule.ge) and (rule.gt is None or value > rule.gt)


# --- pydantic-settings --------------------------------------------------------------------------


def load() -> Settings:
    """Read and validate every setting; a bad value is one line naming its variable. Settings in
    their plainest form are read without pydantic (tests/test_settings_readers.py: both readers
    agree), which saves its import on every cold start."""
    plain_config = plain(os.environ)
    if plain_config is not None:
        return plain_config
    return validated()


def validated() -> Settings:
    """The settings as the pydantic-settings model reads them: every form a value may take."""
    from pydantic import ValidationError

    _warn_unknown(os.environ)
    try:
        model = _model()()
    except ValidationError as exc:
        raise _one_line(exc) from exc
    return Settings()._replace(**{name: getattr(model, name) for name in Settings._fields})


def check(name: str, raw: str) -> Any:
    """One setting's value read by its rule, as `load` reads it (ValueError with pydantic's words)."""
    from pydantic import TypeAdapter, ValidationError

    try:
        return TypeAdapter(_field_type(name)).validate_python(raw)
    except ValidationError as exc:
        raise ValueError(_message(exc.errors()[0])) from exc


def _field_type(name: str, in_model: bool = False) -> Any:
    """The field's type with its rule as pydantic metadata (and, `in_model`, its variable)."""
    from pydantic import AfterValidator, AliasChoices, BeforeValidator, ByteSize, Field

    kind, rule = _rules()[name]
    default = Settings._field_defaults[name]
    alias = AliasChoices(rule.variable) if in_model and rule.variable else None
    finite = False if rule.finite else None
    metadata: list[object] = [
        Field(description=rule.help, validation_alias=alias, ge=rule.ge, gt=rule.gt, allow_inf_nan=finite)
    ]
    if rule.empty_is_default:
        metadata.append(BeforeValidator(lambda v: default if v == "" else v))
    if rule.check is not None:
        metadata.append(AfterValidator(rule.check))
    return Annotated[(ByteSize | None if rule.size else kind, *metadata)]


def _model() -> Any:
    from pydantic import create_model
    from pydantic_settings import BaseSettings, SettingsConfigDict

    class Base(BaseSettings):
        model_config = SettingsConfigDict(env_prefix=PREFIX, extra="ignore", frozen=True)

    fields: dict[str, Any] = {
        name: (_field_type(name, True), Settings._field_defaults[name]) for name in Settings._fields
    }
    return create_model("Settings", __base__=Base, **fields)


def _one_line(exc: Any) -> ConfigError:
    err = exc.errors()[0]
    name = str(err["loc"][0]) if err["loc"] else "?"
    var = variable(name) if name in Settings._fields else name
    msg = _message(err)
    if name == "cache_max_bytes":
        msg += " (write e.g. 20GiB, 500MB or a number of bytes)"
    return ConfigError(f"{var}: {msg}", "fix the value or unset it")


def _message(err: Mapping[str, Any]) -> str:
    return str(err["msg"]).removeprefix("Value error, ")  # pydantic's words, less its prefix for ours


def _warn_unknown(environ: Mapping[str, str]) -> None:
    """A misspelt variable would be ignored without a word: a warning (not an error, so a newer
    setting can be set before the image that reads it rolls out)."""
    import difflib

    known = [variable(name)[len(PREFIX) :] for name in Settings._fields if variable(name).startswith(PREFIX)]
    for name in sorted(k for k in environ if k.startswith(PREFIX) and k[len(PREFIX) :] not in known):
        close = difflib.get_close_matches(name[len(PREFIX) :], known, n=1, cutoff=0.75)
        hint = f" (did you mean {PREFIX}{close[0]}?)" if close else ""
        log.info(f"warning: {name} is not a setting of this entrypoint and is ignored{hint}; see docs/configuration.md")
