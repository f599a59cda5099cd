"""The batch the batcher forms at the default --max-batch-size (fast tier, fake model).

While a batch computes, work queues up; the next batch takes all of it, up to the maximum,
however the images are split into requests: the cost curve that chose the default
(BENCHMARKS.md) only pays if batches that large really form.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
import pytest

from cifar_serve.server.batcher import DynamicBatcher
from cifar_serve.server.settings import Settings

pytestmark = pytest.mark.fast

NEVER = 3600.0  # a batch delay no test waits out: only a full or idle model can start a batch
MAX = Settings().max_batch_size


class GatedModel:
    """Records the size of every batch; holds each one until the gate opens."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.sizes: list[int] = []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.sizes.append(len(x))
        self.entered.set()
        assert self.gate.wait(30)
        return x.reshape(len(x), -1)[:, :10].astype(np.float32)


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


async def _batches_after_a_busy_model(request_sizes: list[int]) -> list[int]:
    """Sizes of the batches that run when ``request_sizes`` arrive while one image computes."""
    model = GatedModel()
    b = DynamicBatcher(
        model, max_batch_size=MAX, max_delay_s=NEVER, max_queue_images=Settings().max_queue_images
    )
    b.start()
    first = asyncio.ensure_future(b.submit(_images(1, 0)))  # the idle model takes it at once
    assert await asyncio.to_thread(model.entered.wait, 10)
    requests = [_images(n, i + 1) for i, n in enumerate(request_sizes)]
    calls = [asyncio.ensure_future(b.submit(x)) for x in requests]
    while b.queued_images < sum(request_sizes):
        await asyncio.sleep(0.001)
    model.gate.set()
    answers: list[Any] = await asyncio.gather(first, *calls)
    for x, out in zip(requests, answers[1:], strict=True):
        np.testing.assert_array_equal(out, x.reshape(len(x), -1)[:, :10].astype(np.float32))
    await b.stop()
    return model.sizes


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_single_image_requests_fill_a_batch_up_to_the_default_maximum() -> None:
    sizes = run(_batches_after_a_busy_model([1] * (MAX + 44)))
    assert sizes == [1, MAX, 44]


def test_fewer_queued_images_than_the_maximum_all_go_in_the_next_batch() -> None:
    # Single-image callers at a concurrency below the maximum (perf_analyzer's c=128): one batch
    # of all of them, not several smaller ones.
    sizes = run(_batches_after_a_busy_model([1] * (MAX - 1)))
    assert sizes == [1, MAX - 1]


def test_requests_of_many_images_are_packed_and_split_at_the_maximum() -> None:
    sizes = run(_batches_after_a_busy_model([64] * 5 + [MAX + 3]))
    total = 64 * 5 + MAX + 3
    assert sizes[0] == 1 and sum(sizes[1:]) == total
    assert sizes[1:] == [MAX] * (total // MAX) + ([total % MAX] if total % MAX else [])
