"""The v2 REST API end to end: real server, real HTTP (stdlib, curl, and Triton's tritonclient.http).

tritonclient runs in a subprocess (tests/http_client_check.py), as in tests/test_oip.py: the
test process never imports it. Requests here are built by hand with the standard library, so
the wire format itself (JSON, Triton's binary data extension) is what is checked.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from cifar_serve.v1 import classifier_pb2, classifier_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
CLIENT_CHECK = REPO / "tests" / "http_client_check.py"
TIMEOUT_S = 60


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        n = self.headers.get("inference-header-content-length")
        return json.loads(self.body[: int(n)] if n is not None else self.body)

    def binary(self) -> bytes:
        return self.body[int(self.headers["inference-header-content-length"]) :]


def call(
    address: str, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> Answer:
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT_S)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def infer_body(
    x: np.ndarray, binary_in: bool = True, outputs: list[dict[str, Any]] | None = None, **extra: Any
) -> tuple[bytes, dict[str, str]]:
    """A v2 inference request: JSON, then the input's bytes when ``binary_in`` (Triton's extension)."""
    tensor: dict[str, Any] = {"name": "images", "datatype": "UINT8", "shape": list(x.shape)}
    if binary_in:
        tensor["parameters"] = {"binary_data_size": x.nbytes}
    else:
        tensor["data"] = x.tolist()  # nested, row-major: the spec allows it
    if binary_in and outputs is None and "parameters" not in extra:
        extra["parameters"] = {"binary_data_output": True}  # as tritonclient asks when naming no output
    doc: dict[str, Any] = {"inputs": [tensor], **extra}
    if outputs is not None:
        doc["outputs"] = outputs
    header = json.dumps(doc).encode()
    if not binary_in:
        return header, {"Content-Type": "application/json"}
    return header + x.tobytes(), {
        "Inference-Header-Content-Length": str(len(header)),
        "Content-Type": "application/octet-stream",
    }


def infer(address: str, model: str, x: np.ndarray, **kw: Any) -> Answer:
    body, headers = infer_body(x, **kw)
    return call(address, "POST", f"/v2/models/{model}/infer", body, headers)


def parse_bytes_tensor(raw: bytes) -> list[str]:
    items, pos = [], 0
    while pos < len(raw):
        (n,) = struct.unpack_from("<I", raw, pos)
        items.append(raw[pos + 4 : pos + 4 + n].decode())
        pos += 4 + n
    return items


def check_classification(rows: list[list[str]], expected: np.ndarray, labels: list[str], k: int) -> None:
    assert len(rows) == len(expected)
    ranked = np.sort(expected, axis=1)[:, ::-1]
    for i, row in enumerate(rows):
        assert len(row) == k
        for j, text in enumerate(row):
            m = re.fullmatch(r"(-?\d+\.\d{6}):(\d+):(.+)", text)
            assert m, text
            score, index, label = float(m[1]), int(m[2]), m[3]
            assert label == labels[index]
            assert abs(score - expected[i, index]) < 2e-4
            assert abs(score - ranked[i, j]) < 2e-4


# ---------------------------------------------------------------------------- health and metadata


def test_health_and_metadata(server: Any, model: tuple[str, str], labels: list[str]) -> None:
    a = server.http_address
    name, version = model
    assert call(a, "GET", "/v2/health/live").json() == {"live": True}
    assert call(a, "GET", "/v2/health/ready").json() == {"ready": True}
    meta = call(a, "GET", "/v2").json()
    assert meta["name"] == "cifar-serve" and {"classification", "system_shared_memory"} <= set(
        meta["extensions"]
    )
    for path in (f"/v2/models/{name}", f"/v2/models/{name}/versions/{version}"):
        m = call(a, "GET", path).json()
        assert m["name"] == name and m["versions"] == [version]
        assert m["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, 32, 32, 3]}]
        assert m["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, len(labels)]}]
        assert call(a, "GET", path + "/ready").status == 200
        config = call(a, "GET", path + "/config").json()
        assert config["name"] == name and config["input"][0]["dims"] == [32, 32, 3]
        assert call(a, "GET", path + "/stats").json()["model_stats"][0]["name"] == name
    # As Triton: unknown models and versions are "not ready" (400), and not found for metadata.
    assert call(a, "GET", "/v2/models/no_such_model/ready").status == 400
    assert call(a, "GET", f"/v2/models/{name}/versions/999/ready").status == 400
    for path in (
        "/v2/models/no_such_model",
        f"/v2/models/{name}/versions/999",
        "/v2/models/no_such_model/config",
    ):
        answer = call(a, "GET", path)
        assert answer.status == 404, answer.body
        assert re.search("'no_such_model'|'999'", answer.json()["error"])
    answer = call(a, "GET", "/v2/no/such/path")
    assert answer.status == 404 and "error" in answer.json()
    assert call(a, "POST", "/v2/health/live").status == 405


# ---------------------------------------------------------------------------- inference


def test_binary_infer_matches_offline_and_native(
    server: Any, channel: grpc.Channel, model: tuple[str, str], images: np.ndarray, expected: np.ndarray
) -> None:
    answer = infer(
        server.http_address,
        model[0],
        images,
        id="r-1",
        outputs=[{"name": "logits", "parameters": {"binary_data": True}}],
    )
    assert answer.status == 200, answer.body[:300]
    doc = answer.json()
    assert (doc["model_name"], doc["model_version"], doc["id"]) == (*model, "r-1")
    out = doc["outputs"][0]
    assert (out["name"], out["datatype"], out["shape"]) == ("logits", "FP32", [len(images), 10])
    assert out["parameters"]["binary_data_size"] == len(images) * 40
    got = np.frombuffer(answer.binary(), "<f4").reshape(len(images), 10)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    packed = classifier_pb2.PackedImages(data=images.tobytes(), count=len(images))
    native = classifier_pb2_grpc.ClassifierStub(channel).Classify(
        classifier_pb2.ClassifyRequest(packed=packed, include_logits=True), timeout=TIMEOUT_S
    )
    np.testing.assert_allclose(got, np.array([list(r.logits) for r in native.results]), atol=1e-4, rtol=0)


def test_json_infer_both_ways(
    server: Any, model: tuple[str, str], images: np.ndarray, expected: np.ndarray
) -> None:
    answer = infer(server.http_address, model[0], images[:4], binary_in=False)
    assert answer.status == 200 and "inference-header-content-length" not in answer.headers
    out = answer.json()["outputs"][0]
    assert "id" not in answer.json() and out["shape"] == [4, 10]
    np.testing.assert_allclose(np.array(out["data"]).reshape(4, 10), expected[:4], atol=1e-4, rtol=0)
    # binary_data_output asks for every output in binary, whatever the input was.
    answer = infer(
        server.http_address, model[0], images[:4], binary_in=False, parameters={"binary_data_output": True}
    )
    np.testing.assert_allclose(
        np.frombuffer(answer.binary(), "<f4").reshape(4, 10), expected[:4], atol=1e-4, rtol=0
    )


def test_classification_binary_and_json(
    server: Any, model: tuple[str, str], images: np.ndarray, expected: np.ndarray, labels: list[str]
) -> None:
    answer = infer(
        server.http_address,
        model[0],
        images,
        outputs=[{"name": "logits", "parameters": {"classification": 3, "binary_data": True}}],
    )
    out = answer.json()["outputs"][0]
    assert (out["datatype"], out["shape"]) == ("BYTES", [len(images), 3])
    flat = parse_bytes_tensor(answer.binary())
    check_classification([flat[i : i + 3] for i in range(0, len(flat), 3)], expected, labels, 3)
    answer = infer(
        server.http_address,
        model[0],
        images,
        binary_in=False,
        outputs=[{"name": "logits", "parameters": {"classification": 50}}],
    )
    out = answer.json()["outputs"][0]
    assert out["shape"] == [len(images), len(labels)]  # clamped to every class, as Triton
    k = len(labels)
    check_classification([out["data"][i : i + k] for i in range(0, len(out["data"]), k)], expected, labels, k)


def _raw(x: np.ndarray, header: str | None, payload: bytes) -> tuple[bytes, dict[str, str]]:
    return payload, ({"Inference-Header-Content-Length": header} if header is not None else {})


def _req(doc: Any, tail: bytes = b"") -> tuple[bytes, dict[str, str]]:
    header = json.dumps(doc).encode()
    headers = {"Inference-Header-Content-Length": str(len(header))} if tail else {}
    return header + tail, headers


def _tensor(shape: list[int], **kw: Any) -> dict[str, Any]:
    return {"name": "images", "datatype": "UINT8", "shape": shape, **kw}


THREE = 3 * 32 * 32 * 3
REST_ERRORS: list[tuple[str, tuple[bytes, dict[str, str]], str, int, str]] = [
    ("malformed_json", (b'{"inputs": [', {}), "M", 400, "malformed JSON"),
    ("not_an_object", _req([1, 2]), "M", 400, "must be a JSON object"),
    ("inputs_not_list", _req({"inputs": {"name": "images"}}), "M", 400, "'inputs' must be a list"),
    ("no_inputs", _req({"inputs": []}), "M", 400, "no input tensors"),
    (
        "wrong_shape",
        _req({"inputs": [_tensor([3, 32, 96], data=[0] * THREE)]}),
        "M",
        400,
        "input 'images': shape [3,32,96]",
    ),
    (
        "nchw",
        _req({"inputs": [_tensor([3, 3, 32, 32], parameters={"binary_data_size": THREE})]}, b"\0" * THREE),
        "M",
        400,
        "input 'images': shape [3,3,32,32]",
    ),
    ("shape_not_ints", _req({"inputs": [_tensor(["3", 32, 32, 3], data=[0])]}), "M", 400, "list of integers"),
    (
        "wrong_datatype",
        _req(
            {
                "inputs": [
                    {"name": "images", "datatype": "FP32", "shape": [1, 32, 32, 3], "data": [0.5] * 3072}
                ]
            }
        ),
        "M",
        400,
        "datatype FP32, expected UINT8",
    ),
    (
        "data_count",
        _req({"inputs": [_tensor([1, 32, 32, 3], data=[0] * 3071)]}),
        "M",
        400,
        "'data' holds 3071 values, the shape needs 3072",
    ),
    (
        "data_range",
        _req({"inputs": [_tensor([1, 32, 32, 3], data=[0] * 3071 + [256])]}),
        "M",
        400,
        "outside 0-255",
    ),
    (
        "data_negative",
        _req({"inputs": [_tensor([1, 32, 32, 3], data=[-1] * 3072)]}),
        "M",
        400,
        "outside 0-255",
    ),
    (
        "data_floats",
        _req({"inputs": [_tensor([1, 32, 32, 3], data=[0.5] * 3072)]}),
        "M",
        400,
        "integers 0-255",
    ),
    ("data_ragged", _req({"inputs": [_tensor([1, 32, 32, 3], data=[[1, 2], [3]])]}), "M", 400, "regular"),
    ("no_data", _req({"inputs": [_tensor([1, 32, 32, 3])]}), "M", 400, "set exactly one of 'data'"),
    (
        "binary_size_past_end",
        _req({"inputs": [_tensor([1, 32, 32, 3], parameters={"binary_data_size": 3072})]}, b"\0" * 100),
        "M",
        400,
        "runs past the end of the body",
    ),
    (
        "binary_size_wrong",
        _req({"inputs": [_tensor([1, 32, 32, 3], parameters={"binary_data_size": 100})]}, b"\0" * 100),
        "M",
        400,
        "binary_data_size is 100 bytes, shape",
    ),
    (
        "binary_left_over",
        _req({"inputs": [_tensor([1, 32, 32, 3], parameters={"binary_data_size": 3072})]}, b"\0" * 3073),
        "M",
        400,
        "1 bytes of binary data beyond",
    ),
    (
        "header_length_too_big",
        (b"{}", {"Inference-Header-Content-Length": "99"}),
        "M",
        400,
        "Inference-Header-Content-Length",
    ),
    (
        "header_length_not_int",
        (b"{}", {"Inference-Header-Content-Length": "abc"}),
        "M",
        400,
        "Inference-Header-Content-Length",
    ),
    (
        "unknown_output",
        _req({"inputs": [_tensor([1, 32, 32, 3], data=[0] * 3072)], "outputs": [{"name": "probs"}]}),
        "M",
        400,
        "output 'probs'",
    ),
    (
        "classification_zero",
        _req(
            {
                "inputs": [_tensor([1, 32, 32, 3], data=[0] * 3072)],
                "outputs": [{"name": "logits", "parameters": {"classification": 0}}],
            }
        ),
        "M",
        400,
        "parameter 'classification'",
    ),
    (
        "param_object",
        _req(
            {
                "inputs": [_tensor([1, 32, 32, 3], data=[0] * 3072)],
                "outputs": [{"name": "logits", "parameters": {"classification": [3]}}],
            }
        ),
        "M",
        400,
        "must be a boolean, a number or a string",
    ),
    ("huge_dimension", _req({"inputs": [_tensor([2**70, 32, 32, 3], data=[0])]}), "M", 400, "out of range"),
    (
        "huge_parameter",
        _req(
            {
                "inputs": [_tensor([1, 32, 32, 3], data=[0] * 3072)],
                "outputs": [{"name": "logits", "parameters": {"classification": 2**65}}],
            }
        ),
        "M",
        400,
        "64-bit integer range",
    ),
    (
        "too_many_images",
        _req({"inputs": [_tensor([100_000, 32, 32, 3], data=[0])]}),
        "M",
        400,
        "100000 images",
    ),
    (
        "timeout_not_int",
        _req({"inputs": [_tensor([1, 32, 32, 3], data=[0] * 3072)], "parameters": {"timeout": "soon"}}),
        "M",
        400,
        "'timeout'",
    ),
    (
        "timeout_null",
        _req({"inputs": [_tensor([1, 32, 32, 3], data=[0] * 3072)], "parameters": {"timeout": None}}),
        "M",
        400,
        "'timeout'",
    ),
    (
        "unknown_model",
        _req({"inputs": [_tensor([1, 32, 32, 3], data=[0] * 3072)]}),
        "no_such_model",
        404,
        "'no_such_model'",
    ),
]


@pytest.mark.parametrize(
    ("request_", "model_name", "status", "fragment"),
    [c[1:] for c in REST_ERRORS],
    ids=[c[0] for c in REST_ERRORS],
)
def test_errors_then_next_request_succeeds(
    server: Any,
    model: tuple[str, str],
    images: np.ndarray,
    expected: np.ndarray,
    request_: tuple[bytes, dict[str, str]],
    model_name: str,
    status: int,
    fragment: str,
) -> None:
    body, headers = request_
    name = model[0] if model_name == "M" else model_name
    answer = call(server.http_address, "POST", f"/v2/models/{name}/infer", body, headers)
    assert answer.status == status, answer.body[:500]
    assert answer.headers["content-type"] == "application/json"
    error = json.loads(answer.body)["error"]
    assert fragment in error, error
    good = infer(server.http_address, model[0], images[:2])
    np.testing.assert_allclose(
        np.frombuffer(good.binary(), "<f4").reshape(2, 10), expected[:2], atol=1e-4, rtol=0
    )


def test_timeout_parameter_is_the_deadline(server: Any, model: tuple[str, str], images: np.ndarray) -> None:
    # One microsecond is over before the request reaches the batcher.
    answer = infer(server.http_address, model[0], images[:1], parameters={"timeout": 1})
    assert answer.status == 504 and "timeout" in answer.json()["error"]


def _metric(srv: Any, name: str, labels: dict[str, str] | None = None) -> float:
    return float(srv.metric(name, labels))


def test_counts_in_the_shared_metrics(server: Any, model: tuple[str, str], images: np.ndarray) -> None:
    ok = {"method": "REST/ModelInfer", "code": "OK"}
    bad = {"method": "REST/ModelInfer", "code": "INVALID_ARGUMENT"}
    before = [_metric(server, "cifar_serve_requests_total", x) for x in (ok, bad)]
    images_before = _metric(server, "cifar_serve_images_total")
    assert infer(server.http_address, model[0], images[:4]).status == 200
    assert call(server.http_address, "POST", f"/v2/models/{model[0]}/infer", b"{").status == 400
    after = [_metric(server, "cifar_serve_requests_total", x) for x in (ok, bad)]
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1]
    assert _metric(server, "cifar_serve_images_total") - images_before >= 4
    assert _metric(server, "cifar_serve_request_latency_seconds_count", {"method": "REST/ModelInfer"}) >= 2


def test_rest_stats_are_the_grpc_statistics(server: Any, model: tuple[str, str], images: np.ndarray) -> None:
    import grpc

    from cifar_serve.v1 import open_inference_pb2 as oip
    from cifar_serve.v1 import open_inference_pb2_grpc as oip_grpc

    path = f"/v2/models/{model[0]}/stats"
    before = call(server.http_address, "GET", path).json()["model_stats"]
    assert infer(server.http_address, model[0], images[:5]).status == 200
    rest = {s["version"]: s for s in call(server.http_address, "GET", path).json()["model_stats"]}
    with grpc.insecure_channel(server.address) as ch:
        reply = oip_grpc.GRPCInferenceServiceStub(ch).ModelStatistics(
            oip.ModelStatisticsRequest(name=model[0]), timeout=10
        )
    grpc_stats = {s.version: s for s in reply.model_stats}
    assert set(rest) == set(grpc_stats)
    for version, s in rest.items():
        g = grpc_stats[version]
        assert (s["inference_count"], s["execution_count"]) == (g.inference_count, g.execution_count)
        assert s["inference_stats"]["success"]["count"] == g.inference_stats.success.count
    served = {s["version"]: s for s in before}[model[1]]
    assert rest[model[1]]["inference_count"] - served["inference_count"] == 5


# ---------------------------------------------------------------------------- limits, batching, curl


@pytest.fixture(scope="module")
def small_server(model_dir: Path, make_settings: Any) -> Iterator[Any]:
    """Batches of 2 that wait long for a second request; bodies of at most 64 KiB."""
    from cifar_serve.server.launch import ServerThread

    settings = make_settings(
        model_dir,
        max_batch_size=2,
        max_batch_delay_ms=3000.0,
        idle_dispatch=False,
        max_receive_message_bytes=64 * 1024,
        max_images_per_request=8,
        max_queue_images=64,
    )
    with ServerThread(settings) as srv:
        yield srv


def test_rest_and_grpc_requests_share_one_batch(small_server: Any, sample: Any, served_model: Any) -> None:
    srv = small_server
    x = np.ascontiguousarray(sample.images[:2])
    count, total = _metric(srv, "cifar_serve_batch_size_count"), _metric(srv, "cifar_serve_batch_size_sum")
    with grpc.insecure_channel(srv.address) as ch, ThreadPoolExecutor(2) as pool:
        native = classifier_pb2_grpc.ClassifierStub(ch)
        a = pool.submit(
            native.Classify,
            classifier_pb2.ClassifyRequest(packed=classifier_pb2.PackedImages(data=x[:1].tobytes(), count=1)),
            timeout=TIMEOUT_S,
        )
        b = pool.submit(infer, srv.http_address, served_model(srv)[0], x[1:])
        a.result()
        assert b.result().status == 200
    assert _metric(srv, "cifar_serve_batch_size_count") - count == 1
    assert _metric(srv, "cifar_serve_batch_size_sum") - total == 2


def test_body_and_image_limits(small_server: Any, sample: Any, served_model: Any) -> None:
    name = served_model(small_server)[0]
    x = np.ascontiguousarray(sample.images[:30])  # 92 KiB: over the 64 KiB body limit
    answer = infer(small_server.http_address, name, x)
    assert answer.status == 413 and "--max-receive-message-bytes" in answer.json()["error"]
    answer = infer(small_server.http_address, name, x[:9])  # under the body limit, over 8 images
    assert answer.status == 400 and "9 images, more than the limit of 8" in answer.json()["error"]


def _curl() -> str:
    found = shutil.which("curl")
    if not found:
        pytest.skip("curl not installed")
    return found


def test_curl_malformed_wrong_shape_and_oversized(
    small_server: Any, tmp_path: Path, served_model: Any
) -> None:
    exe = _curl()
    url = f"http://{small_server.http_address}/v2/models/{served_model(small_server)[0]}/infer"

    def curl(*args: str) -> tuple[int, dict[str, Any]]:
        proc = subprocess.run(
            [exe, "-sS", "-w", "\n%{http_code}", *args, url],
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        assert proc.returncode == 0, proc.stderr
        body, code = proc.stdout.rsplit("\n", 1)
        return int(code), json.loads(body)

    code, doc = curl("-d", '{"inputs": [{"name": "images",')
    assert code == 400 and "malformed JSON" in doc["error"]
    shape = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 3, 32, 32], "data": [0] * 3072}]}
    code, doc = curl("-H", "Content-Type: application/json", "-d", json.dumps(shape))
    assert code == 400 and "shape [1,3,32,32], expected [n,32,32,3]" in doc["error"]
    big = tmp_path / "big.json"
    big.write_text(
        json.dumps(
            {
                "inputs": [
                    {
                        "name": "images",
                        "datatype": "UINT8",
                        "shape": [8, 32, 32, 3],
                        "data": [255] * (8 * 3072),
                    }
                ]
            }
        )
    )
    code, doc = curl("--data-binary", f"@{big}")
    assert code == 413 and "exceeds --max-receive-message-bytes" in doc["error"]
    # A chunked body declares no length: counted as it arrives.
    code, doc = curl("-H", "Transfer-Encoding: chunked", "--data-binary", f"@{big}")
    assert code == 413


# ---------------------------------------------------------------------------- readiness, auth, TLS, drain


def test_warming_up_is_not_ready_and_infer_is_503(fake_server: Any, fake_runtime: Any) -> None:
    fake_runtime.warm_gate.clear()
    srv = fake_server(wait_ready=False)
    a = srv.http_address
    ready = call(a, "GET", "/v2/health/ready")
    assert ready.status == 400 and "warming up" in ready.json()["error"]
    assert call(a, "GET", "/v2/health/live").status == 200
    assert call(a, "GET", "/v2/models/cifar10_resnet18/ready").status == 400
    x = np.zeros((1, 32, 32, 3), np.uint8)
    answer = infer(a, "cifar10_resnet18", x)
    assert answer.status == 503 and "warming up" in answer.json()["error"]
    fake_runtime.warm_gate.set()
    deadline = time.monotonic() + 30
    while not srv.server.lifecycle.ready and time.monotonic() < deadline:
        time.sleep(0.01)  # warm-up runs in the server's thread; nothing to await from here
    assert call(a, "GET", "/v2/health/ready").status == 200
    answer = infer(a, "cifar10_resnet18", x)
    assert answer.status == 200


def test_drain_finishes_requests_in_flight_and_refuses_new_connections(
    fake_server: Any, fake_runtime: Any
) -> None:
    srv = fake_server()
    a = srv.http_address
    x = np.arange(3072, dtype=np.uint8).reshape(1, 32, 32, 3)
    fake_runtime.gate.clear()  # hold the forward pass
    with ThreadPoolExecutor(2) as pool:
        pending = pool.submit(infer, a, "cifar10_resnet18", x)
        assert fake_runtime.entered.wait(30)
        stopping = pool.submit(srv.stop, 10.0)
        deadline = time.monotonic() + 30
        refused = False
        while not refused and time.monotonic() < deadline:
            try:
                call(a, "GET", "/v2/health/live")
            except OSError:
                refused = True
        assert refused, "the REST port still took connections while draining"
        fake_runtime.gate.set()
        answer = pending.result(timeout=30)
        stopping.result(timeout=30)
    assert answer.status == 200
    np.testing.assert_array_equal(
        np.frombuffer(answer.binary(), "<f4"), x.reshape(-1)[:10].astype(np.float32)
    )


def test_bearer_token(fake_server: Any) -> None:
    srv = fake_server(auth_token="s3cret")
    a = srv.http_address
    x = np.zeros((1, 32, 32, 3), np.uint8)
    body, headers = infer_body(x)
    for given in (None, "Bearer wrong", "s3cret"):
        h = dict(headers, **({"Authorization": given} if given else {}))
        answer = call(a, "POST", "/v2/models/cifar10_resnet18/infer", body, h)
        assert answer.status == 401 and answer.headers["www-authenticate"] == "Bearer"
        assert "bearer token" in answer.json()["error"]
    assert call(a, "GET", "/v2/models/cifar10_resnet18").status == 401
    answer = call(
        a, "POST", "/v2/models/cifar10_resnet18/infer", body, dict(headers, Authorization="Bearer s3cret")
    )
    assert answer.status == 200
    # Probes stay open, as the gRPC health service does.
    assert call(a, "GET", "/v2/health/ready").status == 200


def test_tls(fake_server: Any, tmp_path: Path, self_signed: Any) -> None:
    cert, key = self_signed(tmp_path, "localhost", ip="127.0.0.1")
    srv = fake_server(tls_cert=str(cert), tls_key=str(key))
    context = ssl.create_default_context(cafile=str(cert))
    conn = http.client.HTTPSConnection("127.0.0.1", srv.http_port, context=context, timeout=TIMEOUT_S)
    try:
        conn.request("GET", "/v2/health/ready")
        assert conn.getresponse().status == 200
    finally:
        conn.close()
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        call(srv.http_address, "GET", "/v2/health/ready")  # plain HTTP to a TLS port


def test_http_port_minus_one_turns_rest_off(fake_server: Any) -> None:
    assert fake_server(http_port=-1).http_port == -1


# ---------------------------------------------------------------------------- Triton's own client


@pytest.fixture(scope="module")
def triton_report(
    server: Any, model: tuple[str, str], images: np.ndarray, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("rest") / "images.npy"
    np.save(path, images)
    proc = subprocess.run(
        [sys.executable, str(CLIENT_CHECK), "http", server.http_address, model[0], str(path)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return report


def test_triton_http_client_health_metadata_config(
    triton_report: dict[str, Any], model: tuple[str, str], labels: list[str]
) -> None:
    r = triton_report["sync"]
    assert (r["live"], r["ready"], r["model_ready"], r["unknown_model_ready"]) == (True, True, True, False)
    assert "classification" in r["server_metadata"]["extensions"]
    meta = r["model_metadata"]
    assert meta["name"] == model[0] and meta["versions"] == [model[1]]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, len(labels)]}]
    assert r["model_config"]["name"] == model[0]
    assert r["stats"]["model_stats"][0]["name"] == model[0]


def test_triton_http_client_infer(
    triton_report: dict[str, Any], model: tuple[str, str], expected: np.ndarray
) -> None:
    r = triton_report["sync"]
    b = r["infer_binary"]
    assert (b["dtype"], b["shape"], b["id"], b["model_name"]) == (
        "float32",
        [len(expected), 10],
        "req-1",
        model[0],
    )
    for got in (b["logits"], r["infer_json"]["logits"], r["infer_default_outputs"], r["after_errors"]):
        np.testing.assert_allclose(np.array(got, np.float32), expected, atol=1e-4, rtol=0)
    assert r["infer_json"]["has_data"]


def test_triton_http_client_classification(
    triton_report: dict[str, Any], expected: np.ndarray, labels: list[str]
) -> None:
    r = triton_report["sync"]
    assert (r["classification"]["dtype"], r["classification"]["shape"]) == ("BYTES", [len(expected), 3])
    check_classification(r["classification"]["strings"], expected, labels, 3)
    check_classification(r["classification_json"], expected, labels, 2)


def test_triton_http_client_errors(triton_report: dict[str, Any]) -> None:
    e = triton_report["sync"]["errors"]
    assert e["unknown_model"]["status"] == "404" and "no_such_model" in e["unknown_model"]["message"]
    assert e["unknown_model_metadata"]["status"] == "404"
    assert e["wrong_datatype"]["status"] == "400" and "'images'" in e["wrong_datatype"]["message"]
    assert e["unknown_output"]["status"] == "400" and "'probs'" in e["unknown_output"]["message"]
    assert e["wrong_shape"]["status"] == "400" and "shape" in e["wrong_shape"]["message"]


def test_triton_http_aio_client(
    triton_report: dict[str, Any], model: tuple[str, str], expected: np.ndarray, labels: list[str]
) -> None:
    r = triton_report["aio"]
    assert (r["live"], r["ready"], r["model_ready"], r["model_metadata_name"]) == (True, True, True, model[0])
    np.testing.assert_allclose(np.array(r["logits"], np.float32), expected, atol=1e-4, rtol=0)
    check_classification(r["classification"], expected, labels, 3)
    assert r["unknown_model"]["status"] == "404"


def test_triton_client_never_shares_our_process() -> None:
    assert "tritonclient" not in sys.modules


# ---------------------------------------------------------------------------- model repository


def _post_json(address: str, path: str, doc: Any) -> Answer:
    return call(address, "POST", path, json.dumps(doc).encode(), {"Content-Type": "application/json"})


def test_repository_index_and_model_control_closed_by_default(server: Any, model: tuple[str, str]) -> None:
    a = server.http_address
    index = _post_json(a, "/v2/repository/index", {})
    assert index.status == 200
    assert index.json() == [{"name": model[0], "version": model[1], "state": "READY", "reason": ""}]
    answer = _post_json(a, "/v2/repository/models/no_such_model/load", {})
    assert answer.status == 404 and "no_such_model" in answer.json()["error"]
    for verb in ("load", "unload"):
        answer = _post_json(a, f"/v2/repository/models/{model[0]}/{verb}", {})
        assert answer.status == 400 and "--model-control-mode" in answer.json()["error"]
    assert call(a, "GET", "/v2/health/ready").status == 200


def test_refused_loads_in_explicit_mode(fake_server: Any, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    srv = fake_server(model_control_mode="explicit", model_repository=str(tmp_path))
    a = srv.http_address
    load = "/v2/repository/models/cifar10_resnet18/load"
    answer = _post_json(a, load, {"parameters": {"colour": "red"}})
    assert answer.status == 400 and "'colour'" in answer.json()["error"]
    # A folder without artifacts: refused with the reason, the serving version stays.
    answer = _post_json(a, load, {"parameters": {"model_dir": "empty"}})
    error = answer.json()["error"]
    assert answer.status == 400 and "cannot load" in error and "manifest" in error
    assert str(tmp_path) not in error  # named relative to the repository, not by its host path
    index = _post_json(a, "/v2/repository/index", {}).json()[0]
    assert index["version"] == "1" and index["state"] == "READY"
    assert call(a, "GET", "/v2/health/ready").status == 200


def test_repository_unload_makes_infer_unavailable(fake_server: Any) -> None:
    srv = fake_server(model_control_mode="explicit")
    a = srv.http_address
    assert _post_json(a, "/v2/repository/models/cifar10_resnet18/unload", {}).status == 200
    assert _post_json(a, "/v2/repository/index", {}).json()[0]["state"] == "UNAVAILABLE"
    assert _post_json(a, "/v2/repository/index", {"ready": True}).json() == []
    assert call(a, "GET", "/v2/models/cifar10_resnet18/ready").status == 400
    answer = infer(a, "cifar10_resnet18", np.zeros((1, 32, 32, 3), np.uint8))
    assert answer.status == 503 and "unloaded" in answer.json()["error"]
