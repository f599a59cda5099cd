"""Python client of cifar-serve: classify images with the served CIFAR-10 ResNet18.

    from cifar_serve.client import Client

    with Client("localhost:50051", timeout=10) as client:
        for result in client.classify(["cat.png", "ship.jpg"], top_k=3):
            print(result.label, result.probability)

``classify()`` takes file paths, encoded file bytes, PIL images and uint8 numpy arrays (one HWC
image or an NHWC batch), one or a list of them, and answers one :class:`Classification` per image
in input order. Every failure is a :class:`CifarServeError` carrying its ``grpc.StatusCode``.
:class:`AsyncClient` is the asyncio twin.
"""

from __future__ import annotations

from ._client import DEFAULT_ADDRESS, AsyncClient, Client, Credential
from ._errors import (
    CifarServeError,
    DeadlineExceededError,
    InvalidArgumentError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from ._inputs import ImageInput, Inputs, load_image_file
from ._types import BatchingInfo, Classification, Limits, ModelInfo, Prediction, TensorSpec

__all__ = [
    "DEFAULT_ADDRESS",
    "AsyncClient",
    "BatchingInfo",
    "CifarServeError",
    "Classification",
    "Client",
    "Credential",
    "DeadlineExceededError",
    "ImageInput",
    "Inputs",
    "InvalidArgumentError",
    "Limits",
    "ModelInfo",
    "PermissionDeniedError",
    "Prediction",
    "ResourceExhaustedError",
    "TensorSpec",
    "UnauthenticatedError",
    "UnavailableError",
    "load_image_file",
]
