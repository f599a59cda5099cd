"""The null model (issue 20): made by cifar-export, served unchanged by the real server.

One export through the CLI into a temporary folder (conftest's ``null_model_dir``), one real
server over it (``--workers 2`` under CIFAR_SERVE_WORKERS=2, as `make test` runs the API tests a
second time), real sample images over gRPC (the client library) and REST; every answer is checked
against what ONNX Runtime computes offline from the exported ``model.onnx``.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

IDX = np.arange(3, 600, 50)  # 12 real test images, every class
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def manifest(null_model_dir: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((null_model_dir / "manifest.json").read_text())
    return loaded


@pytest.fixture(scope="module")
def images(sample: Any) -> np.ndarray:
    x = np.ascontiguousarray(sample.images[IDX])
    # Each image's mirror image too: the same per-channel means, so the null model's same answer.
    return np.concatenate([x, np.ascontiguousarray(x[:, :, ::-1])])


@pytest.fixture(scope="module")
def offline(null_model_dir: Path, images: np.ndarray) -> np.ndarray:
    """The exported ONNX model's logits, by ONNX Runtime directly (no project code)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(null_model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(["logits"], {"images": images})[0])


@pytest.fixture(scope="module")
def null_server(null_model_dir: Path, make_settings: Any) -> Iterator[Any]:
    from cifar_serve.server.launch import ServerThread

    # Default runtime settings (--backend auto: both runtimes load and warm-up picks per bucket);
    # the worker count comes from CIFAR_SERVE_WORKERS.
    srv = ServerThread(make_settings(null_model_dir)).start()
    try:
        yield srv
    finally:
        srv.stop()


def test_the_manifest_says_it_is_the_null_model(null_model_dir: Path, manifest: dict[str, Any]) -> None:
    from cifar_serve.export.data import CIFAR10_CLASSES
    from cifar_serve.export.exporter import NULL_MODEL_NAME, sha256_file

    assert manifest["model"] == {"name": NULL_MODEL_NAME, "version": "1", "arch": "null"}
    assert manifest["checkpoint"] is None and manifest["test_accuracy"] is None
    assert "meaningless" in manifest["note"]
    # The served contract, exactly as the real model's.
    assert manifest["input"]["shape"] == [-1, 32, 32, 3] and manifest["input"]["datatype"] == "UINT8"
    assert manifest["output"] == {"name": "logits", "datatype": "FP32", "shape": [-1, 10]}
    assert manifest["labels"] == list(CIFAR10_CLASSES)
    # fp32 only, every file as the manifest hashes it, parity checked like any export.
    assert set(manifest["artifacts"]) == {"torchscript", "onnx"}
    for entry in manifest["artifacts"].values():
        assert sha256_file(null_model_dir / entry["path"]) == entry["sha256"]
    assert manifest["parity"]["images"] == 64 and set(manifest["parity"]["top1_agreement"].values()) == {1.0}
    assert manifest["check_sample"]["count"] == len(manifest["check_sample"]["logits"]) > 0


def test_the_same_null_export_again_is_left_alone_and_a_real_one_is_not_overwritten(
    null_model_dir: Path, manifest: dict[str, Any]
) -> None:
    from cifar_serve.export import cli
    from cifar_serve.export.exporter import ExportError, export_model

    before = {p.name: p.read_bytes() for p in null_model_dir.iterdir()}
    assert cli.main(["--null-model", "--out", str(null_model_dir), "--no-parity", "-q"]) == 0
    assert {p.name: p.read_bytes() for p in null_model_dir.iterdir()} == before
    with pytest.raises(ExportError, match=r"already holds a different export \(the null model\)"):
        export_model(Path(__file__).resolve().parents[1] / "models" / "resnet18_cifar10.pt", null_model_dir)
    assert {p.name: p.read_bytes() for p in null_model_dir.iterdir()} == before


def test_the_offline_logits_are_those_of_a_pixel_mean(offline: np.ndarray) -> None:
    n = len(IDX)
    np.testing.assert_allclose(offline[:n], offline[n:], atol=1e-5, rtol=0)
    assert len({int(i) for i in offline.argmax(1)}) > 1  # not one constant answer


def test_grpc_answers_are_the_onnx_models(
    null_server: Any, manifest: dict[str, Any], images: np.ndarray, offline: np.ndarray
) -> None:
    from cifar_serve.client import Client

    with Client(null_server.address, timeout=TIMEOUT_S) as client:
        info = client.model_info()
        one = client.classify(images[:1], top_k=3, include_logits=True)
        many = client.classify(images, top_k=10, include_logits=True)
    assert (info.name, info.backend, info.labels[0]) == ("cifar10_null", "auto", "airplane")
    assert info.artifact_sha256 in {e["sha256"] for e in manifest["artifacts"].values()}
    got = np.stack([r.logits for r in many])
    np.testing.assert_allclose(got, offline, atol=1e-5, rtol=0)
    np.testing.assert_allclose(one[0].logits, offline[0], atol=1e-5, rtol=0)
    assert [r.label for r in many] == [info.labels[i] for i in offline.argmax(1)]


def test_rest_answers_are_the_onnx_models(null_server: Any, images: np.ndarray, offline: np.ndarray) -> None:
    tensor = {"name": "images", "datatype": "UINT8", "shape": list(images.shape)}
    tensor["parameters"] = {"binary_data_size": images.nbytes}
    doc = {"inputs": [tensor], "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}
    header = json.dumps(doc).encode()
    host, port = null_server.http_address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT_S)
    try:
        conn.request(
            "POST",
            "/v2/models/cifar10_null/infer",
            body=header + images.tobytes(),
            headers={"Inference-Header-Content-Length": str(len(header))},
        )
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    assert resp.status == 200, body[:300]
    json_len = int(resp.getheader("Inference-Header-Content-Length") or 0)
    out = json.loads(body[:json_len])
    assert out["model_name"] == "cifar10_null"
    assert out["outputs"][0]["shape"] == [len(images), 10]
    got = np.frombuffer(body[json_len:], "<f4").reshape(len(images), 10)
    np.testing.assert_allclose(got, offline, atol=1e-5, rtol=0)
