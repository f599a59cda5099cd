"""``cifar-export``: checkpoint -> TorchScript + ONNX + manifest.json, with a parity check."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .checkpoint import CheckpointError
from .data import DatasetError, load_split
from .exporter import ExportError, export_model

__all__ = ["DEFAULT_CHECKPOINT", "DEFAULT_OUT", "main"]

logger = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = "models/resnet18_cifar10.pt"
DEFAULT_OUT = "artifacts"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cifar-export", description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--checkpoint",
        default=os.environ.get("CIFAR_SERVE_CHECKPOINT", DEFAULT_CHECKPOINT),
        help="checkpoint written by cifar-train (env CIFAR_SERVE_CHECKPOINT)",
    )
    p.add_argument(
        "--out",
        default=os.environ.get("CIFAR_SERVE_MODEL_DIR", DEFAULT_OUT),
        help="output folder for the artifacts and manifest.json (env CIFAR_SERVE_MODEL_DIR)",
    )
    p.add_argument(
        "--parity-data",
        default=os.environ.get("CIFAR_SERVE_PARITY_DATA", "tests/fixtures/cifar10-test-sample.zip"),
        help="CIFAR-10 source whose test split feeds the parity check (env CIFAR_SERVE_PARITY_DATA)",
    )
    p.add_argument("--parity-images", type=int, default=0, help="images used by the parity check (0: all)")
    p.add_argument("--no-parity", action="store_true", help="skip the parity check (not recommended)")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--triton-repo", default=None, help="also write a Triton model repository here")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # The ONNX exporter's optimiser logs every rewrite at INFO; only its problems matter here.
    for noisy in ("onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        images = None
        if not args.no_parity:
            split = load_split(args.parity_data, "test")
            images = split.images if args.parity_images <= 0 else split.images[: args.parity_images]
        result = export_model(args.checkpoint, args.out, images, opset=args.opset)
        if args.triton_repo:
            from .triton import write_triton_repo

            write_triton_repo(result.out_dir, Path(args.triton_repo))
    except (CheckpointError, DatasetError, ExportError) as exc:
        logger.error("%s", exc)
        return 1
    parity = result.manifest.get("parity")
    logger.info("wrote %s (parity: %s)", result.manifest_path, parity)
    return 0


if __name__ == "__main__":
    sys.exit(main())
