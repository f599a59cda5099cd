"""cifar-export: checkpoint -> TorchScript + ONNX + manifest.json, with a parity check.

--null-model writes the null model instead: the served contract with a forward that costs
microseconds, for measuring the request path (its answers are meaningless).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .checkpoint import CheckpointError
from .data import DatasetError, load_split
from .exporter import ExportError, ExportResult, export_model, export_null_model
from .int8_cli import add_int8_arguments, int8_request, int8_summary

__all__ = ["DEFAULT_CHECKPOINT", "DEFAULT_OUT", "DEFAULT_PARITY_DATA", "main", "parity_data_path"]

logger = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = "models/resnet18_cifar10.pt"
DEFAULT_OUT = "artifacts"
DEFAULT_PARITY_DATA = "tests/fixtures/cifar10-test-sample.zip"
# The checkout this module runs from (an editable install): the default parity sample is found
# there when the command runs from another folder.
SOURCE_ROOT = Path(__file__).resolve().parents[1]


def parity_data_path(value: str) -> str:
    """``--parity-data`` as given; the default also resolves against the source checkout."""
    if value != DEFAULT_PARITY_DATA or Path(value).exists():
        return value
    in_checkout = SOURCE_ROOT / DEFAULT_PARITY_DATA
    if in_checkout.is_file():
        return str(in_checkout)
    raise DatasetError(
        f"parity data {DEFAULT_PARITY_DATA} not found (relative to {Path.cwd()}): pass --parity-data "
        "with any CIFAR-10 source that has a test split (e.g. cifar-10-python.tar.gz), or --no-parity"
    )


def _model_version(text: str) -> str:
    """A positive integer, as Triton numbers a model's versions (its repository's folder names)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return str(int(text))


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
        "--null-model",
        action="store_true",
        help="write the null model instead of a checkpoint's (no --checkpoint, no int8): the same inputs, "
        "outputs and labels, a forward of microseconds (pixel mean, fixed Linear(3, 10)), answers that "
        "mean nothing; for benchmarking the server's request path",
    )
    p.add_argument(
        "--out",
        default=os.environ.get("CIFAR_SERVE_MODEL_DIR", DEFAULT_OUT),
        help="output folder for the artifacts and manifest.json (env CIFAR_SERVE_MODEL_DIR); an existing "
        "export of another checkpoint there is refused without --force, the same one left unchanged",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace a different export already in --out (a server reading it sees each file swapped "
        "whole, the manifest last)",
    )
    p.add_argument(
        "--parity-data",
        default=os.environ.get("CIFAR_SERVE_PARITY_DATA", DEFAULT_PARITY_DATA),
        help="CIFAR-10 source whose test split feeds the parity check (env CIFAR_SERVE_PARITY_DATA); "
        "the default is the checkout's committed 600-image sample",
    )
    p.add_argument("--parity-images", type=int, default=0, help="images used by the parity check (0: all)")
    p.add_argument("--no-parity", action="store_true", help="skip the parity check (not recommended)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset of model.onnx")
    p.add_argument(
        "--triton-repo",
        default=None,
        help="also write a Triton model repository here (folders 0755, files 0644; only this model's "
        "folders are replaced)",
    )
    add_int8_arguments(p)
    p.add_argument(
        "--version",
        type=_model_version,
        default="1",
        help="model version written into manifest.json: give each retrained model the next one, and "
        "a server reloading it logs 'now serving version N' and answers with it",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    return p


def _summary(result: ExportResult) -> str:
    parity = result.manifest.get("parity")
    if result.unchanged:
        state = "unchanged: already the export of this checkpoint"
    elif not parity:
        state = "no parity check"
    else:
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in parity["max_abs_diff"].items())
        agree = min(parity["top1_agreement"].values())
        state = (
            f"parity on {parity['images']} images at batch sizes {parity['batch_sizes']}: "
            f"max |logit diff| {diffs} (tolerance {parity['atol']:.0e}), top-1 agreement {agree:.0%}"
        )
    return f"wrote {result.manifest_path} ({state})"


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
            split = load_split(parity_data_path(args.parity_data), "test")
            images = split.images if args.parity_images <= 0 else split.images[: args.parity_images]
        # The null model has no accuracy for an int8 gate to keep: it is fp32 only.
        int8 = None if args.null_model else int8_request(args, parity_data_path)
        # The export is silent until its end (a minute on a slow CPU): say what is under way.
        checks = (
            f"then a parity check on {len(images)} test images" if images is not None else "no parity check"
        )
        logger.info(
            "exporting %s to %s: TorchScript, ONNX%s, %s",
            "the null model" if args.null_model else args.checkpoint,
            args.out,
            ", int8 ONNX" if int8 is not None else "",
            checks,
        )
        if args.null_model:
            result = export_null_model(
                args.out, images, opset=args.opset, force=args.force, model_version=args.version
            )
        else:
            result = export_model(
                args.checkpoint,
                args.out,
                images,
                opset=args.opset,
                force=args.force,
                int8=int8,
                model_version=args.version,
            )
        if args.triton_repo:
            from .triton import write_triton_repo

            write_triton_repo(result.out_dir, Path(args.triton_repo))
    except (CheckpointError, DatasetError, ExportError) as exc:
        logger.error("%s", exc)
        return 1
    logger.info("%s", _summary(result))
    if not result.unchanged and (line := int8_summary(result.manifest)):
        logger.info("%s", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
