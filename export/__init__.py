"""Model, data, training and export of the document's ResNet18 for CIFAR-10."""

from .checkpoint import CheckpointError, TrainConfig, load_checkpoint, load_model
from .data import CIFAR10_CLASSES, CifarSplit, DatasetError, load_cifar10, load_split
from .model import CIFAR10_MEAN, CIFAR10_STD, NullNet, ResBlk, ResNet18, ServingModel

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CheckpointError",
    "CifarSplit",
    "DatasetError",
    "NullNet",
    "ResBlk",
    "ResNet18",
    "ServingModel",
    "TrainConfig",
    "load_checkpoint",
    "load_cifar10",
    "load_model",
    "load_split",
]
