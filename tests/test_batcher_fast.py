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

pytestmark = pytest.mark.fast

IMAGES = np.random.default_rng(1).integers(0, 256, size=(64, 32, 32, 3), dtype=np.uint8)
NEVER = 3600.0  # a batch delay no test waits out


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
