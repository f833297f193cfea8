"""Command line: first-argument dispatch (like the Docker official images' entrypoints), then exec.

mlserver-entrypoint                      # mlserver start $MLSERVER_MODELS_DIR, in the environment
mlserver-entrypoint unpack               # prepare the environment, print its prefix, exit
mlserver-entrypoint inspect [TARBALL] [--json]                 # what an archive holds, will it work here
mlserver-entrypoint gc [--max-bytes N] [--max-age DAYS] [--dry-run]  # trim the cache, never an entry in use
mlserver-entrypoint CMD [ARG…]           # any command, in the environment
mlserver-entrypoint -- CMD [ARG…]        # same, for a command named like a subcommand
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from entrypoint import __version__, log
from entrypoint.errors import ConfigError, EntrypointError, Stopped, StopSignal, error_line

if TYPE_CHECKING:
    from entrypoint.fastpath import Hit

SUBCOMMANDS = ("unpack", "inspect", "gc")
USAGE = __doc__.split("\n\n", 1)[1].rstrip() if __doc__ else ""


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    # SIGTERM (docker stop, a pod deleted) before the command runs: one line, exit 143. As a
    # container's PID 1 above all: the kernel drops a signal PID 1 has no handler for, so a stop
    # during the lock wait or the hashing went unnoticed and the server started anyway. The unpack
    # installs its own handler (prepare.Interrupted); exec resets this one for the command.
    signal.signal(signal.SIGTERM, Stopped.handler)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not inherited ignored (`cmd &`)
        signal.signal(signal.SIGINT, Stopped.handler)  # Ctrl-C: the same line, and deferrable (StopSignal.deferred)
    sys.unraisablehook = _quiet_stops(sys.unraisablehook)
    try:
        code = _dispatch(args)
    except KeyboardInterrupt:  # Ctrl-C before the line above
        _ignore_stop_signals()
        log.info(f"error: {error_line(Stopped(signal.SIGINT))}")
        code = 130
    except BrokenPipeError:  # `gc | head -1`: the reader had enough; end as a tool killed by SIGPIPE would
        log.silence_stdout()
        code = 128 + 13
    except Exception as exc:
        error = _reported(exc)
        if error is None:
            raise
        _ignore_stop_signals()
        log.info(f"error: {error_line(error)}")
        code = error.exit_code
    sys.exit(code)


def _reported(exc: Exception) -> EntrypointError | None:
    """The error that ends the start: a stop signal's first. A stop's exception is an Exception
    that libraries may wrap (pydantic-settings' SettingsError: a traceback, exit 1) or swallow in
    an `except Exception` (the start went on, and exited with the next error's code)."""
    seen: BaseException | None = exc
    for _ in range(100):  # a chain can loop
        if seen is None:
            break
        if isinstance(seen, StopSignal):
            return seen
        seen = seen.__cause__ or seen.__context__
    if StopSignal.caught:
        return Stopped(StopSignal.caught[-1])
    return exc if isinstance(exc, EntrypointError) else None


def _quiet_stops(hook: Callable[[sys.UnraisableHookArgs], object]) -> Callable[[sys.UnraisableHookArgs], object]:
    """An unraisable-exception hook that prints nothing for a stop signal's exception: it was
    recorded and is raised again at the start's next check; a traceback would break the promise
    of one error line."""

    def quiet(unraisable: sys.UnraisableHookArgs) -> object:
        if isinstance(unraisable.exc_value, StopSignal):
            return None
        return hook(unraisable)

    return quiet


def _ignore_stop_signals() -> None:
    """The cleanup is done: a burst of Ctrl-C now must not add a traceback after the one error line."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)


def _dispatch(args: list[str]) -> int:
    if args[:1] in (["-h"], ["--help"], ["help"]):
        log.out(f"usage:\n{USAGE}\n\nSettings are environment variables; see README.md.")
        return 0
    if args[:1] == ["--version"]:
        log.out(f"mlserver-entrypoint {__version__}")
        return 0
    if args[:1] == ["--"]:
        return run(args[1:])
    if args[:1] in ([c] for c in SUBCOMMANDS) and {"-h", "--help"} & set(args[1:]):
        # `gc --help` is a question, not a usage error (and must not need valid settings to answer)
        log.out("usage:\n" + "\n".join(line for line in USAGE.splitlines() if line.split()[1:2] == args[:1]))
        return 0
    if args[:1] == ["unpack"]:
        if len(args) > 1:
            raise ConfigError(f"unpack takes no arguments (got {' '.join(args[1:])}); configure it with MLSERVER_ENV_*")
        return unpack()
    if args[:1] in (["inspect"], ["gc"]):
        from entrypoint import gc, inspection
        from entrypoint.settings import load_settings

        return (inspection.main if args[0] == "inspect" else gc.main)(args[1:], load_settings())
    return run(args)


def unpack() -> int:
    """Prepare the environment (for init containers and scripts); its prefix is stdout's last line."""
    from entrypoint import supervise

    # Not used here, but refused as a cold `unpack` (the settings model) and the server's start
    # refuse them: an init container must not pass on values its pod's server then fails on.
    supervise.options(os.environ)
    hit = _warm(())
    if hit is not None:
        log.out(str(hit.entry.prefix))
        return 0

    from entrypoint.prepare import prepare
    from entrypoint.settings import load_settings
    from entrypoint.source import locate

    settings = load_settings()
    tarball = locate(settings)
    if tarball is None:
        raise ConfigError(
            "no environment to unpack: set MLSERVER_ENV_TARBALL, or put environment.tar.gz in "
            f"MLSERVER_MODELS_DIR ({settings.models_dir})"
        )
    prepared = prepare(settings, tarball)
    Stopped.honour()
    log.out(str(prepared.prefix))
    sys.stderr.flush()
    # Done, the entry is published and durable, every lock released: skip the interpreter's teardown,
    # which spent ~0.1 s freeing the extraction's bookkeeping (a `run` start execs instead).
    os._exit(0)


def _warm(require: tuple[str, ...]) -> Hit | None:
    """A cache hit found without loading the settings model (see fastpath), logged as `locate`.

    On a miss, a local tarball whose key is not remembered starts being hashed right away."""
    from entrypoint import fastpath

    t0 = time.monotonic()
    hit = fastpath.lookup(os.environ, require)
    if hit is not None:
        log.info(f"locate: {(time.monotonic() - t0) * 1000:.0f} ms, cache hit {hit.entry.prefix}")
    elif (path := fastpath.to_hash(os.environ)) is not None:
        from entrypoint import source

        source.prehash(path)
    return hit


def run(command: list[str]) -> int:
    """Prepare the environment if there is one, activate it and exec the command."""
    require = ("mlserver",) if (command or ["mlserver"])[0] == "mlserver" else ()
    if (serves := _served_folder(command)) is not None and "MLSERVER_MODELS_DIR" not in os.environ:
        # `mlserver start /models` with /models/environment.tar.gz beside the model: that folder is
        # the models dir (MLServer's images set the variable and the command alike); the server
        # sees the variable too, as there
        os.environ["MLSERVER_MODELS_DIR"] = serves
    hit = _warm(require)
    if hit is not None:
        launch(command or _default_command(hit.models_dir), hit.entry.prefix)

    from entrypoint.prepare import prepare
    from entrypoint.settings import load_settings
    from entrypoint.source import locate

    settings = load_settings()
    tarball = locate(settings)
    if tarball is None:
        log.info("no environment tarball configured: running the command as is")
        launch(command or _default_command(settings.models_dir), None)
    prepared = prepare(settings, tarball, require)
    launch(command or _default_command(settings.models_dir), prepared.prefix)


def _served_folder(command: list[str]) -> str | None:
    """The folder a `mlserver start FOLDER` command serves."""
    return command[2] if command[:2] == ["mlserver", "start"] and len(command) == 3 else None


def _default_command(models_dir: Path) -> list[str]:
    return ["mlserver", "start", str(models_dir)]


def _warn_other_models_dir(command: list[str]) -> None:
    """The image's CMD names /mnt/models (as its issue asks); MLServer's own images serve
    $MLSERVER_MODELS_DIR. Whoever sets only the variable would get another folder served than
    the one their environment.tar.gz was looked for in, with no word why."""
    wanted = os.environ.get("MLSERVER_MODELS_DIR", "")
    serves = _served_folder(command)
    if serves is not None and not os.path.isdir(serves):  # mlserver 1.x serves no model then, and reports ready
        log.info(f"warning: the models folder {serves} does not exist: no model will be served; mount it there")
    if wanted and serves is not None and os.path.realpath(serves) != os.path.realpath(wanted):
        log.info(
            f"warning: serving {serves}, the command's folder, not MLSERVER_MODELS_DIR={wanted}; "
            f"to serve that one, give the command `mlserver start {wanted}` (or mount it at {serves}); to serve "
            f"{serves} (and find its environment.tar.gz), set MLSERVER_MODELS_DIR={serves} too"
        )


def launch(command: list[str], prefix: Path | None) -> NoReturn:
    """Activate the environment at `prefix` (None: run as is) and exec the command (or, as PID 1,
    run it under a tiny init: see supervise.py)."""
    from entrypoint.activate import activated_environ, exec_command, resolve_command

    if prefix is None:
        env = dict(os.environ)
    else:
        env = activated_environ(prefix, os.environ)
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # the entry is shared and may be read-only: never write into it
        if os.environ.get("PYTHONPATH"):  # dropped: said, or a custom runtime found only through it fails unexplained
            log.info(
                "warning: PYTHONPATH is not passed to the environment (another Python's modules would shadow its "
                "own); put a custom runtime's code in its model's folder (MLServer imports from there) or pack it"
            )
    _warn_other_models_dir(command)
    argv = resolve_command(command, env, prefix)
    Stopped.honour()  # the last moment a stop can still keep the command from running
    from entrypoint import supervise

    mode, grace = supervise.options(os.environ)
    if supervise.wanted(mode):  # PID 1 of a container: stay as a tiny init (see supervise.py)
        log.info(
            f"run: {' '.join(argv)} as the child of this init (pid {os.getpid()}, MLSERVER_ENV_INIT={mode}) "
            f"(entrypoint work {log.elapsed_ms():.0f} ms)"
        )
        sys.exit(supervise.run(argv, env, grace))
    log.info(f"exec: {' '.join(argv)} (entrypoint work {log.elapsed_ms():.0f} ms)")
    supervise.reset_signals()
    exec_command(argv, env)
