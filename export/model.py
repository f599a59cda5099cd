"""The ResNet18 of the design document, kept layer for layer.

Two quirks of the document are deliberate and preserved so that its checkpoints load with
``strict=True`` and give identical outputs:

* there is no ReLU after the residual sum;
* ``blk4`` keeps an identity shortcut (512 -> 512 channels) although its convolution has
  stride 2, so a ``[b,512,2,2]`` input is added to a ``[b,512,1,1]`` output by broadcasting.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "NullNet", "ResBlk", "ResNet18", "ServingModel"]

# Per-channel statistics of the CIFAR-10 training set, in [0, 1] units.
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)


class ResBlk(nn.Module):
    """Residual block: two 3x3 conv+BN, with a 1x1 conv+BN shortcut when channels change."""

    def __init__(self, ch_in: int, ch_out: int, stride: int = 1) -> None:
        super().__init__()
        self.con1 = nn.Conv2d(ch_in, ch_out, kernel_size=3, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(ch_out)
        self.con2 = nn.Conv2d(ch_out, ch_out, kernel_size=3, stride=1, padding=1)
        self.bn2 = nn.BatchNorm2d(ch_out)
        self.extra: nn.Sequential = nn.Sequential()
        if ch_out != ch_in:
            self.extra = nn.Sequential(
                nn.Conv2d(ch_in, ch_out, kernel_size=1, stride=stride),
                nn.BatchNorm2d(ch_out),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.con1(x)))
        out = self.bn2(self.con2(out))
        # The document adds without a final ReLU; when ``extra`` is the identity and the
        # stride shrinks the map, the sum broadcasts (blk4).
        return self.extra(x) + out


class ResNet18(nn.Module):
    """The document's network: stride-3 stem, four blocks, global average pool, linear head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=3, stride=3, padding=0),
            nn.BatchNorm2d(64),
        )
        self.blk1 = ResBlk(64, 128, stride=2)
        self.blk2 = ResBlk(128, 256, stride=2)
        self.blk3 = ResBlk(256, 512, stride=2)
        self.blk4 = ResBlk(512, 512, stride=2)
        self.outlay = nn.Linear(512 * 1 * 1, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = self.blk1(x)
        x = self.blk2(x)
        x = self.blk3(x)
        x = self.blk4(x)
        x = F.adaptive_avg_pool2d(x, (1, 1))
        x = x.view(x.size(0), -1)
        return self.outlay(x)


class NullNet(nn.Module):
    """A stand-in of the served contract whose forward costs microseconds: the per-channel mean
    over the pixels, then a fixed Linear(3, classes).

    Served in place of the ResNet18 it leaves only the request path to measure (as Triton measures
    its own overhead with identity models). The weights are a closed formula, not a seeded draw,
    so every torch version exports the same model; its answers are meaningless.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.head = nn.Linear(3, num_classes)
        with torch.no_grad():
            k = torch.arange(num_classes, dtype=torch.float32).view(-1, 1)
            c = torch.arange(3, dtype=torch.float32).view(1, -1)
            self.head.weight.copy_(torch.sin(1.0 + 3.0 * k + c))
            self.head.bias.copy_(0.1 * torch.cos(k.view(-1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.mean(dim=(2, 3)))


class ServingModel(nn.Module):
    """What gets exported: uint8 NHWC RGB pixels in, float32 logits out.

    Normalisation lives inside the graph so every runtime that loads the artifact
    (TorchScript, ONNX Runtime, Triton) applies exactly the same preprocessing.
    """

    def __init__(
        self,
        net: nn.Module,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ) -> None:
        super().__init__()
        self.net = net
        # Folded into one multiply-add: x/255 - mean)/std == x*scale + shift.
        scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32)
        shift = torch.tensor([-m / s for m, s in zip(mean, std, strict=False)], dtype=torch.float32)
        self.scale: torch.Tensor
        self.shift: torch.Tensor
        self.register_buffer("scale", scale.view(1, 3, 1, 1))
        self.register_buffer("shift", shift.view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).to(torch.float32)
        x = x * self.scale + self.shift
        return self.net(x)
