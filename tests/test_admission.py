"""Admission, lifecycle and limits over {gRPC, REST} x {1, 2 worker processes}, on the real model.

One server per process count and configuration, shared by the module:

* ``default``: no flags. Model control is closed: load and unload are refused over both APIs and
  inference carries on.
* ``locked``: ``--model-control-mode explicit --auth-token A --admin-token B``, with the model in
  a repository folder. Admin calls need B (A is refused), loads are confined to the repository,
  and an unload drives health, v2 readiness and inference the way the lifecycle says.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cifar_serve.v1 import classifier_pb2, classifier_pb2_grpc
from cifar_serve.v1 import open_inference_pb2 as oip
from cifar_serve.v1 import open_inference_pb2_grpc as oip_grpc

INFER_TOKEN = "A-inference-token"
ADMIN_TOKEN = "B-admin-token"
MODEL = "cifar10_resnet18"
IDX = np.arange(3, 400, 50)  # 8 real test images over several classes
TIMEOUT_S = 30.0
TRANSPORTS = ("grpc", "rest")

pytestmark = pytest.mark.timeout(300)


# --------------------------------------------------------------------------- servers


@pytest.fixture(scope="module", params=[1, 2], ids=["1proc", "2workers"])
def workers(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture(scope="module")
def repository(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository holding the shipped model as ``v1``, a file outside it, and a symlink
    inside it that points out of it."""
    root = tmp_path_factory.mktemp("repository")
    shutil.copytree(model_dir, root / "v1")
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(model_dir, outside / "elsewhere")
    (root / "escape").symlink_to(outside / "elsewhere", target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def default_server(model_dir: Path, make_settings: Any, workers: int) -> Iterator[Any]:
    from cifar_serve.server.launch import ServerThread

    srv = ServerThread(make_settings(model_dir, workers=workers)).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def locked_server(repository: Path, make_settings: Any, workers: int) -> Iterator[Any]:
    from cifar_serve.server.launch import ServerThread

    settings = make_settings(
        repository / "v1",
        workers=workers,
        model_control_mode="explicit",
        auth_token=INFER_TOKEN,
        admin_token=ADMIN_TOKEN,
    )
    srv = ServerThread(settings).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def images(sample: Any) -> np.ndarray:
    return np.ascontiguousarray(sample.images[IDX])


@pytest.fixture(scope="module")
def expected_top1(offline_logits: np.ndarray) -> np.ndarray:
    return np.asarray(offline_logits[IDX].argmax(1))


# --------------------------------------------------------------------------- one client, two transports


class Outcome:
    """What a call came back with, in both transports' words."""

    def __init__(self, ok: bool, code: str, message: str = "", body: Any = None) -> None:
        self.ok, self.code, self.message, self.body = ok, code, message, body

    def __repr__(self) -> str:
        return f"Outcome({self.code}, {self.message!r})"


_HTTP_CODE = {
    200: "OK",
    400: "BAD_REQUEST",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    503: "UNAVAILABLE",
}


class Client:
    def __init__(self, srv: Any, transport: str) -> None:
        self.srv = srv
        self.transport = transport
        self._channel = grpc.insecure_channel(srv.address)

    def close(self) -> None:
        self._channel.close()

    # gRPC ------------------------------------------------------------------

    def _grpc(self, fn: Any, request: Any, token: str | None) -> Outcome:
        metadata = [("authorization", f"Bearer {token}")] if token else []
        try:
            return Outcome(True, "OK", body=fn(request, timeout=TIMEOUT_S, metadata=metadata))
        except grpc.RpcError as exc:
            return Outcome(False, exc.code().name, exc.details() or "")

    # REST ------------------------------------------------------------------

    def _http(
        self, method: str, path: str, doc: Any = None, token: str | None = None, raw: bytes = b""
    ) -> Outcome:
        host, port = self.srv.http_address.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT_S)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        body = raw
        if doc is not None:
            body = json.dumps(doc).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            status = resp.status
            n = resp.getheader("Inference-Header-Content-Length")
        finally:
            conn.close()
        parsed = json.loads(data[: int(n)] if n else data) if data else None
        message = parsed.get("error", "") if isinstance(parsed, dict) else ""
        return Outcome(status == 200, _HTTP_CODE.get(status, str(status)), message, parsed)

    # calls -----------------------------------------------------------------

    def unload(self, token: str | None) -> Outcome:
        if self.transport == "grpc":
            stub = oip_grpc.GRPCInferenceServiceStub(self._channel)
            return self._grpc(
                stub.RepositoryModelUnload, oip.RepositoryModelUnloadRequest(model_name=MODEL), token
            )
        return self._http("POST", f"/v2/repository/models/{MODEL}/unload", {}, token)

    def load(self, token: str | None, model_dir: str | None = None) -> Outcome:
        if self.transport == "grpc":
            req = oip.RepositoryModelLoadRequest(model_name=MODEL)
            if model_dir is not None:
                req.parameters["model_dir"].string_param = model_dir
            stub = oip_grpc.GRPCInferenceServiceStub(self._channel)
            return self._grpc(stub.RepositoryModelLoad, req, token)
        doc = {"parameters": {"model_dir": model_dir}} if model_dir is not None else {}
        return self._http("POST", f"/v2/repository/models/{MODEL}/load", doc, token)

    def ready(self) -> bool:
        """v2 server readiness, asked without a token (probes carry none)."""
        if self.transport == "grpc":
            stub = oip_grpc.GRPCInferenceServiceStub(self._channel)
            out = self._grpc(stub.ServerReady, oip.ServerReadyRequest(), None)
            assert out.ok, out
            return bool(out.body.ready)
        return self._http("GET", "/v2/health/ready").ok

    def live(self) -> bool:
        if self.transport == "grpc":
            stub = oip_grpc.GRPCInferenceServiceStub(self._channel)
            out = self._grpc(stub.ServerLive, oip.ServerLiveRequest(), None)
            return out.ok and bool(out.body.live)
        return self._http("GET", "/v2/health/live").ok

    def model_ready(self) -> bool:
        if self.transport == "grpc":
            stub = oip_grpc.GRPCInferenceServiceStub(self._channel)
            out = self._grpc(stub.ModelReady, oip.ModelReadyRequest(name=MODEL), None)
            assert out.ok, out
            return bool(out.body.ready)
        return self._http("GET", f"/v2/models/{MODEL}/ready").ok

    def infer(self, x: np.ndarray, token: str | None) -> Outcome:
        """Top-1 classes of ``x`` in ``body`` when OK."""
        if self.transport == "grpc":
            req = oip.ModelInferRequest(model_name=MODEL)
            req.inputs.add(name="images", datatype="UINT8", shape=list(x.shape))
            req.raw_input_contents.append(x.tobytes())
            stub = oip_grpc.GRPCInferenceServiceStub(self._channel)
            out = self._grpc(stub.ModelInfer, req, token)
            if out.ok:
                logits = np.frombuffer(out.body.raw_output_contents[0], "<f4").reshape(len(x), -1)
                out.body = logits.argmax(1)
            return out
        doc = {
            "inputs": [
                {"name": "images", "datatype": "UINT8", "shape": list(x.shape), "data": x.ravel().tolist()}
            ]
        }
        out = self._http("POST", f"/v2/models/{MODEL}/infer", doc, token)
        if out.ok:
            out.body = np.asarray(out.body["outputs"][0]["data"], np.float32).reshape(len(x), -1).argmax(1)
        return out

    def register_shm(self, token: str | None) -> Outcome:
        if self.transport == "grpc":
            stub = oip_grpc.GRPCInferenceServiceStub(self._channel)
            req = oip.SystemSharedMemoryRegisterRequest(name="r", key="/no-such-object", byte_size=16)
            return self._grpc(stub.SystemSharedMemoryRegister, req, token)
        return self._http(
            "POST",
            "/v2/systemsharedmemory/region/r/register",
            {"key": "/no-such-object", "byte_size": 16},
            token,
        )


def health(srv: Any) -> int:
    with grpc.insecure_channel(srv.address) as ch:
        return int(
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S).status
        )


def classify_native(srv: Any, x: np.ndarray, token: str | None = None) -> np.ndarray:
    """Top-1 by the native gRPC API (a third path through the same admission)."""
    metadata = [("authorization", f"Bearer {token}")] if token else []
    with grpc.insecure_channel(srv.address) as ch:
        req = classifier_pb2.ClassifyRequest(top_k=1)
        req.packed.count = len(x)
        req.packed.data = x.tobytes()
        resp = classifier_pb2_grpc.ClassifierStub(ch).Classify(req, timeout=TIMEOUT_S, metadata=metadata)
    return np.asarray([r.predictions[0].class_index for r in resp.results])


def wait_for(predicate: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not {what} within {timeout}s"
        time.sleep(0.05)


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# --------------------------------------------------------------------------- closed by default


def test_default_server_refuses_model_control_and_keeps_serving(
    default_server: Any, transport: str, images: np.ndarray, expected_top1: np.ndarray
) -> None:
    client = Client(default_server, transport)
    try:
        for attempt in (client.unload(None), client.load(None), client.load(None, "/etc")):
            assert not attempt.ok, attempt
            assert attempt.code in ("FAILED_PRECONDITION", "BAD_REQUEST"), attempt
            assert "--model-control-mode" in attempt.message
        assert client.ready() and client.model_ready()
        assert health(default_server) == health_pb2.HealthCheckResponse.SERVING
        out = client.infer(images, None)
        assert out.ok, out
        np.testing.assert_array_equal(out.body, expected_top1)
    finally:
        client.close()


# --------------------------------------------------------------------------- tokens and groups


def test_groups_and_tokens(
    locked_server: Any, transport: str, images: np.ndarray, expected_top1: np.ndarray
) -> None:
    client = Client(locked_server, transport)
    try:
        # Open: probes carry no token.
        assert client.live() and client.ready() and client.model_ready()
        # Inference: the inference token, or the admin one (the stronger credential).
        assert client.infer(images, None).code == "UNAUTHENTICATED"
        assert client.infer(images, "wrong").code == "UNAUTHENTICATED"
        for token in (INFER_TOKEN, ADMIN_TOKEN):
            out = client.infer(images, token)
            assert out.ok, out
            np.testing.assert_array_equal(out.body, expected_top1)
        # Admin: the inference token does not grant it.
        for attempt in (
            client.unload(INFER_TOKEN),
            client.load(INFER_TOKEN),
            client.register_shm(INFER_TOKEN),
        ):
            assert attempt.code == "PERMISSION_DENIED", attempt
            assert "admin" in attempt.message
        for attempt in (client.unload(None), client.register_shm(None)):
            assert attempt.code == "UNAUTHENTICATED", attempt
        # With the admin token, shared memory registration is reached (and refuses a missing object).
        attempt = client.register_shm(ADMIN_TOKEN)
        assert attempt.code in ("INVALID_ARGUMENT", "BAD_REQUEST") and "no-such-object" in attempt.message
        assert client.ready()
    finally:
        client.close()


def test_loads_are_confined_to_the_repository(locked_server: Any, transport: str, repository: Path) -> None:
    client = Client(locked_server, transport)
    try:
        outside = str(repository.parent)
        for model_dir in ("/etc", "../", "v1/../../", "escape", outside, str(repository / "escape")):
            attempt = client.load(ADMIN_TOKEN, model_dir)
            assert attempt.code in ("INVALID_ARGUMENT", "BAD_REQUEST"), (model_dir, attempt)
            assert "outside the model repository" in attempt.message, attempt
            # Nothing about the host beyond the repository comes back.
            assert "/etc" not in attempt.message and outside not in attempt.message, attempt
        missing = client.load(ADMIN_TOKEN, "v9")
        assert missing.code in ("INVALID_ARGUMENT", "BAD_REQUEST") and "'v9'" in missing.message
        assert str(repository) not in missing.message
        assert client.ready() and health(locked_server) == health_pb2.HealthCheckResponse.SERVING
    finally:
        client.close()


# --------------------------------------------------------------------------- the lifecycle


def test_unload_and_load_drive_health_readiness_and_inference(
    locked_server: Any, transport: str, images: np.ndarray, expected_top1: np.ndarray
) -> None:
    client = Client(locked_server, transport)
    try:
        assert client.unload(ADMIN_TOKEN).ok
        # Every worker hears of it: ask several times, over fresh connections.
        wait_for(lambda: health(locked_server) == health_pb2.HealthCheckResponse.NOT_SERVING, "NOT_SERVING")
        for _ in range(4):
            assert health(locked_server) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert not client.ready() and not client.model_ready()
            refused = client.infer(images, INFER_TOKEN)
            assert refused.code == "UNAVAILABLE" and "unloaded" in refused.message, refused
        with pytest.raises(grpc.RpcError) as info:
            classify_native(locked_server, images, INFER_TOKEN)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # A load with no parameters brings the configured model back.
        loaded = client.load(ADMIN_TOKEN)
        assert loaded.ok, loaded
        wait_for(lambda: health(locked_server) == health_pb2.HealthCheckResponse.SERVING, "SERVING")
        for _ in range(4):
            assert client.ready() and client.model_ready()
            out = client.infer(images, INFER_TOKEN)
            assert out.ok, out
            np.testing.assert_array_equal(out.body, expected_top1)
        np.testing.assert_array_equal(classify_native(locked_server, images, INFER_TOKEN), expected_top1)
        # A version inside the repository, named relative to it, loads too.
        assert client.load(ADMIN_TOKEN, "v1").ok
        assert client.ready()
    finally:
        client.close()


# --------------------------------------------------------------------------- REST bounded like gRPC


def _raw_http(srv: Any) -> socket.socket:
    host, port = srv.http_address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=TIMEOUT_S)
    return sock


def _infer_head(length: int, token: str | None = None, chunked: bool = False) -> bytes:
    lines = [f"POST /v2/models/{MODEL}/infer HTTP/1.1", "Host: test", "Content-Type: application/json"]
    lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}")
    if token:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_idle_rest_uploads_do_not_stop_other_clients(
    default_server: Any, images: np.ndarray, expected_top1: np.ndarray
) -> None:
    """20 connections announce 16 MiB bodies (the default budget's worth, 256 MiB, over all of
    them) and send nothing: they hold no budget, so gRPC and REST calls from others go through."""
    idle = [_raw_http(default_server) for _ in range(20)]
    try:
        for sock in idle:
            sock.sendall(_infer_head(16 * 1024 * 1024))
        time.sleep(0.5)  # let every worker read the headers and start waiting for the body
        np.testing.assert_array_equal(classify_native(default_server, images), expected_top1)
        out = Client(default_server, "rest").infer(images, None)
        assert out.ok, out
        np.testing.assert_array_equal(out.body, expected_top1)
    finally:
        for sock in idle:
            sock.close()


@pytest.fixture(scope="module")
def tight_server(model_dir: Path, make_settings: Any, workers: int) -> Iterator[Any]:
    """A 1 MiB message limit, a 2 MiB budget per process, and a 3 s HTTP read timeout."""
    from cifar_serve.server.launch import ServerThread

    settings = make_settings(
        model_dir,
        workers=workers,
        max_receive_message_bytes=1024 * 1024,
        max_inflight_request_bytes=2 * 1024 * 1024,
        http_read_timeout_s=3.0,
    )
    srv = ServerThread(settings).start()
    try:
        yield srv
    finally:
        srv.stop()


def _read_status(sock: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return -1
        data += chunk
    return int(data.split(b" ", 2)[1])


def test_a_stalled_body_is_timed_out_and_its_budget_released(tight_server: Any) -> None:
    sock = _raw_http(tight_server)
    try:
        sock.sendall(_infer_head(1000 * 1024) + b"x" * (900 * 1024))
        started = time.monotonic()
        assert _read_status(sock) == 408
        assert time.monotonic() - started < 20
    finally:
        sock.close()
    wait_for(lambda: tight_server.metric("cifar_serve_inflight_request_bytes") == 0, "budget released")


def test_stalled_headers_are_cut_off(tight_server: Any) -> None:
    sock = _raw_http(tight_server)
    try:
        sock.sendall(b"POST /v2/models/x/infer HTTP/1.1\r\nHost: te")
        sock.settimeout(20)
        assert sock.recv(4096) == b""  # closed by the server, not by this test's timeout
    finally:
        sock.close()


def test_chunked_bodies_count_against_the_budget(tight_server: Any, workers: int) -> None:
    """Chunked uploads hold what they have sent: past the budget, the next upload gets 429."""
    held = []
    try:
        # 3 uploads of 0.9 MiB per process fill every process's 2 MiB budget.
        statuses = []
        for _ in range(3 * workers + 2):
            sock = _raw_http(tight_server)
            held.append(sock)
            part = b"y" * (900 * 1024)
            sock.sendall(_infer_head(0, chunked=True) + f"{len(part):x}\r\n".encode() + part + b"\r\n")
            sock.settimeout(0.2)  # all of them sent well within the read timeout
            try:
                statuses.append(_read_status(sock))
            except TimeoutError:
                statuses.append(0)  # still uploading: held
        # Each process holds two (1.8 MiB) and refuses a third. The kernel spreads connections
        # over the workers' shared port unevenly, so which process got how many is unknown;
        # at least one got three or more, and none holds more than two.
        assert 429 in statuses, statuses
        assert 2 <= statuses.count(0) <= 2 * workers, statuses
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: tight_server.metric("cifar_serve_inflight_request_bytes") == 0, "budget released")


def test_metric_names_are_what_the_tests_read(tight_server: Any) -> None:
    """The gauge the budget tests read exists (so a rename cannot make them pass vacuously)."""
    text = _get_metrics(tight_server)
    assert "cifar_serve_inflight_request_bytes" in text


def _get_metrics(srv: Any) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", srv.metrics_port, timeout=TIMEOUT_S)
    try:
        conn.request("GET", "/metrics")
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def test_a_large_json_body_holds_its_decoded_size(tight_server: Any, images: np.ndarray) -> None:
    """A JSON tensor decodes into several times its text: that much counts against the budget,
    so a body well under the message limit can still be refused rather than blow up memory."""
    x = np.concatenate([images] * 4)  # 32 images: ~0.3 MiB of JSON, several MiB decoded
    doc = {
        "inputs": [
            {"name": "images", "datatype": "UINT8", "shape": list(x.shape), "data": x.ravel().tolist()}
        ]
    }
    body = json.dumps(doc).encode()
    assert 256 * 1024 < len(body) < 1024 * 1024  # under --max-receive-message-bytes
    out = Client(tight_server, "rest")._http("POST", f"/v2/models/{MODEL}/infer", raw=body)
    assert out.code == "429", out
    assert "--max-inflight-request-bytes" in out.message
    # The same images as binary data, the bytes they are, go through.
    assert Client(tight_server, "grpc").infer(x, None).ok
