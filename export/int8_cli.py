"""cifar-export's int8 flags: where the calibration sample and the gate's images come from."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .data import DatasetError, load_split
from .quantize import (
    CALIBRATION_IMAGES,
    CALIBRATION_METHODS,
    CALIBRATION_SEED,
    DEFAULT_CALIBRATION_DATA,
    Int8Config,
    Int8Request,
    calibration_sample,
)

__all__ = ["add_int8_arguments", "calibration_data_path", "int8_request", "int8_summary"]

logger = logging.getLogger(__name__)

# The checkout this module runs from (an editable install): the committed calibration sample is
# found there when the command runs from another folder.
SOURCE_ROOT = Path(__file__).resolve().parents[1]


def add_int8_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "int8", "model.int8.onnx: ONNX Runtime static quantization (QDQ), calibrated on training images"
    )
    g.add_argument("--no-int8", action="store_true", help="do not write model.int8.onnx")
    g.add_argument(
        "--calibration-data",
        default=os.environ.get("CIFAR_SERVE_CALIBRATION_DATA", DEFAULT_CALIBRATION_DATA),
        help="CIFAR-10 source whose TRAIN split the calibration sample is drawn from (env "
        "CIFAR_SERVE_CALIBRATION_DATA); the default is the committed seeded draw of 512 training images, "
        "the same images the full training set gives with the default seed and count",
    )
    g.add_argument("--calibration-images", type=int, default=CALIBRATION_IMAGES, help="images in the sample")
    g.add_argument("--calibration-seed", type=int, default=CALIBRATION_SEED, help="seed of the draw")
    g.add_argument(
        "--calibration-method",
        choices=CALIBRATION_METHODS,
        default=Int8Config.method,
        help="how activation ranges are calibrated (the default was picked by measurement: MODEL_CARD.md)",
    )
    g.add_argument(
        "--int8-weights",
        choices=("per-channel", "per-tensor"),
        default="per-channel" if Int8Config.per_channel else "per-tensor",
        help="weight scales per output channel or per tensor",
    )
    g.add_argument(
        "--gate-data",
        default=os.environ.get("CIFAR_SERVE_GATE_DATA"),
        help="CIFAR-10 source whose TEST split gates the int8 model (env CIFAR_SERVE_GATE_DATA): top-1 "
        "within 0.5 points of fp32 and >= 98%% agreement, else the export fails; default: --parity-data "
        "(the committed 600-image sample). The release gate is the full 10,000-image test set",
    )


def calibration_data_path(value: str) -> str:
    """``--calibration-data`` as given; the default also resolves against the source checkout."""
    if value != DEFAULT_CALIBRATION_DATA or Path(value).exists():
        return value
    in_checkout = SOURCE_ROOT / DEFAULT_CALIBRATION_DATA
    if in_checkout.is_file():
        return str(in_checkout)
    raise DatasetError(
        f"calibration data {DEFAULT_CALIBRATION_DATA} not found (relative to {Path.cwd()}): pass "
        "--calibration-data with any CIFAR-10 source that has a train split, or --no-int8"
    )


def int8_request(args: argparse.Namespace, parity_path: Callable[[str], str]) -> Int8Request | None:
    """What export_model needs for the int8 model, from the flags (None under ``--no-int8``)."""
    if args.no_int8:
        return None
    calibration_source = calibration_data_path(args.calibration_data)
    train = load_split(calibration_source, "train")
    images, record = calibration_sample(
        train.images, calibration_source, args.calibration_images, args.calibration_seed
    )
    try:
        gate_source = args.gate_data or parity_path(args.parity_data)
    except DatasetError as exc:
        message = f"no test images for the int8 gate ({exc}); pass --gate-data or --no-int8"
        raise DatasetError(message) from exc
    test = load_split(gate_source, "test")
    return Int8Request(
        calibration_images=images,
        calibration=record,
        gate_images=test.images,
        gate_labels=test.labels,
        gate_source=gate_source,
        config=Int8Config(method=args.calibration_method, per_channel=args.int8_weights == "per-channel"),
    )


def int8_summary(manifest: dict[str, Any]) -> str:
    """One line on the int8 model just written: its gate's figures."""
    entry = manifest.get("artifacts", {}).get("onnx_int8")
    if not entry:
        return ""
    g = entry["gate"]
    return (
        f"wrote {entry['path']} (calibrated on {entry['calibration']['count']} training images, "
        f"{entry['quantization']['calibration_method']}): top-1 {g['int8_top1']:.2f}% vs fp32 "
        f"{g['fp32_top1']:.2f}%, agreement {g['top1_agreement']:.2%} on {g['images']} test images "
        f"of {g['source']}"
    )
