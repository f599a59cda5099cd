"""The transport-free inference core: model runtime + batcher + ranking.

Servicers hand it numpy images and get numpy logits or ranked classes back; it knows
nothing about protobuf or gRPC.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .batcher import DynamicBatcher
from .errors import InvalidInput, ModelNotFound
from .metrics import Metrics
from .runtime import ModelRuntime
from .settings import Settings
from .stats import ModelStats, RequestTimes

__all__ = ["InferenceCore", "Ranked", "rank"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranked:
    """Top-k per image: ``indices`` and ``probabilities`` are ``[n, k]``, most probable first."""

    indices: np.ndarray
    probabilities: np.ndarray


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def rank(logits: np.ndarray, k: int) -> Ranked:
    """Vectorised top-k over the whole batch (stable: ties keep class order)."""
    probs = softmax(logits.astype(np.float64))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return Ranked(order, np.take_along_axis(probs, order, axis=1).astype(np.float32))


class InferenceCore:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        slots = settings.max_inflight_batches or 0
        self.runtime = ModelRuntime(
            settings.model_dir,
            device=settings.device,
            backend=settings.backend,
            precision=settings.precision,
            max_batch_size=settings.max_batch_size,
            slots=max(slots, 2),
            threads=settings.torch_threads,
            verify_sha256=settings.verify_sha256,
            cuda_graphs=settings.cuda_graphs,
        )
        if not slots:
            slots = 2 if self.runtime.device.type == "cuda" else 1
        self.max_inflight = slots
        m = self.runtime.manifest
        self.model_name = settings.model_name or m.name
        self.model_version = m.version
        self.labels: tuple[str, ...] = m.labels
        self.num_classes = len(self.labels)
        self.batcher: DynamicBatcher | None = None
        self.stats = ModelStats()

    def warmup(self) -> None:
        self.runtime.warmup()

    def start(self) -> None:
        """Create the batcher on the running event loop."""
        self.batcher = DynamicBatcher(
            self.runtime.infer,
            max_batch_size=self.settings.max_batch_size,
            max_delay_s=self.settings.max_batch_delay_ms / 1000.0,
            max_queue_images=self.settings.max_queue_images,
            max_inflight=self.max_inflight,
            idle_dispatch=self.settings.idle_dispatch,
            num_classes=self.num_classes,
            metrics=self.metrics,
            stats=self.stats,
        )
        self.batcher.start()

    async def stop(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()

    def check_model(self, name: str, version: str = "") -> None:
        if name != self.model_name:
            raise ModelNotFound(f"unknown model {name!r}; this server serves {self.model_name!r}")
        if version and version != self.model_version:
            raise ModelNotFound(
                f"model {name!r} has no version {version!r}; available: {self.model_version!r}"
            )

    def check_count(self, n: int) -> None:
        if n == 0:
            raise InvalidInput("request holds no images")
        if n > self.settings.max_images_per_request:
            raise InvalidInput(
                f"request holds {n} images, more than the limit of {self.settings.max_images_per_request} "
                "per request; split it"
            )

    async def logits(self, images: np.ndarray, deadline: float | None = None) -> np.ndarray:
        """Float32 logits ``[n, classes]`` for uint8 ``[n,32,32,3]`` images."""
        started = time.perf_counter_ns()
        times = RequestTimes()
        try:
            n = int(images.shape[0])
            self.check_count(n)
            assert self.batcher is not None, "core not started"
            logits = await self.batcher.submit(images, deadline, times)
        except BaseException:  # cancelled callers count as failed requests, as in Triton
            self.stats.request_failed(time.perf_counter_ns() - started)
            raise
        self.stats.request_succeeded(n, time.perf_counter_ns() - started, times)
        return logits

    def check_top_k(self, k: int) -> None:
        if not 1 <= k <= self.num_classes:
            raise InvalidInput(f"top_k must be between 1 and {self.num_classes}, got {k}")

    def info(self) -> dict[str, Any]:
        s = self.settings
        return {
            "name": self.model_name,
            "version": self.model_version,
            "labels": list(self.labels),
            "sha256": self.runtime.sha256,
            "test_accuracy": self.runtime.manifest.test_accuracy,
            **self.runtime.describe(),
            "runtime_table": self.runtime.runtime_table(),
            "max_batch_size": s.max_batch_size,
            "max_batch_delay_ms": s.max_batch_delay_ms,
            "max_queue_images": s.max_queue_images,
            "max_images_per_request": s.max_images_per_request,
            "max_image_pixels": s.max_image_pixels,
            "max_receive_message_bytes": s.max_receive_message_bytes,
            "max_stream_requests": s.max_stream_requests,
        }
