"""A tiny init: run the command as a child, forward signals, reap zombies, end a stop in time.

Why the entrypoint does not always exec: mlserver 1.1.0 with its default parallel inference
workers never finishes shutting down on SIGTERM (it logs "Waiting for inference pool shutdown"
forever), so a `docker stop` would always wait for the runtime's own SIGKILL, and an exec'd PID 1
reaps no orphan. So when the entrypoint is PID 1 (MLSERVER_ENV_INIT=auto), or when asked
(`always`), it stays as the parent: the command runs in its own process group, every signal a
runtime or a user sends is forwarded to it,
and `MLSERVER_ENV_STOP_GRACE` seconds after the first SIGTERM or SIGINT the whole group gets
SIGKILL. The entrypoint then exits with the command's status (128 + signal if it was killed).

Why hand-written rather than tini or dumb-init: those are binaries from outside PyPI that the
image and every user's base would have to carry, and neither ends the process group after a
grace period tied to a setting. The loop is the one tini uses (block the signals, wait for them
synchronously with sigtimedwait, forward, reap with WNOHANG), in the standard library only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from entrypoint import log
from entrypoint.activate import exec_failure
from entrypoint.constants import DEFAULT_INIT, DEFAULT_STOP_GRACE, ENV_PREFIX, INIT_MODES, InitMode
from entrypoint.errors import ConfigError

FORWARDED = (
    signal.SIGHUP,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGTERM,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
)
STOPPING = (signal.SIGTERM, signal.SIGINT)
# Dispositions CPython sets to "ignore" at start-up; an ignored signal stays ignored across exec.
PYTHON_IGNORES = (signal.SIGPIPE, signal.SIGXFSZ)
PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1
LEFTOVER_WAIT = 2.0  # seconds to reap the group's leftovers after they got SIGKILL


def options(environ: Mapping[str, str]) -> tuple[InitMode, float]:
    """MLSERVER_ENV_INIT and MLSERVER_ENV_STOP_GRACE, read without the settings model (the warm path
    never imports pydantic); a bad value is the same one-line error the settings model gives."""
    value = environ.get(f"{ENV_PREFIX}INIT", DEFAULT_INIT)
    mode = next((m for m in INIT_MODES if m == value), None)
    if mode is None:
        raise ConfigError(f"{ENV_PREFIX}INIT: Input should be 'auto', 'always' or 'never'; fix the value or unset it")
    raw = environ.get(f"{ENV_PREFIX}STOP_GRACE", "").strip()
    try:
        grace = float(raw) if raw else DEFAULT_STOP_GRACE
    except ValueError:
        grace = -1.0
    if not 0 <= grace < float("inf"):
        raise ConfigError(
            f"{ENV_PREFIX}STOP_GRACE: must be a number of seconds, 0 or more (got {raw!r}); fix the value or unset it"
        )
    return mode, grace


def wanted(mode: str) -> bool:
    """Whether to stay as the command's parent: always, never, or (auto) when this process is PID 1."""
    return mode == "always" or (mode == "auto" and os.getpid() == 1)


def reset_signals() -> None:
    """Give the command the default dispositions CPython changed, as a shell would (before exec)."""
    for signum in PYTHON_IGNORES:
        signal.signal(signum, signal.SIG_DFL)


def run(argv: Sequence[str], env: Mapping[str, str], grace: float) -> int:
    """Run argv as a child under this process acting as init; return the exit code to exit with."""
    waited = {*FORWARDED, signal.SIGCHLD}
    # Blocked before the fork, so no signal is lost between the fork and the wait loop (and a
    # blocked signal is delivered even to PID 1, which the kernel spares unhandled ones).
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, waited)
    prctl = None if os.getpid() == 1 else _become_subreaper()
    sys.stdout.flush()
    sys.stderr.flush()
    terminal = _owns_terminal()
    child = _spawn(argv, env, previous_mask, prctl)
    code = _wait(child, waited, grace, terminal)
    _end_leftovers(child)
    return code


def _become_subreaper() -> Callable[..., int] | None:
    """Orphans of the command are re-parented to us rather than to the real init, so we reap them.
    Returns libc's prctl, for the child."""
    import ctypes  # not at the top: the warm path imports this module, ctypes costs it ~5 ms

    libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols, libc's among them
    try:
        prctl: Callable[..., int] = libc.prctl
    except AttributeError:
        return None
    prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    return prctl


def _owns_terminal() -> bool:
    try:
        return os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        return False


def _spawn(argv: Sequence[str], env: Mapping[str, str], mask: Iterable[int], prctl: Callable[..., int] | None) -> int:
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the child: its own group, default signal state, then exec; never returns
        try:
            if prctl is not None:  # not PID 1: a kill -9 of this init must not leave the server running
                prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)  # (a container's PID 1 ends them all)
                if os.getppid() != parent:  # it died before the prctl
                    os._exit(128 + signal.SIGTERM)
            os.setpgid(0, 0)
            reset_signals()
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.execve(argv[0], list(argv), dict(env))
        except OSError as exc:  # the program exists (resolve_command found it): 126, as a shell says
            os.write(2, f"{log.PROG}: error: {exec_failure(argv[0], exc)}\n".encode())
            os._exit(126)
        finally:
            os._exit(127)
    with contextlib.suppress(OSError):  # the child does the same; whichever runs first wins
        os.setpgid(pid, pid)
    return pid


def _wait(child: int, waited: set[signal.Signals], grace: float, terminal: bool) -> int:
    """Forward signals to the child until it exits; SIGKILL its group `grace` s after a stop signal.

    With a terminal we keep it, so its Ctrl-C reaches us and starts the grace period (mlserver
    1.1.0 given the terminal hung for good on a Ctrl-C while loading, `make serve` with it); a
    command that reads or configures the terminal (`docker run -it IMAGE bash`) is stopped by
    the kernel for it, and gets it then, as a shell's `fg` does."""
    deadline: float | None = None
    info: signal.struct_siginfo | None
    while True:
        if deadline is None:
            info = signal.sigwaitinfo(waited)
        else:
            info = signal.sigtimedwait(waited, max(0.0, deadline - time.monotonic()))
        if info is None:  # the grace period is over
            log.info(
                f"still running {grace:g} s after the stop signal ({ENV_PREFIX}STOP_GRACE): "
                f"SIGKILL to its process group {child}"
            )
            _killpg(child, signal.SIGKILL)
            deadline = None
            continue
        if info.si_signo == signal.SIGCHLD:
            status = _reap(child)
            if status is not None and os.WIFSTOPPED(status):
                if terminal and os.WSTOPSIG(status) in (signal.SIGTTIN, signal.SIGTTOU):
                    _give_terminal(child)
                continue
            if status is not None:
                code = os.waitstatus_to_exitcode(status)
                return code if code >= 0 else 128 - code
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, info.si_signo)
            if info.si_signo in STOPPING:  # a stopped command (SIGSTOP, Ctrl-Z) acts on it only once
                os.kill(child, signal.SIGCONT)  # continued, as systemd and a shell's `kill` do
        if info.si_signo in STOPPING and deadline is None:
            deadline = time.monotonic() + grace
            log.info(
                f"{signal.Signals(info.si_signo).name} forwarded to pid {child}; its process group gets "
                f"SIGKILL in {grace:g} s if it has not exited"
            )


def _give_terminal(child: int) -> None:
    """Make the child's group the terminal's foreground and let it go on."""
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # as a shell does; we may be in the background by now
    with contextlib.suppress(OSError):
        os.tcsetpgrp(0, child)
    _killpg(child, signal.SIGCONT)


def _reap(child: int) -> int | None:
    """Reap every exited child (orphans included); the wait status of `child` if it was one (also
    when it stopped)."""
    found = None
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG | os.WUNTRACED)
        except ChildProcessError:
            return found
        if pid == 0:
            return found
        if pid == child:
            found = status


def _killpg(pgid: int, signum: int) -> bool:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _end_leftovers(pgid: int) -> None:
    """Processes of the command's group still running after it exited (orphaned workers) get
    SIGKILL, as the kernel would do to them when a container's PID 1 exits; then we reap them."""
    if not _killpg(pgid, 0):
        return
    log.info(f"processes of group {pgid} outlived the command: SIGKILL")
    _killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + LEFTOVER_WAIT
    while time.monotonic() < deadline:
        _reap(-1)
        if not _killpg(pgid, 0):
            return
        signal.sigtimedwait({signal.SIGCHLD}, 0.05)
