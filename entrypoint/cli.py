"""Command line: first-argument dispatch (like the Docker official images' entrypoints), then exec.

mlserver-entrypoint                      # mlserver start $MLSERVER_MODELS_DIR, in the environment
mlserver-entrypoint unpack               # prepare the environments, print their prefixes, exit
mlserver-entrypoint inspect [TARBALL] [--json]                 # what an archive holds, will it work here
mlserver-entrypoint gc [--max-bytes N] [--max-age DAYS] [--dry-run]  # trim the cache, never an entry in use
mlserver-entrypoint CMD [ARG…]           # any command, in the environment
mlserver-entrypoint -- CMD [ARG…]        # same, for a command named like a subcommand
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NoReturn

from entrypoint import __version__, lease, log, models, settings, warm, worker
from entrypoint.entry import Entry, read_marker
from entrypoint.errors import ConfigError, EntrypointError, Stopped, out_of_processes
from entrypoint.models import ModelEnv
from entrypoint.warm import Ready
from entrypoint.worker import Message

Send = Callable[[Message], None]

SUBCOMMANDS = ("unpack", "inspect", "gc")
USAGE = __doc__.split("\n\n", 1)[1].rstrip() if __doc__ else ""
ATTEMPTS = 3  # cold starts in a row whose entry a gc removed before this process held it


def main(argv: Sequence[str] | None = None, mask: set[int] | None = None) -> None:
    """`mask`: the signal mask the process started with, if the stops were blocked before."""
    worker.block_stops(mask)  # first: no stop goes unnoticed, and none runs a handler (worker.py)
    args = list(sys.argv[1:] if argv is None else argv)
    sys.exit(guarded(lambda: _dispatch(args)))


def guarded(body: Callable[[], int], report: Callable[[EntrypointError], int] | None = None) -> int:
    """Run `body`; an error the user can act on is one line (or handed to `report`) and its exit code."""
    try:
        try:
            return body()
        except RuntimeError as exc:
            if "can't start new thread" not in str(exc):  # threading's words when no process is left
                raise
            raise out_of_processes(exc) from exc
    except EntrypointError as exc:
        if report is not None:
            return report(exc)
        log.error(exc, debug=_debug())
        return exc.exit_code
    except BrokenPipeError:  # `gc | head -1`: the reader had enough; end as a tool killed by SIGPIPE would
        log.silence_stdout()
        return 128 + 13


def in_worker(job: Callable[[Send], int]) -> Callable[[Send], int]:
    """`job` as a worker runs it: its error goes to this process, which prints the one line."""
    return lambda send: guarded(lambda: job(send), lambda exc: worker.report(exc, send, _debug()))


def _debug() -> bool:
    config = settings.plain(os.environ, only=("debug",))
    return config is not None and config.debug


def _dispatch(args: list[str]) -> int:
    if args[:1] in (["-h"], ["--help"], ["help"]):
        log.out(f"usage:\n{USAGE}\n\nSettings are environment variables; see docs/configuration.md.")
        return 0
    if args[:1] == ["--version"]:
        log.out(f"mlserver-entrypoint {__version__}")
        return 0
    if args[:1] == ["--"]:
        return run(args[1:])
    if args[:1] in ([c] for c in SUBCOMMANDS) and {"-h", "--help"} & set(args[1:]):
        log.out("usage:\n" + "\n".join(line for line in USAGE.splitlines() if line.split()[1:2] == args[:1]))
        return 0
    if args[:1] == ["unpack"]:
        if len(args) > 1:
            raise ConfigError(
                f"unpack takes no arguments (got {' '.join(args[1:])})", "configure it with MLSERVER_ENV_*"
            )
        return unpack()
    if args[:1] == ["inspect"]:
        from entrypoint import inspection

        worker.run(in_worker(lambda send: inspection.main(args[1:], send)), inspection.undo)
        return 0
    if args[:1] == ["gc"]:
        from entrypoint import gc

        worker.run(in_worker(lambda _: gc.main(args[1:])), lambda _: ("collecting", "run gc again to finish"))
        return 0
    return run(args)


def unpack() -> int:
    """Prepare the environments (for init containers and scripts): each model's prefix on a line
    of its own, the server's (if any) last."""
    ready = prepared((), _wanted(None))
    if ready.prefix is None and not ready.models:
        raise ConfigError(
            "no environment to unpack",
            f"set MLSERVER_ENV_TARBALL, or put environment.tar.gz in MLSERVER_MODELS_DIR ({ready.config.models_dir})",
        )
    if (stop := worker.pending_stop()) is not None:
        raise Stopped(stop, "starting", "the environments are unpacked and cached; they were not printed")
    for prefix in [*ready.models.values(), *([ready.prefix] if ready.prefix else [])]:
        log.out(str(prefix))
    return 0


def run(command: list[str]) -> NoReturn:
    """Prepare the environments there are, activate the server's and exec the command."""
    require = ("mlserver",) if (command or ["mlserver"])[0] == "mlserver" else ()
    if command[:2] == ["mlserver", "start"] and len(command) == 3 and "MLSERVER_MODELS_DIR" not in os.environ:
        # `mlserver start /models` with /models/environment.tar.gz beside the model: that folder is
        # the models folder (MLServer's images set the variable and the command alike)
        os.environ["MLSERVER_MODELS_DIR"] = command[2]
    ready = prepared(require, _wanted(command))
    if ready.prefix is None and not ready.models:
        log.info("no environment tarball configured: running the command as is")
    launch(command or ["mlserver", "start", str(ready.config.models_dir)], ready)


def _wanted(command: list[str] | None) -> list[ModelEnv]:
    """The models with an environment of their own in the folder `mlserver start` serves (None:
    the models folder, for `unpack`); none for any other command."""
    if command and (command[:2] != ["mlserver", "start"] or len(command) != 3):
        return []
    config = settings.plain(os.environ, only=("models_dir",))
    folder = command[2] if command else None if config is None else config.models_dir
    found = [] if folder is None else models.find(Path(folder))
    taken = found and models.repository_taken(Path(folder or ""), os.environ)
    if taken:
        log.info(
            f"warning: {taken} names a model repository of its own, so the models' environment_tarball is left "
            "to MLServer; see docs/per-model.md"
        )
        return []
    return found


def prepared(require: tuple[str, ...], wanted: list[ModelEnv]) -> Ready:
    """The environments to run in: published entries found at once, or ones the cold path made in a
    worker (prepare.py), then held by this process for as long as it and its server live."""
    t0 = time.monotonic()
    hit = warm.lookup(os.environ, require, wanted)
    if hit is not None:
        hits = [str(p) for p in [hit.prefix, *hit.models.values()] if p is not None]
        log.info(f"locate: {(time.monotonic() - t0) * 1000:.0f} ms, cache hit {', '.join(dict.fromkeys(hits))}")
        return hit
    from entrypoint import prepare

    job = in_worker(lambda send: prepare.main(send, require, wanted))
    for _ in range(ATTEMPTS):
        messages = worker.run(job, prepare.abandon)
        result = next(m["result"] for m in reversed(messages) if "result" in m)
        config = settings.restore(result["settings"])
        found = [Entry(config.cache_dir, key) for key in [result["key"], *result["models"]] if key is not None]
        # Not waiting: a gc holding it now is removing it (and a stop must be seen); unpacked again
        if all(lease.hold(e, wait=False) and read_marker(e) is not None for e in found):
            server = Entry(config.cache_dir, result["key"]).prefix if result["key"] else None
            own = zip(wanted, result["models"], strict=True)
            return Ready(server, config, {m: Entry(config.cache_dir, k).prefix for m, k in own})
    raise ConfigError(
        f"the cache entry was removed {ATTEMPTS} times right after it was unpacked",
        "check what else trims MLSERVER_ENV_CACHE_DIR (gc, MLSERVER_ENV_CACHE_MAX_BYTES of other starts)",
    )


def launch(command: list[str], ready: Ready) -> NoReturn:
    """Activate the environment (None: run as is) and exec the command, or run it under the tiny
    init when this process is a container's PID 1 (supervise.py)."""
    from entrypoint import activate, supervise

    env = dict(os.environ) if ready.prefix is None else _activated(ready.prefix)
    _warn_other_models_dir(command)
    argv = activate.resolve_command(command, env, ready.prefix)
    if ready.models:
        _hand_over(argv, env, ready.models)
    if (stop := worker.pending_stop()) is not None:  # the last moment a stop keeps the command from running
        raise Stopped(stop, "starting", "the command was not run")
    mode = ready.config.init
    if supervise.wanted(mode):
        log.info(
            f"run: {' '.join(argv)} as the child of this init (pid {os.getpid()}, MLSERVER_ENV_INIT={mode}) "
            f"(entrypoint work {log.elapsed_ms():.0f} ms)"
        )
        sys.exit(supervise.run(argv, env, ready.config.stop_grace))
    log.info(f"exec: {' '.join(argv)} (entrypoint work {log.elapsed_ms():.0f} ms)")
    activate.exec_command(argv, env)


def _hand_over(argv: list[str], env: dict[str, str], prepared: Mapping[ModelEnv, Path]) -> None:
    """The server (`mlserver start FOLDER`) loads each model of `prepared` in its own environment."""
    server = models.server_prefix(argv[0])
    served = models.mlserver_version(server)
    if served is None:
        log.info(
            f"warning: no mlserver-*.dist-info under {server}/lib: each model's environment must hold the "
            "mlserver release the server runs (not checked)"
        )
    models.check_versions(prepared, served)
    models.handover(prepared, env)
    log.info(f"models with an environment of their own: {', '.join(m.name for m in prepared)}")


def _activated(prefix: Path) -> dict[str, str]:
    from entrypoint import activate

    env = activate.activated_environ(prefix, os.environ)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # the entry is shared and may be read-only: never write into it
    if os.environ.get("PYTHONPATH"):
        log.info(
            "warning: PYTHONPATH is not passed to the environment (another Python's modules would shadow its "
            "own); put a custom runtime's code in its model's folder (MLServer imports from there) or pack it"
        )
    return env


def _warn_other_models_dir(command: list[str]) -> None:
    """The image's command names /mnt/models; MLServer's own images serve $MLSERVER_MODELS_DIR:
    whoever sets only the variable gets another folder served than the one searched."""
    wanted = os.environ.get("MLSERVER_MODELS_DIR", "")
    serves = command[2] if command[:2] == ["mlserver", "start"] and len(command) == 3 else None
    if serves is not None and not os.path.isdir(serves):  # mlserver serves no model then, and reports ready
        log.info(f"warning: the models folder {serves} does not exist: no model will be served; mount it there")
    if wanted and serves is not None and os.path.realpath(serves) != os.path.realpath(wanted):
        log.info(
            f"warning: serving {serves}, the command's folder, not MLSERVER_MODELS_DIR={wanted}; "
            f"to serve that one, give the command `mlserver start {wanted}` (or mount it at {serves}); to serve "
            f"{serves} (and find its environment.tar.gz), set MLSERVER_MODELS_DIR={serves} too"
        )
