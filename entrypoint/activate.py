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


def _elf_target(header: bytes) -> tuple[int, int, int] | None:
    """(class, byte order, machine) of an ELF header, None if it is not ELF."""
    if len(header) < 20 or not header.startswith(b"\x7fELF"):
        return None
    machine = int.from_bytes(header[18:20], "little" if header[5] == 1 else "big")
    return header[4], header[5], machine


def _describe(target: tuple[int, int, int]) -> str:
    bits = {1: "32-bit", 2: "64-bit"}.get(target[0], "?-bit")
    return f"{MACHINES.get(target[2], f'machine {target[2]}')} {bits} Linux"


def no_python_advice(nested: list[str]) -> str:
    """What to do about an archive without bin/python: often the environment one folder down
    (`tar -czf env.tar.gz myenv`), which adding python would not mend."""
    if len(nested) == 1:
        top = nested[0]
        return (
            f"the archive holds an environment one folder down, in {top}/: pack the environment itself "
            f"(`conda pack -p {top}`, or `tar -C {top} -czf ENV.tar.gz .`)"
        )
    return "add python to the environment before `conda pack`"


NOT_EXECUTABLE = "{} is not executable; pack the environment again with its interpreter's mode kept"


def find_python(prefix: Path) -> Path:
    """The environment's interpreter, checked to run on this machine before anything execs it."""
    for name in ("python", "python3"):
        candidate = prefix / "bin" / name
        if candidate.exists():
            break
    else:
        if (prefix / "python.exe").exists():
            raise EnvError(f"environment in {prefix} was built for Windows; pack it on Linux ({sys_target()})")
        inner = sorted({str(p.parent.parent.name) for n in ("python", "python3") for p in prefix.glob(f"*/bin/{n}")})
        raise EnvError(f"environment in {prefix} has no bin/python; {no_python_advice(inner)}")
    try:
        with open(candidate, "rb") as f:
            header = f.read(64)
    except OSError as exc:  # a directory, a symlink to one, a loop
        raise EnvError(
            f"{candidate} cannot be read ({exc.strerror}); pack the environment again with its interpreter"
        ) from None
    if header.startswith(MACHO):
        raise EnvError(f"{candidate} is a macOS binary; pack the environment on Linux ({sys_target()})")
    target = _elf_target(header)
    if target is None:
        raise EnvError(f"{candidate} is not an ELF executable; the environment was not built for Linux")
    host = _host_target()
    if host is not None and target != host:
        raise EnvError(
            f"{candidate} is built for {_describe(target)}, this machine runs {_describe(host)}; "
            f"pack the environment on {_describe(host)}"
        )
    if not os.access(candidate, os.X_OK):  # else `python` would resolve to the host's interpreter on PATH
        raise EnvError(NOT_EXECUTABLE.format(candidate))
    return candidate


def _host_target() -> tuple[int, int, int] | None:
    try:
        with open("/proc/self/exe", "rb") as f:
            return _elf_target(f.read(64))
    except OSError:
        return None


def sys_target() -> str:
    host = _host_target()
    return _describe(host) if host else sys.platform


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
    from entrypoint import child  # only an environment with activate.d scripts needs it

    script = "".join(f'. "{s}" || exit 1\n' for s in scripts) + "exec env -0\n"
    # Its own group: on a stop, what the scripts started goes with them.
    code, stdout, stderr = child.run(["sh", "-c", script], own_group=True, env=env)
    if code != 0:
        last = (stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        raise EnvError(f"activation script failed in {scripts[0].parent}: {last}")
    # As os.environ decodes the environment: bytes that are not UTF-8 survive, and exec restores them.
    text = stdout.decode("utf-8", "surrogateescape")
    out = dict(item.split("=", 1) for item in text.split("\0") if "=" in item)
    for name in LEAKY:
        out.pop(name, None)
    return out


def resolve_command(argv: Sequence[str], env: Mapping[str, str], prefix: Path | None) -> list[str]:
    """argv with its program found on the activated PATH, or an error that says how to fix it."""
    program = shutil.which(argv[0], path=env.get("PATH"))
    if program is None and "/" in argv[0] and os.path.exists(argv[0]):
        why = "is a directory" if os.path.isdir(argv[0]) else "is not executable"
        raise CommandNotRunnable(f"cannot run {argv[0]}: it {why}; name a program, or `chmod +x` it")
    if program is None:
        if argv[0] == "mlserver" and prefix is not None:
            raise EnvError(
                f"environment in {prefix} has no mlserver; add `mlserver` and its runtime (e.g. "
                "`mlserver-sklearn`) to the environment's pip dependencies and pack it again"
            )
        if argv[0] == "mlserver":  # no environment: the usual cause is a tarball not configured
            raise CommandNotFound(
                "command not found: mlserver is not on PATH and no environment is configured; set "
                "MLSERVER_ENV_TARBALL to an environment with mlserver (README, Settings), or install mlserver"
            )
        where = f"in the environment ({prefix}/bin), nor on PATH" if prefix is not None else "on PATH"
        raise CommandNotFound(f"command not found: {argv[0]} is not {where}; check its spelling")
    return [program, *argv[1:]]


def exec_command(argv: Sequence[str], env: Mapping[str, str]) -> NoReturn:
    """Replace this process, so the server gets signals directly and keeps our PID."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(argv[0], list(argv), dict(env))
    except OSError as exc:
        raise CommandNotRunnable(exec_failure(argv[0], exc)) from None


def exec_failure(program: str, exc: OSError) -> str:
    """Why the kernel would not start a program that exists, and what to do: a script whose #!
    names a missing interpreter (a pip script packed with its build machine's path) fails with
    ENOENT, which without this reads as if the program itself were missing."""
    head = b""
    try:
        with open(program, "rb") as f:
            head = f.read(256)
    except OSError:
        pass
    if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELIBBAD) and head.startswith(b"#!"):
        line = head[2:].split(b"\n", 1)[0].decode("utf-8", "replace").strip()
        interpreter = line.split()[0] if line else "nothing"
        name = os.path.basename(interpreter)
        other = f"run it as `python {program}`" if name.startswith("python") else f"install {name} here"
        return (
            f"cannot run {program}: its #! line names {interpreter}, which cannot be run here ({exc.strerror}); "
            f"fix the script's first line, or {other}"
        )
    if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELIBBAD):
        return (
            f"cannot run {program}: the loader or a library it was built to start with is missing here "
            f"({exc.strerror}); build it for this machine, or pack it in the environment"
        )
    if exc.errno == errno.ENOEXEC:
        return (
            f"cannot run {program}: not a program this machine can start ({exc.strerror}); give a script a "
            "#! line, or build the program for this machine"
        )
    return f"cannot run {program}: {exc.strerror}"
