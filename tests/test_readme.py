"""Every command in README.md runs here, against a real server, so the README cannot rot.

Blocks marked ``<!-- readme-test: skip (reason) -->`` are the exceptions, each with its reason
(``make test`` is CI itself; Docker needs an engine and tests/test_deploy.py covers it).
Substitutions: the server address (a free port instead of 50051), output folders (a temp dir
instead of the checkout), and cifar-train's schedule (one short epoch on a tiny tree: argparse
keeps the last value of a repeated flag, so the README's own command line runs unchanged).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
BIN = Path(sys.executable).parent
BLOCK = re.compile(
    r"(?:<!-- readme-test: skip \((?P<skip>[^)]+)\) -->\n)?```(?P<lang>sh|python)\n(?P<body>.*?)```", re.S
)


def blocks() -> list[tuple[str, str, str | None]]:
    return [(m["lang"], m["body"], m["skip"]) for m in BLOCK.finditer(README)]


def test_readme_has_the_promised_sections() -> None:
    found = blocks()
    assert any("make serve" in b for _, b, _ in found)
    assert any("cifar-classify" in b for _, b, _ in found)
    assert any("ModelInfer" in b for _, b, _ in found)
    assert any("tritonclient" in b for _, b, _ in found)
    for _, body, skip in found:
        if skip is not None:
            assert len(skip) > 20, f"a skipped block needs its reason: {body!r}"


def test_settings_table_is_current() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "settings_table.py")],
        capture_output=True,
        text=True,
        check=True,
    )
    begin, end = "<!-- settings-table:begin -->\n", "<!-- settings-table:end -->"
    current = README[README.index(begin) + len(begin) : README.index(end)]
    assert current == proc.stdout, "README's configuration table is stale: run tools/settings_table.py"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, sample):  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("readme")
    for name in ("examples", "models", "tests"):
        (d / name).symlink_to(REPO / name)
    data = d / "cifar10"
    for split, start, count in (("train", 0, 160), ("test", 300, 60)):
        for i in range(start, start + count):
            cls = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")[
                int(sample.labels[i])
            ]
            (data / split / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(sample.images[i]).save(data / split / cls / f"{i}.png")
    return d


def _prepare(body: str, address: str, workdir: Path, http_address: str = "") -> str:
    body = body.replace("localhost:50051", address)
    if http_address:
        body = body.replace("localhost:8000", http_address)
    body = body.replace("--out artifacts", f"--out {workdir / 'artifacts'}")
    return re.sub(
        r"^(cifar-train .*)$",
        r"\1 --epochs 1 --limit-train 128 --batch-size 64 --threads 1",
        body,
        flags=re.M,
    )


def _run(lang: str, body: str, workdir: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "CIFAR_SERVE_DATA": str(workdir / "cifar10"),
    }
    cmd = ["bash", "-euo", "pipefail", "-c", body] if lang == "sh" else [sys.executable, "-c", body]
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)


RUNNABLE = [(lang, body) for lang, body, skip in blocks() if skip is None and "make serve" not in body]


@pytest.mark.parametrize(
    ("lang", "body"), RUNNABLE, ids=[b.strip().splitlines()[0][:40] for _, b in RUNNABLE]
)
def test_readme_block_runs(lang, body, server, workdir) -> None:  # type: ignore[no-untyped-def]
    proc = _run(lang, _prepare(body, server.address, workdir, server.http_address), workdir)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert (proc.stdout + proc.stderr).strip(), "every README example reports something"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_make_serve_starts_a_server(sample) -> None:  # type: ignore[no-untyped-def]
    if not (REPO / ".venv" / ".installed").exists():
        pytest.skip("make serve needs the Makefile's .venv (run through `make test`)")
    port, metrics = _free_port(), _free_port()
    env = {**os.environ, "CIFAR_SERVE_PORT": str(port), "CIFAR_SERVE_METRICS_PORT": str(metrics)}
    proc = subprocess.Popen(
        ["make", "serve"],
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while True:
                assert proc.poll() is None, proc.communicate()[0]
                assert time.monotonic() < deadline, "make serve never became SERVING"
                try:
                    if (
                        stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                        == health_pb2.HealthCheckResponse.SERVING
                    ):
                        break
                except grpc.RpcError:
                    time.sleep(0.5)
        from cifar_serve.client import Client

        with Client(f"127.0.0.1:{port}", timeout=30) as client:
            assert client.classify(sample.images[:4])[0].label
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    assert "serving cifar10_resnet18" in out
