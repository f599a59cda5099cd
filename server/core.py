"""The transport-free inference core: model runtime + batcher + ranking.

Servicers hand it numpy images and get numpy logits or ranked classes back; it knows
nothing about protobuf or gRPC.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .batcher import DynamicBatcher
from .errors import InvalidInput, ModelNotFound, Unavailable
from .metrics import Metrics
from .settings import Settings
from .stats import ModelStats, RequestTimes

__all__ = ["InferenceCore", "Phase", "Ranked", "Readiness", "Runtime", "rank"]

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


class ManifestInfo(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def labels(self) -> Sequence[str]: ...
    @property
    def test_accuracy(self) -> float: ...


class Runtime(Protocol):
    """What the core needs of a model runtime (:class:`.runtime.ModelRuntime`, or a test's fake)."""

    @property
    def manifest(self) -> ManifestInfo: ...
    @property
    def sha256(self) -> str: ...
    @property
    def backend(self) -> str: ...
    @property
    def device(self) -> Any: ...  # has ``.type``: "cpu" or "cuda"

    def infer(self, images: np.ndarray) -> np.ndarray: ...
    def warmup(self) -> None: ...
    def describe(self) -> dict[str, Any]: ...


class Phase(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    FAILED = "failed"


class Readiness:
    """Whether the core takes new work, and why not."""

    def __init__(self) -> None:
        self.phase = Phase.STARTING
        self.reason = ""

    @property
    def serving(self) -> bool:
        return self.phase is Phase.SERVING

    def set(self, phase: Phase, reason: str = "") -> None:
        self.phase = phase
        self.reason = reason

    def check(self) -> None:
        """Raise :class:`Unavailable` unless new work is taken."""
        if self.phase is Phase.SERVING:
            return
        if self.phase is Phase.STARTING:
            raise Unavailable("warming up: the model is loading; retry shortly")
        if self.phase is Phase.DRAINING:
            raise Unavailable("shutting down: not taking new calls; use another replica")
        raise Unavailable(f"server failed ({self.reason}); it is exiting")


def load_runtime(settings: Settings, slots: int) -> Runtime:
    """The real runtime for ``settings`` (imported here: torch loads only when a model does)."""
    from .runtime import ModelRuntime

    runtime: Runtime = ModelRuntime(
        settings.model_dir,
        device=settings.device,
        backend=settings.backend,
        precision=settings.precision,
        max_batch_size=settings.max_batch_size,
        slots=slots,
        threads=settings.torch_threads,
        verify_sha256=settings.verify_sha256,
        cuda_graphs=settings.cuda_graphs,
    )
    return runtime


class InferenceCore:
    def __init__(self, settings: Settings, metrics: Metrics, runtime: Runtime | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.readiness = Readiness()
        slots = settings.max_inflight_batches or 0
        self.runtime = runtime if runtime is not None else load_runtime(settings, max(slots, 2))
        if not slots:
            slots = 2 if self.runtime.device.type == "cuda" else 1
        self.max_inflight = slots
        m = self.runtime.manifest
        self.model_name = settings.model_name or m.name
        self.model_version = m.version
        self.labels: tuple[str, ...] = tuple(m.labels)
        self.num_classes = len(self.labels)
        self.batcher: DynamicBatcher | None = None
        self.stats = ModelStats()

    def warmup(self) -> None:
        self.runtime.warmup()

    def start(self, on_failure: Callable[[BaseException], None] | None = None) -> None:
        """Create the batcher on the running event loop (before warm-up: calls meanwhile get
        UNAVAILABLE from :attr:`readiness`, never an unstarted core)."""
        self.batcher = DynamicBatcher(
            self.runtime.infer,
            max_batch_size=self.settings.max_batch_size,
            max_delay_s=self.settings.max_batch_delay_ms / 1000.0,
            max_queue_images=self.settings.max_queue_images,
            max_inflight=self.max_inflight,
            idle_dispatch=self.settings.idle_dispatch,
            num_classes=self.num_classes,
            metrics=self.metrics,
            on_failure=on_failure,
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
        n = int(images.shape[0])
        self.check_count(n)
        if self.batcher is None:
            raise Unavailable("warming up: the model is loading; retry shortly")
        # Statistics count the requests that reached the model's queue (as Triton's do).
        started = time.perf_counter_ns()
        times = RequestTimes()
        try:
            logits = await self.batcher.submit(images, deadline, times)
        except BaseException:  # refused, expired, cancelled or failed: all failed inferences
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
            "max_batch_size": s.max_batch_size,
            "max_batch_delay_ms": s.max_batch_delay_ms,
            "max_queue_images": s.max_queue_images,
            "max_images_per_request": s.max_images_per_request,
            "max_image_pixels": s.max_image_pixels,
            "max_receive_message_bytes": s.max_receive_message_bytes,
            "max_stream_requests": s.max_stream_requests,
        }
