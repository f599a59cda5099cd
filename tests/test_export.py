"""Export of the shipped checkpoint: manifest, TorchScript, ONNX, and parity on real images.

The export runs once per module (about 15 s); every check below reads its artifacts. Parity
is re-measured here independently of ``check_parity`` with ONNX Runtime and TorchScript against
PyTorch eager on all 600 real CIFAR-10 test images of the committed sample.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from cifar_serve.export import CIFAR10_CLASSES, ResNet18, ServingModel, exporter, load_model
from cifar_serve.export import cli as export_cli
from cifar_serve.export.exporter import ParityError, check_parity, export_model

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "models" / "resnet18_cifar10.pt"
SAMPLE_ZIP = Path(__file__).resolve().parent / "fixtures" / "cifar10-test-sample.zip"
ATOL = 1e-4
BATCH_SIZES = (1, 7, 256)


@dataclass(frozen=True)
class Exported:
    out: Path
    manifest: dict[str, Any]
    images: np.ndarray
    labels: np.ndarray
    eager: ServingModel
    reference: np.ndarray  # eager logits of ``images``


def _sample() -> tuple[np.ndarray, np.ndarray]:
    """All 600 images of the committed sample (uint8 NHWC) and their labels, decoded with PIL."""
    images, labels = [], []
    with zipfile.ZipFile(SAMPLE_ZIP) as zf:
        for name in sorted(zf.namelist()):
            if not name.endswith(".jpg"):
                continue
            with Image.open(io.BytesIO(zf.read(name))) as img:
                images.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
            labels.append(CIFAR10_CLASSES.index(name.split("/")[-2]))
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def _eager() -> ServingModel:
    net, meta = load_model(CHECKPOINT)
    return ServingModel(net, meta["mean"], meta["std"]).eval()


def _run_eager(model: torch.nn.Module, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    outs = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            outs.append(model(torch.from_numpy(images[i : i + batch_size])).numpy())
    return np.concatenate(outs)


@pytest.fixture(scope="module", autouse=True)
def _one_intra_op_thread() -> Iterator[None]:
    """Parity runs hundreds of batch-1 inferences. On a small CI machine that is also busy
    with other work, a 2-thread pool stalls at every operator's barrier (10x slower measured);
    one thread keeps the module fast and changes nothing that is checked here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, _one_intra_op_thread: None) -> Exported:
    images, labels = _sample()
    assert len(images) == 600
    out = tmp_path_factory.mktemp("export") / "model"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CIFAR_SERVE_CACHE", str(tmp_path_factory.mktemp("cache")))
        result = export_model(CHECKPOINT, out, images)
    assert result.out_dir == out
    eager = _eager()
    return Exported(out, result.manifest, images, labels, eager, _run_eager(eager, images))


# --------------------------------------------------------------------------- manifest


def test_output_directory_holds_exactly_the_artifacts(exported: Exported) -> None:
    names = sorted(p.name for p in exported.out.iterdir())
    assert names == ["manifest.json", "model.onnx", "model.torchscript.pt"]  # no tmp dir, no .data


def test_manifest_fields(exported: Exported) -> None:
    manifest = json.loads((exported.out / "manifest.json").read_text())
    assert manifest == exported.manifest
    assert manifest["format"] == "cifar-serve-manifest/1"
    assert manifest["model"] == {"name": "cifar10_resnet18", "version": "1", "arch": "ResNet18"}
    assert manifest["input"] == {
        "name": "images",
        "datatype": "UINT8",
        "shape": [-1, 32, 32, 3],
        "layout": "NHWC",
        "color": "RGB",
    }
    assert manifest["output"] == {"name": "logits", "datatype": "FP32", "shape": [-1, 10]}
    assert manifest["labels"] == list(CIFAR10_CLASSES)
    assert manifest["normalization"]["in_graph"] is True
    assert manifest["normalization"]["mean"] == pytest.approx([0.4914, 0.4822, 0.4465])
    assert manifest["normalization"]["std"] == pytest.approx([0.2470, 0.2435, 0.2616])
    ckpt = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)
    assert manifest["test_accuracy"] == ckpt["test_accuracy"]
    assert 0.75 < manifest["test_accuracy"] <= 1.0
    assert manifest["artifacts"]["onnx"]["opset"] >= 17
    assert {"torch", "onnx", "onnxruntime", "numpy", "python"} <= set(manifest["versions"])
    parity = manifest["parity"]
    assert parity["images"] == 600
    assert parity["batch_sizes"] == [1, 7, 256]
    for runtime in ("torchscript", "onnxruntime"):
        assert parity["max_abs_diff"][runtime] <= ATOL
        assert parity["top1_agreement"][runtime] == 1.0


def test_manifest_hashes_match_files(exported: Exported) -> None:
    def sha256(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    artifacts = exported.manifest["artifacts"]
    assert set(artifacts) == {"torchscript", "onnx"}
    for entry in artifacts.values():
        path = exported.out / entry["path"]
        assert path.is_file()
        assert entry["sha256"] == sha256(path)
    assert exported.manifest["checkpoint"] == {"file": CHECKPOINT.name, "sha256": sha256(CHECKPOINT)}


# --------------------------------------------------------------------------- artifact validity


def test_torchscript_loads_without_any_project_code(exported: Exported, tmp_path: Path) -> None:
    """A fresh interpreter that cannot import cifar_serve loads and runs the TorchScript file."""
    script = textwrap.dedent(
        """
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "cifar_serve":
                    raise ImportError("blocked " + name)
                return None

        sys.meta_path.insert(0, Block())
        import numpy as np
        import torch

        model = torch.jit.load(sys.argv[1], map_location="cpu").eval()
        with torch.inference_mode():
            out = model(torch.from_numpy(np.load(sys.argv[2])))
        np.save(sys.argv[3], out.numpy())
        assert not [m for m in sys.modules if m.split(".")[0] == "cifar_serve"]
        try:
            import cifar_serve.export  # noqa: F401
        except ImportError:
            print("OK", out.dtype, tuple(out.shape))
        """
    )
    x = exported.images[:33]
    np.save(tmp_path / "x.npy", x)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            script,
            str(exported.out / "model.torchscript.pt"),
            str(tmp_path / "x.npy"),
            str(tmp_path / "y.npy"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "OK torch.float32 (33, 10)"
    got = np.load(tmp_path / "y.npy")
    np.testing.assert_allclose(got, exported.reference[:33], rtol=0, atol=ATOL)


def test_onnx_is_valid_with_dynamic_batch(exported: Exported) -> None:
    path = exported.out / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    opsets = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
    assert opsets["ai.onnx"] >= 17
    assert opsets["ai.onnx"] == exported.manifest["artifacts"]["onnx"]["opset"]
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer), (
        "weights must be inside model.onnx"
    )

    (inp,) = proto.graph.input
    (out,) = proto.graph.output
    assert inp.name == "images" and out.name == "logits"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    in_dims = inp.type.tensor_type.shape.dim
    out_dims = out.type.tensor_type.shape.dim
    assert [d.dim_value for d in in_dims[1:]] == [32, 32, 3]
    assert [d.dim_value for d in out_dims[1:]] == [10]
    for dims in (in_dims, out_dims):
        assert not dims[0].HasField("dim_value"), "batch dimension must be symbolic"
        assert dims[0].dim_param == "batch"


def test_onnx_runtime_accepts_any_batch_size(exported: Exported) -> None:
    sess = _session(exported.out / "model.onnx")
    (inp,) = sess.get_inputs()
    assert inp.name == "images" and inp.type == "tensor(uint8)"
    for n in (1, 2, 3, 600):
        (out,) = sess.run(["logits"], {"images": exported.images[:n]})
        assert out.shape == (n, 10) and out.dtype == np.float32


# --------------------------------------------------------------------------- parity


def _run_batched(fn: Any, images: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([fn(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def test_parity_with_eager_on_real_images(exported: Exported) -> None:
    sess = _session(exported.out / "model.onnx")
    ts = torch.jit.load(str(exported.out / "model.torchscript.pt"), map_location="cpu").eval()

    def run_ts(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return ts(torch.from_numpy(x)).numpy()

    def run_ort(x: np.ndarray) -> np.ndarray:
        return sess.run(["logits"], {"images": x})[0]

    images, ref = exported.images, exported.reference
    assert len(images) >= 512
    ref_top1 = ref.argmax(1)
    for name, fn in (("torchscript", run_ts), ("onnxruntime", run_ort)):
        for bs in BATCH_SIZES:
            got = _run_batched(fn, images, bs)
            assert got.shape == ref.shape and got.dtype == np.float32
            diff = float(np.abs(got - ref).max())
            assert diff <= ATOL, f"{name} batch {bs}: max abs diff {diff}"
            np.testing.assert_array_equal(got.argmax(1), ref_top1, err_msg=f"{name} batch {bs}")


def test_shipped_model_accuracy_on_sample(exported: Exported) -> None:
    acc = float((exported.reference.argmax(1) == exported.labels).mean())
    assert acc > 0.75, f"top-1 on the 600-image sample: {acc:.3f} (full test set: ~0.83)"
    # and the logits are a real classifier's: confident on most images, not constant
    assert exported.reference.std(axis=0).min() > 0.1


def test_eager_reference_is_independent_of_batching(exported: Exported) -> None:
    one_by_one = _run_eager(exported.eager, exported.images[:50], batch_size=1)
    np.testing.assert_allclose(one_by_one, exported.reference[:50], rtol=0, atol=ATOL)


def test_check_parity_flags_a_wrong_eager_model(exported: Exported) -> None:
    good = check_parity(
        exported.eager,
        exported.out / "model.torchscript.pt",
        exported.out / "model.onnx",
        exported.images[:64],
        batch_sizes=(1, 64),
    )
    assert good.ok

    net = ResNet18()
    net.load_state_dict(exported.eager.net.state_dict())
    with torch.no_grad():
        net.outlay.bias.add_(torch.linspace(-0.5, 0.5, 10))
    wrong = ServingModel(net).eval()
    report = check_parity(
        wrong,
        exported.out / "model.torchscript.pt",
        exported.out / "model.onnx",
        exported.images[:64],
        batch_sizes=(1, 64),
    )
    assert not report.ok
    for runtime in ("torchscript", "onnxruntime"):
        assert report.max_abs_diff[runtime] > 0.4
    assert report.as_dict()["images"] == 64


def test_export_refuses_a_wrong_artifact_and_leaves_no_files(
    exported: Exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TorchScript file that disagrees with eager -> ParityError; nothing half-valid is left."""
    real_export_torchscript = exporter.export_torchscript

    def export_perturbed_torchscript(model: ServingModel, path: Path) -> None:
        net = ResNet18()
        net.load_state_dict(model.net.state_dict())
        with torch.no_grad():
            net.blk4.bn2.bias.add_(0.05)
        real_export_torchscript(ServingModel(net).eval(), path)

    monkeypatch.setattr(exporter, "export_torchscript", export_perturbed_torchscript)
    out = tmp_path / "model"
    out.mkdir()
    (out / "manifest.json").write_text('{"previous": true}\n')  # a previous export stays untouched
    with pytest.raises(ParityError, match="parity check failed") as info:
        export_model(CHECKPOINT, out, exported.images[:64], batch_sizes=(64,), force=True)
    assert "torchscript" in str(info.value)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]
    assert json.loads((out / "manifest.json").read_text()) == {"previous": True}


# --------------------------------------------------------------------------- command line


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CIFAR_SERVE_CACHE=str(tmp_path / "cache"))
    return subprocess.run(
        [sys.executable, "-m", "cifar_serve.export.cli", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_missing_checkpoint(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "model.pt"
    out = tmp_path / "out"
    proc = _cli(tmp_path, "--checkpoint", str(missing), "--out", str(out), "--parity-data", str(SAMPLE_ZIP))
    assert proc.returncode != 0
    assert f"checkpoint not found: {missing}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_cli_corrupt_checkpoint(tmp_path: Path) -> None:
    bad = tmp_path / "model.pt"
    bad.write_bytes(CHECKPOINT.read_bytes()[:4096])  # a truncated download
    out = tmp_path / "out"
    proc = _cli(tmp_path, "--checkpoint", str(bad), "--out", str(out), "--no-parity")
    assert proc.returncode != 0
    assert f"{bad}: unreadable checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_cli_refuses_checkpoint_with_code(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    marker = tmp_path / "pwned"
    bad = tmp_path / "model.pt"
    torch.save({"model": {}, "payload": _Evil(marker)}, bad)
    rc = export_cli.main(["--checkpoint", str(bad), "--out", str(tmp_path / "out"), "--no-parity", "-q"])
    assert rc != 0
    assert "unreadable checkpoint" in caplog.text
    assert not marker.exists()


def test_cli_rejects_weights_of_another_architecture(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sd = ResNet18().state_dict()
    sd["blk4.extra.0.weight"] = torch.zeros(512, 512, 1, 1)
    bad = tmp_path / "model.pt"
    torch.save({"model": sd}, bad)
    rc = export_cli.main(["--checkpoint", str(bad), "--out", str(tmp_path / "out"), "--no-parity", "-q"])
    assert rc != 0
    assert "weights do not fit the document's ResNet18" in caplog.text


# --------------------------------------------------------------------------- a folder a server may serve


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_the_same_export_again_leaves_the_folder_alone(exported: Exported) -> None:
    before = _digests(exported.out)
    result = export_model(CHECKPOINT, exported.out, exported.images[:8])
    assert result.unchanged and result.manifest == exported.manifest
    assert _digests(exported.out) == before


def test_a_different_export_is_refused_without_force(exported: Exported, tmp_path: Path) -> None:
    ckpt = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)
    ckpt["model"]["outlay.bias"] = ckpt["model"]["outlay.bias"] + 0.01
    other = tmp_path / "other.pt"
    torch.save(ckpt, other)
    serving = tmp_path / "serving"
    serving.mkdir()
    for name in ("manifest.json", "model.onnx", "model.torchscript.pt"):
        (serving / name).write_bytes((exported.out / name).read_bytes())
    before = _digests(serving)
    with pytest.raises(exporter.ExportError, match=r"already holds a different export .* pass --force"):
        export_model(other, serving, None)
    assert _digests(serving) == before
    result = export_model(other, serving, None, force=True)
    assert not result.unchanged
    assert result.manifest["checkpoint"]["sha256"] == hashlib.sha256(other.read_bytes()).hexdigest()
    assert json.loads((serving / "manifest.json").read_text()) == result.manifest
    assert sorted(p.name for p in serving.iterdir()) == [
        "manifest.json",
        "model.onnx",
        "model.torchscript.pt",
    ]


def test_cli_is_quiet_says_parity_once_and_writes_a_readable_triton_repo(tmp_path: Path) -> None:
    """Run from outside the checkout, with the default --parity-data: it still finds the sample."""
    out, repo = tmp_path / "artifacts", tmp_path / "triton-repo"
    proc = _cli(
        tmp_path,
        "--checkpoint",
        str(CHECKPOINT),
        "--out",
        str(out),
        "--parity-images",
        "16",
        "--triton-repo",
        str(repo),
    )
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout + proc.stderr
    assert "Warning" not in text and "[torch.onnx]" not in text, text
    assert proc.stdout == ""
    assert text.count("parity on") == 1, text
    assert "parity on 16 images" in text and "top-1 agreement 100%" in text
    for path in [repo, *repo.rglob("*")]:
        mode = path.stat().st_mode & 0o777
        assert mode == (0o755 if path.is_dir() else 0o644), f"{path}: {oct(mode)}"
    again = _cli(tmp_path, "--checkpoint", str(CHECKPOINT), "--out", str(out), "--no-parity")
    assert again.returncode == 0 and "unchanged" in again.stderr


def test_missing_default_parity_data_names_the_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(export_cli, "SOURCE_ROOT", tmp_path / "not-a-checkout")
    rc = export_cli.main(["--checkpoint", str(CHECKPOINT), "--out", str(tmp_path / "out")])
    assert rc != 0
    assert "pass --parity-data" in caplog.text and "--no-parity" in caplog.text
    assert not (tmp_path / "out").exists()


def test_triton_repo_is_git_ignored() -> None:
    assert "triton-repo/" in (ROOT / ".gitignore").read_text().splitlines()


def test_help_has_no_rst_and_every_option_explained() -> None:
    import argparse

    parser = export_cli.build_parser()
    text = parser.format_help()
    assert "``" not in text
    assert parser.formatter_class is argparse.ArgumentDefaultsHelpFormatter  # shows every default
    for action in parser._actions:
        assert action.help and action.help != argparse.SUPPRESS, f"{action.option_strings} has no help"
