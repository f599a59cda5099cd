"""The int8 ONNX model: ONNX Runtime's static quantization of ``model.onnx``, and its gate.

ONNX Runtime's own tooling does the work (``quant_pre_process``, then ``quantize_static`` in QDQ
format): int8 weights, uint8 activations, scales calibrated on a fixed, seeded sample of
TRAINING images (never the test split, which the gate measures on). The gate compares the int8
model with ``model.onnx`` on labelled test images: top-1 within ``GATE_MAX_DROP_POINTS`` and
top-1 agreement at least ``GATE_MIN_AGREEMENT``; the exporter fails with both figures otherwise.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CALIBRATION_IMAGES",
    "CALIBRATION_METHODS",
    "CALIBRATION_SEED",
    "DEFAULT_CALIBRATION_DATA",
    "GATE_MAX_DROP_POINTS",
    "GATE_MIN_AGREEMENT",
    "INT8_NAME",
    "INT8_PARITY_ATOL",
    "GateReport",
    "Int8Config",
    "Int8Request",
    "calibration_indices",
    "calibration_sample",
    "compare_int8",
    "quantize_int8",
]

logger = logging.getLogger(__name__)

INT8_NAME = "model.int8.onnx"
# The committed sample: CALIBRATION_IMAGES training images drawn with CALIBRATION_SEED from the
# 50,000 (tools/make_calibration_sample.py), so a fresh clone and CI calibrate on exactly the
# images a full training set would give.
DEFAULT_CALIBRATION_DATA = "tests/fixtures/cifar10-train-calibration.zip"
CALIBRATION_IMAGES = 512
CALIBRATION_SEED = 0
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
GATE_MAX_DROP_POINTS = 0.5
GATE_MIN_AGREEMENT = 0.98
# The int8 model's own parity tolerance against eager fp32 (logits range about +-7): measured
# at most 0.27 on the committed 600-image sample, at batch sizes 1, 7 and 256 alike.
INT8_PARITY_ATOL = 1.0
_CALIBRATION_BATCH = 64
_GATE_BATCH = 256


@dataclass(frozen=True)
class Int8Config:
    """The quantizer's choices (defaults picked by measurement: MODEL_CARD.md, int8)."""

    method: str = "percentile"
    per_channel: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {
            "tool": "onnxruntime.quantization (quant_pre_process, quantize_static)",
            "format": "QDQ",
            "weights": "int8, " + ("per-channel" if self.per_channel else "per-tensor"),
            "activations": "uint8, per-tensor",
            "calibration_method": self.method,
        }


@dataclass(frozen=True)
class Int8Request:
    """What the exporter needs to write and gate the int8 model."""

    calibration_images: np.ndarray
    calibration: dict[str, Any]  # where the sample came from: recorded in the manifest
    gate_images: np.ndarray
    gate_labels: np.ndarray
    gate_source: str
    config: Int8Config = field(default_factory=Int8Config)


@dataclass(frozen=True)
class GateReport:
    """int8 against fp32 (both ONNX Runtime, CPU) on the same labelled images."""

    images: int
    source: str
    fp32_top1: float  # percent
    int8_top1: float  # percent
    agreement: float  # fraction of images with the same top-1
    max_drop_points: float = GATE_MAX_DROP_POINTS
    min_agreement: float = GATE_MIN_AGREEMENT

    @property
    def drop_points(self) -> float:
        return self.fp32_top1 - self.int8_top1

    @property
    def ok(self) -> bool:
        return self.drop_points <= self.max_drop_points and self.agreement >= self.min_agreement

    def summary(self) -> str:
        return (
            f"int8 top-1 {self.int8_top1:.2f}% vs fp32 {self.fp32_top1:.2f}% "
            f"({self.drop_points:+.2f} points lost; at most {self.max_drop_points} allowed), "
            f"top-1 agreement {self.agreement:.2%} (at least {self.min_agreement:.0%} required) "
            f"on {self.images} images of {self.source}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "source": self.source,
            "fp32_top1": round(self.fp32_top1, 4),
            "int8_top1": round(self.int8_top1, 4),
            "top1_agreement": round(self.agreement, 6),
            "max_drop_points": self.max_drop_points,
            "min_agreement": self.min_agreement,
            "passed": self.ok,
        }


def calibration_indices(total: int, count: int, seed: int = CALIBRATION_SEED) -> np.ndarray:
    """Which of ``total`` images (in load order) form the sample: all when ``count >= total``.

    Sorted, so a source holding exactly the sample (the committed one) reads them in the same
    order as the full training set gives them.
    """
    if count >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, size=count, replace=False))


def calibration_sample(
    images: np.ndarray, source: str, count: int = CALIBRATION_IMAGES, seed: int = CALIBRATION_SEED
) -> tuple[np.ndarray, dict[str, Any]]:
    """The seeded sample of training ``images`` and its record for the manifest."""
    picked = np.ascontiguousarray(images[calibration_indices(len(images), count, seed)])
    record = {
        "split": "train",
        "source": os.path.basename(source),
        "source_sha256": _sha256_of(source),
        "source_images": len(images),
        "seed": seed,
        "count": len(picked),
        "draw": (
            "sorted numpy.random.default_rng(seed).choice(source_images, count, replace=False)"
            if count < len(images)
            else "every image of the source (the committed sample is that draw from the 50,000: "
            "tools/make_calibration_sample.py)"
        ),
        # The pixels themselves: the same for the committed sample and the full training set.
        "sample_sha256": hashlib.sha256(picked.tobytes()).hexdigest(),
    }
    return picked, record


def _sha256_of(source: str) -> str | None:
    path = Path(source)
    if not path.is_file():
        return None  # a folder of batches or images: the sample's own sha256 identifies it
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _reader(input_name: str, images: np.ndarray) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class _Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self._it: Iterator[dict[str, np.ndarray]] = iter(
                {input_name: images[i : i + _CALIBRATION_BATCH]}
                for i in range(0, len(images), _CALIBRATION_BATCH)
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    return _Batches()


def quantize_int8(
    fp32_path: Path, out_path: Path, images: np.ndarray, input_name: str, config: Int8Config
) -> None:
    """Write the QDQ int8 model of ``fp32_path`` to ``out_path``, calibrated on ``images``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if config.method not in methods:
        raise ValueError(f"unknown calibration method {config.method!r}; one of {sorted(methods)}")
    # The histogram calibrators print their progress to stdout: users see the export's result.
    with (
        tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".quant-") as tmp,
        contextlib.redirect_stdout(io.StringIO()),
    ):
        prepared = Path(tmp) / "prepared.onnx"
        # Shape inference and graph optimisation first (BatchNorm folded into the convolutions),
        # as ONNX Runtime's quantization guide asks: the quantizer then sees one Conv per layer.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=False)
        quantize_static(
            str(prepared),
            str(out_path),
            _reader(input_name, images),
            quant_format=QuantFormat.QDQ,
            per_channel=config.per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            # Note: "entropy" at ONNX Runtime's default 128 histogram bins has one candidate
            # threshold, the full range, so it writes the very model "minmax" does (same sha256).
            calibrate_method=methods[config.method],
            # Asymmetric activation ranges for every method (percentile's default is symmetric):
            # uint8 activations after ReLU then use all 256 levels. Measured on the 10,000 test
            # images: percentile per-channel agrees with fp32 on 99.19% asymmetric, 99.03% symmetric.
            extra_options={"CalibTensorRangeSymmetric": False},
            calibration_providers=["CPUExecutionProvider"],
        )
    logger.info("quantized %s to int8 (%s) on %d images", fp32_path.name, config.method, len(images))


def _session(path: Path, threads: int = 0) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads > 0:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_onnx(session: Any, input_name: str, output_name: str, images: np.ndarray) -> np.ndarray:
    """Logits of ``images`` in batches the gate and the export both use."""
    return np.concatenate(
        [
            np.asarray(session.run([output_name], {input_name: images[i : i + _GATE_BATCH]})[0])
            for i in range(0, len(images), _GATE_BATCH)
        ]
    )


def compare_int8(
    fp32_path: Path,
    int8_path: Path,
    images: np.ndarray,
    labels: np.ndarray,
    source: str,
    input_name: str,
    output_name: str,
) -> GateReport:
    """Top-1 of both models against ``labels``, and how often they agree with each other."""
    fp32 = run_onnx(_session(fp32_path), input_name, output_name, images).argmax(1)
    int8 = run_onnx(_session(int8_path), input_name, output_name, images).argmax(1)
    report = GateReport(
        images=len(images),
        source=os.path.basename(source),
        fp32_top1=float((fp32 == labels).mean() * 100),
        int8_top1=float((int8 == labels).mean() * 100),
        agreement=float((fp32 == int8).mean()),
    )
    logger.info("int8 gate: %s", report.summary())
    return report
