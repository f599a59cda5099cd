"""The dynamic batcher with the real model runtime: batching, splitting, bounds, deadlines, failures."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cifar_serve.server.batcher import DynamicBatcher
from cifar_serve.server.errors import (
    DeadlineExceeded,
    InternalError,
    QueueFull,
    ResourceExhausted,
    Unavailable,
)
from cifar_serve.server.metrics import Metrics
from cifar_serve.server.runtime import ModelRuntime


@pytest.fixture(scope="module")
def runtime(model_dir: Path) -> ModelRuntime:
    return ModelRuntime(model_dir, max_batch_size=16)


class Gate:
    """Wraps the real runtime so a test decides when a forward pass may proceed."""

    def __init__(self, runtime: ModelRuntime) -> None:
        self.runtime = runtime
        self.open = threading.Event()
        self.entered = threading.Event()
        self.sizes: list[int] = []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.sizes.append(len(x))
        self.entered.set()
        assert self.open.wait(30)
        return self.runtime.infer(x)


def _dropped(metrics: Metrics, reason: str) -> float:
    return metrics.registry.get_sample_value("cifar_serve_dropped_images_total", {"reason": reason}) or 0.0


async def _busy(
    runtime: ModelRuntime, sample: Any, max_queue_images: int
) -> tuple[Gate, Metrics, DynamicBatcher, asyncio.Future[np.ndarray]]:
    """A started batcher whose first batch (16 images) is in the model, held there by a shut gate.

    The queue is empty then, so what a test submits next waits in it for as long as it likes.
    """
    gate = Gate(runtime)
    metrics = Metrics()
    b = DynamicBatcher(
        gate, max_batch_size=16, max_delay_s=0.0, max_queue_images=max_queue_images, metrics=metrics
    )
    b.start()
    first = asyncio.ensure_future(b.submit(sample.images[:16]))
    await asyncio.to_thread(gate.entered.wait, 10)
    return gate, metrics, b, first


def test_concurrent_callers_share_batches_and_get_their_own_rows(runtime, sample, offline_logits) -> None:  # type: ignore[no-untyped-def]
    async def run() -> None:
        gate = Gate(runtime)
        b = DynamicBatcher(gate, max_batch_size=16, max_delay_s=0.05, max_queue_images=1000)
        b.start()
        gate.open.set()
        results = await asyncio.gather(*[b.submit(sample.images[i : i + 1]) for i in range(48)])
        await b.stop()
        for i, r in enumerate(results):
            np.testing.assert_allclose(r[0], offline_logits[i], atol=1e-4)
        assert max(gate.sizes) == 16 and len(gate.sizes) <= 6

    asyncio.run(run())


def test_large_request_split_across_batches_in_order(runtime, sample, offline_logits) -> None:  # type: ignore[no-untyped-def]
    async def run() -> None:
        gate = Gate(runtime)
        gate.open.set()
        b = DynamicBatcher(gate, max_batch_size=16, max_delay_s=0.0, max_queue_images=1000)
        b.start()
        a, c = await asyncio.gather(b.submit(sample.images[:37]), b.submit(sample.images[37:40]))
        await b.stop()
        np.testing.assert_allclose(a, offline_logits[:37], atol=1e-4)
        np.testing.assert_allclose(c, offline_logits[37:40], atol=1e-4)
        assert all(s <= 16 for s in gate.sizes) and sum(gate.sizes) == 40

    asyncio.run(run())


def test_full_batch_runs_without_waiting_for_the_delay(runtime, sample, offline_logits) -> None:  # type: ignore[no-untyped-def]
    async def run() -> None:
        gate = Gate(runtime)
        b = DynamicBatcher(gate, max_batch_size=16, max_delay_s=3600.0, max_queue_images=100, max_inflight=2)
        b.start()
        first = asyncio.ensure_future(b.submit(sample.images[:1]))  # the model was idle: runs at once
        assert await asyncio.to_thread(gate.entered.wait, 10)
        gate.entered.clear()
        # Busy model, an hour's delay: only the full-batch rule can start this batch.
        full = asyncio.ensure_future(b.submit(sample.images[1:17]))
        assert await asyncio.to_thread(gate.entered.wait, 10), "a full batch waited for the delay"
        gate.open.set()
        np.testing.assert_allclose(await full, offline_logits[1:17], atol=1e-4)
        await first
        assert gate.sizes == [1, 16]
        await b.stop()

    asyncio.run(run())


def test_queue_bound_refuses_at_once(runtime, sample) -> None:  # type: ignore[no-untyped-def]
    async def run() -> None:
        gate, metrics, b, first = await _busy(runtime, sample, max_queue_images=32)
        queued = asyncio.ensure_future(b.submit(sample.images[:30]))
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull):  # the gate is shut: only an immediate refusal returns
            await b.submit(sample.images[:3])
        assert _dropped(metrics, "queue_full") == 3
        gate.open.set()
        assert (await first).shape == (16, 10) and (await queued).shape == (30, 10)
        await b.stop()

    asyncio.run(run())


def test_expired_work_is_dropped_before_compute(runtime, sample) -> None:  # type: ignore[no-untyped-def]
    async def run() -> None:
        gate, metrics, b, first = await _busy(runtime, sample, max_queue_images=100)
        late = asyncio.ensure_future(b.submit(sample.images[16:20], deadline=time.monotonic() + 0.05))
        await asyncio.sleep(0.2)
        gate.open.set()
        await first
        with pytest.raises(DeadlineExceeded):
            await late
        await b.stop()
        assert _dropped(metrics, "deadline") == 4
        assert gate.sizes == [16]  # the expired images never reached the model

    asyncio.run(run())


def test_cancelled_call_leaves_the_queue(runtime, sample) -> None:  # type: ignore[no-untyped-def]
    async def run() -> None:
        gate, metrics, b, first = await _busy(runtime, sample, max_queue_images=100)
        doomed = asyncio.ensure_future(b.submit(sample.images[:5]))
        await asyncio.sleep(0.01)
        assert b.queued_images == 5
        doomed.cancel()
        await asyncio.sleep(0.01)
        assert b.queued_images == 0
        gate.open.set()
        await first
        await b.stop()
        assert _dropped(metrics, "cancelled") == 5
        assert gate.sizes == [16]

    asyncio.run(run())


def test_failure_fails_only_that_batch(runtime, sample, offline_logits) -> None:  # type: ignore[no-untyped-def]
    calls = {"n": 0}

    def flaky(x: np.ndarray) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated kernel failure")
        return runtime.infer(x)

    async def run() -> None:
        b = DynamicBatcher(flaky, max_batch_size=16, max_delay_s=0.0, max_queue_images=100)
        b.start()
        with pytest.raises(InternalError, match="simulated kernel failure"):
            await b.submit(sample.images[:4])
        np.testing.assert_allclose(await b.submit(sample.images[4:8]), offline_logits[4:8], atol=1e-4)
        await b.stop()

    asyncio.run(run())


def test_out_of_memory_retries_in_halves(runtime, sample, offline_logits) -> None:  # type: ignore[no-untyped-def]
    import torch

    sizes: list[int] = []

    def small_memory(x: np.ndarray) -> np.ndarray:
        sizes.append(len(x))
        if len(x) > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return runtime.infer(x)

    def no_memory(x: np.ndarray) -> np.ndarray:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    async def run() -> None:
        b = DynamicBatcher(small_memory, max_batch_size=16, max_delay_s=0.0, max_queue_images=100)
        b.start()
        out = await b.submit(sample.images[:16])
        await b.stop()
        np.testing.assert_allclose(out, offline_logits[:16], atol=1e-4)
        assert sizes[:3] == [16, 8, 4]
        b2 = DynamicBatcher(no_memory, max_batch_size=16, max_delay_s=0.0, max_queue_images=100)
        b2.start()
        with pytest.raises(ResourceExhausted, match="out of memory"):
            await b2.submit(sample.images[:2])
        await b2.stop()

    asyncio.run(run())


def test_stop_finishes_accepted_work_and_refuses_new(runtime, sample, offline_logits) -> None:  # type: ignore[no-untyped-def]
    async def run() -> None:
        b = DynamicBatcher(runtime.infer, max_batch_size=16, max_delay_s=0.5, max_queue_images=100)
        b.start()
        pending = [asyncio.ensure_future(b.submit(sample.images[i : i + 1])) for i in range(5)]
        await asyncio.sleep(0)
        await b.stop()
        for i, p in enumerate(pending):
            np.testing.assert_allclose((await p)[0], offline_logits[i], atol=1e-4)
        with pytest.raises(Unavailable):
            await b.submit(sample.images[:1])

    asyncio.run(run())
