"""Where work runs in a child process that a stop can end: the process structure for stops.

The entrypoint blocks SIGTERM and SIGINT before it imports anything (entrypoint/__main__.py), so
no handler ever runs. Work that takes time (hashing, waiting for a lock, unpacking, inspecting,
activation scripts) runs in a child in a session of its own, while the entrypoint waits for the
child and for a stop signal together (sigwaitinfo). On a stop it ends the child's whole process
group with SIGKILL, undoes what the child announced it had begun, and exits with one line and
128 + the signal. The child has no handler of its own, and dies with the entrypoint
(PR_SET_PDEATHSIG), so a kill -9 leaves nothing running either.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from entrypoint.errors import EntrypointError, Stopped, out_of_processes

STOPS = frozenset({signal.SIGTERM, signal.SIGINT})
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PYTHON_IGNORES = (signal.SIGPIPE, signal.SIGXFSZ)  # ignored by CPython at start; an exec'd program gets them back
GROUP_WAIT = 1.0  # seconds for a killed group's processes to be gone
UNDO_TIME = 0.3  # seconds a stop spends undoing a worker's work (`docker stop` waits 10 s in all)
TRACE_MAX = 16 << 10  # characters of a worker's traceback handed over (MLSERVER_ENV_DEBUG)
Message = dict[str, Any]
Undo = Callable[[list[Message]], tuple[str, str]]
_original_mask: set[int] = set()
_inherited_ignored: set[int] = set()  # stop signals the entrypoint was started with ignored (`cmd &`)


def block_stops(mask: set[int] | None = None) -> None:
    """From here a stop signal waits until the entrypoint looks for it: blocked, so never dropped
    (even as a container's PID 1, whose unhandled signals the kernel drops), and no handler (the
    one CPython installs for SIGINT is taken away). `mask`: the one the process started with, if
    the stops were blocked earlier."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)
    _original_mask.update(previous if mask is None else mask)
    _inherited_ignored.update(s for s in STOPS if signal.getsignal(s) == signal.SIG_IGN)
    for signum in STOPS:
        signal.signal(signum, signal.SIG_IGN if signum in _inherited_ignored else signal.SIG_DFL)
    _guard_stdio()


def _guard_stdio() -> None:
    """Standard streams the entrypoint was started without (`>&-`) are /dev/null from here: a file
    opened later (a cache lease) must not become a command's stdin or stdout. sys.stdout stays
    None, so output the entrypoint owes still says it is lost (log.out)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def ignored() -> set[int]:
    """Stop signals the entrypoint was started with ignored, which the command it runs ignores."""
    return set(_inherited_ignored)


def pending_stop() -> int | None:
    """A stop signal sent meanwhile, if any (taken off the pending set)."""
    pending = signal.sigpending() & STOPS
    if not pending:
        return None
    info = signal.sigtimedwait(pending, 0)
    return info.si_signo if info is not None else None


def exec_defaults() -> None:
    """The signal state the entrypoint was started with, for a program it execs: the dispositions
    CPython changed put back, and the mask. (A stop in the instant between the last check and
    the exec ends the process by its default action: the command is not run.)"""
    for signum in (*STOPS, *PYTHON_IGNORES):
        signal.signal(signum, signal.SIG_IGN if signum in _inherited_ignored else signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, _original_mask)


def dies_with_parent(signum: int = signal.SIGKILL) -> Callable[[], None]:
    """For a child, before it runs: get `signum` when this process dies, also if it already has."""
    import ctypes

    prctl = ctypes.CDLL(None).prctl  # resolved before the fork: no dlopen in a child
    parent = os.getpid()

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, signum)
        if os.getppid() != parent:
            os._exit(128 + signum)

    return arm


def spawn(child: Callable[[], int], death_signal: int = signal.SIGKILL, session: bool = True) -> int:
    """Fork `child` into a session (or, not `session`, a process group) of its own that dies with
    this process. A session has no terminal to stop it for reading or writing one. It runs with no
    stop blocked and default dispositions, and exits with what it returns (1 and the traceback
    for a bug)."""
    arm = dies_with_parent(death_signal)
    flush()
    try:
        pid = os.fork()
    except BlockingIOError as exc:  # EAGAIN: no process left
        raise out_of_processes(exc) from exc
    if pid == 0:
        code = 1
        try:
            os.setsid() if session else os.setpgid(0, 0)
            arm()
            for signum in STOPS:
                signal.signal(signum, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, _original_mask)
            code = child()
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            flush()
            os._exit(code)
    if not session:
        with contextlib.suppress(OSError):  # the child does the same; whichever runs first wins
            os.setpgid(pid, pid)
    return pid


def flush() -> None:
    """Write out what is buffered (once, not in both processes after a fork); a closed or failing
    stream is the caller's to report."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()


def wait(pid: int) -> tuple[int | None, int | None]:
    """Wait for child `pid` to exit, or for a stop signal: (wait status, None) or (None, signal).
    After a stop the child's whole group is killed and reaped. A stop signal the entrypoint was
    started with ignored counts too: a harness that starts it in the background stops it so."""
    waited = {*STOPS, signal.SIGCHLD}
    while True:
        info = signal.sigwaitinfo(waited)
        if info.si_signo == signal.SIGCHLD:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status, None
            continue
        _end_group(pid)
        return None, info.si_signo


def _end_group(pid: int) -> None:
    """SIGKILL to child `pid`'s process group, then wait (GROUP_WAIT at most: a process stuck in
    the kernel cannot be hurried) until it is empty, so what the child started is gone too when
    the entrypoint exits. Meanwhile this process is their subreaper and reaps them itself."""
    import ctypes

    prctl = ctypes.CDLL(None).prctl
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    try:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + GROUP_WAIT
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                while os.waitpid(-pid, os.WNOHANG)[0]:
                    pass
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.005)
    finally:
        prctl(PR_SET_CHILD_SUBREAPER, 0)


def run(job: Callable[[Callable[[Message], None]], int], undo: Undo) -> list[Message]:
    """Run `job` in a worker and return the messages it sent (`job` gets the function to send
    them). A worker that failed sends its error (`{"error": …}`), which is raised here, so this
    process prints the one line; one that failed otherwise (a bug) printed its traceback, and
    its exit code is raised as SystemExit. On a stop, `undo` gets the messages sent so far,
    undoes what they announce and says what the worker was doing and what is left; Stopped is
    raised, whatever the worker sent."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})  # before the fork: no exit goes unseen
    # Messages go to a file in memory, shared through the fork: a worker never waits to send one.
    box = os.memfd_create("mlserver-entrypoint-messages")
    try:
        status, stop = wait(spawn(lambda: job(_sender(box))))
        messages = _received(box)
    finally:
        os.close(box)
    if stop is not None:
        raise Stopped(stop, *undo(messages))
    assert status is not None
    if os.WIFSIGNALED(status):  # by someone else: the kernel's OOM killer, a kill of its group
        signum = os.WTERMSIG(status)
        doing, outcome = undo(messages)
        raise EntrypointError(
            f"the worker was killed by {signal.Signals(signum).name} while {doing}", outcome, 128 + signum
        )
    if (code := os.waitstatus_to_exitcode(status)) != 0:
        reported = next((m["error"] for m in messages if "error" in m), None)
        if reported is None:
            raise SystemExit(code)
        error = EntrypointError(reported["line"], "", code)
        error.trace = reported.get("trace", "")
        raise error
    return messages


def _sender(box: int) -> Callable[[Message], None]:
    def send(message: Message) -> None:
        os.write(box, (json.dumps(message) + "\n").encode())

    return send


def _received(box: int) -> list[Message]:
    """The messages in the box; a line cut short by a kill is no message."""
    size = os.fstat(box).st_size
    messages = []
    for line in os.pread(box, size, 0).decode(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            messages.append(json.loads(line))
    return messages


def report(error: EntrypointError, send: Callable[[Message], None], debug: bool) -> int:
    """In a worker: hand an error to the entrypoint to print (its traceback too, for debug)."""
    import traceback

    trace = "".join(traceback.format_exception(error))[-TRACE_MAX:] if debug else ""
    send({"error": {"line": error.line, "trace": trace}})
    return error.exit_code


def call(argv: Sequence[str], env: Mapping[str, str], doing: str, outcome: str) -> tuple[int, bytes, bytes]:
    """Run a program in a session of its own with its output captured: (exit code, stdout,
    stderr). A stop meanwhile ends it and what it started, and raises Stopped."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    out, err = os.memfd_create("mlserver-entrypoint-stdout"), os.memfd_create("mlserver-entrypoint-stderr")
    try:
        status, stop = wait(spawn(lambda: _exec(argv, env, out, err)))
        if stop is not None:
            raise Stopped(stop, doing, outcome)
        assert status is not None
        return os.waitstatus_to_exitcode(status), _contents(out), _contents(err)
    finally:
        os.close(out)
        os.close(err)


def _contents(fd: int) -> bytes:
    return os.pread(fd, os.fstat(fd).st_size, 0)


def _exec(argv: Sequence[str], env: Mapping[str, str], stdout: int, stderr: int) -> NoReturn:
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)
    exec_defaults()
    try:
        os.execvpe(argv[0], list(argv), dict(env))
    except OSError as exc:
        os.write(2, f"cannot run {argv[0]}: {exc.strerror}\n".encode())
    os._exit(127)
