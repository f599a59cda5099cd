"""The dynamic batcher over a fake model (fast tier): batching rules, bounds and supervision.

No wall-clock assertions: a rule under test is shown by a batch that can only run because of it
(every other way out waits far longer than the test's bound).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
import pytest

from cifar_serve.server.batcher import DynamicBatcher
from cifar_serve.server.errors import QueueFull, Unavailable
from cifar_serve.server.settings import Settings

pytestmark = pytest.mark.fast

IMAGES = np.random.default_rng(1).integers(0, 256, size=(64, 32, 32, 3), dtype=np.uint8)
NEVER = 3600.0  # a batch delay no test waits out
MAX = Settings().max_batch_size


class Model:
    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.sizes: list[int] = []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.sizes.append(len(x))
        self.entered.set()
        assert self.gate.wait(30)
        return x.reshape(len(x), -1)[:, :10].astype(np.float32)


def _expected(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1)[:, :10].astype(np.float32)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_delay_expiry_dispatches_a_partial_batch() -> None:
    # Before Python 3.11 asyncio.wait_for raises asyncio.TimeoutError, not TimeoutError: a collector
    # catching only the latter died here, and this call hung (the Python 3.10 defect).
    async def go() -> None:
        model = Model()
        b = DynamicBatcher(
            model, max_batch_size=16, max_delay_s=0.01, max_queue_images=100, idle_dispatch=False
        )
        b.start()
        out = await b.submit(IMAGES[:1])
        np.testing.assert_array_equal(out, _expected(IMAGES[:1]))
        out = await b.submit(IMAGES[1:3])  # and the collector is still alive for the next one
        np.testing.assert_array_equal(out, _expected(IMAGES[1:3]))
        await b.stop()
        assert b.failure is None

    run(go())


def test_full_batch_runs_without_waiting_for_the_delay() -> None:
    async def go() -> None:
        model = Model()
        b = DynamicBatcher(model, max_batch_size=8, max_delay_s=NEVER, max_queue_images=100, max_inflight=2)
        b.start()
        model.gate.clear()
        first = asyncio.ensure_future(b.submit(IMAGES[:1]))  # idle: dispatched at once, then held
        await asyncio.to_thread(model.entered.wait, 10)
        model.entered.clear()
        # The model is busy, so idle dispatch cannot fire and the delay is an hour: only the
        # full-batch rule can start this one.
        full = asyncio.ensure_future(b.submit(IMAGES[1:9]))
        assert await asyncio.to_thread(model.entered.wait, 10), "a full batch waited for the delay"
        model.gate.set()
        np.testing.assert_array_equal(await full, _expected(IMAGES[1:9]))
        await first
        assert model.sizes == [1, 8]
        await b.stop()

    run(go())


def test_idle_model_runs_work_at_once() -> None:
    async def go() -> None:
        model = Model()
        b = DynamicBatcher(model, max_batch_size=8, max_delay_s=NEVER, max_queue_images=100)
        b.start()
        np.testing.assert_array_equal(await b.submit(IMAGES[:3]), _expected(IMAGES[:3]))
        await b.stop()

    run(go())


def test_work_gathers_while_the_model_is_busy_and_each_caller_gets_its_rows() -> None:
    async def go() -> None:
        model = Model()
        b = DynamicBatcher(model, max_batch_size=16, max_delay_s=NEVER, max_queue_images=100)
        b.start()
        model.gate.clear()
        first = asyncio.ensure_future(b.submit(IMAGES[:1]))
        await asyncio.to_thread(model.entered.wait, 10)
        rest = [asyncio.ensure_future(b.submit(IMAGES[i : i + 1])) for i in range(1, 17)]
        await asyncio.sleep(0)
        model.gate.set()
        outs = await asyncio.gather(first, *rest)
        for i, out in enumerate(outs):
            np.testing.assert_array_equal(out, _expected(IMAGES[i : i + 1]))
        assert model.sizes == [1, 16]  # the 16 waiting callers shared one forward pass
        await b.stop()

    run(go())


def test_queue_bound_refuses_without_waiting() -> None:
    async def go() -> None:
        model = Model()
        b = DynamicBatcher(model, max_batch_size=8, max_delay_s=NEVER, max_queue_images=8)
        b.start()
        model.gate.clear()
        first = asyncio.ensure_future(b.submit(IMAGES[:8]))
        await asyncio.to_thread(model.entered.wait, 10)
        queued = asyncio.ensure_future(b.submit(IMAGES[8:16]))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull, match="queue full"):
            await b.submit(IMAGES[:1])  # the gate is shut: only an immediate refusal returns
        model.gate.set()
        await asyncio.gather(first, queued)
        await b.stop()

    run(go())


def test_collector_death_fails_every_waiting_caller_and_refuses_new_work() -> None:
    async def go() -> None:
        model = Model()
        failures: list[BaseException] = []
        b = DynamicBatcher(
            model, max_batch_size=8, max_delay_s=NEVER, max_queue_images=100, on_failure=failures.append
        )
        b.start()
        model.gate.clear()
        first = asyncio.ensure_future(b.submit(IMAGES[:1]))
        await asyncio.to_thread(model.entered.wait, 10)
        waiting = [asyncio.ensure_future(b.submit(IMAGES[i : i + 1])) for i in range(1, 4)]
        await asyncio.sleep(0)

        def bug() -> None:
            raise RuntimeError("bug")

        b._take = bug  # type: ignore[method-assign]
        model.gate.set()
        for w in waiting:
            with pytest.raises(Unavailable, match="batcher failed"):
                await w
        await first
        assert len(failures) == 1 and isinstance(failures[0], RuntimeError)
        with pytest.raises(Unavailable):
            await b.submit(IMAGES[:1])
        await b.stop()

    run(go())


# The batch the batcher forms at the default --max-batch-size: while a batch computes, work queues
# up and the next batch takes all of it, up to the maximum, however the images are split into
# requests. The cost curve that chose the default (BENCHMARKS.md) only pays if such batches form.


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


async def _batches_after_a_busy_model(request_sizes: list[int]) -> list[int]:
    """Sizes of the batches that run when ``request_sizes`` arrive while one image computes."""
    model = Model()
    model.gate.clear()  # holds the first batch while the rest queue
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
        np.testing.assert_array_equal(out, _expected(x))
    await b.stop()
    return model.sizes


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


# Regrouping: with closed-loop callers, the batch that just finished sends its callers straight
# back, and the work that queued while it computed waits for them instead of leaving half-full.


async def _two_rounds(regroup: bool) -> list[int]:
    """Batch sizes when A computes (held) while B queues, then A's caller comes straight back with C."""
    model = Model()
    model.gate.clear()
    b = DynamicBatcher(model, max_batch_size=8, max_delay_s=0.0, max_queue_images=100, regroup=regroup)
    b.start()
    a = asyncio.ensure_future(b.submit(IMAGES[:1]))  # the idle model takes it at once
    assert await asyncio.to_thread(model.entered.wait, 10)
    queued_b = asyncio.ensure_future(b.submit(IMAGES[1:2]))
    while b.queued_images < 1:
        await asyncio.sleep(0.001)
    # A's compute time sets how long B may wait for A's caller: far longer than that caller takes.
    await asyncio.sleep(0.5)
    model.gate.set()
    np.testing.assert_array_equal(await a, _expected(IMAGES[:1]))
    c = await b.submit(IMAGES[2:3])  # A's caller, back with its next image
    np.testing.assert_array_equal(c, _expected(IMAGES[2:3]))
    np.testing.assert_array_equal(await queued_b, _expected(IMAGES[1:2]))
    await b.stop()
    return model.sizes


def test_regroup_waits_for_the_callers_just_answered() -> None:
    assert run(_two_rounds(regroup=True)) == [1, 2]


def test_without_regroup_the_queued_work_leaves_alone() -> None:
    assert run(_two_rounds(regroup=False)) == [1, 1, 1]


def test_regroup_waits_for_no_one_when_the_callers_do_not_come_back() -> None:
    # A batch's callers that have nothing more to send cost the queued work at most half that
    # batch's compute time (here longer than the batch delay): with the model held for 0.2 s, B
    # still runs (and the test ends).
    async def go() -> list[int]:
        model = Model()
        model.gate.clear()
        b = DynamicBatcher(model, max_batch_size=8, max_delay_s=0.0, max_queue_images=100, regroup=True)
        b.start()
        a = asyncio.ensure_future(b.submit(IMAGES[:1]))
        assert await asyncio.to_thread(model.entered.wait, 10)
        queued_b = asyncio.ensure_future(b.submit(IMAGES[1:2]))
        await asyncio.sleep(0.2)
        model.gate.set()
        await asyncio.gather(a, queued_b)
        await b.stop()
        return model.sizes

    assert run(go()) == [1, 1]


async def _after_a_fast_batch(max_delay_s: float, back_after_s: float) -> list[int]:
    """Batch sizes when a batch of two computes in microseconds and its callers come back one at a time."""
    model = Model()
    b = DynamicBatcher(model, max_batch_size=8, max_delay_s=max_delay_s, max_queue_images=100, regroup=True)
    b.start()
    # Both queue before the collector runs: one batch of two.
    first = await asyncio.gather(b.submit(IMAGES[:1]), b.submit(IMAGES[1:2]))
    np.testing.assert_array_equal(np.concatenate(first), _expected(IMAGES[:2]))
    c = asyncio.ensure_future(b.submit(IMAGES[2:3]))  # one caller back at once...
    await asyncio.sleep(back_after_s)
    d = asyncio.ensure_future(b.submit(IMAGES[3:4]))  # ...the other one later
    np.testing.assert_array_equal(np.concatenate(await asyncio.gather(c, d)), _expected(IMAGES[2:4]))
    await b.stop()
    return model.sizes


def test_after_a_batch_that_cost_nothing_regroup_waits_up_to_the_batch_delay() -> None:
    # Where the model is nearly free (the null model, a GPU) the hop around a batch is its cost:
    # C waits for D although the batch before them computed for microseconds, 0.3 s ago.
    assert run(_after_a_fast_batch(max_delay_s=NEVER, back_after_s=0.3)) == [2, 2]


def test_regroup_after_a_fast_batch_waits_no_longer_than_the_batch_delay() -> None:
    # With a delay of 10 ms, C leaves alone long before D comes back.
    assert run(_after_a_fast_batch(max_delay_s=0.01, back_after_s=0.5)) == [2, 1, 1]
