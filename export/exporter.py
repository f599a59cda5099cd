"""Export a checkpoint as TorchScript and ONNX, prove parity, and write ``manifest.json``.

The exported graphs take uint8 ``[N,32,32,3]`` RGB pixels and return float32 logits
``[N,10]``; normalisation is inside the graph, and the batch axis is dynamic.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import hashlib
import io
import json
import logging
import os
import platform
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import load_model
from .data import CIFAR10_CLASSES
from .model import CIFAR10_MEAN, CIFAR10_STD, NullNet, ServingModel
from .quantize import (
    GATE_MIN_AGREEMENT,
    INT8_NAME,
    INT8_PARITY_ATOL,
    Int8Request,
    compare_int8,
    quantize_int8,
    run_onnx,
)

__all__ = [
    "INPUT_NAME",
    "MANIFEST_NAME",
    "MODEL_NAME",
    "NULL_ARCH",
    "NULL_MODEL_NAME",
    "OUTPUT_NAME",
    "ExportError",
    "ExportResult",
    "Int8GateError",
    "ParityError",
    "ParityReport",
    "check_parity",
    "export_model",
    "export_null_model",
    "sha256_file",
]

logger = logging.getLogger(__name__)

MODEL_NAME = "cifar10_resnet18"
# The null model (NullNet): the served contract at microseconds per batch, for benchmarking the
# request path alone.
NULL_MODEL_NAME = "cifar10_null"
NULL_ARCH = "null"
NULL_NOTE = (
    "The null model: the per-channel pixel mean through a fixed Linear(3, 10), made to measure the "
    "request path. Its answers are meaningless; never serve it to classify images."
)
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
MANIFEST_NAME = "manifest.json"
TORCHSCRIPT_NAME = "model.torchscript.pt"
ONNX_NAME = "model.onnx"
DEFAULT_OPSET = 18
PARITY_ATOL = 1e-4
PARITY_BATCH_SIZES = (1, 7, 256)
# Images, with the eager model's logits for them, that a server re-checks a new version on
# before swapping it in (see the server's model reload).
CHECK_SAMPLE_SIZE = 8
CHECK_SAMPLE_ATOL = 1e-3


class ExportError(RuntimeError):
    """Export could not produce valid artifacts."""


class ParityError(ExportError):
    """An exported runtime disagrees with PyTorch eager beyond tolerance."""


class Int8GateError(ExportError):
    """The int8 model loses more top-1 than the gate allows, or agrees too little with fp32."""


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """Silence torch's deprecation FutureWarnings (torch.jit) and the ONNX exporter's progress
    lines, which it prints to stdout: users see the export's result, not torch's internals."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class ParityReport:
    """Agreement of each runtime with PyTorch eager on the same images."""

    images: int
    batch_sizes: tuple[int, ...]
    max_abs_diff: dict[str, float]
    top1_agreement: dict[str, float]
    atol: float

    @property
    def ok(self) -> bool:
        return all(d <= self.atol for d in self.max_abs_diff.values()) and all(
            a == 1.0 for a in self.top1_agreement.values()
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "batch_sizes": list(self.batch_sizes),
            "atol": self.atol,
            "max_abs_diff": self.max_abs_diff,
            "top1_agreement": self.top1_agreement,
        }


def _batched(fn: Any, images: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([fn(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def check_parity(
    eager: torch.nn.Module,
    torchscript_path: str | os.PathLike[str],
    onnx_path: str | os.PathLike[str],
    images: np.ndarray,
    batch_sizes: tuple[int, ...] = PARITY_BATCH_SIZES,
    atol: float = PARITY_ATOL,
) -> ParityReport:
    """Run ONNX Runtime (CPU) and TorchScript against eager on ``images`` at each batch size."""
    import onnxruntime as ort

    eager = eager.eval()
    with _quiet_torch():
        ts = torch.jit.load(str(torchscript_path), map_location="cpu").eval()
    opts = ort.SessionOptions()
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])

    def run_eager(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return eager(torch.from_numpy(x)).numpy()

    def run_ts(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return ts(torch.from_numpy(x)).numpy()

    def run_ort(x: np.ndarray) -> np.ndarray:
        return np.asarray(sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0])

    ref = _batched(run_eager, images, 256)
    diffs: dict[str, float] = {}
    agree: dict[str, float] = {}
    for name, fn in (("torchscript", run_ts), ("onnxruntime", run_ort)):
        worst = 0.0
        agreement = 1.0
        for bs in batch_sizes:
            out = _batched(fn, images, bs)
            if out.shape != ref.shape:
                raise ParityError(f"{name} at batch size {bs}: output shape {out.shape} != {ref.shape}")
            worst = max(worst, float(np.abs(out - ref).max()))
            agreement = min(agreement, float((out.argmax(1) == ref.argmax(1)).mean()))
        diffs[name] = worst
        agree[name] = agreement
    report = ParityReport(len(images), tuple(batch_sizes), diffs, agree, atol)
    logger.debug("parity on %d images: %s", len(images), report.as_dict())
    return report


def _existing_export(out: Path) -> dict[str, Any] | None:
    """The manifest already in ``out`` (``{}`` if unreadable), or None when there is none."""
    path = out / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


@dataclass(frozen=True)
class _Source:
    """What an export is of, as its manifest says: the real model's checkpoint or the null model."""

    model: dict[str, str]  # the manifest's "model": name, version, arch
    labels: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # Manifest entries that differ between the two: checkpoint, weights, test_accuracy, note.
    manifest: dict[str, Any]
    described: str  # for the log


def _same_export(
    out: Path,
    manifest: dict[str, Any],
    source: _Source,
    opset: int,
    int8: Int8Request | None,
) -> bool:
    try:
        entry = manifest["artifacts"].get("onnx_int8")
        if (entry is None) != (int8 is None):
            return False
        if entry is not None and int8 is not None:
            # Another calibration sample or quantizer choice is another int8 model.
            if entry["quantization"] != int8.config.as_dict() or (
                entry["calibration"]["sample_sha256"] != int8.calibration["sample_sha256"]
            ):
                return False
        if _checkpoint_sha(manifest) != _checkpoint_sha(source.manifest) or manifest["model"] != source.model:
            return False
        if manifest["artifacts"]["onnx"]["opset"] != opset:
            return False
        return all(
            sha256_file(out / entry["path"]) == entry["sha256"] for entry in manifest["artifacts"].values()
        )
    except (KeyError, TypeError, AttributeError, OSError):
        return False


def _checkpoint_sha(manifest: dict[str, Any]) -> str | None:
    """The sha256 of the checkpoint an export was made from; None for the null model (none)."""
    checkpoint = manifest["checkpoint"]
    return None if checkpoint is None else str(checkpoint["sha256"])


def _what(manifest: dict[str, Any]) -> str:
    """An existing export, in words, for the message that refuses to overwrite it."""
    model = manifest.get("model")
    if isinstance(model, dict) and model.get("arch") == NULL_ARCH:
        return "the null model"
    was = manifest.get("checkpoint")
    if not isinstance(was, dict):
        was = {}
    return f"of {was.get('file', '?')}, checkpoint sha256 {str(was.get('sha256', '?'))[:12]}"


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    manifest: dict[str, Any]
    unchanged: bool = False  # out_dir already held this export and was left alone

    @property
    def manifest_path(self) -> Path:
        return self.out_dir / MANIFEST_NAME


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }


def export_onnx(model: ServingModel, path: Path, opset: int = DEFAULT_OPSET) -> None:
    """ONNX with a dynamic batch axis, validated by ``onnx.checker`` (full check)."""
    import onnx

    example = torch.zeros(2, 32, 32, 3, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        with _quiet_torch():
            program = torch.onnx.export(
                model,
                (example,),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                dynamo=True,
                external_data=False,
                dynamic_shapes={"images": {0: batch}},
                verbose=False,
            )
        assert program is not None
        program.save(str(path), external_data=False)
    except Exception as exc:
        raise ExportError(f"ONNX export failed: {exc}") from exc
    proto = onnx.load(str(path))
    # The exporter names the batch dimension after the Dim; make it the conventional name.
    for vi in list(proto.graph.input) + list(proto.graph.output):
        dim0 = vi.type.tensor_type.shape.dim[0]
        if not dim0.dim_value:
            dim0.dim_param = "batch"
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def export_torchscript(model: ServingModel, path: Path) -> None:
    example = torch.zeros(2, 32, 32, 3, dtype=torch.uint8)
    with torch.no_grad(), _quiet_torch():
        traced = torch.jit.trace(model, example)
    traced.save(str(path))


def _int8_sample_logits(int8_path: Path, sample: dict[str, Any]) -> list[list[float]]:
    """The int8 model's logits for the check sample: what a server loading it re-checks top-1 on."""
    import onnxruntime as ort

    x = np.frombuffer(base64.b64decode(sample["images_b64"]), np.uint8).reshape(-1, 32, 32, 3)
    sess = ort.InferenceSession(str(int8_path), providers=["CPUExecutionProvider"])
    return [[float(v) for v in row] for row in run_onnx(sess, INPUT_NAME, OUTPUT_NAME, x)]


def _int8_parity(
    eager: torch.nn.Module, int8_path: Path, images: np.ndarray, batch_sizes: tuple[int, ...]
) -> dict[str, Any]:
    """The int8 model against eager fp32 at each batch size, with the int8 model's own tolerance:
    quantization moves logits (up to ~0.3 measured) and may flip a close call, never more."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(int8_path), providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        ref = _batched(lambda x: eager.eval()(torch.from_numpy(x)).numpy(), images, 256)
    worst, agreement = 0.0, 1.0
    for bs in batch_sizes:
        out = _batched(lambda x: np.asarray(sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0]), images, bs)
        worst = max(worst, float(np.abs(out - ref).max()))
        agreement = min(agreement, float((out.argmax(1) == ref.argmax(1)).mean()))
    report = {
        "images": len(images),
        "batch_sizes": list(batch_sizes),
        "atol": INT8_PARITY_ATOL,
        "min_top1_agreement": GATE_MIN_AGREEMENT,
        "max_abs_diff": worst,
        "top1_agreement": agreement,
    }
    if worst > INT8_PARITY_ATOL or agreement < GATE_MIN_AGREEMENT:
        raise ParityError(f"int8 parity check failed: {report}")
    return report


def _write_int8(
    tmp: Path,
    request: Int8Request,
    sample: dict[str, Any],
    eager: torch.nn.Module,
    parity_images: np.ndarray | None,
    batch_sizes: tuple[int, ...],
) -> dict[str, Any]:
    """Quantize ``model.onnx`` in ``tmp``, gate it against fp32, and describe it for the manifest."""
    quantize_int8(tmp / ONNX_NAME, tmp / INT8_NAME, request.calibration_images, INPUT_NAME, request.config)
    gate = compare_int8(
        tmp / ONNX_NAME,
        tmp / INT8_NAME,
        request.gate_images,
        request.gate_labels,
        request.gate_source,
        INPUT_NAME,
        OUTPUT_NAME,
    )
    if not gate.ok:
        raise Int8GateError(f"int8 gate failed: {gate.summary()}; no artifact was written")
    sample["logits_int8"] = _int8_sample_logits(tmp / INT8_NAME, sample)
    parity = None
    if parity_images is not None and len(parity_images):
        parity = _int8_parity(eager, tmp / INT8_NAME, parity_images, batch_sizes)
    return {
        "path": INT8_NAME,
        "sha256": sha256_file(tmp / INT8_NAME),
        "runtime": "onnxruntime",
        "device": "cpu",
        "quantization": request.config.as_dict(),
        "calibration": request.calibration,
        "gate": gate.as_dict(),
        "parity": parity,
    }


def check_sample(model: torch.nn.Module, images: np.ndarray | None) -> dict[str, Any]:
    """A few images (the first parity images, else seeded noise) and the eager model's logits."""
    if images is not None and len(images):
        x = np.ascontiguousarray(images[:CHECK_SAMPLE_SIZE], dtype=np.uint8)
    else:
        x = np.random.default_rng(0).integers(0, 256, (CHECK_SAMPLE_SIZE, 32, 32, 3), dtype=np.uint8)
    with torch.inference_mode():
        logits = model.eval()(torch.from_numpy(x)).numpy()
    return {
        "count": len(x),
        "images_b64": base64.b64encode(x.tobytes()).decode("ascii"),
        "logits": [[float(v) for v in row] for row in logits],
        "atol": CHECK_SAMPLE_ATOL,
    }


def export_model(
    checkpoint: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    parity_images: np.ndarray | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    batch_sizes: tuple[int, ...] = PARITY_BATCH_SIZES,
    atol: float = PARITY_ATOL,
    model_name: str = MODEL_NAME,
    model_version: str = "1",
    force: bool = False,
    int8: Int8Request | None = None,
) -> ExportResult:
    """Write TorchScript, ONNX and ``manifest.json`` into ``out_dir``; fail loudly on parity.

    Artifacts are written into a temporary folder first and moved into place only when
    every check passed, so a failed export never leaves a half-valid model directory.

    A server may be serving ``out_dir``: if it already holds an export of another checkpoint
    (or another opset or name), nothing is touched and :class:`ExportError` says so, unless
    ``force``; if it holds this very export, intact, it is left as it is (``unchanged``).

    With ``int8``, ``model.int8.onnx`` is also written (ONNX Runtime's static quantization of
    ``model.onnx``) and must pass its gate (:class:`Int8GateError` otherwise, nothing written).
    """
    ckpt_path = Path(checkpoint)
    net, meta = load_model(ckpt_path)
    source = _Source(
        model={"name": model_name, "version": model_version, "arch": "ResNet18"},
        labels=tuple(meta["labels"]),
        mean=tuple(meta["mean"]),
        std=tuple(meta["std"]),
        manifest={
            "checkpoint": {"file": ckpt_path.name, "sha256": sha256_file(ckpt_path)},
            "weights": meta.get("weights", "raw"),
            "test_accuracy": meta.get("test_accuracy"),
        },
        described=str(ckpt_path),
    )
    model = ServingModel(net, meta["mean"], meta["std"]).eval()
    return _export(model, source, Path(out_dir), parity_images, opset, batch_sizes, atol, force, int8)


def export_null_model(
    out_dir: str | os.PathLike[str],
    parity_images: np.ndarray | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    batch_sizes: tuple[int, ...] = PARITY_BATCH_SIZES,
    atol: float = PARITY_ATOL,
    model_name: str = NULL_MODEL_NAME,
    model_version: str = "1",
    force: bool = False,
) -> ExportResult:
    """The null model (:class:`NullNet`) into ``out_dir``, as :func:`export_model` writes a checkpoint's.

    Same contract, labels, normalisation, runtimes, parity check and check sample, so the real
    server serves it unchanged; its forward costs microseconds, which leaves the request path
    alone to measure. No checkpoint, no int8 model (there is no accuracy to gate), and a manifest
    that says what it is: ``"arch": "null"``, no test accuracy, a note.
    """
    source = _Source(
        model={"name": model_name, "version": model_version, "arch": NULL_ARCH},
        labels=tuple(CIFAR10_CLASSES),
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        manifest={
            "checkpoint": None,
            "weights": "fixed",
            "test_accuracy": None,
            "note": NULL_NOTE,
        },
        described="the null model",
    )
    model = ServingModel(NullNet(len(CIFAR10_CLASSES)), CIFAR10_MEAN, CIFAR10_STD).eval()
    return _export(model, source, Path(out_dir), parity_images, opset, batch_sizes, atol, force, None)


def _export(
    model: ServingModel,
    source: _Source,
    out: Path,
    parity_images: np.ndarray | None,
    opset: int,
    batch_sizes: tuple[int, ...],
    atol: float,
    force: bool,
    int8: Int8Request | None,
) -> ExportResult:
    if not force:
        existing = _existing_export(out)
        if existing is not None:
            if _same_export(out, existing, source, opset, int8):
                logger.info("%s already holds this export (%s); left unchanged", out, source.described)
                return ExportResult(out, existing, unchanged=True)
            raise ExportError(
                f"{out} already holds a different export ({_what(existing)}), which a server may be "
                "serving: pass --force to replace it, or choose another --out"
            )
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as tmp_name:
        tmp = Path(tmp_name)
        export_torchscript(model, tmp / TORCHSCRIPT_NAME)
        export_onnx(model, tmp / ONNX_NAME, opset)
        parity: dict[str, Any] | None = None
        if parity_images is not None and len(parity_images):
            report = check_parity(
                model, tmp / TORCHSCRIPT_NAME, tmp / ONNX_NAME, parity_images, batch_sizes, atol
            )
            if not report.ok:
                raise ParityError(f"parity check failed: {report.as_dict()}")
            parity = report.as_dict()
        sample = check_sample(model, parity_images)
        artifacts: dict[str, Any] = {
            "torchscript": {"path": TORCHSCRIPT_NAME, "sha256": sha256_file(tmp / TORCHSCRIPT_NAME)},
            "onnx": {"path": ONNX_NAME, "sha256": sha256_file(tmp / ONNX_NAME), "opset": opset},
        }
        if int8 is not None:
            artifacts["onnx_int8"] = _write_int8(tmp, int8, sample, model, parity_images, batch_sizes)
        manifest: dict[str, Any] = {
            "format": "cifar-serve-manifest/1",
            "model": source.model,
            "input": {
                "name": INPUT_NAME,
                "datatype": "UINT8",
                "shape": [-1, 32, 32, 3],
                "layout": "NHWC",
                "color": "RGB",
            },
            "output": {"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, len(source.labels)]},
            "labels": list(source.labels),
            "normalization": {"mean": list(source.mean), "std": list(source.std), "in_graph": True},
            "artifacts": artifacts,
            **source.manifest,
            "parity": parity,
            "check_sample": sample,
            "versions": _versions(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        # One rename per file, the manifest last: a reader never sees a truncated file, and a
        # manifest always describes artifacts already in place.
        for name in (TORCHSCRIPT_NAME, ONNX_NAME, *([INT8_NAME] if int8 else []), MANIFEST_NAME):
            os.replace(tmp / name, out / name)
    logger.info("exported %s to %s", source.described, out)
    return ExportResult(out, manifest)
