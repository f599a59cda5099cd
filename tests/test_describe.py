"""REST and gRPC describe the server and judge requests alike (fast tier: the fake model).

Both APIs render metadata, config, statistics and the repository index from one module, and
decode inference requests into one neutral type validated once; these tests ask a real server
the same questions over both APIs and compare the answers field by field.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import json_format
from google.protobuf.message import Message

from cifar_serve.v1 import open_inference_pb2 as pb
from cifar_serve.v1 import open_inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.fast

MODEL = "cifar10_resnet18"
TIMEOUT_S = 30
IMAGE_BYTES = 32 * 32 * 3
IMAGES = np.random.default_rng(7).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)


def _rest(srv: Any, method: str, path: str, doc: Any = None) -> tuple[int, Any]:
    host, port = srv.http_address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT_S)
    try:
        body = None if doc is None else json.dumps(doc).encode()
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _as(message: Message, doc: Any) -> Message:
    """REST's JSON read into the gRPC message (fields only REST has are skipped), for comparison."""
    json_format.ParseDict(doc, message, ignore_unknown_fields=True)
    return message


@pytest.fixture
def both(fake_server: Any) -> Iterator[tuple[Any, Any]]:
    """A server batching with a 2.01 ms delay (a value int() and round() read differently),
    its gRPC stub, after one inference over each API so the statistics have something to show."""
    srv = fake_server(max_batch_delay_ms=2.01, max_batch_size=4)
    with grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        req = pb.ModelInferRequest(model_name=MODEL)
        req.inputs.add(name="images", datatype="UINT8", shape=[2, 32, 32, 3])
        req.raw_input_contents.append(IMAGES[:2].tobytes())
        stub.ModelInfer(req, timeout=TIMEOUT_S)
        status, _ = _rest(
            srv,
            "POST",
            f"/v2/models/{MODEL}/infer",
            {
                "inputs": [
                    {
                        "name": "images",
                        "datatype": "UINT8",
                        "shape": [1, 32, 32, 3],
                        "data": IMAGES[2].ravel().tolist(),
                    }
                ]
            },
        )
        assert status == 200
        yield srv, stub


def test_config_is_the_same_over_rest_and_grpc(both: tuple[Any, Any]) -> None:
    srv, stub = both
    status, rest = _rest(srv, "GET", f"/v2/models/{MODEL}/config")
    assert status == 200
    config = stub.ModelConfig(pb.ModelConfigRequest(name=MODEL), timeout=TIMEOUT_S).config
    # One rounding rule: 2.01 ms is 2010 µs over both APIs (REST truncated it to 2009 before).
    assert rest["dynamic_batching"]["max_queue_delay_microseconds"] == 2010
    assert config.dynamic_batching.max_queue_delay_microseconds == 2010
    # REST carries every field gRPC does, with the same values ...
    assert _as(pb.ModelConfig(), rest) == config
    assert rest["backend"] == config.backend and rest["dynamic_batching"]["preserve_ordering"] is True
    (group,) = rest["instance_group"]
    assert group["kind"] == "KIND_CPU" and group["count"] >= 1
    # ... and the JSON-only fields of Triton's model_config besides.
    assert rest["version_policy"] == {"specific": {"versions": ["1"]}}
    assert rest["parameters"]["labels"]["string_value"].split(",")[0] == "airplane"


def test_metadata_and_index_are_the_same_over_rest_and_grpc(both: tuple[Any, Any]) -> None:
    srv, stub = both
    _, rest = _rest(srv, "GET", f"/v2/models/{MODEL}")
    grpc_meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL), timeout=TIMEOUT_S)
    assert _as(pb.ModelMetadataResponse(), rest) == grpc_meta
    assert rest["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, 32, 32, 3]}]

    _, rest = _rest(srv, "GET", "/v2")
    assert _as(pb.ServerMetadataResponse(), rest) == stub.ServerMetadata(
        pb.ServerMetadataRequest(), timeout=TIMEOUT_S
    )
    assert "classification" in rest["extensions"]

    _, rest = _rest(srv, "POST", "/v2/repository/index", {"ready": True})
    grpc_index = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=TIMEOUT_S)
    assert _as(pb.RepositoryIndexResponse(), {"models": rest}) == grpc_index
    assert [(m["name"], m["state"]) for m in rest] == [(MODEL, "READY")]


def test_statistics_are_the_same_over_rest_and_grpc(both: tuple[Any, Any]) -> None:
    srv, stub = both
    _, rest = _rest(srv, "GET", f"/v2/models/{MODEL}/stats")
    grpc_stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name=MODEL), timeout=TIMEOUT_S)
    assert _as(pb.ModelStatisticsResponse(), rest) == grpc_stats
    (entry,) = rest["model_stats"]
    assert entry["inference_count"] == 3  # two images over gRPC, one over REST
    assert entry["inference_stats"]["success"]["count"] == 2
    sizes = [b["batch_size"] for b in entry["batch_stats"]]
    assert sizes == sorted(sizes) and sum(b["compute_infer"]["count"] for b in entry["batch_stats"]) >= 1


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (
            {"outputs": [{"name": "logits", "parameters": {"classification": "3"}}]},
            "output 'logits': parameter 'classification' must be an int64_param, got string_param",
        ),
        (
            {"outputs": [{"name": "logits", "parameters": {"classification": 0}}]},
            "output 'logits': parameter 'classification' must be at least 1, got 0",
        ),
        ({"outputs": [{"name": "probs"}]}, "output 'probs': unknown; this model's only output is 'logits'"),
        ({"shape": [1, 3, 32, 32]}, "input 'images': shape [1,3,32,32], expected [n,32,32,3] with n >= 1"),
        ({"datatype": "FP32"}, "input 'images': datatype FP32, expected UINT8"),
        ({"name": "pixels"}, "input 'pixels': unknown; this model's only input is 'images'"),
    ],
    ids=["classification_kind", "classification_zero", "unknown_output", "shape", "datatype", "input_name"],
)
def test_the_same_bad_request_gets_the_same_message(
    fake_server: Any, mutate: dict[str, Any], fragment: str
) -> None:
    srv = fake_server()
    tensor: dict[str, Any] = {"name": "images", "datatype": "UINT8", "shape": [1, 32, 32, 3]}
    outputs: list[dict[str, Any]] = mutate.get("outputs", [])
    tensor.update({k: v for k, v in mutate.items() if k != "outputs"})

    # REST: JSON with binary data, the way tritonclient.http sends it.
    head = json.dumps(
        {
            "inputs": [{**tensor, "parameters": {"binary_data_size": IMAGE_BYTES}}],
            "outputs": outputs,
        }
    ).encode()
    host, port = srv.http_address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT_S)
    try:
        conn.request(
            "POST",
            f"/v2/models/{MODEL}/infer",
            body=head + IMAGES[0].tobytes(),
            headers={"Inference-Header-Content-Length": str(len(head))},
        )
        resp = conn.getresponse()
        status, rest_error = resp.status, json.loads(resp.read())["error"]
    finally:
        conn.close()

    # gRPC: the same request as protobuf, raw contents and typed parameters.
    req = pb.ModelInferRequest(model_name=MODEL)
    req.inputs.add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
    req.raw_input_contents.append(IMAGES[0].tobytes())
    for out in outputs:
        o = req.outputs.add(name=out["name"])
        for key, value in out.get("parameters", {}).items():
            if isinstance(value, str):
                o.parameters[key].string_param = value
            else:
                o.parameters[key].int64_param = value
    with grpc.insecure_channel(srv.address) as channel, pytest.raises(grpc.RpcError) as err:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=TIMEOUT_S)

    assert status == 400 and err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in rest_error, rest_error
    assert rest_error == err.value.details()
