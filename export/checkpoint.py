"""Checkpoint format: a plain dict of tensors and JSON-like metadata.

Everything in it loads with ``torch.load(..., weights_only=True)``: no arbitrary objects are
ever unpickled. The training configuration is a dataclass stored as a dict.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import CIFAR10_CLASSES
from .model import CIFAR10_MEAN, CIFAR10_STD, ResNet18

__all__ = [
    "STUDENT_ARCH",
    "CheckpointError",
    "TrainConfig",
    "load_checkpoint",
    "load_model",
    "save_checkpoint",
]

FORMAT_VERSION = 1
STUDENT_ARCH = "ResNet18"  # the document's network, the only architecture that ships


class CheckpointError(RuntimeError):
    """The checkpoint is missing, unreadable or not one of ours."""


@dataclass
class TrainConfig:
    """Everything that determines a training run; saved inside every checkpoint."""

    data: str = "data/cifar10"
    out: str = "runs/default"
    epochs: int = 40
    batch_size: int = 256
    lr: float = 0.2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    pct_start: float = 0.25
    crop_padding: int = 4
    cutout: int = 8
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    threads: int = 0
    limit_train: int = 0
    # "student" is the document's network (the one that ships); "teacher" a standard CIFAR
    # ResNet-18 (export/teacher.py) that only ever teaches.
    arch: str = "student"
    # Knowledge distillation: soft targets of this teacher checkpoint ("" = plain training).
    teacher: str = ""
    kd_temperature: float = 4.0
    kd_alpha: float = 0.9
    # An exponential moving average of the weights (and BN statistics), evaluated and saved
    # beside the raw weights; export uses it when present.
    ema: bool = False
    ema_decay: float = 0.999
    # Images carved from the training set for validation (0 = none); with a split, epochs are
    # evaluated on it and the test set is left alone unless final_test is set.
    val_split: int = 0
    val_seed: int = 0
    final_test: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    """Write atomically so an interrupted run never leaves a truncated checkpoint."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, p)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{p}: unreadable checkpoint ({exc})") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        # A bare state dict (e.g. saved from the design document's code) is accepted too.
        if isinstance(ckpt, dict) and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            return {"model": ckpt}
        raise CheckpointError(f"{p}: not a cifar-serve checkpoint (no 'model' entry)")
    return ckpt


def _cpu_fp32(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.cpu()
        for k, v in model.state_dict().items()
    }


def shipping_payload(
    model: nn.Module,
    config: TrainConfig,
    test_accuracy: float | None,
    history: list[dict[str, float]],
    *,
    arch: str = STUDENT_ARCH,
    ema_model: nn.Module | None = None,
    val_accuracy: float | None = None,
    accuracy: dict[str, dict[str, float | None]] | None = None,
) -> dict[str, Any]:
    """The small fp32 checkpoint that ships: weights and metadata, no optimizer state.

    ``test_accuracy``/``val_accuracy`` are those of the weights export uses (the EMA when there
    is one); ``accuracy`` holds both sets, ``{"raw": {"val": .., "test": ..}, "ema": {..}}``.
    """
    payload: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "model": _cpu_fp32(model),
        "config": asdict(config),
        "labels": list(CIFAR10_CLASSES),
        "mean": list(CIFAR10_MEAN),
        "std": list(CIFAR10_STD),
        "test_accuracy": test_accuracy,
        "history": history,
    }
    if ema_model is not None:
        payload["ema_model"] = _cpu_fp32(ema_model)
    if val_accuracy is not None:
        payload["val_accuracy"] = val_accuracy
    if accuracy is not None:
        payload["accuracy"] = accuracy
    return payload


def load_model(path: str | os.PathLike[str]) -> tuple[ResNet18, dict[str, Any]]:
    """A ready ``ResNet18`` in eval mode and the checkpoint's metadata.

    The EMA weights are loaded when the checkpoint has them (``meta["weights"]`` says which).
    """
    ckpt = load_checkpoint(path)
    arch = ckpt.get("arch", STUDENT_ARCH)
    if arch != STUDENT_ARCH:
        raise CheckpointError(
            f"{path}: a {arch!r} checkpoint (a distillation teacher?); only the document's "
            f"{STUDENT_ARCH} is exported and served"
        )
    model = ResNet18()
    use_ema = "ema_model" in ckpt
    try:
        model.load_state_dict(ckpt["ema_model"] if use_ema else ckpt["model"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the document's ResNet18 ({exc})") from exc
    model.eval()
    meta = {k: v for k, v in ckpt.items() if k not in ("model", "ema_model", "ema", "optimizer", "scheduler")}
    meta["weights"] = "ema" if use_ema else "raw"
    meta.setdefault("labels", list(CIFAR10_CLASSES))
    meta.setdefault("mean", list(CIFAR10_MEAN))
    meta.setdefault("std", list(CIFAR10_STD))
    return model, meta
