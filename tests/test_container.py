"""The container image and the Compose CPU stack, built and run for real on a Docker engine.

``make test-container`` runs this module (``make test`` does not: it builds a multi-GB image).
It builds the image from this checkout, runs it, waits for Docker's own health check to report
healthy, classifies the 600-image fixture sample through the published port and compares the
logits with the offline TorchScript logits, checks that the health check follows a non-default
``--port``, that ``docker stop`` ends in exit code 0, and runs the Compose CPU stack up and then
down with the README's own teardown command.

Environment (the Makefile sets them):

* ``CIFAR_SERVE_TEST_CONTAINER=1`` turns the module on;
* ``CIFAR_SERVE_TEST_PYTHON_IMAGE``: the base image (build argument PYTHON_IMAGE; default
  ``python:3.11-slim-bookworm``, pulled if absent). Where Docker Hub is unreachable,
  ``../shared/tools/make-python-base-image.sh`` builds a stand-in under that name;
* ``CIFAR_SERVE_TEST_TORCH_VARIANT``: the build argument TORCH_VARIANT (default ``cuda``: PyPI's
  wheels, reachable wherever PyPI is; ``cpu`` needs download.pytorch.org).

Without a Docker engine (none answers and ``dockerd`` cannot be started here) it skips, saying why.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
ATOL = 1e-4
HEALTHY_WITHIN_S = 300.0  # a bound for a stuck start, not a performance figure
TOKEN = "container-test-token"

pytestmark = pytest.mark.skipif(
    os.environ.get("CIFAR_SERVE_TEST_CONTAINER") != "1",
    reason="builds and runs the Docker image: run it with `make test-container`",
)


def _docker(
    *args: str, timeout: float = 300, check: bool = True, **kw: Any
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, **kw)
    if check:
        assert proc.returncode == 0, f"docker {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}"
    return proc


def _engine_answers() -> bool:
    try:
        return _docker("info", timeout=60, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A Docker engine: the one that answers, or a ``dockerd`` started here (as root) and stopped after."""
    if shutil.which("docker") is None:
        pytest.skip("no docker CLI on PATH")
    if _engine_answers():
        yield
        return
    dockerd = shutil.which("dockerd")
    if dockerd is None or os.geteuid() != 0:
        pytest.skip("no Docker engine answers, and none can be started here (needs dockerd and root)")
    log_path = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
    with log_path.open("w") as log:
        daemon = subprocess.Popen([dockerd], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        # dockerd has no readiness signal but its API answering: ask until it does.
        while not _engine_answers():
            if daemon.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"dockerd could not be started:\n{log_path.read_text()[-2000:]}")
            time.sleep(1)
        yield
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)


@dataclass(frozen=True)
class Image:
    tag: str
    build_log: str


@pytest.fixture(scope="module")
def image(engine: None) -> Image:
    base = os.environ.get("CIFAR_SERVE_TEST_PYTHON_IMAGE", "python:3.11-slim-bookworm")
    variant = os.environ.get("CIFAR_SERVE_TEST_TORCH_VARIANT", "cuda")
    if _docker("image", "inspect", base, check=False).returncode != 0:
        pulled = _docker("pull", base, timeout=600, check=False)
        if pulled.returncode != 0:
            pytest.skip(
                f"base image {base} is not present and cannot be pulled ({pulled.stderr.strip()}); "
                "build a stand-in with ../shared/tools/make-python-base-image.sh or set "
                "CIFAR_SERVE_TEST_PYTHON_IMAGE"
            )
    tag = f"cifar-serve:test-{variant}"
    build = _docker(
        "build",
        "--build-arg", f"PYTHON_IMAGE={base}",
        "--build-arg", f"TORCH_VARIANT={variant}",
        "--tag", tag,
        str(REPO),
        timeout=3600,
        check=False,
    )  # fmt: skip
    assert build.returncode == 0, f"docker build failed:\n{build.stdout[-4000:]}\n{build.stderr[-4000:]}"
    return Image(tag, build.stdout + build.stderr)


# --------------------------------------------------------------------------------------------- helpers


@dataclass
class Container:
    id: str
    since: str  # when it was started, for `docker events --since`

    def inspect(self, template: str) -> str:
        return _docker("inspect", "--format", template, self.id).stdout.strip()

    def host_port(self, container_port: int) -> tuple[str, int]:
        out = _docker("port", self.id, f"{container_port}/tcp").stdout.split()[0]
        host, _, port = out.rpartition(":")
        return host, int(port)

    def logs(self) -> str:
        proc = _docker("logs", self.id, check=False)
        return proc.stdout + proc.stderr


def _run_container(image: Image, *args: str, publish: int, also: tuple[int, ...] = ()) -> Container:
    since = str(int(time.time()) - 1)
    ports = [a for port in (publish, *also) for a in ("--publish", f"127.0.0.1::{port}")]
    cid = _docker(
        "run", "--detach", "--name", f"cifar-serve-test-{uuid.uuid4().hex[:8]}",
        *ports, image.tag, *args,
    ).stdout.strip()  # fmt: skip
    return Container(cid, since)


def _http_status(url: str, token: str | None = None) -> int:
    """The HTTP status of a GET of ``url`` (the v2 REST API)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _remove(container: Container) -> None:
    _docker("rm", "--force", "--volumes", container.id, check=False)


def _wait_healthy(container: Container) -> None:
    """Block on Docker's own health events for the container until it reports healthy."""
    events = subprocess.Popen(
        ["docker", "events", "--since", container.since, "--filter", f"container={container.id}",
         "--format", "{{.Status}}"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    timer = threading.Timer(HEALTHY_WITHIN_S, events.kill)
    timer.start()
    seen = []
    try:
        assert events.stdout is not None
        for line in events.stdout:
            status = line.strip()
            seen.append(status)
            if status == "health_status: healthy":
                return
            if status in ("health_status: unhealthy", "die"):
                break
    finally:
        timer.cancel()
        events.kill()
        events.wait()
    health = container.inspect("{{json .State.Health}}")
    pytest.fail(f"not healthy (events {seen}); health: {health}\nlogs:\n{container.logs()[-3000:]}")


def _classify_all(address: str, images: np.ndarray, token: str | None = None) -> np.ndarray:
    from cifar_serve.client import Client

    with Client(address, timeout=120, token=token) as client:
        results = client.classify(images, include_logits=True)
    assert len(results) == len(images)
    return np.stack([r.logits for r in results])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------------------------- tests


def test_image_is_built_as_documented(image: Image) -> None:
    # useradd's "uid 10001 outside of the SYS_UID_MIN 100 and SYS_UID_MAX 999 range" warning.
    assert "SYS_UID_MAX" not in image.build_log
    config = _docker("image", "inspect", "--format", "{{json .Config}}", image.tag).stdout
    assert '"User":"app:app"' in config
    assert '"StopSignal":"SIGTERM"' in config
    assert '"/app/deploy/healthcheck.py"' in config
    # The user is a regular account whose uid lies in the image's own UID_MIN..UID_MAX, so useradd
    # had nothing to warn about even where the build log above came from the layer cache.
    script = "id -u; grep -E '^UID_(MIN|MAX)\\s' /etc/login.defs"
    out = _docker("run", "--rm", "--entrypoint", "sh", image.tag, "-c", script).stdout.split()
    uid, limits = int(out[0]), dict(zip(out[1::2], map(int, out[2::2]), strict=True))
    assert uid == 10001
    assert limits["UID_MIN"] <= uid <= limits["UID_MAX"], limits


def test_container_serves_the_sample_and_stops_with_exit_0(
    image: Image, sample: Any, offline_logits: Any
) -> None:
    container = _run_container(image, publish=50051, also=(8000,))
    try:
        _wait_healthy(container)
        host, port = container.host_port(50051)
        assert host == "127.0.0.1"
        # The v2 HTTP/REST API listens on all interfaces in the container too (EXPOSE 8000).
        rest_host, rest_port = container.host_port(8000)
        assert _http_status(f"http://{rest_host}:{rest_port}/v2/health/ready") == 200, container.logs()
        assert _http_status(f"http://{rest_host}:{rest_port}/v2/models/cifar10_resnet18") == 200
        logits = _classify_all(f"{host}:{port}", sample.images)
        np.testing.assert_allclose(logits, offline_logits, atol=ATOL, rtol=0)
        assert (logits.argmax(1) == offline_logits.argmax(1)).all()
        # `docker stop` without -t: SIGTERM, then SIGKILL after Docker's default 10 s.
        stopped = _docker("stop", container.id, timeout=120)
        assert stopped.returncode == 0
        assert container.inspect("{{.State.ExitCode}} {{.State.OOMKilled}}") == "0 false", container.logs()
        assert "shutting down" in container.logs()
    finally:
        _remove(container)


def test_health_check_follows_a_non_default_port(image: Image, sample: Any, offline_logits: Any) -> None:
    # Only the flag says 50061: the image's environment still says CIFAR_SERVE_PORT is unset (50051).
    container = _run_container(image, "--port", "50061", publish=50061)
    try:
        _wait_healthy(container)
        assert container.inspect("{{.State.Health.Status}}") == "healthy"
        checks = json.loads(container.inspect("{{json .State.Health.Log}}"))
        assert checks[-1]["ExitCode"] == 0 and "127.0.0.1:50061: SERVING" in checks[-1]["Output"], checks
        host, port = container.host_port(50061)
        logits = _classify_all(f"{host}:{port}", sample.images[:64])
        np.testing.assert_allclose(logits, offline_logits[:64], atol=ATOL, rtol=0)
        _docker("stop", container.id, timeout=120)
        assert container.inspect("{{.State.ExitCode}}") == "0", container.logs()
    finally:
        _remove(container)


def _readme_teardown() -> str:
    deployment = README[README.index("## Deployment") :]
    found = re.findall(r"^(docker compose [^#\n]*\bdown\b[^#\n]*?)\s*(?:#.*)?$", deployment, flags=re.M)
    assert found, "README's Deployment section has no `docker compose ... down` teardown"
    return str(found[0])


def test_compose_cpu_stack_up_and_down(image: Image, sample: Any, offline_logits: Any) -> None:
    from cifar_serve.client import UnauthenticatedError

    if _docker("compose", "version", check=False).returncode != 0:
        pytest.skip("the Docker Compose v2 plugin is missing (`docker compose version` fails)")
    project = f"cifar-serve-test-{uuid.uuid4().hex[:8]}"
    grpc_port, http_port, metrics_port = _free_port(), _free_port(), _free_port()
    env = {
        **os.environ,
        "COMPOSE_PROJECT_NAME": project,  # never the user's own `cifar-serve` stack
        "CPU_IMAGE": image.tag,  # the image built above, whatever torch variant it holds
        "GRPC_PORT": str(grpc_port),
        "HTTP_PORT": str(http_port),
        "METRICS_PORT": str(metrics_port),
        "CIFAR_SERVE_AUTH_TOKEN": TOKEN,
    }

    def compose(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return _docker("compose", *args, timeout=timeout, env=env, cwd=REPO)

    def project_objects() -> str:
        label = f"label=com.docker.compose.project={project}"
        containers = _docker("ps", "--all", "--quiet", "--filter", label).stdout
        volumes = _docker("volume", "ls", "--quiet", "--filter", label).stdout
        return (containers + volumes).strip()

    try:
        up = compose(
            "up", "--detach", "--no-build", "--wait", "--wait-timeout", "600", "server-cpu", timeout=900
        )
        assert up.returncode == 0
        export = compose(
            "ps", "--all", "--format", "{{.Service}} {{.State}} {{.ExitCode}}", "export-cpu"
        ).stdout
        assert export.split() == ["export-cpu", "exited", "0"], export
        published = compose("port", "server-cpu", "50051").stdout.strip()
        assert published == f"127.0.0.1:{grpc_port}", "compose publishes on loopback by default"
        logits = _classify_all(published, sample.images[:64], token=TOKEN)
        np.testing.assert_allclose(logits, offline_logits[:64], atol=ATOL, rtol=0)
        with pytest.raises(UnauthenticatedError):
            _classify_all(published, sample.images[:1])
        rest = compose("port", "server-cpu", "8000").stdout.strip()
        assert rest == f"127.0.0.1:{http_port}", "compose publishes REST on loopback by default"
        assert _http_status(f"http://{rest}/v2/health/ready") == 200  # probes need no token
        assert _http_status(f"http://{rest}/v2/models/cifar10_resnet18") == 401
        assert _http_status(f"http://{rest}/v2/models/cifar10_resnet18", token=TOKEN) == 200
        teardown = _readme_teardown()
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", teardown],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert project_objects() == "", f"`{teardown}` left containers or volumes behind"
    finally:
        if project_objects():
            compose("--profile", "*", "down", "--volumes", "--timeout", "30")
