"""Where the process is exec'd: check the interpreter, build the activated environment, exec."""

from __future__ import annotations

import errno
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NoReturn

from entrypoint.errors import CommandNotFound, CommandNotRunnable, EnvError

MACHINES = {3: "x86 (32-bit)", 40: "ARM (32-bit)", 62: "x86_64", 183: "aarch64", 21: "ppc64", 22: "s390x"}
MACHO = (
    b"\xfe\xed\xfa\xce",
    b"\xfe\xed\xfa\xcf",
    b"\xce\xfa\xed\xfe",
    b"\xcf\xfa\xed\xfe",
    b"\xca\xfe\xba\xbe",
)
# Variables that would make the environment's interpreter load another Python's modules.
LEAKY = (
    "PYTHONHOME",
    "PYTHONPATH",
    "PYTHONSTARTUP",
    "VIRTUAL_ENV",
    "PYTHONEXECUTABLE",
    "__PYVENV_LAUNCHER__",
)


def elf_target(header: bytes) -> tuple[int, int, int] | None:
    """(class, byte order, machine) of an ELF header, None if it is not ELF."""
    if len(header) < 20 or not header.startswith(b"\x7fELF"):
        return None
    machine = int.from_bytes(header[18:20], "little" if header[5] == 1 else "big")
    return header[4], header[5], machine


def describe(target: tuple[int, int, int]) -> str:
    bits = {1: "32-bit", 2: "64-bit"}.get(target[0], "?-bit")
    return f"{MACHINES.get(target[2], f'machine {target[2]}')} {bits} Linux"


def no_python_advice(nested: list[str]) -> str:
    """What to do about an environment without bin/python: often it is one folder down
    (`tar -czf env.tar.gz myenv`), which adding python would not mend."""
    if len(nested) == 1:
        top = nested[0]
        return (
            f"the archive holds an environment one folder down, in {top}/: pack the environment itself "
            f"(`conda pack -p {top}`, or `tar -C {top} -czf ENV.tar.gz .`)"
        )
    return "add python to the environment before `conda pack`"


def find_python(prefix: Path, shown: Path | None = None) -> Path:
    """The environment's interpreter, checked to run on this machine before anything execs it.
    Errors name paths under `shown` rather than `prefix` (inspect: Path(), relative names)."""
    shown = prefix if shown is None else shown
    name = next((n for n in ("python", "python3") if (prefix / "bin" / n).exists()), None)
    if name is None:
        if (prefix / "python.exe").exists():
            raise EnvError(f"{_subject(shown)}built for Windows", f"pack it on Linux ({sys_target()})")
        nested = sorted({p.parent.parent.name for n in ("python", "python3") for p in prefix.glob(f"*/bin/{n}")})
        raise EnvError(_lacks(shown, "bin/python"), no_python_advice(nested))
    candidate = prefix / "bin" / name
    real = os.path.realpath(candidate)  # named as the file it is, when it is one inside
    inside = os.path.relpath(real, os.path.realpath(prefix))
    named = shown / (inside if os.path.isfile(real) and not inside.startswith("..") else f"bin/{name}")
    try:
        with open(candidate, "rb") as f:
            header = f.read(64)
    except OSError as exc:  # a directory, a symlink to one, a loop
        raise EnvError(
            f"{named} cannot be read ({exc.strerror})", "pack the environment again with its interpreter"
        ) from exc
    _check_platform(header, named)
    if not os.access(candidate, os.X_OK):  # else `python` would resolve to the host's interpreter on PATH
        raise EnvError(f"{named} is not executable", "pack the environment again with its interpreter's mode kept")
    return candidate


def _subject(shown: Path) -> str:
    return f"environment in {shown} was " if shown.parts else "the environment was "


def _lacks(shown: Path, what: str) -> str:
    return f"environment in {shown} has no {what}" if shown.parts else f"no {what}"


def _check_platform(header: bytes, named: Path) -> None:
    if header.startswith(MACHO):
        raise EnvError(f"{named} is a macOS binary", f"pack the environment on Linux ({sys_target()})")
    target = elf_target(header)
    if target is None:
        raise EnvError(f"{named} is not an ELF executable; the environment was not built for Linux")
    host = _host_target()
    if host is not None and target != host:
        raise EnvError(
            f"{named} is built for {describe(target)}, this machine runs {describe(host)}",
            f"pack the environment on {describe(host)}",
        )


def require(prefix: Path, programs: tuple[str, ...], shown: Path | None = None) -> None:
    """The programs a command needs in the environment's bin/ (e.g. mlserver) are there."""
    for program in programs:
        if not os.access(prefix / "bin" / program, os.X_OK):
            raise missing(prefix if shown is None else shown, program)


def missing(prefix: Path, program: str) -> EnvError:
    runtime = " and its runtime (e.g. `mlserver-sklearn`)" if program == "mlserver" else ""
    return EnvError(
        _lacks(prefix, program), f"add `{program}`{runtime} to the environment's pip dependencies and pack it again"
    )


def _host_target() -> tuple[int, int, int] | None:
    try:
        with open("/proc/self/exe", "rb") as f:
            return elf_target(f.read(64))
    except OSError:
        return None


def sys_target() -> str:
    host = _host_target()
    return describe(host) if host else sys.platform


def activated_environ(prefix: Path, base: Mapping[str, str]) -> dict[str, str]:
    """The variables `conda activate` sets for a non-interactive process, without Python leaks."""
    env = {k: v for k, v in base.items() if k not in LEAKY}
    env["PATH"] = os.pathsep.join(filter(None, [str(prefix / "bin"), base.get("PATH", os.defpath)]))
    env["CONDA_PREFIX"] = str(prefix)
    env["CONDA_DEFAULT_ENV"] = str(prefix)
    env["CONDA_SHLVL"] = "1"
    env["PYTHONNOUSERSITE"] = "1"
    scripts = sorted((prefix / "etc" / "conda" / "activate.d").glob("*.sh"))
    return _run_activate_scripts(scripts, env) if scripts else env


def _run_activate_scripts(scripts: Sequence[Path], env: dict[str, str]) -> dict[str, str]:
    """Source the environment's activate.d scripts in sh and keep the variables they export."""
    from entrypoint import worker

    script = "".join(f'. "{s}" || exit 1\n' for s in scripts) + "exec env -0\n"
    code, stdout, stderr = worker.call(["sh", "-c", script], env, "activating", "the command was not run")
    if code != 0:
        last = (stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        raise EnvError(f"activation script failed in {scripts[0].parent}: {last}")
    # Decoded as os.environ decodes: bytes that are not UTF-8 survive, and exec restores them.
    text = stdout.decode("utf-8", "surrogateescape")
    out = dict(item.split("=", 1) for item in text.split("\0") if "=" in item)
    for name in LEAKY:
        out.pop(name, None)
    return out


def resolve_command(argv: Sequence[str], env: Mapping[str, str], prefix: Path | None) -> list[str]:
    """argv with its program found on the activated PATH, or an error that says how to fix it."""
    program = shutil.which(argv[0], path=env.get("PATH"))
    if program is not None:
        return [program, *argv[1:]]
    if "/" in argv[0] and os.path.exists(argv[0]):
        why = "is a directory" if os.path.isdir(argv[0]) else "is not executable"
        raise CommandNotRunnable(f"cannot run {argv[0]}: it {why}", "name a program, or `chmod +x` it")
    if argv[0] == "mlserver" and prefix is not None:
        raise missing(prefix, "mlserver")
    if argv[0] == "mlserver":  # no environment: the usual cause is a tarball not configured
        raise CommandNotFound(
            "command not found: mlserver is not on PATH and no environment is configured",
            "set MLSERVER_ENV_TARBALL to an environment with mlserver (docs/configuration.md), or install mlserver",
        )
    where = f"in the environment ({prefix}/bin), nor on PATH" if prefix is not None else "on PATH"
    raise CommandNotFound(f"command not found: {argv[0]} is not {where}", "check its spelling")


def exec_command(argv: Sequence[str], env: Mapping[str, str]) -> NoReturn:
    """Replace this process, so the server gets signals directly and keeps our PID."""
    from entrypoint import worker

    worker.flush()
    worker.exec_defaults()
    try:
        os.execve(argv[0], list(argv), dict(env))
    except OSError as exc:
        raise exec_failure(argv[0], exc) from exc


def exec_failure(program: str, exc: OSError) -> CommandNotRunnable:
    """Why the kernel would not start a program that exists: a script whose #! names a missing
    interpreter fails with ENOENT, as if the program itself were missing."""
    head = b""
    try:
        with open(program, "rb") as f:
            head = f.read(256)
    except OSError:
        pass
    failed = f"cannot run {program}"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELIBBAD) and head.startswith(b"#!"):
        line = head[2:].split(b"\n", 1)[0].decode("utf-8", "replace").strip()
        interpreter = line.split()[0] if line else "nothing"
        name = os.path.basename(interpreter)
        other = f"run it as `python {program}`" if name.startswith("python") else f"install {name} here"
        return CommandNotRunnable(
            f"{failed}: its #! line names {interpreter}, which cannot be run here ({exc.strerror})",
            f"fix the script's first line, or {other}",
        )
    if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELIBBAD):
        return CommandNotRunnable(
            f"{failed}: the loader or a library it was built to start with is missing here ({exc.strerror})",
            "build it for this machine, or pack it in the environment",
        )
    if exc.errno == errno.ENOEXEC:
        return CommandNotRunnable(
            f"{failed}: not a program this machine can start ({exc.strerror})",
            "give a script a #! line, or build the program for this machine",
        )
    return CommandNotRunnable(f"{failed}: {exc.strerror}")
