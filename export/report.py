"""Figures for MODEL_CARD.md: test-set evaluation, training curves, parity and the run ablation.

``python -m cifar_serve.export.report --checkpoint models/resnet18_cifar10.pt --data <test data>
--out docs/`` evaluates the checkpoint on the full test split (top-1, per-class accuracy, confusion
matrix), plots the training history stored in the checkpoint, exports the model to a temporary folder
to run the TorchScript / ONNX Runtime parity check on every test image, optionally summarises the
training logs of several runs, and writes everything to ``model_report.json``. Nothing is printed
to stdout except through logging; every figure in the model card comes from that JSON.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import os
import platform
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from .checkpoint import CheckpointError, load_model
from .cli import DEFAULT_CHECKPOINT
from .data import DatasetError, load_split
from .exporter import PARITY_BATCH_SIZES, ExportError, export_model, sha256_file
from .model import ServingModel

__all__ = [
    "CURVES_NAME",
    "REPORT_NAME",
    "EvalResult",
    "RunLog",
    "build_report",
    "evaluate_model",
    "main",
    "parse_train_log",
    "plot_ablation",
    "plot_training_curves",
]

logger = logging.getLogger(__name__)

REPORT_NAME = "model_report.json"
CURVES_NAME = "training_curves.png"
ABLATION_NAME = "ablation_curves.png"


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class EvalResult:
    """Accuracy figures of one model on one labelled split."""

    images: int
    top1: float
    cross_entropy: float
    per_class: dict[str, float]
    confusion: list[list[int]]  # rows: true class, columns: predicted class
    labels: list[str]

    @property
    def top1_stderr(self) -> float:
        """Binomial standard error of ``top1`` (sampling noise of a test set this size)."""
        return math.sqrt(self.top1 * (1.0 - self.top1) / max(self.images, 1))

    def as_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "top1": self.top1,
            "top1_stderr": self.top1_stderr,
            "correct": round(self.top1 * self.images),
            "cross_entropy": self.cross_entropy,
            "labels": self.labels,
            "per_class_accuracy": self.per_class,
            "confusion_matrix": {
                "rows": "true class",
                "columns": "predicted class",
                "matrix": self.confusion,
            },
        }


def evaluate_model(
    model: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    batch_size: int = 500,
) -> EvalResult:
    """Evaluate a uint8-NHWC-in, logits-out model in fp32 on CPU."""
    model = model.eval()
    chunks: list[torch.Tensor] = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            chunks.append(model(torch.from_numpy(images[i : i + batch_size])).float())
    logits = torch.cat(chunks)
    target = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    pred = logits.argmax(1)
    n_cls = len(class_names)
    confusion = torch.bincount(target * n_cls + pred, minlength=n_cls * n_cls).reshape(n_cls, n_cls)
    per_row = confusion.sum(1).clamp(min=1)
    per_class = {name: int(confusion[i, i]) / int(per_row[i]) for i, name in enumerate(class_names)}
    return EvalResult(
        images=len(target),
        top1=int((pred == target).sum()) / max(len(target), 1),
        cross_entropy=float(F.cross_entropy(logits, target)),
        per_class=per_class,
        confusion=confusion.tolist(),
        labels=list(class_names),
    )


# --------------------------------------------------------------------------- training logs


_EPOCH_RE = re.compile(
    r"^(?P<ts>\S+ \S+) .*epoch (?P<epoch>\d+)/(?P<of>\d+) loss (?P<loss>[\d.]+) train_acc (?P<train>[\d.]+) "
    r"test_acc (?P<test>[\d.]+) (?P<sec>[\d.]+)s \((?P<ips>\d+) img/s\)"
)
_FINAL_RE = re.compile(r"final test accuracy on (?P<n>\d+) images: (?P<acc>[\d.]+) \((?P<sec>\d+)s\)")
_RC_RE = re.compile(r"^\S+ rc=(?P<rc>-?\d+)\s*$")
_TS_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


@dataclass(frozen=True)
class RunLog:
    """What a ``cifar-train`` log (as written by benchmarks/gpu_train.sh) says about one run."""

    name: str
    path: str
    epochs_planned: int
    epochs_done: int
    finished: bool
    exit_code: int | None
    final_test_acc: float | None  # the run's own final evaluation; None if it never finished
    last_test_acc: float
    last_train_acc: float
    train_seconds: float | None  # cifar-train's own total, printed when it finishes
    log_span_seconds: float  # first to last timestamp in the log
    median_epoch_seconds: float
    median_images_per_s: float
    train_acc: list[float]
    test_acc: list[float]

    def as_dict(self, with_curves: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_curves:
            del d["train_acc"], d["test_acc"]
        return d


def parse_train_log(path: str | os.PathLike[str], name: str | None = None) -> RunLog:
    """Summarise one training log; raises ``ValueError`` if it holds no epoch lines."""
    p = Path(path)
    epochs: list[dict[str, Any]] = []
    final: re.Match[str] | None = None
    rc: int | None = None
    stamps: list[_dt.datetime] = []
    for line in p.read_text(errors="replace").splitlines():
        ts = _TS_RE.match(line)
        if ts:
            stamps.append(_dt.datetime.strptime(ts.group(1), "%Y-%m-%d %H:%M:%S,%f"))
        if m := _EPOCH_RE.search(line):
            epochs.append(m.groupdict())
        elif m := _FINAL_RE.search(line):
            final = m
        elif m := _RC_RE.match(line):
            rc = int(m.group("rc"))
    if not epochs:
        raise ValueError(f"{p}: no epoch lines found")
    last = epochs[-1]
    return RunLog(
        name=name or p.stem,
        path=str(p),
        epochs_planned=int(last["of"]),
        epochs_done=int(last["epoch"]),
        finished=final is not None,
        exit_code=rc,
        final_test_acc=float(final.group("acc")) if final else None,
        last_test_acc=float(last["test"]),
        last_train_acc=float(last["train"]),
        train_seconds=float(final.group("sec")) if final else None,
        log_span_seconds=(stamps[-1] - stamps[0]).total_seconds() if len(stamps) > 1 else 0.0,
        # The first epoch carries warm-up (cudnn autotuning, compilation); the median ignores it.
        median_epoch_seconds=float(np.median([float(e["sec"]) for e in epochs])),
        median_images_per_s=float(np.median([float(e["ips"]) for e in epochs])),
        train_acc=[float(e["train"]) for e in epochs],
        test_acc=[float(e["test"]) for e in epochs],
    )


# --------------------------------------------------------------------------- figures


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(
    history: Sequence[dict[str, float]], path: str | os.PathLike[str], title: str = ""
) -> Path:
    """Two panels: training loss (with the learning rate), and train / test accuracy per epoch."""
    plt = _pyplot()
    epochs = [int(h["epoch"]) for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    ax_loss.plot(
        epochs,
        [h["train_loss"] for h in history],
        color="tab:blue",
        label="train loss (label-smoothed, augmented)",
    )
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.set_title("Loss")
    ax_loss.grid(alpha=0.3)
    if all("lr" in h for h in history):
        ax_lr = ax_loss.twinx()
        ax_lr.plot(
            epochs,
            [h["lr"] for h in history],
            color="tab:gray",
            linestyle="--",
            label="learning rate (end of epoch)",
        )
        ax_lr.set_ylabel("learning rate")
        lines = ax_loss.get_lines() + ax_lr.get_lines()
        ax_loss.legend(lines, [ln.get_label() for ln in lines], loc="upper right", fontsize=8)
    else:
        ax_loss.legend(fontsize=8)
    ax_acc.plot(epochs, [h["train_acc"] for h in history], label="train (augmented)", color="tab:blue")
    ax_acc.plot(epochs, [h["test_acc"] for h in history], label="test (10,000 images)", color="tab:orange")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("top-1 accuracy")
    ax_acc.set_title("Accuracy")
    ax_acc.grid(alpha=0.3)
    ax_acc.legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_ablation(runs: Sequence[RunLog], path: str | os.PathLike[str]) -> Path:
    """Test accuracy of each logged run against the fraction of its planned schedule."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), constrained_layout=True)
    for run in runs:
        x = [(i + 1) / run.epochs_planned for i in range(len(run.test_acc))]
        status = "finished" if run.finished else f"stopped at {run.epochs_done}"
        ax.plot(x, run.test_acc, label=f"{run.name}: {run.epochs_planned} epochs ({status})", linewidth=1)
    ax.set_xlabel("fraction of the planned one-cycle schedule")
    ax.set_ylabel("test top-1 accuracy")
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------- the report


def _phase(
    history: Sequence[dict[str, float]], keep: Callable[[float], bool], definition: str
) -> dict[str, Any] | None:
    rows = [h for h in history if keep(h.get("lr", 0.0))]
    if not rows:
        return None
    return {
        "definition": definition,
        "epochs": [int(rows[0]["epoch"]), int(rows[-1]["epoch"])],
        "train_acc": [min(h["train_acc"] for h in rows), max(h["train_acc"] for h in rows)],
        "test_acc": [min(h["test_acc"] for h in rows), max(h["test_acc"] for h in rows)],
        "first": {"train_acc": rows[0]["train_acc"], "test_acc": rows[0]["test_acc"]},
        "last": {"train_acc": rows[-1]["train_acc"], "test_acc": rows[-1]["test_acc"]},
    }


def _history_summary(history: Sequence[dict[str, float]], peak_lr: float) -> dict[str, Any]:
    """Where the accuracy was gained: during the high-lr phase vs during annealing.

    Phases are defined by the learning rate at the end of each epoch relative to the peak, so the
    summary applies to any one-cycle schedule length. Ranges are ``[min, max]``.
    """
    if not history:
        return {}
    out: dict[str, Any] = {
        "epochs": len(history),
        "final": dict(history[-1]),
        "best_test_acc_during_training": max(h["test_acc"] for h in history),
        "total_epoch_seconds": float(sum(h.get("seconds", 0.0) for h in history)),
        "median_epoch_seconds": float(np.median([h.get("seconds", 0.0) for h in history])),
        "median_images_per_s": float(np.median([h.get("images_per_s", 0.0) for h in history])),
    }
    if peak_lr > 0:
        top = max(range(len(history)), key=lambda i: history[i].get("lr", 0.0))
        phases = {
            "high_lr_phase": _phase(
                history, lambda lr: lr >= 0.75 * peak_lr, "end-of-epoch learning rate >= 0.75 x peak"
            ),
            "low_lr_phase": _phase(
                history[top:],
                lambda lr: lr < 0.25 * peak_lr,
                "end-of-epoch learning rate < 0.25 x peak, after the peak",
            ),
        }
        out.update({k: v for k, v in phases.items() if v is not None})
    return out


def _versions() -> dict[str, str]:
    import onnxruntime

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "machine": platform.machine(),
    }


def build_report(
    checkpoint: str | os.PathLike[str],
    data: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    parity: bool = True,
    parity_images: int = 0,
    parity_batch_sizes: tuple[int, ...] = PARITY_BATCH_SIZES,
    train_logs: Sequence[tuple[str, str | os.PathLike[str]]] = (),
    shipped_run: str | None = None,
    eval_batch_size: int = 500,
    command: str | None = None,
) -> dict[str, Any]:
    """Compute every figure, write the plots and ``model_report.json`` into ``out_dir``, return the dict."""
    t_all = time.monotonic()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = Path(checkpoint)
    net, meta = load_model(ckpt_path)
    model = ServingModel(net, meta["mean"], meta["std"]).eval()
    labels = list(meta["labels"])
    timings: dict[str, float] = {}

    t = time.monotonic()
    split = load_split(data, "test")
    timings["load_test_split"] = time.monotonic() - t
    logger.info("test split: %d images from %s (%.1fs)", len(split), data, timings["load_test_split"])

    t = time.monotonic()
    result = evaluate_model(model, split.images, split.labels, labels, eval_batch_size)
    timings["evaluate"] = time.monotonic() - t
    logger.info("top-1 %.4f on %d images (%.1fs)", result.top1, result.images, timings["evaluate"])

    history = list(meta.get("history") or [])
    config = dict(meta.get("config") or {})
    figures: dict[str, str] = {}
    if history:
        final_acc = history[-1]["test_acc"]
        run_title = f"ResNet18 on CIFAR-10: {len(history)} epochs, final test top-1 {final_acc:.4f}"
        figures["training_curves"] = str(plot_training_curves(history, out / CURVES_NAME, run_title))
        logger.info("wrote %s", figures["training_curves"])

    runs = [parse_train_log(p, name) for name, p in train_logs]
    if runs:
        figures["ablation_curves"] = str(plot_ablation(runs, out / ABLATION_NAME))
        logger.info("wrote %s", figures["ablation_curves"])

    parity_report: dict[str, Any] | None = None
    if parity:
        images = split.images if parity_images <= 0 else split.images[:parity_images]
        t = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="cifar-report-export-") as tmp:
            exported = export_model(ckpt_path, tmp, images, batch_sizes=tuple(parity_batch_sizes))
        timings["export_and_parity"] = time.monotonic() - t
        parity_report = exported.manifest["parity"]
        logger.info("parity (%.1fs): %s", timings["export_and_parity"], parity_report)

    timings["total"] = time.monotonic() - t_all
    report: dict[str, Any] = {
        "format": "cifar-serve-model-report/1",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "checkpoint": {
            "path": str(ckpt_path),
            "sha256": sha256_file(ckpt_path),
            "test_accuracy_recorded_at_training": meta.get("test_accuracy"),
        },
        "model": {
            "arch": meta.get("arch", "ResNet18"),
            "parameters": int(sum(p.numel() for p in net.parameters())),
            "labels": labels,
            "mean": list(meta["mean"]),
            "std": list(meta["std"]),
        },
        "train_config": config,
        "test_data": {"source": str(data), "split": "test", "images": len(split)},
        "evaluation": {"device": "cpu", "dtype": "float32", **result.as_dict()},
        "training": _history_summary(history, float(config.get("lr", 0.0))),
        "parity": parity_report,
        "runs": {
            "shipped": shipped_run,
            "logs": [r.as_dict() for r in runs],
        },
        "figures": figures,
        "timings_seconds": timings,
        "versions": _versions(),
    }
    previous = _read_report(out / REPORT_NAME)
    if "int8" in previous:  # written by --int8-from, from another command: kept as it is
        report["int8"] = previous["int8"]
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    logger.info("wrote %s (%.0fs in all)", out / REPORT_NAME, timings["total"])
    return report


def _read_report(path: Path) -> dict[str, Any]:
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


def update_int8(out_dir: str | os.PathLike[str], manifest_path: str | os.PathLike[str], command: str) -> None:
    """Put the int8 figures of an export (its manifest's ``onnx_int8`` entry: quantization,
    calibration sample, gate, parity) into the report's ``int8`` key, leaving the rest alone.

    The release figures come from an export gated on the full test set (``cifar-export
    --gate-data``), which is not the export `make artifacts` runs; ``command`` records it.
    """
    path = Path(out_dir) / REPORT_NAME
    report = _read_report(path)
    if not report:
        raise ValueError(f"{path}: no model report to add the int8 figures to (build it first)")
    manifest = json.loads(Path(manifest_path).read_text())
    entry = manifest.get("artifacts", {}).get("onnx_int8")
    if not entry:
        raise ValueError(f"{manifest_path}: the export has no int8 model")
    if manifest["checkpoint"]["sha256"] != report["checkpoint"]["sha256"]:
        raise ValueError(f"{manifest_path}: exported from another checkpoint than the report's")
    report["int8"] = {
        "command": command,
        "exported": manifest.get("created"),
        "artifact": {"path": entry["path"], "sha256": entry["sha256"]},
        **{k: entry[k] for k in ("quantization", "calibration", "gate", "parity")},
        "versions": manifest.get("versions"),
    }
    path.write_text(json.dumps(report, indent=2) + "\n")
    logger.info("wrote the int8 figures of %s into %s", manifest_path, path)


# --------------------------------------------------------------------------- CLI


def _log_arg(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep:
        return Path(value).stem, value
    return name, path


def _batch_sizes(value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {value!r}") from exc
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("batch sizes must be positive")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cifar_serve.export.report",
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        default=os.environ.get("CIFAR_SERVE_CHECKPOINT", DEFAULT_CHECKPOINT),
        help="checkpoint written by cifar-train (env CIFAR_SERVE_CHECKPOINT)",
    )
    p.add_argument(
        "--data",
        default=os.environ.get("CIFAR_SERVE_DATA"),
        help="CIFAR-10 source holding the test split: zip, tarball or folder (env CIFAR_SERVE_DATA)",
    )
    p.add_argument("--out", default="docs", help="folder for model_report.json and the plots")
    p.add_argument(
        "--train-log",
        action="append",
        default=[],
        type=_log_arg,
        metavar="[NAME=]PATH",
        help="a cifar-train log to summarise in the ablation (repeatable)",
    )
    p.add_argument("--shipped-run", default=None, help="name of the --train-log run that was shipped")
    p.add_argument("--no-parity", action="store_true", help="skip the export + parity check")
    p.add_argument("--parity-images", type=int, default=0, help="images for the parity check (0: all)")
    p.add_argument(
        "--parity-batch-sizes",
        type=_batch_sizes,
        default=PARITY_BATCH_SIZES,
        help="comma-separated batch sizes for the parity check",
    )
    p.add_argument("--eval-batch-size", type=int, default=500)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument(
        "--int8-from",
        metavar="MANIFEST",
        default=None,
        help="only put this export's int8 figures (gate, calibration, parity) into --out's existing "
        "report; --int8-command says which cifar-export made it",
    )
    p.add_argument("--int8-command", default="", help="the cifar-export command behind --int8-from")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(raw)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.int8_from:
        try:
            update_int8(args.out, args.int8_from, args.int8_command)
        except (ValueError, OSError, KeyError) as exc:
            logger.error("%s", exc)
            return 1
        return 0
    if not args.data:
        logger.error("no test data: pass --data or set CIFAR_SERVE_DATA")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        build_report(
            args.checkpoint,
            args.data,
            args.out,
            parity=not args.no_parity,
            parity_images=args.parity_images,
            parity_batch_sizes=tuple(args.parity_batch_sizes),
            train_logs=args.train_log,
            shipped_run=args.shipped_run,
            eval_batch_size=args.eval_batch_size,
            command="python -m cifar_serve.export.report " + shlex.join(raw),
        )
    except (CheckpointError, DatasetError, ExportError, ValueError, OSError) as exc:
        logger.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
