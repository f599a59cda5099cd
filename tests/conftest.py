"""Shared fixtures: the real CIFAR-10 sample, the exported model, and a real server on loopback."""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
SAMPLE_ZIP = FIXTURES / "cifar10-test-sample.zip"
CHECKPOINT = REPO / "models" / "resnet18_cifar10.pt"


def pytest_configure(config: pytest.Config) -> None:
    # Decoded-array caches go to a throwaway folder, never the user's ~/.cache.
    os.environ.setdefault("CIFAR_SERVE_CACHE", tempfile.mkdtemp(prefix="cifar-serve-test-cache-"))
    # Servers the tests start as subprocesses take a free HTTP/REST port, not the default 8000
    # (which another server on the machine may hold).
    os.environ.setdefault("CIFAR_SERVE_HTTP_PORT", "0")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    workers = os.environ.get("CIFAR_SERVE_WORKERS", "1")
    if workers == "1":
        return
    skip = pytest.mark.skip(
        reason=f"reads the in-process server; CIFAR_SERVE_WORKERS={workers} runs it in other processes"
    )
    for item in items:
        if "in_process" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def sample():  # type: ignore[no-untyped-def]
    """600 real CIFAR-10 test images (60 a class) with labels, uint8 [N,32,32,3]."""
    from cifar_serve.export.data import load_split

    return load_split(SAMPLE_ZIP, "test")


@pytest.fixture(scope="session")
def sample_jpegs() -> list[tuple[str, bytes]]:
    """The sample's original JPEG files as (name, bytes), in the same order as ``sample``."""
    import zipfile

    with zipfile.ZipFile(SAMPLE_ZIP) as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".jpg"))
        return [(n, zf.read(n)) for n in names]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The exported shipped model: ``artifacts/`` when `make` built it, else exported here."""
    built = REPO / "artifacts"
    if (built / "manifest.json").is_file():
        return built
    from cifar_serve.export.exporter import export_model

    out = tmp_path_factory.mktemp("artifacts")
    export_model(CHECKPOINT, out)
    return out


@pytest.fixture(scope="session")
def null_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The null model (``cifar-export --null-model``), exported here through the CLI."""
    from cifar_serve.export import cli

    out = tmp_path_factory.mktemp("null") / "artifacts-null"
    # The CLI's default parity data is the committed sample, as `make artifacts-null` runs it.
    assert cli.main(["--null-model", "--out", str(out), "--parity-images", "64", "-q"]) == 0
    return out


@pytest.fixture(scope="session")
def offline_logits(model_dir: Path, sample) -> np.ndarray:  # type: ignore[no-untyped-def]
    """TorchScript logits computed offline (no server) for every sample image."""
    import torch

    module = torch.jit.load(str(model_dir / "model.torchscript.pt")).eval()
    with torch.inference_mode():
        return np.concatenate(
            [module(torch.from_numpy(sample.images[i : i + 100])).numpy() for i in range(0, len(sample), 100)]
        )


def _make_settings(model_dir: Path, **overrides: object):  # type: ignore[no-untyped-def]
    from cifar_serve.server.settings import Settings

    base = dict(
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        http_port=0,
        model_dir=str(model_dir),
        max_batch_size=32,
        max_batch_delay_ms=5.0,
        grace_period_s=5.0,
        log_level="WARNING",
        # `make test` runs the API, reliability and shutdown tests a second time with
        # CIFAR_SERVE_WORKERS=2: every server they start is then the multi-process one.
        workers=int(os.environ.get("CIFAR_SERVE_WORKERS", "1")),
    )
    base.update(overrides)
    return Settings(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def make_settings():  # type: ignore[no-untyped-def]
    """``make_settings(model_dir, **overrides)``: test server settings (free ports, quiet logs)."""
    return _make_settings


@pytest.fixture(scope="session")
def server(model_dir: Path) -> Iterator[object]:
    """A real cifar-serve on a free loopback port, shared by the session (ServerThread)."""
    from cifar_serve.server.launch import ServerThread

    srv = ServerThread(_make_settings(model_dir)).start()
    try:
        yield srv
    finally:
        srv.stop()


def _served_model(srv: object) -> tuple[str, str]:
    """(name, version) the server at ``srv.address`` serves, asked over its own API."""
    import grpc

    from cifar_serve.v1 import classifier_pb2, classifier_pb2_grpc

    with grpc.insecure_channel(srv.address) as ch:  # type: ignore[attr-defined]
        info = classifier_pb2_grpc.ClassifierStub(ch).GetModelInfo(
            classifier_pb2.GetModelInfoRequest(), timeout=30
        )
    return info.name, info.version


@pytest.fixture(scope="session")
def served_model():  # type: ignore[no-untyped-def]
    """``served_model(srv)``: (name, version) of the model a server serves (any number of workers)."""
    return _served_model


@pytest.fixture(scope="session")
def channel(server):  # type: ignore[no-untyped-def]
    import grpc

    ch = grpc.insecure_channel(server.address)
    yield ch
    ch.close()


# --------------------------------------------------------------------------- the fast tier
# A fake model (numpy in, numpy out, no torch) under the real server, batcher and edge, so the
# serving logic is tested in seconds, and on Python versions the real model's stack is not
# installed on. The real-model tests above stay.

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class FakeRuntime:
    """Logits are each image's first ten pixel bytes, so every caller's rows are checkable.

    ``gate`` (set by default) holds forward passes while cleared; ``warm_gate`` holds warm-up.
    """

    backend = "fake"
    sha256 = "0" * 64

    def __init__(self) -> None:
        import threading
        from types import SimpleNamespace

        self.device = SimpleNamespace(type="cpu")
        self.manifest = SimpleNamespace(
            name="cifar10_resnet18", version="1", labels=CLASSES, test_accuracy=0.0
        )
        self.gate = threading.Event()
        self.gate.set()
        self.warm_gate = threading.Event()
        self.warm_gate.set()
        self.entered = threading.Event()
        self.batches: list[int] = []

    @staticmethod
    def expected(images: np.ndarray) -> np.ndarray:
        return images.reshape(len(images), -1)[:, :10].astype(np.float32)

    def infer(self, images: np.ndarray) -> np.ndarray:
        self.batches.append(len(images))
        self.entered.set()
        assert self.gate.wait(60), "test never opened the gate"
        return self.expected(images)

    def warmup(self) -> None:
        assert self.warm_gate.wait(60), "test never finished the warm-up"

    def describe(self) -> dict[str, object]:
        return {"device": "cpu", "backend": "fake", "precision": "fp32"}


@pytest.fixture
def fake_runtime() -> FakeRuntime:
    return FakeRuntime()


@pytest.fixture
def fake_server(fake_runtime: FakeRuntime, tmp_path: Path) -> Iterator[object]:
    """``fake_server(**settings)``: a real server on a free port over :class:`FakeRuntime`."""
    from cifar_serve.server.launch import ServerThread

    started: list[ServerThread] = []

    def start(wait_ready: bool = True, **overrides: object) -> ServerThread:
        overrides.setdefault("workers", 1)  # a fake model lives in the test's process
        srv = ServerThread(_make_settings(tmp_path, **overrides), runtime=fake_runtime)
        started.append(srv)
        return srv.start(wait_ready=wait_ready)

    yield start
    fake_runtime.gate.set()
    fake_runtime.warm_gate.set()
    for srv in started:
        srv.stop(grace=1.0)


# --------------------------------------------------------------------------- server processes


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_serving(address: str, proc: object, timeout: float = 120) -> None:
    """Block until the server at ``address`` reports SERVING; fail at once if ``proc`` exits."""
    import subprocess
    import time

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    assert isinstance(proc, subprocess.Popen)
    end = time.monotonic() + timeout

    def serving() -> bool:
        # A fresh connection each time: with --workers N each may land on another worker, and
        # every worker turns SERVING on its own (moments apart).
        with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            try:
                status = (
                    health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2).status
                )
            except grpc.RpcError:
                return False
            return bool(status == health_pb2.HealthCheckResponse.SERVING)

    while time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()[1]
        if serving() and all(serving() for _ in range(4)):
            return
        time.sleep(0.2)
    raise AssertionError(f"the server at {address} never became SERVING")


@pytest.fixture(scope="session")
def free_port():  # type: ignore[no-untyped-def]
    """``free_port()``: a loopback port nothing listens on."""
    return _free_port


@pytest.fixture(scope="session")
def wait_serving():  # type: ignore[no-untyped-def]
    """``wait_serving(address, proc)``: block until a ``cifar-serve`` subprocess is SERVING."""
    return _wait_serving


@pytest.fixture
def start_workers(model_dir: Path, tmp_path: Path) -> Iterator[object]:
    """``start_workers(workers, *args)``: ``cifar-serve --workers N`` on free ports, the shipped model.

    Returns ``(proc, port, metrics_port, log)`` once every worker is SERVING; ``log`` is the
    server's INFO log (its stderr). The processes still running at the end of the test are killed.
    """
    import subprocess
    import sys
    import time

    started: list[subprocess.Popen[str]] = []

    def run(workers: int, *args: str) -> tuple[subprocess.Popen[str], int, int, Path]:
        port, metrics_port = _free_port(), _free_port()
        log = tmp_path / f"server-{port}.log"
        # The flags below are the whole configuration: no CIFAR_SERVE_* setting of the test run's.
        env = {k: v for k, v in os.environ.items() if not k.startswith("CIFAR_SERVE_")}
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cifar_serve.server",
                "--workers",
                str(workers),
                "--port",
                str(port),
                "--metrics-port",
                str(metrics_port),
                "--http-port",
                "-1",
                "--model-dir",
                str(model_dir),
                "--log-level",
                "INFO",
                *args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=log.open("w"),
            text=True,
            env=env,
        )
        started.append(proc)
        _wait_serving(f"127.0.0.1:{port}", proc)
        # SERVING on one connection is one worker; the front end logs this once all of them are.
        end = time.monotonic() + 60
        while f"with {workers} workers" not in log.read_text():
            assert time.monotonic() < end and proc.poll() is None, log.read_text()
            time.sleep(0.05)
        return proc, port, metrics_port, log

    yield run
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- the v2 API tests
# test_oip.py (gRPC) and test_rest.py (HTTP) check the two transports of one protocol against
# the same images, so a difference between them is the transport's.

# 15 real test images spread over every class (the sample is sorted by class, 60 a class).
API_IDX = np.arange(7, 600, 40)


@pytest.fixture(scope="module")
def model(server: object) -> tuple[str, str]:
    """(name, version) of the model the session's ``server`` serves."""
    return _served_model(server)


@pytest.fixture(scope="module")
def labels(model_dir: Path) -> list[str]:
    """The class names in the exported model's manifest, in logit order."""
    import json

    return list(json.loads((model_dir / "manifest.json").read_text())["labels"])


@pytest.fixture(scope="module")
def images(sample) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The v2 API tests' images, uint8 [15,32,32,3], contiguous as a request carries them."""
    return np.ascontiguousarray(sample.images[API_IDX])


@pytest.fixture(scope="module")
def expected(offline_logits: np.ndarray) -> np.ndarray:
    """The offline logits of :func:`images`."""
    return offline_logits[API_IDX]


# --------------------------------------------------------------------------- TLS


def _self_signed(folder: Path, name: str, ip: str | None = None, ca: bool = False) -> tuple[Path, Path]:
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    san = x509.IPAddress(ipaddress.ip_address(ip)) if ip is not None else x509.DNSName(name)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
    )
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    cert = builder.add_extension(x509.SubjectAlternativeName([san]), critical=False).sign(
        key, hashes.SHA256()
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="session")
def self_signed():  # type: ignore[no-untyped-def]
    """``self_signed(folder, name, ip=None, ca=False)``: (cert, key) PEM files of a new EC key.

    The certificate names ``name`` (its subject) and, as its one subject alternative name, the
    address ``ip`` if given, else ``name``; ``ca`` marks it a CA (basicConstraints), for the
    verifiers that want their trust root to be one. Valid from five minutes ago, for a day.
    """
    return _self_signed
