"""Result types: small frozen dataclasses built from the protobuf answers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from cifar_serve.v1 import classifier_pb2 as pb

__all__ = ["BatchingInfo", "Classification", "Limits", "ModelInfo", "Prediction", "TensorSpec"]


class Prediction(NamedTuple):
    """One ranked class: ``(label, class_index, probability)``."""

    label: str
    class_index: int
    probability: float


@dataclass(frozen=True)
class Classification:
    """The answer for one image.

    ``label``, ``class_index`` and ``probability`` are the top-1 prediction; ``predictions`` holds the
    ``top_k`` ranked classes, most probable first; ``logits`` (float32, one per class, in class index
    order) is set only when ``include_logits=True`` was asked for.
    """

    label: str
    class_index: int
    probability: float
    predictions: tuple[Prediction, ...]
    logits: np.ndarray | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_proto(cls, msg: pb.Classification) -> Classification:
        preds = tuple(Prediction(p.label, int(p.class_index), float(p.probability)) for p in msg.predictions)
        if not preds:
            raise ValueError("server answered a classification without predictions")
        logits = np.asarray(msg.logits, dtype=np.float32) if len(msg.logits) else None
        if logits is not None:
            logits.setflags(write=False)
        top = preds[0]
        return cls(top.label, top.class_index, top.probability, preds, logits)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]
    layout: str


@dataclass(frozen=True)
class BatchingInfo:
    max_batch_size: int
    max_batch_delay_ms: float
    max_queue_images: int


@dataclass(frozen=True)
class Limits:
    max_images_per_request: int
    max_image_pixels: int
    max_receive_message_bytes: int
    max_stream_requests: int


@dataclass(frozen=True)
class ModelInfo:
    """What the server serves and how (``GetModelInfo``)."""

    name: str
    version: str
    labels: tuple[str, ...]
    input: TensorSpec
    output: TensorSpec
    artifact_sha256: str
    test_accuracy: float
    device: str
    backend: str
    precision: str
    batching: BatchingInfo
    limits: Limits

    @classmethod
    def from_proto(cls, msg: pb.ModelInfo) -> ModelInfo:
        def spec(s: pb.TensorSpec) -> TensorSpec:
            return TensorSpec(s.name, s.datatype, tuple(int(d) for d in s.shape), s.layout)

        b, lim = msg.batching, msg.limits
        return cls(
            name=msg.name,
            version=msg.version,
            labels=tuple(msg.labels),
            input=spec(msg.input),
            output=spec(msg.output),
            artifact_sha256=msg.artifact_sha256,
            test_accuracy=msg.test_accuracy,
            device=msg.device,
            backend=msg.backend,
            precision=msg.precision,
            batching=BatchingInfo(b.max_batch_size, b.max_batch_delay_ms, b.max_queue_images),
            limits=Limits(
                lim.max_images_per_request,
                lim.max_image_pixels,
                lim.max_receive_message_bytes,
                lim.max_stream_requests,
            ),
        )
