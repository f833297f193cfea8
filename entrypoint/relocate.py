"""Rewrite the packed prefix to where the environment now lives, with its own `conda-unpack`."""

from __future__ import annotations

import ast
import ctypes
import os
import re
import signal
import subprocess
from pathlib import Path

from entrypoint.errors import ConfigError, EnvError

UNPACK_SCRIPT = "bin/conda-unpack"
RECORD = re.compile(r"\('([^'\\\n]*)', '([^'\\\n]*)', '(text|binary)'\)")  # ('path', 'placeholder', 'mode')


def prefix_records(prefix: Path) -> list[tuple[str, str, str]]:
    """The (path, placeholder, mode) list conda-pack wrote into bin/conda-unpack; [] if none."""
    try:
        source = (prefix / UNPACK_SCRIPT).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return parse_prefix_records(source, str(prefix / UNPACK_SCRIPT))


def parse_prefix_records(source: str, where: str) -> list[tuple[str, str, str]]:
    """The records in a conda-unpack script's text (`where` names it in errors); `inspect` reads the
    script out of the archive. conda-pack writes one `repr`'d tuple per line: a regular expression
    reads the plain ones, literal_eval the rest (evaluating the whole list at once took 4 s and
    190 MB for the 35,000 records of an mlserver 1.7 environment)."""
    start = source.find("_prefix_records = [")
    if start < 0:
        return []
    end = source.find("\n]\n", start)
    records: list[tuple[str, str, str]] = []
    for line in source[start + len("_prefix_records = [") : end if end >= 0 else None].split("\n"):
        line = line.strip().removesuffix(",")
        if not line:
            continue
        if plain := RECORD.fullmatch(line):
            records.append((plain[1], plain[2], plain[3]))
            continue
        try:
            path, placeholder, mode = ast.literal_eval(line)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise EnvError(f"{where}: cannot read its prefix records; re-pack with conda-pack") from None
        records.append((str(path), str(placeholder), str(mode)))
    if end < 0:
        raise EnvError(f"{where}: its prefix records do not end; re-pack with conda-pack")
    return records


def check_prefix_length(records: list[tuple[str, str, str]], prefix: Path) -> None:
    """conda-unpack pads binary files with NULs, so the new prefix may not be longer than the packed one."""
    binary = [placeholder for _, placeholder, mode in records if mode == "binary"]
    if not binary:
        return
    limit = min(len(p) for p in binary)
    if len(str(prefix)) > limit:
        over = len(str(prefix)) - limit
        raise ConfigError(
            f"the environment's binary files were packed with a {limit}-character prefix ({min(binary, key=len)}), "
            f"but it would be unpacked at {prefix} ({len(str(prefix))} characters); set MLSERVER_ENV_CACHE_DIR "
            f"to a path at least {over} characters shorter"
        )


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _in_child(mask: set[int | signal.Signals]) -> None:
    """In the child, before exec: PR_SET_PDEATHSIG, so a kill -9 of the entrypoint also kills
    conda-unpack, instead of leaving it rewriting files the next start is already extracting;
    then the signal mask the parent had before it blocked the stop signals for the fork."""
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def run_conda_unpack(prefix: Path, python: Path) -> bool:
    """Run the packed conda-unpack with the environment's own interpreter; False if there is none."""
    script = prefix / UNPACK_SCRIPT
    if not script.exists():
        return False
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP")}
    env["PYTHONNOUSERSITE"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    proc = None
    try:
        # SIGTERM/SIGINT wait until the child exists: our handler raises, and an exception raised in
        # a fork hook (filelock registers some) is printed and dropped, so the stop would be lost.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            proc = subprocess.Popen(
                [str(python), str(script)], cwd=prefix, env=env, text=True,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=lambda: _in_child(mask),
            )  # fmt: skip
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a stop that came meanwhile raises here
        _, stderr = proc.communicate()
    except BaseException:
        if proc is not None:  # stopped: conda-unpack must not write on while the entry is removed
            proc.kill()
            proc.wait()
        raise
    if proc.returncode != 0:
        last = (stderr.strip().splitlines() or ["no output"])[-1]
        raise EnvError(f"{script} failed (exit {proc.returncode}): {last}")
    return True
