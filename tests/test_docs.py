"""The documentation: the site builds with strict checks (a broken link or a missing page fails),
and its reference pages cover every setting and every exit code the entrypoint has."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from support import REPO

from entrypoint import errors, settings

DOCS = REPO / "docs"


def test_the_site_builds_with_strict_checks(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=REPO, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "site" / "performance" / "index.html").read_text().count("<table") >= 1


def test_every_setting_is_on_the_configuration_page() -> None:
    page = (DOCS / "configuration.md").read_text()
    missing = [settings.variable(name) for name in settings.Settings._fields if settings.variable(name) not in page]
    assert not missing, missing


def exit_codes() -> set[int]:
    """Every exit code the CLI can end with, besides 0: its errors' own, a stop's (128 + SIGINT or
    SIGTERM, or a worker killed by SIGKILL), and a closed pipe's (128 + SIGPIPE)."""
    classes = [errors.EntrypointError]
    for cls in classes:
        classes += cls.__subclasses__()
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL, signal.SIGPIPE)
    return {cls.exit_code for cls in classes if isinstance(cls.exit_code, int)} | {128 + s for s in signals}


def test_every_exit_code_has_its_section_in_troubleshooting() -> None:
    headings = [line for line in (DOCS / "troubleshooting.md").read_text().splitlines() if line.startswith("#")]
    listed = {int(n) for line in headings for n in re.findall(r"\b(\d{1,3})\b", line)}
    assert exit_codes() - listed == set(), headings


def test_the_readme_fits_on_a_screen_and_opens_with_the_two_commands() -> None:
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 150, len(lines)
    commands = [line.split("#")[0].strip() for line in lines if line.startswith("make ")]
    assert commands[:2] == ["make serve", "make test"], commands
