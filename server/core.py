"""The transport-free inference core: model runtime + batcher + ranking.

Servicers hand it numpy images and get numpy logits or ranked classes back; it knows
nothing about protobuf or gRPC.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .batcher import DynamicBatcher
from .errors import InvalidInput, ModelLoadFailed, ModelNotFound, Unavailable
from .lifecycle import Lifecycle, State
from .limits import check_image_count
from .metrics import Metrics
from .settings import Settings
from .stats import ModelStats, RequestTimes, StatsSnapshot

__all__ = [
    "InferenceCore",
    "Ranked",
    "RequestChecks",
    "Runtime",
    "RuntimeInfo",
    "ServingCore",
    "check_sample",
    "rank",
]

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


class RuntimeInfo(Protocol):
    """What the servicers read of a runtime (in a worker process, the model process's description)."""

    @property
    def sha256(self) -> str: ...
    @property
    def backend(self) -> str: ...
    @property
    def device(self) -> Any: ...  # has ``.type``: "cpu" or "cuda", and ``.index``

    def describe(self) -> dict[str, Any]: ...


class Runtime(RuntimeInfo, Protocol):
    """What the core needs of a model runtime (:class:`.runtime.ModelRuntime`, or a test's fake)."""

    @property
    def manifest(self) -> ManifestInfo: ...

    def infer(self, images: np.ndarray) -> np.ndarray: ...
    def warmup(self) -> None: ...


class ServingCore(Protocol):
    """What servicers, the edge and the app use of a core: :class:`InferenceCore` in this
    process, or :class:`.remote.RemoteCore` in a worker process of ``--workers N``."""

    settings: Settings
    metrics: Metrics
    lifecycle: Lifecycle

    @property
    def model_name(self) -> str: ...
    @property
    def labels(self) -> tuple[str, ...]: ...
    @property
    def num_classes(self) -> int: ...
    @property
    def model_version(self) -> str: ...
    @property
    def max_inflight(self) -> int: ...
    @property
    def last_load_error(self) -> str: ...
    @property
    def runtime(self) -> RuntimeInfo: ...

    def info(self) -> dict[str, Any]: ...
    def check_model(self, name: str, version: str = "") -> None: ...
    def check_count(self, n: int) -> None: ...
    def check_top_k(self, k: int) -> None: ...
    async def infer(self, images: np.ndarray, deadline: float | None = None) -> tuple[np.ndarray, str]: ...
    async def logits(self, images: np.ndarray, deadline: float | None = None) -> np.ndarray: ...
    async def statistics(self) -> dict[str, StatsSnapshot]: ...
    async def load(self, model_dir: str = "") -> str: ...
    async def unload(self) -> None: ...
    async def connect(self) -> None: ...
    def start(self, on_failure: Callable[[BaseException], None] | None = None) -> None: ...
    async def warm_up(self) -> None: ...
    async def stop(self) -> None: ...


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
        spin_wait=settings.spin_wait,
        verify_sha256=settings.verify_sha256,
        cuda_graphs=settings.cuda_graphs,
    )
    return runtime


def check_sample(runtime: Runtime, max_batch: int = 0) -> str:
    """Run the images stored in the runtime's manifest and compare with the logits stored there.

    Raises :class:`ModelLoadFailed` on a mismatch; returns what was checked, for the log.
    """
    raw = getattr(runtime.manifest, "raw", None) or {}
    sample = raw.get("check_sample")
    if not sample:
        return "no check sample in the manifest (exported by an older cifar-export): not checked"
    n = int(sample["count"])
    images = np.frombuffer(base64.b64decode(sample["images_b64"]), np.uint8).reshape(n, 32, 32, 3)
    precision = str(runtime.describe().get("precision", "fp32"))
    # The int8 model is its own model: its top-1 is checked against its own logits at export.
    expected = np.asarray(
        sample.get("logits_int8", sample["logits"]) if precision == "int8" else sample["logits"], np.float32
    )
    # In chunks the runtime is built for (a CUDA runtime has graphs only up to --max-batch-size).
    step = max_batch if max_batch > 0 else n
    got = np.concatenate([runtime.infer(images[i : i + step]) for i in range(0, n, step)])
    if precision == "fp32":
        diff = float(np.abs(got - expected).max())
        if diff > float(sample["atol"]):
            raise ModelLoadFailed(
                f"check sample: logits differ from the manifest's by {diff:.2e} (tolerance {sample['atol']})"
            )
        return f"{n} sample images match the manifest's logits (max diff {diff:.1e})"
    agree = float((got.argmax(1) == expected.argmax(1)).mean())
    if agree < 1.0:
        raise ModelLoadFailed(f"check sample: top-1 agrees with the manifest's on {agree:.0%} of {n} images")
    return f"{n} sample images: same top-1 as the manifest's ({precision})"


@dataclass
class _Loaded:
    """One model version: its runtime, its batcher, where it came from."""

    runtime: Runtime
    version: str
    source: str
    batcher: DynamicBatcher | None = None


class _Identity(Protocol):
    @property
    def settings(self) -> Settings: ...
    @property
    def model_name(self) -> str: ...
    @property
    def model_version(self) -> str: ...
    @property
    def num_classes(self) -> int: ...
    async def infer(self, images: np.ndarray, deadline: float | None = None) -> tuple[np.ndarray, str]: ...


class RequestChecks:
    """The request checks both cores make the same way (this process's, and a worker's stand-in)."""

    def check_model(self: _Identity, name: str, version: str = "") -> None:
        if name != self.model_name:
            raise ModelNotFound(f"unknown model {name!r}; this server serves {self.model_name!r}")
        if version and version != self.model_version:
            raise ModelNotFound(
                f"model {name!r} has no version {version!r}; available: {self.model_version!r}"
            )

    def check_count(self: _Identity, n: int) -> None:
        check_image_count(n, self.settings.max_images_per_request)

    def check_top_k(self: _Identity, k: int) -> None:
        if not 1 <= k <= self.num_classes:
            raise InvalidInput(f"top_k must be between 1 and {self.num_classes}, got {k}")

    async def logits(self: _Identity, images: np.ndarray, deadline: float | None = None) -> np.ndarray:
        """Float32 logits ``[n, classes]`` for uint8 ``[n,32,32,3]`` images."""
        return (await self.infer(images, deadline))[0]


class InferenceCore(RequestChecks):
    """Runtime + batcher behind one API; a new model version can be swapped in while serving.

    ``loader`` builds a runtime from settings (default: the exported artifacts of
    ``settings.model_dir``); ``runtime`` is the first one, when given (tests pass fakes).
    """

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        runtime: Runtime | None = None,
        loader: Callable[[Settings], Runtime] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.lifecycle = Lifecycle()
        slots = settings.max_inflight_batches or 0
        self._loader = loader or (lambda s: load_runtime(s, max(slots, 2)))
        first = runtime if runtime is not None else self._loader(settings)
        if not slots:
            slots = 2 if first.device.type == "cuda" else 1
        self.max_inflight = slots
        m = first.manifest
        self.model_name = settings.model_name or m.name
        self.labels: tuple[str, ...] = tuple(m.labels)
        self.num_classes = len(self.labels)
        self._active = _Loaded(first, m.version, settings.model_dir)
        if (getattr(m, "raw", None) or {}).get("model", {}).get("arch") == "null":
            logger.warning(
                "serving %s, the null model (cifar-export --null-model): its answers are meaningless; "
                "it exists to measure the request path",
                settings.model_dir,
            )
        self._on_failure: Callable[[BaseException], None] | None = None
        self._load_lock: asyncio.Lock | None = None
        self.last_load_error = ""
        self._set_version_metric(None, m.version)
        # Fixed for the process (a reload loads with the same settings): which runtime answers.
        d = first.describe()
        self.metrics.model_runtime.labels(
            self.model_name, str(d.get("backend", "")), str(d.get("precision", "")), str(d.get("device", ""))
        ).set(1)
        # Triton-style statistics, one accumulator per model version that has served.
        self._stats: dict[str, ModelStats] = {}

    @property
    def runtime(self) -> Runtime:
        return self._active.runtime

    @property
    def batcher(self) -> DynamicBatcher | None:
        return self._active.batcher

    @property
    def model_version(self) -> str:
        return self._active.version

    def _set_version_metric(self, old: str | None, new: str) -> None:
        if old is not None and old != new:
            # Zeroed first: with --workers N the series lives in a file that removal leaves alone.
            self.metrics.model_version.labels(self.model_name, old).set(0)
            self.metrics.model_version.remove(self.model_name, old)
        self.metrics.model_version.labels(self.model_name, new).set(1)

    def _new_batcher(self, runtime: Runtime) -> DynamicBatcher:
        batcher = DynamicBatcher(
            runtime.infer,
            max_batch_size=self.settings.max_batch_size,
            max_delay_s=self.settings.max_batch_delay_ms / 1000.0,
            max_queue_images=self.settings.max_queue_images,
            max_inflight=self.max_inflight,
            idle_dispatch=self.settings.idle_dispatch,
            regroup=self.settings.batch_regroup,
            num_classes=self.num_classes,
            metrics=self.metrics,
            on_failure=self._on_failure,
            stats=self.stats_for(runtime.manifest.version),
        )
        batcher.start()
        return batcher

    def warmup(self) -> None:
        self.runtime.warmup()

    async def warm_up(self) -> None:
        """Warm the runtime up off the event loop (calls meanwhile get UNAVAILABLE).

        On a daemon thread, not the default executor: a SIGTERM during a long warm-up stops the
        process at once instead of waiting for the warm-up to end.
        """
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def settle(exc: BaseException | None) -> None:
            if done.done():
                return
            if exc is None:
                done.set_result(None)
            else:
                done.set_exception(exc)

        def run() -> None:
            error: BaseException | None = None
            try:
                self.runtime.warmup()
            except BaseException as exc:  # handed to the awaiting coroutine
                error = exc
            try:
                loop.call_soon_threadsafe(settle, error)
            except RuntimeError:  # the loop closed meanwhile: nobody waits any more
                pass

        threading.Thread(target=run, name="warm-up", daemon=True).start()
        await done

    async def connect(self) -> None:
        """Nothing to connect to: the model is in this process (see :class:`.remote.RemoteCore`)."""

    def start(self, on_failure: Callable[[BaseException], None] | None = None) -> None:
        """Create the batcher on the running event loop (before warm-up: calls meanwhile get
        UNAVAILABLE from :attr:`lifecycle`, never an unstarted core)."""
        self._on_failure = on_failure
        self._active.batcher = self._new_batcher(self._active.runtime)

    async def stop(self) -> None:
        if self._active.batcher is not None:
            await self._active.batcher.stop()

    async def infer(
        self, images: np.ndarray, deadline: float | None = None, *, requests: int = 1
    ) -> tuple[np.ndarray, str]:
        """Logits for uint8 ``[n,32,32,3]`` images, and the model version that computed them.

        A request runs wholly on the version serving when it arrives, even if a new one is
        swapped in meanwhile: the old version's batcher finishes what it accepted. ``requests``
        counts the callers whose images travel together (a worker's group), for the statistics.
        """
        n = int(images.shape[0])
        self.check_count(n)
        active = self._active
        if active.batcher is None:
            raise Unavailable("warming up: the model is loading; retry shortly")
        life = self.lifecycle
        # Not lifecycle.check(): calls accepted before a drain began (a stream's later items)
        # still run. Only a missing model refuses work here.
        if life.state is State.UNLOADED or (life.state is State.LOADING and not life.answers_while_loading):
            life.check()
        # Statistics count the requests that reached the model's queue (as Triton's do).
        stats = self.stats_for(active.version)
        started = time.perf_counter_ns()
        times = RequestTimes()
        try:
            logits = await active.batcher.submit(images, deadline, times, requests)
        except BaseException:  # refused, expired, cancelled or failed: all failed inferences
            stats.request_failed(time.perf_counter_ns() - started, requests)
            raise
        stats.request_succeeded(n, time.perf_counter_ns() - started, times, requests)
        return logits, active.version

    def stats_for(self, version: str) -> ModelStats:
        """The statistics accumulator of one model version (created on first use)."""
        stats = self._stats.get(version)
        if stats is None:
            stats = self._stats[version] = ModelStats()
        return stats

    async def statistics(self) -> dict[str, StatsSnapshot]:
        """Every version's statistics that has served (the serving version always included)."""
        self.stats_for(self.model_version)
        return {version: stats.snapshot() for version, stats in self._stats.items()}

    async def load(self, model_dir: str = "") -> str:
        """Load the artifacts in ``model_dir`` (default ``--model-dir``) as the serving version.

        The new version is loaded (its sha256 checked), warmed up and checked against the
        sample logits stored in its manifest beside the serving one, then swapped in at one
        instant. On any failure the serving version stays and :class:`ModelLoadFailed` says why.
        """
        if self._load_lock is None:
            self._load_lock = asyncio.Lock()
        async with self._load_lock:
            source = model_dir or self.settings.model_dir
            life = self.lifecycle
            before = life.state
            if not life.to(State.LOADING, f"loading {source}"):
                raise Unavailable(f"cannot load now: the server is {life.state.value}")
            try:
                runtime, checked = await asyncio.to_thread(self._prepare, source)
            except ModelLoadFailed as exc:
                self.last_load_error = exc.message
                life.to(before)
                logger.error(
                    "model load from %s refused, %s: %s",
                    source,
                    f"still serving version {self.model_version}"
                    if before is State.SERVING
                    else "the model stays unloaded",
                    exc.message,
                )
                raise
            except BaseException:
                life.to(before)
                raise
            old = self._active
            new = _Loaded(runtime, runtime.manifest.version, source)
            new.batcher = self._new_batcher(runtime)
            self._active = new  # the swap: requests arriving from here on run on the new version
            self.last_load_error = ""
            self._set_version_metric(old.version, new.version)
            life.to(State.SERVING)
            logger.info(
                "model %s: now serving version %s from %s (was version %s from %s); %s",
                self.model_name,
                new.version,
                source,
                old.version,
                old.source,
                checked,
            )
            if old.batcher is not None:
                await old.batcher.stop()  # finishes what the old version accepted
            return new.version

    def _prepare(self, source: str) -> tuple[Runtime, str]:
        try:
            settings = dataclasses.replace(self.settings, model_dir=source)
            runtime = self._loader(settings)
        except Exception as exc:
            raise ModelLoadFailed(f"cannot load {source}: {exc}") from exc
        m = runtime.manifest
        if self.settings.model_name == "" and m.name != self.model_name:
            raise ModelLoadFailed(f"{source} holds model {m.name!r}, this server serves {self.model_name!r}")
        if tuple(m.labels) != self.labels:
            raise ModelLoadFailed(
                f"{source}: labels {list(m.labels)} differ from the served {list(self.labels)}"
            )
        try:
            runtime.warmup()
            checked = check_sample(runtime, self.settings.max_batch_size)
        except ModelLoadFailed:
            raise
        except Exception as exc:
            raise ModelLoadFailed(f"{source}: warm-up or check failed: {type(exc).__name__}: {exc}") from exc
        return runtime, checked

    async def unload(self) -> None:
        if not self.lifecycle.to(State.UNLOADED, "unloaded by RepositoryModelUnload"):
            raise Unavailable(f"cannot unload now: the server is {self.lifecycle.state.value}")
        logger.warning(
            "model %s version %s unloaded: inference answers UNAVAILABLE until a load",
            self.model_name,
            self.model_version,
        )

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
