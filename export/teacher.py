"""The teacher for knowledge distillation: a standard CIFAR ResNet-18 (He et al., 2016).

It is torchvision's ResNet-18 with the usual CIFAR change: a 3x3 stride-1 stem and no max-pool,
so the first residual stage sees the full 32x32 image (the document's network sees 10x10 after
its stride-3 stem). It has 11.2M parameters and reaches about 95% on CIFAR-10 with a plain
SGD recipe. It exists only to train the student: it is never exported and never served
(:func:`cifar_serve.export.checkpoint.load_model` refuses its checkpoints).
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torchvision.models import resnet18

from .checkpoint import STUDENT_ARCH, CheckpointError, load_checkpoint
from .model import CIFAR10_MEAN, CIFAR10_STD, ResNet18, ServingModel

__all__ = ["STUDENT_ARCH", "TEACHER_ARCH", "build_net", "cifar_resnet18", "load_teacher"]

TEACHER_ARCH = "cifar-resnet18"


def cifar_resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 with a CIFAR stem (3x3, stride 1, no max-pool)."""
    net = resnet18(num_classes=num_classes)
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


def build_net(arch: str) -> nn.Module:
    """A freshly initialised network of a checkpoint ``arch`` name."""
    if arch == STUDENT_ARCH:
        return ResNet18()
    if arch == TEACHER_ARCH:
        return cifar_resnet18()
    raise CheckpointError(f"unknown architecture {arch!r} (known: {STUDENT_ARCH}, {TEACHER_ARCH})")


def load_teacher(path: str | os.PathLike[str], device: torch.device | str = "cpu") -> ServingModel:
    """A frozen teacher in eval mode, uint8 NHWC in, logits out (the student's preprocessing).

    Any checkpoint written by ``cifar-train`` works (a student can teach too); its EMA weights
    are used when it has them, as export does.
    """
    ckpt = load_checkpoint(path)
    arch = str(ckpt.get("arch", STUDENT_ARCH))
    net = build_net(arch)
    weights = ckpt.get("ema_model") or ckpt["model"]
    try:
        net.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the {arch} architecture ({exc})") from exc
    model = ServingModel(net, ckpt.get("mean", CIFAR10_MEAN), ckpt.get("std", CIFAR10_STD))
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
