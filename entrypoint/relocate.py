"""Rewrite the packed prefix to where the environment now lives, as its `conda-unpack` would.

A `bin/conda-unpack` written by a conda-pack release we know is not run: its rewriting rules are
applied in this process (`rewrite_prefixes`), with the same result byte for byte. Any other
script is run by the environment's own interpreter (`run_conda_unpack`).
"""

from __future__ import annotations

import ast
import errno
import hashlib
import os
import re
import subprocess
from pathlib import Path
from typing import NamedTuple

from entrypoint import worker
from entrypoint.errors import ConfigError, EnvError

UNPACK_SCRIPT = "bin/conda-unpack"
RECORDS_START = "_prefix_records = ["
RECORD = re.compile(r"\('([^'\\\n]*)', '([^'\\\n]*)', '(text|binary)'\)")  # ('path', 'placeholder', 'mode')

# conda-unpack scripts whose Linux rules `rewrite_prefixes` reproduces, by the SHA-256 of the
# script without its records (`script_digest`). From 0.7.0 to 0.9.2 conda-pack changed only
# branches for Windows and macOS, the shebang rewriting at pack time and a progress bar; each
# release is run against `rewrite_prefixes` on the same archive by tests/test_relocate.py.
KNOWN_SCRIPTS = {
    "84816705db44b07eb69d1d7320af5c1150fe29d70a65d3e629530f5a885383b7": "conda-pack 0.7.0",
    "5a3853c4963e9765ccbea35035235132f56e0633003e7bb71962048d5cb98ce5": "conda-pack 0.7.1",
    "47070f163a0030bf715cdbfa2ad71d744e50e4ebb6d099cb818ea07a0c2c6ab2": "conda-pack 0.8.0",
    "827ab137e5a271313991813416438b30a21faa682836cf919799c2fd63b268f7": "conda-pack 0.8.1",
    "f7e01fc004bdd7c1886b6382785c72ced656b33b0e92674aa34095978e007243": "conda-pack 0.9.1",
    "33f708700785cf5afbfe172b23ab27ae174487e72ee6ccd1ea3004c7aff95858": "conda-pack 0.9.2",
}
# Files rewritten here are read whole, as conda-unpack does; a bigger recorded file (a large
# shared library) leaves the whole job to the script, which keeps the entrypoint's memory flat.
MAX_REWRITE_BYTES = 8 << 20


class UnpackScript(NamedTuple):
    records: list[tuple[str, str, str]]  # (path, placeholder, "text" | "binary"), in the script's order
    known: str | None  # the conda-pack release that wrote it, when `rewrite_prefixes` reproduces it

    @classmethod
    def parse(cls, source: str, where: str) -> UnpackScript:
        """A conda-unpack script's text (`where` names it in errors): from the environment or, for
        `inspect`, from the archive."""
        return cls(parse_prefix_records(source, where), KNOWN_SCRIPTS.get(script_digest(source)))

    def in_process(self, setting: str) -> bool:
        """Whether its rules are applied here (MLSERVER_ENV_RELOCATE `setting`) rather than it run."""
        return self.known is not None and setting == "auto"


def read_unpack_script(prefix: Path) -> UnpackScript | None:
    """The environment's bin/conda-unpack, parsed; None if there is none (not a conda-pack archive)."""
    script = prefix / UNPACK_SCRIPT
    try:
        source = script.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:  # a directory, a symlink loop, not text
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise EnvError(f"{script} cannot be read ({why})", "pack the environment again with conda-pack") from exc
    return UnpackScript.parse(source, str(script))


def script_digest(source: str) -> str:
    """SHA-256 of a conda-unpack script's code: its text without the records, which vary by environment."""
    start = source.find(RECORDS_START)
    end = source.find("\n]\n", start)
    code = source[:start] + source[end:] if 0 <= start < end else source
    return hashlib.sha256(code.encode("utf-8", "surrogateescape")).hexdigest()


def parse_prefix_records(source: str, where: str) -> list[tuple[str, str, str]]:
    """The records in a conda-unpack script's text (`where` names it in errors); `inspect` reads the
    script out of the archive. conda-pack writes one `repr`'d tuple per line: a regular expression
    reads the plain ones, literal_eval the rest (evaluating the whole list at once took 4 s and
    190 MB for the 35,000 records of an mlserver 1.7 environment)."""
    start = source.find(RECORDS_START)
    if start < 0:
        return []
    end = source.find("\n]\n", start)
    records: list[tuple[str, str, str]] = []
    for line in source[start + len(RECORDS_START) : end if end >= 0 else None].split("\n"):
        line = line.strip().removesuffix(",")
        if not line:
            continue
        if plain := RECORD.fullmatch(line):
            records.append((plain[1], plain[2], plain[3]))
            continue
        try:
            path, placeholder, mode = ast.literal_eval(line)
            path, placeholder, mode = str(path), str(placeholder), str(mode)
            if "\0" in path + placeholder:  # a path no system call takes, a placeholder no file holds
                raise ValueError
            path.encode(), placeholder.encode()  # lone surrogates ("\udc80") have no bytes to match
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:  # UnicodeEncodeError too
            raise EnvError(f"{where}: cannot read its prefix records", "pack it again with conda-pack") from exc
        records.append((path, placeholder, mode))
    if end < 0:
        raise EnvError(f"{where}: its prefix records do not end", "pack it again with conda-pack")
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
            f"but it would be unpacked at {prefix} ({len(str(prefix))} characters)",
            f"set MLSERVER_ENV_CACHE_DIR to a path at least {over} characters shorter",
        )


def run_conda_unpack(prefix: Path, python: Path) -> None:
    """Run the packed conda-unpack with the environment's own interpreter. It dies with the process
    that runs it, so a killed start leaves nothing rewriting files under the next one."""
    script = prefix / UNPACK_SCRIPT
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP")}
    env.update(PYTHONNOUSERSITE="1", PYTHONDONTWRITEBYTECODE="1")
    try:
        proc = subprocess.run(
            [str(python), str(script)], cwd=prefix, env=env, capture_output=True, text=True, check=False,
            preexec_fn=worker.dies_with_parent(),
        )  # fmt: skip
    except OSError as exc:  # not executable, or not for this kernel (a loader it lacks)
        raise EnvError(
            f"cannot run {script} with the environment's {python} ({exc.strerror})",
            "pack the environment again with its interpreter executable and built for this machine",
        ) from exc
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise EnvError(f"{script} failed (exit {proc.returncode}): {last}")


def rewrite_prefixes(prefix: Path, records: list[tuple[str, str, str]]) -> int | None:
    """Do what a known conda-unpack does on Linux, here; the number of files changed, or None if a
    recorded file is too big to read whole (the caller runs the script then).

    Hand-written because running the script costs a second interpreter's start and the compilation
    of its record list (0.15 s of its ~0.45 s on the seed environment, whose 6,456 files take 0.12 s
    here). The rules are conda-pack's prefixes.py: a text file gets every placeholder replaced; in
    a binary file, each run from a placeholder to the next NUL gets its placeholders replaced and
    NULs appended to keep its length; a file is written in place, and only if it changed.
    """
    new = os.path.abspath(prefix)  # what conda-unpack computes from its own path
    script = prefix / UNPACK_SCRIPT
    paths = []
    for path, _, mode in records:
        if path.startswith("/") or ".." in path.split("/"):
            raise EnvError(f"{script} lists {path}, outside the environment", "pack it again with conda-pack")
        if mode not in ("text", "binary"):
            raise EnvError(f"{script} gives {path} the unknown mode {mode!r}", "pack it again with conda-pack")
        paths.append(f"{new}/{path}")
    try:
        if any(os.stat(p).st_size > MAX_REWRITE_BYTES for p in paths):
            return None
        new_bytes = new.encode()
        return sum(_rewrite(p, ph.encode(), mode, new_bytes) for p, (_, ph, mode) in zip(paths, records, strict=True))
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ELOOP):
            raise  # the cache's trouble (full, read-only): the caller names the setting
        raise EnvError(  # the archive's: conda-unpack would have failed on it too
            f"{script} lists {exc.filename}, which cannot be rewritten ({exc.strerror})",
            "pack it again with conda-pack",
        ) from exc


def _rewrite(path: str, old: bytes, mode: str, new: bytes) -> bool:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)  # follows symlinks, as conda-unpack's open(path, "rb+")
    try:
        data = os.read(fd, 1 << 16)
        if len(data) == 1 << 16:  # a regular file's read comes back short only at its end
            chunks = [data]
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            data = b"".join(chunks)
        if old not in data:
            return False
        out = data.replace(old, new) if mode == "text" else _binary_replace(data, old, new, path)
        if out == data:
            return False
        done = 0
        while done < len(out):
            done += os.pwrite(fd, memoryview(out)[done:], done)
        os.ftruncate(fd, len(out))
        return True
    finally:
        os.close(fd)


def _binary_replace(data: bytes, old: bytes, new: bytes, path: str) -> bytes:
    """conda-pack's binary_replace: the prefix is shortened inside NUL-terminated strings, padded."""

    def pad(match: re.Match[bytes]) -> bytes:
        padding = (len(old) - len(new)) * match[0].count(old)
        if padding < 0:  # check_prefix_length refused this before
            raise EnvError(f"{path}: the new prefix is longer than the packed one")
        return match[0].replace(old, new) + b"\0" * padding

    return re.sub(re.escape(old) + b"([^\0]*?)\0", pad, data)
