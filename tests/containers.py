"""Podman for the container tests (marker `container`): this machine's quirks in one place.

- No Docker daemon and no registry: podman builds and runs the image, from a local Debian base
  made by scripts/container-base (debootstrap, cached per machine).
- runc, not crun (crun refuses some kernels' hybrid cgroup layout), and ulimits every machine can
  grant: one containers.conf handed to podman and podman-compose through CONTAINERS_CONF.
- The build's pip reaches the package index the way the host does: its pip.conf and CA bundle
  are mounted into the build (when the host has them), with the host's network.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import requests
from support import REPO

IMAGE = "localhost/mlserver-env-entrypoint:test"
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]

[engine]
runtime = "runc"
"""
HOST_PIP_FILES = ("/etc/pip.conf", "/etc/ssl/certs/ca-certificates.crt")
STOP_LIMIT = 10.0  # `docker stop`'s default wait before its own SIGKILL

# What the model predicts, computed by the interpreter `python` is in the container: the
# environment's when MLSERVER_ENV_TARBALL is set, the image's otherwise.
DIGITS = """
import json, sys, joblib, sklearn
from sklearn import datasets
d = datasets.load_digits()
X = d.images.reshape((len(d.images), -1))[899:911]
model = joblib.load(sys.argv[1])
print(json.dumps({"pixels": X.tolist(), "predicted": model.predict(X).tolist(),
                  "sklearn": sklearn.__version__, "python": list(sys.version_info[:2])}))
"""


class Podman:
    """`podman …` with this machine's configuration; failures show podman's own words."""

    def __init__(self, workdir: Path) -> None:
        if shutil.which("podman") is None:
            raise RuntimeError("podman is not installed; run `scripts/install-system-deps container` (as root)")
        conf = workdir / "containers.conf"
        conf.write_text(CONTAINERS_CONF)
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}
        self.env = {k: v for k, v in self.env.items() if not k.startswith("MLSERVER")}

    def __call__(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
        return proc

    def logs(self, name: str) -> str:
        proc = self("logs", name, check=False)
        return proc.stdout + proc.stderr

    def inspect(self, name: str, kind: str = "container") -> dict[str, object]:
        data = json.loads(self(kind, "inspect", name).stdout)
        return data[0] if isinstance(data, list) else data  # type: ignore[no-any-return]

    def remove(self, *names: str) -> None:
        if names:
            self("rm", "--force", "--volumes", "--time", "0", *names, check=False)

    def wait_ready(self, name: str, url: str, timeout: float = 240) -> float:
        """Seconds until `url`/v2/health/ready answers 200; fails with the logs if the container ends."""
        t0 = time.monotonic()
        while True:
            try:
                if requests.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except requests.RequestException:
                pass
            state = self("inspect", "--format", "{{.State.Status}}", name, check=False).stdout.strip()
            if state not in ("created", "running", "configured", "initialized"):
                raise AssertionError(f"container {name} is {state or 'gone'}:\n{self.logs(name)[-4000:]}")
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"{name} not ready after {timeout} s:\n{self.logs(name)[-4000:]}")
            time.sleep(0.3)

    def stop(self, name: str) -> tuple[float, subprocess.CompletedProcess[str]]:
        """`podman stop` with the default 10 s timeout: seconds from the stop to the container's exit
        (its FinishedAt: podman's own bookkeeping after the exit does not count), and its output.
        podman says "resorting to SIGKILL" in that output when its timeout ran out."""
        t0 = time.time_ns()
        proc = self("stop", "--time", str(int(STOP_LIMIT)), name, timeout=120)
        finished = int(self("inspect", "--format", "{{.State.FinishedAt.UnixNano}}", name).stdout)
        return (finished - t0) / 1e9, proc


def build_image(podman: Podman, tag: str = IMAGE) -> tuple[float, str]:
    """Build the Dockerfile from the local base; (seconds, base image name)."""
    base = subprocess.run(
        [str(REPO / "scripts" / "container-base")],
        env=podman.env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if base.returncode != 0:
        raise AssertionError(f"scripts/container-base failed:\n{base.stderr[-4000:]}")
    base_image = base.stdout.strip().splitlines()[-1]
    mounts: list[str] = []
    for f in HOST_PIP_FILES:
        if Path(f).is_file():
            mounts += ["-v", f"{f}:{f}:ro"]
    previous = podman("image", "inspect", "--format", "{{.Id}}", tag, check=False).stdout.strip()
    revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False)
    t0 = time.monotonic()
    podman(
        "build", "--format", "docker", "--network", "host", *mounts,
        "--build-arg", f"BASE_IMAGE={base_image}",
        "--build-arg", f"REVISION={revision.stdout.strip() or 'unknown'}",
        "--tag", tag, str(REPO),
        timeout=1800,
    )  # fmt: skip
    took = time.monotonic() - t0
    if previous and podman("image", "inspect", "--format", "{{.Id}}", tag).stdout.strip() != previous:
        podman("rmi", previous, check=False)  # the last run's image, now untagged: do not pile them up
    return took, base_image


def run_detached(podman: Podman, name: str, args: Sequence[str], command: Sequence[str] = ()) -> None:
    podman("run", "--detach", "--name", name, *args, IMAGE, *command)


def readable_for_anyone(folder: Path) -> Path:
    """Containers run as uid 1000 or any uid: the bind-mounted folder must be readable to them."""
    folder.chmod(0o755)
    for f in folder.iterdir():
        f.chmod(0o644)
    return folder


def log_line(text: str, start: str) -> str:
    """The last entrypoint log line starting with `mlserver-entrypoint: <start>`."""
    lines = [line for line in text.splitlines() if line.startswith(f"mlserver-entrypoint: {start}")]
    assert lines, f"no `{start}` line in:\n{text[-3000:]}"
    return lines[-1]
