"""The worker's link to the model process (``--workers N``), both ends in one event loop.

A real :class:`RemoteCore` and :class:`ModelHost` over a socket pair and a real arena file,
the model process's real :class:`InferenceCore` and batcher over the fake runtime whose logits
are each image's first ten pixel bytes: what the link does with groups of small requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cifar_serve.server.core import InferenceCore
from cifar_serve.server.errors import DeadlineExceeded
from cifar_serve.server.lifecycle import State
from cifar_serve.server.metrics import Metrics
from cifar_serve.server.remote import ModelHost, RemoteCore
from cifar_serve.server.settings import Settings

pytestmark = pytest.mark.fast


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


class Link:
    def __init__(self, core: InferenceCore, host: ModelHost, remote: RemoteCore) -> None:
        self.core, self.host, self.remote = core, host, remote


def _run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))


@contextlib.asynccontextmanager
async def _link(fake_runtime: Any, tmp_path: Path, max_batch_delay_ms: float) -> AsyncIterator[Link]:
    s = Settings(model_dir=str(tmp_path), workers=2, max_batch_size=32, max_batch_delay_ms=max_batch_delay_ms)
    core = InferenceCore(s, Metrics(), runtime=fake_runtime)
    core.start()
    await core.warm_up()
    core.lifecycle.to(State.SERVING)  # as the model process does once warm
    model_end, worker_end = socket.socketpair()
    host = ModelHost(core, [model_end], str(tmp_path))
    await host.start()
    remote = RemoteCore(s, Metrics(), worker_end, str(tmp_path), 0)
    await remote.connect()
    await remote.warm_up()
    try:
        yield Link(core, host, remote)
    finally:
        fake_runtime.gate.set()
        await remote.stop()
        await host.close()
        await core.stop()


async def _busy(fake_runtime: Any, link: Link) -> asyncio.Task[tuple[np.ndarray, str]]:
    """A first call, once the model process is computing it (held at the fake runtime's gate)."""
    fake_runtime.gate.clear()
    first = asyncio.create_task(link.remote.infer(_images(1, 0)))
    while not fake_runtime.batches:
        await asyncio.sleep(0.005)
    return first


def test_requests_held_while_the_model_is_busy_travel_as_one_and_each_gets_its_rows(
    fake_runtime: Any, tmp_path: Path
) -> None:
    async def go() -> None:
        async with _link(fake_runtime, tmp_path, 2000.0) as link:
            first = await _busy(fake_runtime, link)
            images = [_images(n, 10 + i) for i, n in enumerate([1, 3, 2, 1])]
            calls = [asyncio.create_task(link.remote.infer(x)) for x in images]
            await asyncio.sleep(0.05)
            fake_runtime.gate.set()
            answers = await asyncio.gather(first, *calls)
            # The four came while the model process had the first: one forward pass of 7 images.
            assert fake_runtime.batches == [1, 7]
            for x, (logits, _version) in zip(images, answers[1:], strict=True):
                np.testing.assert_array_equal(logits, fake_runtime.expected(x))
            stats = (await link.core.statistics())[link.core.model_version]
            assert stats.success.count == 5 and stats.inference_count == 8

    _run(go())


def test_a_later_deadline_in_a_group_dropped_for_an_earlier_one_is_computed_on_its_own(
    fake_runtime: Any, tmp_path: Path
) -> None:
    async def go() -> None:
        async with _link(fake_runtime, tmp_path, 50.0) as link:
            first = await _busy(fake_runtime, link)
            early, late = _images(1, 1), _images(2, 2)
            soon = asyncio.create_task(link.remote.infer(early, time.monotonic() + 0.2))
            later = asyncio.create_task(link.remote.infer(late, time.monotonic() + 60))
            # Their group goes after the delay, and its deadline passes in the queue.
            await asyncio.sleep(0.4)
            fake_runtime.gate.set()
            await first
            with pytest.raises(DeadlineExceeded):
                await soon
            logits, _version = await later
            np.testing.assert_array_equal(logits, fake_runtime.expected(late))
            # The group was never computed: the later member ran again on its own.
            assert fake_runtime.batches == [1, 2]

    _run(go())


def test_a_group_whose_callers_all_left_is_not_computed(fake_runtime: Any, tmp_path: Path) -> None:
    async def go() -> None:
        async with _link(fake_runtime, tmp_path, 20.0) as link:
            first = await _busy(fake_runtime, link)
            calls = [asyncio.create_task(link.remote.infer(_images(1, 5 + i))) for i in range(3)]
            await asyncio.sleep(0.1)  # the group went, and waits in the model process's queue
            for c in calls:
                c.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
            await asyncio.sleep(0.05)
            fake_runtime.gate.set()
            await first
            logits, _version = await link.remote.infer(_images(1, 9))
            assert fake_runtime.batches == [1, 1]
            np.testing.assert_array_equal(logits, fake_runtime.expected(_images(1, 9)))

    _run(go())
