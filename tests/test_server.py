"""The native API end to end: a real server on loopback, real stubs, real CIFAR-10 images."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cifar_serve.v1 import classifier_pb2 as pb
from cifar_serve.v1 import classifier_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]


def _stub(channel: grpc.Channel) -> pb_grpc.ClassifierStub:
    return pb_grpc.ClassifierStub(channel)


def _top1(resp: pb.ClassifyResponse) -> np.ndarray:
    return np.array([r.predictions[0].class_index for r in resp.results])


def _logits(resp: pb.ClassifyResponse) -> np.ndarray:
    return np.array([list(r.logits) for r in resp.results], dtype=np.float32)


def test_generated_stubs_are_fresh() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "gen_protos.py"), "--check"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


def test_packed_matches_offline(channel, sample, offline_logits) -> None:  # type: ignore[no-untyped-def]
    x = sample.images[:200]
    req = pb.ClassifyRequest(packed=pb.PackedImages(data=x.tobytes(), count=len(x)), include_logits=True)
    resp = _stub(channel).Classify(req, timeout=60)
    assert len(resp.results) == 200
    np.testing.assert_allclose(_logits(resp), offline_logits[:200], atol=1e-4, rtol=0)
    assert (_top1(resp) == offline_logits[:200].argmax(1)).all()
    # Sanity on the model itself: the shipped model scores ~83% on the full test set.
    assert (_top1(resp) == sample.labels[:200]).mean() > 0.7


def test_raw_and_encoded_match_offline(channel, sample, sample_jpegs, offline_logits) -> None:  # type: ignore[no-untyped-def]
    idx = list(range(0, 600, 23))
    images = [
        pb.Image(raw_rgb=sample.images[i].tobytes()) if j % 2 else pb.Image(encoded=sample_jpegs[i][1])
        for j, i in enumerate(idx)
    ]
    resp = _stub(channel).Classify(pb.ClassifyRequest(images=images, include_logits=True), timeout=60)
    np.testing.assert_allclose(_logits(resp), offline_logits[idx], atol=1e-4, rtol=0)


def test_top_k_ranked_probabilities(channel, sample, offline_logits) -> None:  # type: ignore[no-untyped-def]
    resp = _stub(channel).Classify(
        pb.ClassifyRequest(images=[pb.Image(raw_rgb=sample.images[5].tobytes())], top_k=10), timeout=30
    )
    preds = resp.results[0].predictions
    assert len(preds) == 10
    probs = [p.probability for p in preds]
    assert probs == sorted(probs, reverse=True)
    assert abs(sum(probs) - 1.0) < 1e-4
    order = np.argsort(-offline_logits[5], kind="stable")
    assert [p.class_index for p in preds] == order.tolist()
    assert (
        preds[0].label
        == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")[
            preds[0].class_index
        ]
    )
    assert len(resp.results[0].logits) == 0  # logits only on request


def test_request_larger_than_batch_is_split(channel, sample, offline_logits) -> None:  # type: ignore[no-untyped-def]
    # The session server's max batch is 32: 75 images run as several batches, answered in order.
    x = sample.images[100:175]
    resp = _stub(channel).Classify(
        pb.ClassifyRequest(packed=pb.PackedImages(data=x.tobytes(), count=75), include_logits=True),
        timeout=60,
    )
    np.testing.assert_allclose(_logits(resp), offline_logits[100:175], atol=1e-4, rtol=0)


def test_stream_answers_matched_by_id(channel, sample, offline_logits) -> None:  # type: ignore[no-untyped-def]
    def requests():  # type: ignore[no-untyped-def]
        for i in range(40):
            yield pb.ClassifyStreamRequest(
                id=f"req-{i}",
                request=pb.ClassifyRequest(
                    images=[pb.Image(raw_rgb=sample.images[i].tobytes())], include_logits=True
                ),
            )
        yield pb.ClassifyStreamRequest(id="bad", request=pb.ClassifyRequest(top_k=3))

    answers = {a.id: a for a in _stub(channel).ClassifyStream(requests(), timeout=60)}
    assert len(answers) == 41
    assert answers["bad"].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "no images" in answers["bad"].error_message
    for i in range(40):
        a = answers[f"req-{i}"]
        assert a.error_code == 0
        np.testing.assert_allclose(list(a.response.results[0].logits), offline_logits[i], atol=1e-4)


def test_model_info(channel, model_dir) -> None:  # type: ignore[no-untyped-def]
    info = _stub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert info.name == manifest["model"]["name"]
    assert list(info.labels) == manifest["labels"]
    assert info.artifact_sha256 == manifest["artifacts"]["torchscript"]["sha256"]
    assert info.test_accuracy == pytest.approx(manifest["test_accuracy"])
    assert list(info.input.shape) == [-1, 32, 32, 3] and info.input.datatype == "UINT8"
    assert info.device == "cpu" and info.backend == "auto"  # ONNX Runtime for small batches
    assert info.batching.max_batch_size == 32


def test_health_serving(channel) -> None:  # type: ignore[no-untyped-def]
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "cifar_serve.v1.Classifier"):
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_services(channel) -> None:  # type: ignore[no-untyped-def]
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"cifar_serve.v1.Classifier", "grpc.health.v1.Health"} <= names


def test_grpcurl_classify(server, sample) -> None:  # type: ignore[no-untyped-def]
    grpcurl = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    if not Path(grpcurl).exists():
        pytest.skip("grpcurl binary not installed")
    import base64

    body = json.dumps(
        {"images": [{"raw_rgb": base64.b64encode(sample.images[0].tobytes()).decode()}], "top_k": 2}
    )
    proc = subprocess.run(
        [grpcurl, "-plaintext", "-d", body, server.address, "cifar_serve.v1.Classifier/Classify"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert len(out["results"][0]["predictions"]) == 2


def test_metrics_endpoint(server, channel, sample) -> None:  # type: ignore[no-untyped-def]
    _stub(channel).Classify(pb.ClassifyRequest(images=[pb.Image(raw_rgb=sample.images[0].tobytes())]))
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    )
    for name in (
        "cifar_serve_requests_total",
        "cifar_serve_request_latency_seconds_bucket",
        "cifar_serve_queue_time_seconds_bucket",
        "cifar_serve_batch_size_bucket",
        "cifar_serve_images_total",
    ):
        assert name in text, name
    assert 'cifar_serve_requests_total{code="OK",method="Classify"}' in text
