"""Helpers shared by the tests: running the entrypoint, waiting for a server, V2 requests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import NoReturn

import pytest
import requests

REPO = Path(__file__).resolve().parent.parent
ENTRYPOINT = [sys.executable, "-m", "entrypoint"]


def unavailable(reason: str) -> NoReturn:
    """Skip a test whose set-up (root, a tmpfs, unshare, setpriv, chattr, ...) is missing; under
    CI=true fail instead: CI installs and permits all of it, so a skip there would hide a gap."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: set-up is missing)", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def entry_env(**overrides: str | Path | None) -> dict[str, str]:
    """os.environ without any MLSERVER_* setting of the developer's, plus `overrides` (None: unset)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLSERVER")}
    env.update({k: str(v) for k, v in overrides.items() if v is not None})
    return env


def run_entrypoint(
    args: list[str], env: Mapping[str, str], timeout: float = 300, **kw: object
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        [*ENTRYPOINT, *args], env=dict(env), capture_output=True, text=True, timeout=timeout, cwd=REPO, **kw
    )


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The one error line the entrypoint printed (and assert there is exactly one)."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("mlserver-entrypoint: error:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@contextmanager
def serving(env: Mapping[str, str], args: list[str] | None = None, timeout: float = 180) -> Iterator[str]:
    """Start the entrypoint serving on free ports; yield its base URL once the model is ready."""
    port = free_port()
    env = {
        **env,
        "MLSERVER_HTTP_PORT": str(port),
        "MLSERVER_GRPC_PORT": str(free_port()),
        "MLSERVER_METRICS_PORT": str(free_port()),
    }
    # The log file stays open for the server's whole life, closed in the finally below.
    log = open(env["TEST_LOG"], "a") if "TEST_LOG" in env else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen([*ENTRYPOINT, *(args or [])], env=env, stdout=log, stderr=log, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"entrypoint exited with {proc.returncode} before the server was ready")
            try:
                if requests.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("server not ready in time")
            time.sleep(0.3)
        yield url
    finally:
        stop(proc)
        if log is not subprocess.DEVNULL:
            log.close()  # type: ignore[union-attr]


def stop(proc: subprocess.Popen[bytes], grace: float = 15) -> None:
    """SIGTERM the server's process group; SIGKILL what is left after `grace` seconds."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def infer(url: str, model: str, pixels: list[float]) -> int:
    body = {"inputs": [{"name": "predict", "shape": [1, 64], "datatype": "FP32", "data": pixels}]}
    r = requests.post(f"{url}/v2/models/{model}/infer", json=body, timeout=30)
    r.raise_for_status()
    return int(r.json()["outputs"][0]["data"][0])


def env_python(prefix: Path, code: str, *args: str) -> object:
    """Run `code` with an unpacked environment's own interpreter; it prints JSON, we return it."""
    out = subprocess.run(
        [str(prefix / "bin" / "python"), "-c", code, *args],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    return json.loads(out.stdout)
