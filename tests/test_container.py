"""The image, really built and run with podman (issue 4); marker `container` (`make test-marked`).

The image is built from the Dockerfile on a local Debian base (scripts/container-base), then
serves the seed example exactly as the README's `docker run` does, and the compose stack comes
up from docker-compose.yml. Timings (build, cold and warm start, stop) are printed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import v2grpc
import yaml
from conftest import Example, _build
from containers import DIGITS, IMAGE, STOP_LIMIT, Podman, build_image, log_line, readable_for_anyone, run_detached
from support import REPO, free_port, infer

pytestmark = pytest.mark.container
TARBALL_IN_CONTAINER = "/mnt/models/old-sklearn.tar.gz"


def report(message: str) -> None:
    sys.stderr.write(f"\n[container] {message}\n")


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    try:
        return Podman(tmp_path_factory.mktemp("podman"))
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def image(podman: Podman) -> str:
    took, base = build_image(podman)
    report(f"image {IMAGE} built from {base} in {took:.0f} s")
    return IMAGE


@pytest.fixture
def names(podman: Podman) -> Iterator[list[str]]:
    """What a test creates (`ctr:NAME`, `vol:NAME`, `kube:MANIFEST`), removed afterwards."""
    made: list[str] = []
    yield made
    for n in made:
        if n.startswith("kube:"):
            podman("kube", "down", n[5:], check=False, timeout=120)
    podman.remove(*[n[4:] for n in made if n.startswith("ctr:")])
    for n in made:
        if n.startswith("vol:"):
            podman("volume", "rm", "--force", n[4:], check=False)


def _name(names: list[str], kind: str, what: str) -> str:
    name = f"mlenv-test-{os.getpid()}-{what}"
    names.append(f"{kind}:{name}")
    return name


@pytest.fixture(scope="module")
def models(seed: Example) -> Path:
    return readable_for_anyone(seed.models_dir)


def _predict_in_container(podman: Podman, mounts: list[str], model: str) -> dict[str, object]:
    """DIGITS run with `IMAGE python`: inside the environment when the tarball is set."""
    proc = podman("run", "--rm", *mounts, IMAGE, "python", "-c", DIGITS, model)
    expected = json.loads(proc.stdout)
    assert isinstance(expected, dict)
    return expected


def test_image_metadata(podman: Podman, image: str) -> None:
    info = podman.inspect(image, "image")
    config = info["Config"]
    assert isinstance(config, dict)
    assert config["User"] == "1000:0"
    assert config["Entrypoint"] == ["/opt/mlserver/bin/python", "-I", "-m", "entrypoint"]
    assert config["Cmd"] == ["mlserver", "start", "/mnt/models"]
    assert set(config["ExposedPorts"]) == {"8080/tcp", "8081/tcp", "8082/tcp"}
    assert "/opt/envs" in config["Volumes"]
    assert "MLSERVER_ENV_CACHE_DIR=/opt/envs" in config["Env"]
    assert "/v2/health/ready" in " ".join(info["Healthcheck"]["Test"])  # type: ignore[index]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.title"] == "mlserver-env-entrypoint"
    assert labels["org.opencontainers.image.base.name"].startswith("localhost/")
    # `IMAGE bash` and `IMAGE mlserver --version` work as users expect, without a tarball too.
    out = podman("run", "--rm", image, "bash", "-c", "id -u; id -g; echo $0").stdout.split()
    assert out[:2] == ["1000", "0"] and out[2].endswith("/bash")
    version = podman("run", "--rm", image, "mlserver", "--version")
    assert "1.7.1" in version.stdout
    # A login shell keeps what the entrypoint put on PATH (Debian's /etc/profile resets it).
    login = podman("run", "--rm", image, "bash", "-lc", "command -v mlserver")
    assert login.stdout.strip() == "/opt/mlserver/bin/mlserver", login.stdout + login.stderr
    # tar.bz2 environments are decoded by lbzip2, which the image has.
    assert podman("run", "--rm", image, "lbzip2", "--version").returncode == 0


def seed_mounts(podman: Podman, names: list[str], models: Path, cache: str) -> list[str]:
    """The README's `docker run` options: the models folder read-only, a cache volume of its own,
    MLSERVER_ENV_TARBALL set."""
    volume = _name(names, "vol", cache)
    podman("volume", "create", volume)
    return [
        "-v",
        f"{models}:/mnt/models:ro",
        "-v",
        f"{volume}:/opt/envs",
        "-e",
        f"MLSERVER_ENV_TARBALL={TARBALL_IN_CONTAINER}",
    ]


def test_seed_flow_serves_the_right_digits_on_http_and_grpc_and_stops_in_time(
    podman: Podman, image: str, models: Path, names: list[str]
) -> None:
    """The README's `docker run`: the folder mounted, MLSERVER_ENV_TARBALL set, ports 8080 and 8081
    published. One container answers both protocols: a second cold start would only cost time."""
    mounts = seed_mounts(podman, names, models, "seed-envs")
    ctr = _name(names, "ctr", "seed")
    port, grpc_port = free_port(), free_port()
    run_detached(podman, ctr, [*mounts, "-p", f"127.0.0.1:{port}:8080", "-p", f"127.0.0.1:{grpc_port}:8081"])
    url = f"http://127.0.0.1:{port}"
    took = podman.wait_ready(ctr, url)
    logs = podman.logs(ctr)
    assert "extract:" in logs
    assert "/opt/envs/" in log_line(logs, "run: ") and "as the child of this init (pid 1" in logs
    work = log_line(logs, "run: ").rsplit("(entrypoint work ", 1)[1].rstrip(")")
    report(f"seed cold start (unpack included): ready {took:.1f} s after `podman run`, entrypoint work {work}")

    # The environment's own python says what the model predicts (scikit-learn 0.24.2, Python 3.8).
    expected = _predict_in_container(podman, mounts, "/mnt/models/model.joblib")
    assert expected["sklearn"] == "0.24.2" and expected["python"] == [3, 8]
    pixels, predicted = expected["pixels"], expected["predicted"]
    assert isinstance(pixels, list) and isinstance(predicted, list)
    got = [infer(url, "mnist-svm", p) for p in pixels]
    assert got == predicted and len(set(got)) > 3
    # The same images over V2 gRPC (ModelInfer), after ServerReady and ModelReady.
    t0 = time.monotonic()
    assert v2grpc.digits(f"127.0.0.1:{grpc_port}", "mnist-svm", pixels) == predicted
    report(f"gRPC: ServerReady, ModelReady and {len(pixels)} ModelInfer calls in {time.monotonic() - t0:.2f} s")

    assert podman("healthcheck", "run", ctr, check=False).returncode == 0  # the image's HEALTHCHECK
    user = podman("top", ctr, "user", "args").stdout
    assert "root" not in user and "mlserver start" in user
    _stops_in_time(podman, ctr)


def _stops_in_time(podman: Podman, ctr: str) -> None:
    """`podman stop` ends the seed server before podman's own SIGKILL, with mlserver's shutdown."""
    stop_took, stop = podman.stop(ctr)
    logs = podman.logs(ctr)
    assert stop_took < STOP_LIMIT, logs[-3000:]
    assert "resorting to SIGKILL" not in stop.stderr
    assert "SIGTERM forwarded" in logs
    assert "Waiting for application shutdown" in logs or "Shutting down" in logs  # mlserver's own shutdown
    status = podman.inspect(ctr)["State"]["ExitCode"]  # type: ignore[index]
    how = "killed after MLSERVER_ENV_STOP_GRACE" if "SIGKILL to its process group" in logs else "mlserver exited"
    report(f"seed server stopped {stop_took:.1f} s after `podman stop` ({how}), exit status {status}")


def test_restart_with_the_same_cache_volume_is_a_cache_hit(
    podman: Podman, image: str, models: Path, names: list[str]
) -> None:
    mounts = seed_mounts(podman, names, models, "restart-envs")
    times = []
    for run in ("cold", "warm"):
        ctr = _name(names, "ctr", f"restart-{run}")
        port = free_port()
        run_detached(podman, ctr, [*mounts, "-p", f"127.0.0.1:{port}:8080"])
        took = podman.wait_ready(ctr, f"http://127.0.0.1:{port}")
        logs = podman.logs(ctr)
        work = log_line(logs, "run: ").rsplit("(entrypoint work ", 1)[1].rstrip(")")
        times.append((run, took, work))
        assert infer(f"http://127.0.0.1:{port}", "mnist-svm", [0.0] * 64) in range(10)
        podman.remove(ctr)
        # What each start did, from its own log: deterministic, unlike one ready time against
        # another (mlserver's own start dominates both and varies with the machine's load).
        if run == "cold":
            assert "extract:" in logs and "cache hit" not in logs, logs[-3000:]
        else:  # the second start found the volume's entry and extracted nothing
            assert "cache hit" in logs and "extract:" not in logs, logs[-3000:]
    for run, took, work in times:
        report(f"{run} start: ready {took:.1f} s after `podman run`, entrypoint work {work}")


def test_mlserver_version_is_the_environments(podman: Podman, image: str, models: Path) -> None:
    proc = podman(
        "run", "--rm", "-v", f"{models}:/mnt/models:ro", "-e", f"MLSERVER_ENV_TARBALL={TARBALL_IN_CONTAINER}",
        "--tmpfs", "/opt/envs:rw,exec,mode=1777", image, "mlserver", "--version",
    )  # fmt: skip
    assert "1.1.0" in proc.stdout, proc.stdout + proc.stderr


def test_arbitrary_uid_read_only_root_tmpfs_cache(podman: Podman, image: str, models: Path, names: list[str]) -> None:
    """As OpenShift runs it: any uid in group 0; read-only root filesystem, the cache on a tmpfs."""
    ctr = _name(names, "ctr", "ro")
    port = free_port()
    args = [
        "--user", "123456:0", "--read-only", "--read-only-tmpfs=false",  # as strict as Docker's --read-only
        "--tmpfs", "/tmp:rw,mode=1777", "--tmpfs", "/opt/envs:rw,exec,mode=1777",
        "-v", f"{models}:/mnt/models:ro", "-e", f"MLSERVER_ENV_TARBALL={TARBALL_IN_CONTAINER}",
        "-p", f"127.0.0.1:{port}:8080",
    ]  # fmt: skip
    run_detached(podman, ctr, args)
    url = f"http://127.0.0.1:{port}"
    podman.wait_ready(ctr, url)
    assert infer(url, "mnist-svm", [0.0] * 64) in range(10)
    ids = podman("exec", ctr, "sh", "-c", "id -u; id -g; touch /opt/x 2>&1 || echo read-only").stdout
    assert ids.split()[:2] == ["123456", "0"] and "read-only" in ids.lower()


def test_init_container_unpack_then_warm_server_as_another_uid(
    podman: Podman, image: str, models: Path, names: list[str]
) -> None:
    """deploy/kubernetes/serve-warm.yaml's flow with two containers on one volume: `IMAGE unpack`,
    then the server finds a warm cache. A new named volume takes /opt/envs' owner and mode from
    the image (1000:0, group-writable), so another uid in group 0 can fill it."""
    volume = _name(names, "vol", "warm-envs")
    podman("volume", "create", volume)
    args = [
        "--user", "4242:0", "--read-only", "-v", f"{models}:/mnt/models:ro", "-v", f"{volume}:/opt/envs",
        "-e", f"MLSERVER_ENV_TARBALL={TARBALL_IN_CONTAINER}",
    ]  # fmt: skip
    unpack = podman("run", "--rm", *args, image, "unpack")
    prefix = unpack.stdout.strip().splitlines()[-1]
    assert prefix.startswith("/opt/envs/") and "extract:" in unpack.stderr, unpack.stderr
    ctr = _name(names, "ctr", "warm")
    port = free_port()
    run_detached(podman, ctr, [*args, "-p", f"127.0.0.1:{port}:8080"])
    took = podman.wait_ready(ctr, f"http://127.0.0.1:{port}")
    logs = podman.logs(ctr)
    assert "cache hit" in logs and "extract:" not in logs and f"run: {prefix}/bin/mlserver" in logs
    assert infer(f"http://127.0.0.1:{port}", "mnist-svm", [0.0] * 64) in range(10)
    report(f"after an init container's unpack, the server (uid 4242) was ready in {took:.1f} s")


def test_http_url_tarball_works_in_the_image_as_it_is(
    podman: Podman, image: str, models: Path, names: list[str]
) -> None:
    """MLSERVER_ENV_TARBALL=http(s)://… needs nothing added to the image (fsspec; aiohttp comes with
    MLServer); the second start knows the object by its Last-Modified and size, without a download.
    s3:// needs s3fs, which the image leaves out: one line saying so."""
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            "--directory",
            str(models),
            str(port := free_port()),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        volume = _name(names, "vol", "url-envs")
        podman("volume", "create", volume)
        args = [
            "--network", "host", "-v", f"{models}:/mnt/models:ro", "-v", f"{volume}:/opt/envs",
            "-e", f"MLSERVER_ENV_TARBALL=http://127.0.0.1:{port}/old-sklearn.tar.gz",
        ]  # fmt: skip
        unpack = podman("run", "--rm", *args, image, "unpack", check=False)
        assert unpack.returncode == 0 and "extract:" in unpack.stderr, unpack.stderr
        expected = _predict_in_container(podman, args, "/mnt/models/model.joblib")
        assert expected["sklearn"] == "0.24.2" and expected["python"] == [3, 8]
    finally:
        server.terminate()
        requests_seen = server.communicate(timeout=30)[1]
    assert requests_seen.count('"GET /old-sklearn.tar.gz') == 1, requests_seen  # the second start read no byte

    s3 = podman("run", "--rm", "-e", "MLSERVER_ENV_TARBALL=s3://envs/old-sklearn.tar.gz", image, "unpack", check=False)
    lines = [line for line in s3.stderr.splitlines() if not line.startswith("time=")]  # podman's own lines
    assert s3.returncode == 2 and len(lines) == 1 and "s3fs" in lines[0], s3.stderr


def test_kubernetes_manifest_runs_under_podman_kube_play(
    podman: Podman, image: str, models: Path, names: list[str], tmp_path: Path
) -> None:
    """deploy/kubernetes/serve.yaml as `podman kube play` runs it: runAsUser 1000, read-only root,
    emptyDir cache, the models claim as a named volume. Renamed for the test, and on free ports
    (kube play publishes container ports on the host). podman 4.3 restarts initContainers
    forever, so serve-warm.yaml's flow is the test above instead."""
    docs = [d for d in yaml.safe_load_all((REPO / "deploy" / "kubernetes" / "serve.yaml").read_text()) if d]
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    name = _name(names, "pod", "kube")
    dep["metadata"]["name"] = name
    pod = dep["spec"]["template"]["spec"]
    claim = _name(names, "vol", "kube-models")
    (models_volume,) = [v for v in pod["volumes"] if v["name"] == "models"]
    models_volume["persistentVolumeClaim"]["claimName"] = claim
    (server,) = pod["containers"]
    server["image"] = image
    ports = {p["name"]: free_port() for p in server["ports"]}
    for p in server["ports"]:
        p["containerPort"] = ports[p["name"]]
    server["env"] += [
        {"name": "MLSERVER_HTTP_PORT", "value": str(ports["http"])},
        {"name": "MLSERVER_GRPC_PORT", "value": str(ports["grpc"])},
        {"name": "MLSERVER_METRICS_PORT", "value": str(ports["metrics"])},
    ]
    manifest = tmp_path / "serve.yaml"
    manifest.write_text(yaml.safe_dump(dep))
    names.append(f"kube:{manifest}")

    podman("volume", "create", claim)
    mountpoint = Path(podman("volume", "inspect", "--format", "{{.Mountpoint}}", claim).stdout.strip())
    for f in models.iterdir():
        shutil.copy2(f, mountpoint / f.name)
    mountpoint.chmod(0o755)
    podman("kube", "play", str(manifest), timeout=600)
    ctr = f"{name}-pod-0-mlserver"
    names.extend(f"vol:{m['Name']}" for m in podman.inspect(ctr)["Mounts"] if m.get("Name"))  # type: ignore[union-attr]
    url = f"http://127.0.0.1:{ports['http']}"
    took = podman.wait_ready(ctr, url)
    assert infer(url, "mnist-svm", [0.0] * 64) in range(10)
    check = podman("exec", ctr, "sh", "-c", "id -u; touch /x 2>&1 || true; touch /opt/envs/x && echo writable").stdout
    assert check.split()[0] == "1000" and "Read-only file system" in check and "writable" in check
    report(f"kube play of deploy/kubernetes/serve.yaml: ready in {took:.1f} s")


def test_no_tarball_serves_with_the_images_own_mlserver(
    podman: Podman, image: str, tmp_path: Path, names: list[str]
) -> None:
    """Without MLSERVER_ENV_TARBALL (and no environment.tar.gz) the image's MLServer serves a
    model trained with the image's own scikit-learn, with the read-only root filesystem of docs/deployment.md
    (MLServer 1.7 creates its environments folder at start, ./.envs unless the image moves it)."""
    folder = tmp_path / "models"
    folder.mkdir()
    folder.chmod(0o777)  # the container's uid 1000 writes the model here
    (folder / "model-settings.json").write_text(
        json.dumps({"name": "digits-image", "implementation": "mlserver_sklearn.SKLearnModel"})
    )
    train = REPO / "examples" / "seed" / "train.py"
    mounts = ["-v", f"{folder}:/mnt/models", "-v", f"{train}:/opt/train.py:ro"]
    podman("run", "--rm", *mounts, image, "python", "/opt/train.py", "/mnt/models/model.joblib")
    expected = _predict_in_container(podman, mounts, "/mnt/models/model.joblib")
    assert expected["python"] == [3, 11] and expected["sklearn"] != "0.24.2"

    ctr = _name(names, "ctr", "own")
    port = free_port()
    read_only = ["--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp:rw,mode=1777"]  # Docker's --read-only
    run_detached(podman, ctr, [*read_only, "-v", f"{folder}:/mnt/models:ro", "-p", f"127.0.0.1:{port}:8080"])
    url = f"http://127.0.0.1:{port}"
    took = podman.wait_ready(ctr, url)
    pixels, predicted = expected["pixels"], expected["predicted"]
    assert isinstance(pixels, list)
    assert [infer(url, "digits-image", p) for p in pixels] == predicted
    logs = podman.logs(ctr)
    assert "no environment tarball configured" in logs and "/opt/mlserver/bin/mlserver start" in logs
    stop_took, stop = podman.stop(ctr)
    assert stop_took < STOP_LIMIT and "resorting to SIGKILL" not in stop.stderr, stop.stderr + podman.logs(ctr)[-3000:]
    report(
        f"image's own MLServer (scikit-learn {expected['sklearn']}): ready in {took:.1f} s, "
        f"stopped in {stop_took:.1f} s"
    )


def _compose(project: str, env: dict[str, str]) -> Callable[..., subprocess.CompletedProcess[str]]:
    """podman-compose on docker-compose.yml as `project`; a failing command fails with its output."""
    compose = [sys.executable, "-m", "podman_compose", "--project-name", project]
    compose += ["--file", str(REPO / "docker-compose.yml")]

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*compose, *args], env=env, capture_output=True, text=True, timeout=300, check=False)
        output = f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        assert proc.returncode == 0 or not check, f"podman-compose {' '.join(args)}:\n{output}"
        return proc

    return run


def test_compose_stack_comes_up_healthy_and_answers(podman: Podman, image: str, models: Path, names: list[str]) -> None:
    """docker-compose.yml as it is: healthy, answering on both published ports (HTTP and gRPC),
    and a cache hit after `restart`."""
    project = f"mlenvtest{os.getpid()}"
    port, grpc_port = free_port(), free_port()
    env = {
        **podman.env,
        "MLSERVER_ENV_IMAGE": image,  # built already: compose uses it rather than building again
        "MODELS_DIR": str(models),
        "HOST_HTTP_PORT": str(port),
        "HOST_GRPC_PORT": str(grpc_port),
    }
    run = _compose(project, env)
    try:
        run("up", "--detach")
        ctr = podman(
            "ps", "--all", "--filter", f"label=io.podman.compose.project={project}", "--format", "{{.Names}}"
        ).stdout.split()[0]
        url = f"http://127.0.0.1:{port}"
        took = podman.wait_ready(ctr, url)
        # No systemd here to run the healthcheck on its timer: run it the way the timer would.
        assert podman("healthcheck", "run", ctr, check=False).returncode == 0
        assert podman("inspect", "--format", "{{.State.Health.Status}}", ctr).stdout.strip() == "healthy"
        assert infer(url, "mnist-svm", [0.0] * 64) in range(10)
        assert v2grpc.digits(f"127.0.0.1:{grpc_port}", "mnist-svm", [[0.0] * 64])[0] in range(10)
        assert "extract:" in podman.logs(ctr)

        run("restart")
        restarted = podman.wait_ready(ctr, url)
        last_start = podman.logs(ctr).rsplit("mlserver-entrypoint: locate", 1)[1]
        assert "cache hit" in last_start and "extract:" not in last_start
        report(f"compose stack: healthy in {took:.1f} s; after `restart` (cache hit) ready in {restarted:.1f} s")
    finally:
        run("down", "--volumes", check=False)


PER_MODEL = REPO / "examples" / "per-model"
PER_MODEL_PYTHON = {"digits-sklearn-1.2": "3.10", "digits-sklearn-1.5": "3.11"}


@pytest.fixture(scope="module")
def per_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/per-model/models with each model's environment built offline and its model trained
    by that environment's interpreter: Python 3.10 with scikit-learn 1.2, Python 3.11 with 1.5,
    each with the image's mlserver."""
    root = tmp_path_factory.mktemp("per-model") / "models"
    for name, python in PER_MODEL_PYTHON.items():
        built = tmp_path_factory.mktemp(name)
        requirements = PER_MODEL / f"{name.removeprefix('digits-')}.txt"
        tarball = _build(built, "--python", python, "--requirements", str(requirements))
        shutil.copytree(PER_MODEL / "models" / name, root / name)
        shutil.copy(tarball, root / name / "environment.tar.gz")
        shutil.copy(built / "model.joblib", root / name)
        readable_for_anyone(root / name)
    root.chmod(0o755)
    return root


def _serve_per_model(podman: Podman, names: list[str], mounts: list[str], run: str) -> tuple[str, str]:
    """A server of the per-model folder with the read-only root of docs/deployment.md; its URL."""
    ctr = _name(names, "ctr", f"per-model-{run}")
    port = free_port()
    read_only = ["--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp:rw,mode=1777"]
    run_detached(podman, ctr, [*read_only, *mounts, "-p", f"127.0.0.1:{port}:8080"])
    url = f"http://127.0.0.1:{port}"
    took = podman.wait_ready(ctr, url, timeout=600)
    report(f"per-model {run} start: ready {took:.1f} s after `podman run`")
    return ctr, url


def test_two_models_each_served_from_its_own_environment(
    podman: Podman, image: str, per_model: Path, names: list[str]
) -> None:
    """Each model answers with the predictions its own environment's interpreter makes, its
    workers run that interpreter, the models folder is read-only, and a restart unpacks nothing."""
    volume = _name(names, "vol", "per-model-envs")
    podman("volume", "create", volume)
    mounts = ["-v", f"{per_model}:/mnt/models:ro", "-v", f"{volume}:/opt/envs"]
    ctr, url = _serve_per_model(podman, names, mounts, "cold")
    logs = podman.logs(ctr)
    extracted = [x for x in logs.splitlines() if x.startswith("mlserver-entrypoint: extract:") and "files" in x]
    assert len(extracted) == 2 and "models with an environment of their own" in logs, logs[-3000:]
    prefixes = podman("run", "--rm", *mounts, IMAGE, "unpack").stdout.split()  # in find order: 1.2, 1.5
    assert len(prefixes) == 2, prefixes
    workers = podman("top", ctr, "args").stdout
    for (name, python), prefix in zip(PER_MODEL_PYTHON.items(), prefixes, strict=True):
        model = f"/mnt/models/{name}/model.joblib"
        expected = json.loads(podman("run", "--rm", *mounts, IMAGE, f"{prefix}/bin/python", "-c", DIGITS, model).stdout)
        assert expected["python"] == [int(p) for p in python.split(".")]
        assert expected["sklearn"].startswith(name.removeprefix("digits-sklearn-") + ".")
        assert [infer(url, name, p) for p in expected["pixels"]] == expected["predicted"]
        assert f"{prefix}/bin/python" in workers, workers  # the model's workers run its interpreter
    podman.remove(ctr)

    ctr, url = _serve_per_model(podman, names, mounts, "warm")
    logs = podman.logs(ctr)
    assert "cache hit" in logs and "extract:" not in logs, logs[-3000:]
    assert all(infer(url, name, [0.0] * 64) in range(10) for name in PER_MODEL_PYTHON)
