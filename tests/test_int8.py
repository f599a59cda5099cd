"""The int8 model (issue 21): exported and gated, refused when tampered or misused, served on the CPU."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from cifar_serve.v1 import classifier_pb2 as pb
from cifar_serve.v1 import classifier_pb2_grpc as pb_grpc
from cifar_serve.v1 import open_inference_pb2 as oip
from cifar_serve.v1 import open_inference_pb2_grpc as oip_grpc

REPO = Path(__file__).resolve().parents[1]
CALIBRATION_ZIP = REPO / "tests" / "fixtures" / "cifar10-train-calibration.zip"
TIMEOUT_S = 30


@pytest.fixture(scope="module")
def int8_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory, sample: Any) -> Path:
    """An export with model.int8.onnx: ``artifacts/`` when `make artifacts` wrote one, else made here."""
    manifest = json.loads((model_dir / "manifest.json").read_text())
    if "onnx_int8" in manifest["artifacts"]:
        return model_dir
    from cifar_serve.export.data import load_split
    from cifar_serve.export.exporter import export_model
    from cifar_serve.export.quantize import Int8Request, calibration_sample

    images, record = calibration_sample(load_split(CALIBRATION_ZIP, "train").images, str(CALIBRATION_ZIP))
    request = Int8Request(images, record, sample.images, sample.labels, "sample")
    out = tmp_path_factory.mktemp("int8-artifacts")
    export_model(REPO / "models" / "resnet18_cifar10.pt", out, sample.images[:64], int8=request)
    return out


def _copy(src: Path, dest: Path, *, version: str | None = None) -> Path:
    shutil.copytree(src, dest)
    if version is not None:
        manifest = json.loads((dest / "manifest.json").read_text())
        manifest["model"]["version"] = version
        (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def test_the_export_records_calibration_gate_and_sha256(int8_dir: Path) -> None:
    from cifar_serve.export.exporter import sha256_file
    from cifar_serve.export.quantize import GATE_MAX_DROP_POINTS, GATE_MIN_AGREEMENT

    manifest = json.loads((int8_dir / "manifest.json").read_text())
    entry = manifest["artifacts"]["onnx_int8"]
    assert entry["sha256"] == sha256_file(int8_dir / entry["path"])
    assert entry["quantization"]["format"] == "QDQ"
    calibration = entry["calibration"]
    # Training images only, a fixed seeded draw, identified by its pixels.
    assert calibration["split"] == "train" and calibration["seed"] == 0
    assert calibration["count"] == 512 and len(calibration["sample_sha256"]) == 64
    gate = entry["gate"]
    assert gate["passed"] and gate["top1_agreement"] >= GATE_MIN_AGREEMENT
    assert gate["fp32_top1"] - gate["int8_top1"] <= GATE_MAX_DROP_POINTS
    assert len(manifest["check_sample"]["logits_int8"]) == manifest["check_sample"]["count"]


def test_the_int8_runtime_answers_within_the_agreement_bound(int8_dir: Path, sample: Any) -> None:
    from cifar_serve.export.quantize import GATE_MAX_DROP_POINTS, GATE_MIN_AGREEMENT
    from cifar_serve.server.core import check_sample
    from cifar_serve.server.runtime import ModelRuntime

    fp32 = ModelRuntime(int8_dir, device="cpu", backend="onnxruntime", max_batch_size=64, threads=2)
    int8 = ModelRuntime(
        int8_dir, device="auto", backend="auto", precision="int8", max_batch_size=64, threads=2
    )
    d = int8.describe()
    assert (d["backend"], d["precision"], d["device"]) == ("onnxruntime", "int8", "cpu")
    assert {row["runtime"] for row in d["runtime_table"]} == {"onnxruntime-int8"}
    manifest = json.loads((int8_dir / "manifest.json").read_text())
    assert d["sha256"] == manifest["artifacts"]["onnx_int8"]["sha256"]
    assert "same top-1" in check_sample(int8, 64)
    # Batches of the shapes the batcher forms: one image, an odd count, the maximum.
    for n in (1, 7, 64):
        out = int8.infer(sample.images[:n])
        assert out.dtype == np.float32 and out.shape == (n, 10)
    a, b = _infer(fp32, sample.images), _infer(int8, sample.images)
    agreement = float((a.argmax(1) == b.argmax(1)).mean())
    fp32_top1 = float((a.argmax(1) == sample.labels).mean() * 100)
    int8_top1 = float((b.argmax(1) == sample.labels).mean() * 100)
    assert agreement >= GATE_MIN_AGREEMENT, agreement
    assert fp32_top1 - int8_top1 <= GATE_MAX_DROP_POINTS, (fp32_top1, int8_top1)


def _infer(runtime: Any, x: np.ndarray) -> np.ndarray:
    return np.concatenate([runtime.infer(x[i : i + 64]) for i in range(0, len(x), 64)])


def test_a_tampered_int8_file_is_refused_by_its_sha256(int8_dir: Path, tmp_path: Path) -> None:
    from cifar_serve.server.runtime import ArtifactError, ModelRuntime

    tampered = _copy(int8_dir, tmp_path / "tampered")
    with open(tampered / "model.int8.onnx", "r+b") as fh:
        fh.seek(4000)
        byte = fh.read(1)
        fh.seek(4000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ArtifactError, match=r"model\.int8\.onnx: sha256 .* does not match"):
        ModelRuntime(tampered, device="cpu", backend="onnxruntime", precision="int8")
    # fp32 reads other files: the same folder still serves it.
    ModelRuntime(tampered, device="cpu", backend="onnxruntime")


def test_bad_combinations_say_what_to_do(int8_dir: Path, tmp_path: Path) -> None:
    from cifar_serve.server.runtime import ArtifactError, ModelRuntime

    # Refused before anything loads, so no GPU is needed to see the message.
    with pytest.raises(ArtifactError, match=r"runs on the CPU only.*--device cpu"):
        ModelRuntime(int8_dir, device="cuda:0", backend="auto", precision="int8")
    with pytest.raises(ArtifactError, match=r"served by ONNX Runtime.*--backend onnxruntime"):
        ModelRuntime(int8_dir, device="cpu", backend="torchscript", precision="int8")
    no_int8 = _copy(int8_dir, tmp_path / "no-int8")
    manifest = json.loads((no_int8 / "manifest.json").read_text())
    del manifest["artifacts"]["onnx_int8"]
    (no_int8 / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"has no int8 model.*cifar-export --out .*--precision fp32"):
        ModelRuntime(no_int8, device="cpu", backend="auto", precision="int8")


def test_the_server_refuses_a_folder_without_int8_at_start(
    int8_dir: Path, tmp_path: Path, free_port: Any
) -> None:
    no_int8 = _copy(int8_dir, tmp_path / "no-int8")
    manifest = json.loads((no_int8 / "manifest.json").read_text())
    del manifest["artifacts"]["onnx_int8"]
    (no_int8 / "manifest.json").write_text(json.dumps(manifest))
    cmd = [sys.executable, "-m", "cifar_serve.server", "--model-dir", str(no_int8), "--precision", "int8"]
    cmd += ["--port", str(free_port()), "--metrics-port", "-1"]
    cmd += ["--workers", os.environ.get("CIFAR_SERVE_WORKERS", "1")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "cannot start" in proc.stderr and "has no int8 model" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def int8_server(
    int8_dir: Path, tmp_path_factory: pytest.TempPathFactory, free_port: Any, wait_serving: Any
) -> Iterator[tuple[str, int, Path, subprocess.Popen[str]]]:
    """``cifar-serve --precision int8`` (with --workers N under CIFAR_SERVE_WORKERS) on a copy."""
    served = _copy(int8_dir, tmp_path_factory.mktemp("int8-served") / "model", version="1")
    port, metrics_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "cifar_serve.server", "--model-dir", str(served), "--precision", "int8"]
    cmd += ["--port", str(port), "--metrics-port", str(metrics_port), "--max-batch-size", "16"]
    cmd += ["--workers", os.environ.get("CIFAR_SERVE_WORKERS", "1")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_serving(f"127.0.0.1:{port}", proc)
        yield f"127.0.0.1:{port}", metrics_port, served, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_served_int8_answers_right_and_says_so(
    int8_server: tuple[str, int, Path, subprocess.Popen[str]], int8_dir: Path, sample: Any
) -> None:
    from cifar_serve.export.quantize import GATE_MIN_AGREEMENT
    from cifar_serve.server.runtime import ModelRuntime

    address, metrics_port, _served, _proc = int8_server
    x = sample.images[:128]
    fp32 = _infer(ModelRuntime(int8_dir, device="cpu", backend="onnxruntime", threads=2), x)
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=TIMEOUT_S)
        assert (info.precision, info.backend, info.device) == ("int8", "onnxruntime", "cpu")
        assert {b.runtime for b in info.runtime_table} == {"onnxruntime-int8"}
        manifest = json.loads((int8_dir / "manifest.json").read_text())
        assert info.artifact_sha256 == manifest["artifacts"]["onnx_int8"]["sha256"]
        reply = stub.Classify(
            pb.ClassifyRequest(packed=pb.PackedImages(data=x.tobytes(), count=len(x)), include_logits=True),
            timeout=TIMEOUT_S,
        )
        got = np.asarray([list(r.logits) for r in reply.results], np.float32)
        assert float((got.argmax(1) == fp32.argmax(1)).mean()) >= GATE_MIN_AGREEMENT
        config = oip_grpc.GRPCInferenceServiceStub(ch).ModelConfig(
            oip.ModelConfigRequest(name=info.name), timeout=TIMEOUT_S
        )
        assert config.config.platform == "onnxruntime_onnx"
        assert config.config.parameters["precision"].string_value == "int8"
    page = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    assert re.search(r'cifar_serve_model_runtime\{[^}]*precision="int8"[^}]*\} 1\.0', page), page[-2000:]


def test_served_int8_hot_swaps_to_a_new_version(
    int8_server: tuple[str, int, Path, subprocess.Popen[str]], sample: Any
) -> None:
    address, _metrics_port, served, proc = int8_server
    manifest = json.loads((served / "manifest.json").read_text())
    manifest["model"]["version"] = "2"
    tmp = served / "manifest.json.new"
    tmp.write_text(json.dumps(manifest))
    tmp.replace(served / "manifest.json")
    proc.send_signal(signal.SIGHUP)  # reload the model folder: the new version passes its check sample
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        end = time.monotonic() + 120
        while (info := stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=TIMEOUT_S)).version != "2":
            assert proc.poll() is None and time.monotonic() < end, "SIGHUP did not load version 2"
            time.sleep(0.2)
        assert info.precision == "int8"
        x = sample.images[:8]
        request = pb.ClassifyRequest(packed=pb.PackedImages(data=x.tobytes(), count=8))
        reply = stub.Classify(request, timeout=TIMEOUT_S)
        assert len(reply.results) == 8 and reply.model_version == "2"


def test_int8_parity_with_eager_at_every_batch_size(int8_dir: Path, sample: Any) -> None:
    """The parity test for the int8 artifact, with its own tolerance (fp32's is 1e-4)."""
    import onnxruntime as ort
    import torch

    from cifar_serve.export.checkpoint import load_model
    from cifar_serve.export.exporter import PARITY_BATCH_SIZES
    from cifar_serve.export.model import ServingModel
    from cifar_serve.export.quantize import GATE_MIN_AGREEMENT, INT8_PARITY_ATOL

    net, meta = load_model(REPO / "models" / "resnet18_cifar10.pt")
    eager = ServingModel(net, meta["mean"], meta["std"]).eval()
    with torch.inference_mode():
        ref = eager(torch.from_numpy(sample.images)).numpy()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(int8_dir / "model.int8.onnx"), opts, providers=["CPUExecutionProvider"])
    for bs in PARITY_BATCH_SIZES:
        got = np.concatenate(
            [sess.run(["logits"], {"images": sample.images[i : i + bs]})[0] for i in range(0, len(ref), bs)]
        )
        assert float(np.abs(got - ref).max()) <= INT8_PARITY_ATOL, bs
        assert float((got.argmax(1) == ref.argmax(1)).mean()) >= GATE_MIN_AGREEMENT, bs
    recorded = json.loads((int8_dir / "manifest.json").read_text())["artifacts"]["onnx_int8"]["parity"]
    assert recorded["max_abs_diff"] <= INT8_PARITY_ATOL and recorded["batch_sizes"] == list(
        PARITY_BATCH_SIZES
    )


def test_an_int8_model_that_fails_the_gate_fails_the_export_with_both_figures(
    sample: Any, tmp_path: Path
) -> None:
    from cifar_serve.export.exporter import Int8GateError, export_model
    from cifar_serve.export.quantize import Int8Request

    # Calibrated on black images only: every activation range collapses, and the answers with it.
    black = np.zeros((16, 32, 32, 3), np.uint8)
    request = Int8Request(black, {"split": "train", "sample_sha256": "x"}, sample.images, sample.labels, "s")
    out = tmp_path / "out"
    with pytest.raises(Int8GateError, match=r"int8 top-1 [\d.]+% vs fp32 [\d.]+% .* agreement [\d.]+%"):
        export_model(REPO / "models" / "resnet18_cifar10.pt", out, None, int8=request)
    assert sorted(p.name for p in out.iterdir()) == []  # nothing half-written


def test_missing_default_calibration_data_names_the_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from cifar_serve.export import cli, int8_cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(int8_cli, "SOURCE_ROOT", tmp_path / "not-a-checkout")
    args = ["--checkpoint", str(REPO / "models" / "resnet18_cifar10.pt"), "--out", str(tmp_path / "out")]
    assert (
        cli.main([*args, "--parity-data", str(REPO / "tests" / "fixtures" / "cifar10-test-sample.zip")]) != 0
    )
    assert "pass --calibration-data" in caplog.text and "--no-int8" in caplog.text
    assert not (tmp_path / "out").exists()
