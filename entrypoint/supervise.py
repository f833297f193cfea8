"""A tiny init: run the command as a child, forward signals, reap zombies, end a stop in time.

mlserver 1.1.0 with its default parallel inference workers never finishes shutting down on
SIGTERM, and an exec'd PID 1 reaps no orphan. So when the entrypoint is PID 1
(MLSERVER_ENV_INIT=auto), or when asked (`always`), it stays the parent: the command runs in its
own process group, every signal a runtime or a user sends is forwarded to it, and
MLSERVER_ENV_STOP_GRACE seconds after the first SIGTERM or SIGINT the whole group gets SIGKILL.
The entrypoint exits with the command's status (128 + signal if it was killed).

Hand-written rather than tini or dumb-init: those are binaries from outside PyPI, and neither ends
the process group after a grace period tied to a setting. The loop is tini's: the signals blocked
and taken synchronously (sigtimedwait), forwarded, children reaped with WNOHANG.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Mapping, Sequence

from entrypoint import log, worker
from entrypoint.activate import exec_failure

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
PR_SET_CHILD_SUBREAPER = 36
LEFTOVER_WAIT = 2.0  # seconds to reap the group's leftovers after they got SIGKILL


def wanted(mode: str) -> bool:
    """Whether to stay the command's parent: always, never, or (auto) when this process is PID 1."""
    return mode == "always" or (mode == "auto" and os.getpid() == 1)


def run(argv: Sequence[str], env: Mapping[str, str], grace: float) -> int:
    """Run argv as a child under this process acting as init; return the exit code to exit with."""
    waited = {*FORWARDED, signal.SIGCHLD} - worker.ignored()  # the command ignores those: as if exec'd
    # Blocked before the fork: no signal is lost between the fork and the loop.
    signal.pthread_sigmask(signal.SIG_BLOCK, waited)
    if os.getpid() != 1:
        _become_subreaper()
    terminal = _owns_terminal()
    child = worker.spawn(lambda: _exec(argv, env), death_signal=signal.SIGTERM, session=False)
    code = _wait(child, waited, grace, terminal)
    _end_leftovers(child)
    return code


def _exec(argv: Sequence[str], env: Mapping[str, str]) -> int:
    worker.exec_defaults()
    try:
        os.execve(argv[0], list(argv), dict(env))
    except OSError as exc:  # the program exists (resolve_command found it): 126, as a shell says
        log.error(exec_failure(argv[0], exc), debug=False)
    return 126


def _become_subreaper() -> None:
    """Orphans of the command are re-parented to this process rather than to the real init, so
    they are reaped here."""
    import ctypes

    with contextlib.suppress(AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _owns_terminal() -> bool:
    try:
        return os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        return False


def _wait(child: int, waited: set[signal.Signals], grace: float, terminal: bool) -> int:
    """Forward signals to the child until it exits; SIGKILL its group `grace` s after a stop signal.

    With a terminal, this process keeps it, so Ctrl-C reaches it and starts the grace period; a
    command that reads or configures the terminal (`docker run -it IMAGE bash`) is stopped by the
    kernel for it, and gets it then, as a shell's `fg` does."""
    deadline: float | None = None
    info: signal.struct_siginfo | None
    while True:
        if deadline is None:
            info = signal.sigwaitinfo(waited)
        else:
            info = signal.sigtimedwait(waited, max(0.0, deadline - time.monotonic()))
        if info is None:  # the grace period is over
            log.info(
                f"still running {grace:g} s after the stop signal (MLSERVER_ENV_STOP_GRACE): "
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
