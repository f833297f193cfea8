"""Warm start in milliseconds: find a published cache entry without importing pydantic.

Importing pydantic-settings alone takes ~0.3 s, six times the warm-start budget. On a cache hit
only a handful of settings matter, so this module reads exactly those (names and defaults come
from entrypoint.settings' constants) and declines, returning None, whenever anything is unusual:
another MLSERVER_ENV_ variable that could change the outcome, a value needing validation, a URL
without a pin, a cache miss, a damaged entry. The full path then handles it, with pydantic-settings' validation
and the one-line errors.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from entrypoint import cache, gc
from entrypoint.activate import find_python
from entrypoint.cache import Entry
from entrypoint.constants import (
    DEFAULT_MODELS_DIR,
    DEFAULT_TARBALL_NAME,
    ENV_PREFIX,
    RELOCATE_MODES,
    URL_SCHEMES,
    default_cache_dir,
)
from entrypoint.errors import EntrypointError

READ_HERE = {"TARBALL", "TARBALL_SHA256", "CACHE_DIR", "VERIFY"}
IRRELEVANT_ON_A_HIT = {
    "LOCK_TIMEOUT",
    "MAX_MEMBERS",
    "MAX_UNPACKED_BYTES",
    "STOP_GRACE",
    "INIT",
    "REMOTE_RETRIES",
    "REMOTE_TIMEOUT",
    "RELOCATE",  # how a miss relocates; a hit relocates nothing
}
WHOLE_NUMBERS = {"MAX_MEMBERS", "MAX_UNPACKED_BYTES", "REMOTE_RETRIES"}
ZERO_ALLOWED = {"REMOTE_RETRIES"}
CHECKED_ELSEWHERE = {"INIT", "STOP_GRACE"}  # supervise.options reads them on every path, with its errors
CHOICES = {"RELOCATE": RELOCATE_MODES}  # the settings model's Literal values, matched exactly as it does


class Hit(NamedTuple):
    entry: Entry
    python: Path
    models_dir: Path


def lookup(environ: Mapping[str, str], require: tuple[str, ...]) -> Hit | None:
    """The published entry this start would use, if finding it needs nothing but a few stats."""
    names = {k[len(ENV_PREFIX) :] for k in environ if k.startswith(ENV_PREFIX)}
    if names - READ_HERE - IRRELEVANT_ON_A_HIT:
        return None
    if not all(_plain_value(n, environ[ENV_PREFIX + n]) for n in names & IRRELEVANT_ON_A_HIT - CHECKED_ELSEWHERE):
        return None  # a bad value is refused on a hit too, as on the first start of a fresh node
    models_dir = _models_dir(environ)
    tarball = local_tarball(environ)
    verify = environ.get(f"{ENV_PREFIX}VERIFY", "quick")
    pin = environ.get(f"{ENV_PREFIX}TARBALL_SHA256", "").strip().lower() or None
    bad_pin = pin is not None and (len(pin) != 64 or not cache.HEX_DIGITS.issuperset(pin))
    if verify not in ("quick", "full") or bad_pin:
        return None
    cache_dir = _cache_dir(environ)
    if tarball is not None:
        key = _remembered_key(tarball, cache_dir)
    else:  # a URL's key is its pin (remote.content_key): a pinned warm start needs neither network nor fsspec
        key = pin if pin is not None and _plain_url(environ.get(f"{ENV_PREFIX}TARBALL", "")) else None
    if key is None or (pin is not None and key != pin):
        return None
    entry = Entry(cache_dir, key)
    try:
        gc.hold(entry)  # before the marker is read: from here no gc removes it until the server exits
    except EntrypointError:
        return None  # the full path says what is wrong, in one line
    record = cache.read_marker(entry)
    if record is None or not cache.unpacked_here(entry, record) or cache.verify(entry, full=verify == "full"):
        return None
    if any(not os.access(entry.prefix / "bin" / program, os.X_OK) for program in require):
        return None
    try:
        python = find_python(entry.prefix)
    except EntrypointError:
        return None
    return Hit(entry, python, models_dir)


def _plain_value(name: str, value: str) -> bool:
    """Whether the setting is one of its choices, or a number plainly in its range; anything unusual
    ("1e3", " 5", "inf", "Auto") goes to the settings model, which accepts it or gives the one-line error."""
    if name in CHOICES:
        return value in CHOICES[name]
    digits = value if name in WHOLE_NUMBERS else value.replace(".", "", 1)
    if not (digits.isascii() and digits.isdigit()) or value[0] == "." or value[-1] == ".":
        return False
    return name in ZERO_ALLOWED or float(value) > 0


def _plain_url(value: str) -> bool:
    """A URL whose form remote.locate would accept at a glance: a known scheme, a host, a file path,
    nothing to decode. Anything else goes to the full path and its one-line errors."""
    scheme, sep, rest = value.partition("://")
    host, _, path = rest.partition("/")
    host, colon, port = host.partition(":")
    return (
        bool(sep)
        and scheme.lower() in URL_SCHEMES
        and bool(host)
        and (not colon or (port.isdigit() and int(port) <= 65535))
        and path.strip("/") != ""
        and value.isascii()
        and value.isprintable()
        and not any(c in value for c in " []%?#@")
    )


def to_hash(environ: Mapping[str, str]) -> Path | None:
    """The local tarball a cold start will hash (its key is not remembered), to start on it early."""
    tarball = local_tarball(environ)
    if tarball is None or _remembered_key(tarball, _cache_dir(environ)) is not None:
        return None
    return tarball


def local_tarball(environ: Mapping[str, str]) -> Path | None:
    """The configured tarball's absolute path, unless there is none or it is a URL."""
    tarball = environ.get(f"{ENV_PREFIX}TARBALL")
    if tarball is None:
        tarball = str(_models_dir(environ) / DEFAULT_TARBALL_NAME)
    if not tarball.strip() or "://" in tarball:
        return None
    return Path(os.path.abspath(tarball))


def _models_dir(environ: Mapping[str, str]) -> Path:
    return Path(environ.get("MLSERVER_MODELS_DIR") or DEFAULT_MODELS_DIR)


def _cache_dir(environ: Mapping[str, str]) -> Path:
    return Path(os.path.abspath(environ.get(f"{ENV_PREFIX}CACHE_DIR") or default_cache_dir()))


def _remembered_key(tarball: Path, cache_dir: Path) -> str | None:
    """The SHA-256 remembered for this very file version (see source.content_key), if any."""
    try:
        st = os.stat(tarball)
    except OSError:
        return None
    return cache.remembered_key(cache_dir, tarball, cache.file_identity(st))
