"""The entrypoint as a tiny init (entrypoint/supervise.py), without a container.

As PID 1 (`unshare --pid`, what a container gives it) or with MLSERVER_ENV_INIT=always it stays
the command's parent: signals forwarded, zombies reaped, the process group killed a grace period
after a stop signal. Otherwise it execs, so the command keeps the entrypoint's PID (issue 3).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from archives import entry_name, tiny_env, write_tar
from conftest import Example
from filelock import FileLock
from support import ENTRYPOINT, REPO, entry_env, error_line, free_port, infer, run_entrypoint, unavailable

STOP_LIMIT = 10.0  # what `docker stop` waits by default before its own SIGKILL


def _session_processes(sid: int) -> list[str]:
    """Command lines of the live (not zombie) processes in session `sid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(f"{stat.parent.name}: {cmdline}")
    return found


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([*ENTRYPOINT, *args], env=env, stdout=out, stderr=out, cwd=REPO, start_new_session=True)


def _stop_and_time(proc: subprocess.Popen[bytes], signum: int = signal.SIGTERM) -> float:
    t0 = time.monotonic()
    proc.send_signal(signum)
    try:
        proc.wait(STOP_LIMIT + 20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return time.monotonic() - t0


def _no_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return entry_env(MLSERVER_ENV_TARBALL="", MLSERVER_MODELS_DIR=tmp_path, **extra)


def test_not_pid_1_execs_by_default(tmp_path: Path) -> None:
    for mode in (None, "auto", "never"):
        env = _no_env(tmp_path, **({"MLSERVER_ENV_INIT": mode} if mode else {}))
        proc = subprocess.Popen(
            [*ENTRYPOINT, "python3", "-c", "import os; print(os.getpid())"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert int(out) == proc.pid, "the command must replace the entrypoint (exec), keeping its PID"
        assert "exec: " in err and "as the child of this init" not in err


def test_always_runs_the_command_as_a_child_in_its_own_group(tmp_path: Path) -> None:
    env = _no_env(tmp_path, MLSERVER_ENV_INIT="always")
    code = "import os, sys; print(os.getpid(), os.getppid(), os.getpgrp()); sys.exit(7)"
    proc = subprocess.run([*ENTRYPOINT, "python3", "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 7, proc.stderr  # the command's exit status passes through
    pid, ppid, pgrp = map(int, proc.stdout.split())
    assert pgrp == pid and ppid != pid
    assert "as the child of this init" in proc.stderr and "MLSERVER_ENV_INIT=always" in proc.stderr


def test_signals_are_forwarded_and_the_status_kept(tmp_path: Path) -> None:
    """SIGHUP, SIGUSR1, SIGUSR2 reach the command; a SIGTERM it handles ends it with its own status."""
    marks = tmp_path / "got"
    code = f"""
import signal, sys, time
got = open({str(marks)!r}, "a", buffering=1)
for s in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT):
    signal.signal(s, lambda n, f: got.write(signal.Signals(n).name + "\\n"))
signal.signal(signal.SIGTERM, lambda n, f: sys.exit(42))
got.write("ready\\n")
while True:
    time.sleep(0.05)
"""
    proc = _start(["python3", "-c", code], _no_env(tmp_path, MLSERVER_ENV_INIT="always"), tmp_path / "log")
    deadline = time.monotonic() + 30
    while "ready" not in (marks.read_text() if marks.exists() else ""):
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()
        time.sleep(0.05)
    sent = [signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT]
    for s in sent:  # one at a time: signals pending together are taken lowest number first
        proc.send_signal(s)
        while s.name not in marks.read_text().split():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()
            time.sleep(0.01)
    took = _stop_and_time(proc)
    assert proc.returncode == 42, (tmp_path / "log").read_text()
    assert took < 5
    assert marks.read_text().split()[1:] == [s.name for s in sent]
    assert _session_processes(proc.pid) == []


def _started(code: str, env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], list[str]]:
    """Run `python3 -c code` under the entrypoint until it prints a line starting with "started"; its words."""
    proc = _start(["python3", "-c", code], env, log)
    deadline = time.monotonic() + 30
    while not (lines := [line for line in log.read_text().splitlines() if line.split()[:1] == ["started"]]):
        assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
        time.sleep(0.05)
    return proc, lines[0].split()


def test_a_command_ignoring_sigterm_is_killed_with_its_group_after_the_grace(tmp_path: Path) -> None:
    code = (
        "import signal, subprocess, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "[subprocess.Popen(['sleep', '300']) for _ in range(2)]; print('started', flush=True); time.sleep(300)"
    )
    log = tmp_path / "log"
    proc, _ = _started(code, _no_env(tmp_path, MLSERVER_ENV_INIT="always", MLSERVER_ENV_STOP_GRACE="1.5"), log)
    took = _stop_and_time(proc)
    text = log.read_text()
    assert proc.returncode == 128 + signal.SIGKILL, text
    assert 1.4 < took < 5, text
    assert "SIGTERM forwarded" in text and "SIGKILL to its process group" in text
    assert _session_processes(proc.pid) == []


def test_a_kill_9_of_the_init_outside_a_container_stops_the_command(tmp_path: Path) -> None:
    """Not PID 1 (`make serve`, MLSERVER_ENV_INIT=always): the server was left running, holding its
    ports, when the init was SIGKILLed. It gets a SIGTERM then (PR_SET_PDEATHSIG), as on a stop."""
    code = (
        "import os, signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); "
        "print('started', os.getpid(), flush=True); time.sleep(300)"
    )
    proc, words = _started(code, _no_env(tmp_path, MLSERVER_ENV_INIT="always"), tmp_path / "log")
    child = int(words[1])
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(child, os.WNOHANG)  # not ours: reaped by whoever adopted it
        time.sleep(0.05)
    alive = _session_processes(proc.pid)
    if alive:
        os.killpg(proc.pid, signal.SIGKILL)
    assert alive == [], alive


def test_a_stopped_command_gets_the_stop_signal_at_once(tmp_path: Path) -> None:
    """A command stopped by SIGSTOP (a debugger, Ctrl-Z) is continued after the forwarded SIGTERM,
    so it handles it now rather than being SIGKILLed when the grace ends."""
    code = (
        "import os, signal, sys, time; signal.signal(signal.SIGTERM, lambda n, f: sys.exit(42)); "
        "print('started', os.getpid(), flush=True); time.sleep(300)"
    )
    log = tmp_path / "log"
    proc, started = _started(code, _no_env(tmp_path, MLSERVER_ENV_INIT="always", MLSERVER_ENV_STOP_GRACE="20"), log)
    child = int(started[1])
    deadline = time.monotonic() + 30
    os.kill(child, signal.SIGSTOP)
    while Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    took = _stop_and_time(proc)
    assert proc.returncode == 42, log.read_text()
    assert took < 10, log.read_text()


def test_leftovers_of_the_group_are_ended_when_the_command_exits(tmp_path: Path) -> None:
    env = _no_env(tmp_path, MLSERVER_ENV_INIT="always")
    argv = [*ENTRYPOINT, "sh", "-c", "sleep 300 & exit 3"]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, start_new_session=True)
    assert proc.returncode == 3, proc.stderr
    assert "outlived the command: SIGKILL" in proc.stderr
    assert not any("sleep 300" in p for p in _session_processes(os.getpid()))


def _in_a_terminal(
    args: list[str], env: dict[str, str], until: bytes, then: bytes, timeout: float = 30
) -> tuple[int, float, str]:
    """Run the entrypoint under `sh -c` in a new terminal, as `make serve` does from an interactive
    shell; once `until` is printed, type `then`. (exit code, seconds after typing, output)."""
    import pty
    import select
    import shlex

    command = shlex.join([*ENTRYPOINT, *args])
    pid, fd = pty.fork()
    if pid == 0:  # a new session with the terminal; sh is not its leader's only process then
        os.chdir(REPO)
        os.execve("/bin/sh", ["sh", "-c", f"{command}; exit $?"], env)
    out, typed, status = b"", 0.0, None
    deadline = time.monotonic() + timeout
    try:
        while status is None and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.1)[0]:
                with contextlib.suppress(OSError):
                    out += os.read(fd, 65536)
            if not typed and until in out:
                os.write(fd, then)
                typed = time.monotonic()
            done, wait_status = os.waitpid(pid, os.WNOHANG)
            status = wait_status if done else None
    finally:
        left = _session_processes(pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        for line in left:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(line.split(":")[0]), signal.SIGKILL)
        if status is None:
            os.waitpid(pid, 0)
        os.close(fd)
    assert status is not None, f"still running {timeout} s on; left: {left}\n{out.decode(errors='replace')}"
    assert left == [], left
    return os.waitstatus_to_exitcode(status), time.monotonic() - typed, out.decode(errors="replace")


def test_ctrl_c_in_a_terminal_ends_a_command_that_ignores_it_after_the_grace(tmp_path: Path) -> None:
    """`make serve` and Ctrl-C while mlserver 1.1.0 loads: the init gave the server the terminal,
    so the Ctrl-C went to the server alone, which hung, and no grace period ever started."""
    code = (
        "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
        "print('loading', flush=True); time.sleep(300)"
    )
    env = _no_env(tmp_path, MLSERVER_ENV_INIT="always", MLSERVER_ENV_STOP_GRACE="1")
    _, took, out = _in_a_terminal(["python3", "-c", code], env, b"loading\r\n", b"\x03")
    assert "SIGINT forwarded" in out and "SIGKILL to its process group" in out, out
    assert took < 6, out


def test_a_command_reading_the_terminal_is_given_it(tmp_path: Path) -> None:
    """`docker run -it IMAGE bash` stays interactive: a command that reads the terminal gets it."""
    env = _no_env(tmp_path, MLSERVER_ENV_INIT="always")
    status, _, out = _in_a_terminal(["sh", "-c", "echo asking; read x; echo got-$x"], env, b"asking", b"yes\n")
    assert status == 0 and "got-yes" in out, out


def test_each_log_line_is_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """The init's lines share stderr with the server's, which logs too as it stops: under
    PYTHONUNBUFFERED (the image sets it) print() wrote the text and its newline in two calls, and
    the server's next line was glued to ours ("...if it has not exited2026-11-29 ... INFO")."""
    from entrypoint import log

    writes: list[tuple[int, bytes]] = []
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append((fd, bytes(data))) or len(data))
    log.info("SIGTERM forwarded to pid 9")
    assert writes == [(2, b"mlserver-entrypoint: SIGTERM forwarded to pid 9\n")]


def test_bad_init_settings_are_one_line_errors(tmp_path: Path) -> None:
    for name, value in (("MLSERVER_ENV_INIT", "sometimes"), ("MLSERVER_ENV_STOP_GRACE", "-1")):
        proc = run_entrypoint(["true"], _no_env(tmp_path, **{name: value}), timeout=60)
        assert proc.returncode == 2
        assert name in error_line(proc)


def _unshare() -> list[str]:
    if shutil.which("unshare") is None:
        unavailable("unshare (util-linux) is not installed")
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        unavailable(f"cannot make a PID namespace here: {probe.stderr.decode().strip()}")
    return ["unshare", "--pid", "--fork", "--mount-proc"]


def _namespace_init(unshare: subprocess.Popen[bytes], timeout: float = 30) -> int:
    """Host PID of the process that is PID 1 in the namespace `unshare --fork` made."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = Path(f"/proc/{unshare.pid}/task/{unshare.pid}/children")
        pids = children.read_text().split() if children.exists() else []
        if pids:
            return int(pids[0])
        time.sleep(0.02)
    raise AssertionError("unshare started no child")


def test_as_pid_1_it_is_an_init_that_reaps_orphans(tmp_path: Path) -> None:
    """Under `unshare --pid` (as in a container) the default `auto` acts as init; an orphan that
    exits is reaped (no zombie), and the command's status is the entrypoint's."""
    script = (
        "(sleep 0.2 &) ; sleep 1; "  # the inner sleep is orphaned: PID 1 inherits it, and must reap it
        "z=$(grep -l '^State:.*Z' /proc/[0-9]*/status 2>/dev/null | wc -l); echo zombies=$z; exit 5"
    )
    argv = [*_unshare(), *ENTRYPOINT, "sh", "-c", script]
    proc = subprocess.run(argv, env=_no_env(tmp_path), capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 5, proc.stderr
    assert "zombies=0" in proc.stdout
    assert "as the child of this init (pid 1, MLSERVER_ENV_INIT=auto)" in proc.stderr


def test_as_pid_1_sigterm_from_outside_is_forwarded(tmp_path: Path) -> None:
    """A runtime's stop signal reaches PID 1 from the parent namespace; the command gets it."""
    code = (
        "import signal, sys, time; signal.signal(signal.SIGTERM, lambda n, f: sys.exit(9)); "
        "print('up', flush=True); time.sleep(60)"
    )
    log = tmp_path / "log"
    with open(log, "ab") as out:
        unshare = subprocess.Popen(
            [*_unshare(), *ENTRYPOINT, "python3", "-c", code],
            env=_no_env(tmp_path),
            stdout=out,
            stderr=out,
            cwd=REPO,
        )
    init = _namespace_init(unshare)
    deadline = time.monotonic() + 30
    while "up" not in log.read_text().split():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    os.kill(init, signal.SIGTERM)
    assert unshare.wait(10) == 9, log.read_text()


@pytest.mark.parametrize("as_pid_1", [True, False], ids=["pid-1", "not-pid-1"])
def test_a_stop_while_waiting_for_another_unpack_ends_the_start(as_pid_1: bool, tmp_path: Path) -> None:
    """Another replica holds the entry's unpack lock; `docker stop` comes while this start waits.
    As PID 1 the kernel drops a signal nobody handles: the start went on and ran the server. Now
    it ends, with one line and 143, before running anything."""
    tarball = write_tar(tmp_path / "env.tar.gz", tiny_env())
    cache = tmp_path / "c"
    cache.mkdir()
    name = entry_name(tarball)
    log = tmp_path / "log"
    env = entry_env(MLSERVER_ENV_TARBALL=tarball, MLSERVER_ENV_CACHE_DIR=cache)
    with FileLock(str(cache / f"{name}.lock")), open(log, "ab") as out:  # the other replica, unpacking
        proc = subprocess.Popen(
            [*(_unshare() if as_pid_1 else []), *ENTRYPOINT, "sh", "-c", "echo ran"],
            env=env, stdout=out, stderr=out, cwd=REPO,
        )  # fmt: skip
        target = _namespace_init(proc) if as_pid_1 else proc.pid
        deadline = time.monotonic() + 60
        while "waiting for another process" not in log.read_text():
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.05)
        os.kill(target, signal.SIGTERM)
        code = proc.wait(10)
    text = log.read_text()
    assert code == 143 and "error: stopped by SIGTERM while starting" in text and "ran" not in text.split(), text
    assert not (cache / f"{name}.ready").exists()


def test_seed_server_stops_within_ten_seconds_and_leaves_nothing(seed: Example, tmp_path: Path) -> None:
    """mlserver 1.1.0 never finishes its shutdown on SIGTERM (parallel workers): as init, the
    entrypoint forwards the SIGTERM, lets mlserver log its shutdown, then ends the group in time."""
    port = free_port()
    env = entry_env(
        MLSERVER_ENV_TARBALL=seed.tarball,
        MLSERVER_ENV_CACHE_DIR=tmp_path / "c",
        MLSERVER_MODELS_DIR=seed.models_dir,
        MLSERVER_ENV_INIT="always",
        MLSERVER_HTTP_PORT=port,
        MLSERVER_GRPC_PORT=free_port(),
        MLSERVER_METRICS_PORT=free_port(),
    )
    log = tmp_path / "server.log"
    proc = _start([], env, log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "server not ready in time"
        try:
            if requests.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(0.3)
    assert infer(url, "mnist-svm", [0.0] * 64) in range(10)
    workers = _session_processes(proc.pid)
    assert len(workers) >= 3, workers  # the entrypoint, mlserver, its inference worker(s)
    took = _stop_and_time(proc)
    text = log.read_text()
    assert took < STOP_LIMIT, text[-3000:]
    assert "SIGTERM forwarded" in text
    assert "Waiting for application shutdown" in text or "Shutting down" in text  # mlserver's own shutdown
    assert _session_processes(proc.pid) == []
    sys.stderr.write(f"\nseed server stopped {took:.1f} s after SIGTERM, exit status {proc.returncode}\n")


def test_what_the_entrypoint_was_started_ignoring_the_command_ignores_too(tmp_path: Path) -> None:
    """Started from a script's background job (SIGINT ignored) or with SIGTTOU ignored, the command
    gets the same dispositions, and as init a SIGINT neither reaches it nor starts the grace."""

    def ignoring(*signums: int) -> Callable[[], None]:
        return lambda: [signal.signal(s, signal.SIG_IGN) for s in signums] and None

    show = "grep SigIgn /proc/self/status"
    for init in ("never", "always"):
        proc = subprocess.run(
            [*ENTRYPOINT, "sh", "-c", show], env=_no_env(tmp_path, MLSERVER_ENV_INIT=init), cwd=REPO, text=True,
            capture_output=True, timeout=60, preexec_fn=ignoring(signal.SIGINT, signal.SIGTTOU),
        )  # fmt: skip
        ignored = int(proc.stdout.split()[1], 16)
        assert ignored & (1 << (signal.SIGINT - 1)) and ignored & (1 << (signal.SIGTTOU - 1)), (init, proc.stdout)
        assert not ignored & (1 << (signal.SIGTERM - 1)), (init, proc.stdout)
    log = tmp_path / "log"
    with open(log, "ab") as out:
        env = _no_env(tmp_path, MLSERVER_ENV_INIT="always", MLSERVER_ENV_STOP_GRACE="0.2")
        started = subprocess.Popen(
            [*ENTRYPOINT, "sleep", "2"], env=env, cwd=REPO, stdout=out, stderr=out, preexec_fn=ignoring(signal.SIGINT)
        )
    deadline = time.monotonic() + 30
    while "as the child of this init" not in log.read_text():
        assert started.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.02)
    started.send_signal(signal.SIGINT)
    assert started.wait(30) == 0, log.read_text()  # sleep ran to its end
