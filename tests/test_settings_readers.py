"""The two readers of the settings agree: whatever the pydantic-free `plain` reader accepts, `load`
(pydantic-settings) reads as the same value, so a warm start and a cold one run on one set of rules."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

from archives import tiny_env, write_tar
from hypothesis import given, settings
from hypothesis import strategies as st
from support import entry_env

from entrypoint import settings as entry_settings
from entrypoint.errors import ConfigError

TRICKY = [
    "", " ", "0", "1", "-1", "2", "0.0", "0.5", "1.", ".5", "1e3", "inf", "nan", "-0", "01", "1_000", "٣",
    "true", "True", "TRUE", "yes", "On", "off", "n", "t", "maybe", " yes", "quick", "full", "Full",
    "auto", "always", "never", "conda-unpack", "20GiB", "500MB", "1 KiB", "/tmp/c", "rel/dir", "a:b",
    "https://host/env.tar.gz", "a" * 64, "A" * 64, "g" * 64,
]  # fmt: skip


def test_the_readers_agree_on_every_tricky_value_of_every_setting() -> None:
    for name in entry_settings.Settings._fields:
        for raw in TRICKY:
            _agree(name, raw)


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(entry_settings.Settings._fields), raw=st.text(max_size=6))
def test_the_readers_agree_on_any_text(name: str, raw: str) -> None:
    _agree(name, raw)


def _agree(name: str, raw: str) -> None:
    """What the plain reader accepts, load accepts as the same value."""
    environ = {entry_settings.variable(name): raw}
    fast = entry_settings.plain(environ)
    if fast is None or "\x00" in raw:  # None: load reads or refuses it alone
        return
    with mock.patch.dict(os.environ, environ, clear=True):
        try:
            full = entry_settings.validated()
        except ConfigError as exc:
            raise AssertionError(f"plain took {name}={raw!r}, load refused it: {exc.line}") from exc
    assert getattr(fast, name) == getattr(full, name), (name, raw)


def test_a_cold_start_with_plain_settings_does_not_import_pydantic(tmp_path: Path) -> None:
    """Its import is a tenth of a cold start; only a value in another form than the plainest needs it."""
    tarball = write_tar(tmp_path / "env.tar.gz", tiny_env())
    probe = "import sys, runpy; sys.argv = ['x', 'unpack']; runpy.run_module('entrypoint', run_name='__main__')"
    for extra, imported in (({}, False), ({"MLSERVER_ENV_LOCK_TIMEOUT": " 30 "}, True)):
        env = entry_env(MLSERVER_ENV_TARBALL=tarball, MLSERVER_ENV_CACHE_DIR=tmp_path / "c", **extra)
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", probe], env=env, capture_output=True, text=True, check=False
        )
        assert proc.returncode == 0, proc.stderr
        assert (" pydantic_settings" in proc.stderr) is imported, extra
