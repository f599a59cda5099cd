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

from .data import CIFAR10_CLASSES
from .model import CIFAR10_MEAN, CIFAR10_STD, ResNet18

__all__ = ["CheckpointError", "TrainConfig", "load_checkpoint", "load_model", "save_checkpoint"]

FORMAT_VERSION = 1


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


def shipping_payload(
    model: ResNet18, config: TrainConfig, test_accuracy: float | None, history: list[dict[str, float]]
) -> dict[str, Any]:
    """The small fp32 checkpoint that ships: weights and metadata, no optimizer state."""
    return {
        "format_version": FORMAT_VERSION,
        "arch": "ResNet18",
        "model": {
            k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.cpu()
            for k, v in model.state_dict().items()
        },
        "config": asdict(config),
        "labels": list(CIFAR10_CLASSES),
        "mean": list(CIFAR10_MEAN),
        "std": list(CIFAR10_STD),
        "test_accuracy": test_accuracy,
        "history": history,
    }


def load_model(path: str | os.PathLike[str]) -> tuple[ResNet18, dict[str, Any]]:
    """A ready ``ResNet18`` in eval mode and the checkpoint's metadata."""
    ckpt = load_checkpoint(path)
    model = ResNet18()
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the document's ResNet18 ({exc})") from exc
    model.eval()
    meta = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "scheduler")}
    meta.setdefault("labels", list(CIFAR10_CLASSES))
    meta.setdefault("mean", list(CIFAR10_MEAN))
    meta.setdefault("std", list(CIFAR10_STD))
    return model, meta
