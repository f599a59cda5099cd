"""A worker's metric values (``--workers N``): written to the shared files once per loop iteration."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, multiprocess, values

from cifar_serve.server import metrics

pytestmark = pytest.mark.fast


def test_a_change_on_the_event_loop_reaches_the_file_when_the_iteration_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(values, "ValueClass", metrics._deferred_value_class())
    calls = Counter("calls", "calls answered", ["code"], registry=None)

    def scraped() -> float | None:
        # What the supervisor's /metrics reads: every process's file.
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(tmp_path))
        return registry.get_sample_value("calls_total", {"code": "OK"})

    async def go() -> None:
        ok = calls.labels("OK")
        ok.inc()
        ok.inc(2)
        assert scraped() in (None, 0.0)  # not yet: one write per iteration, not one per change
        assert ok._value.get() == 3  # this process reads its own value at once
        await asyncio.sleep(0)
        assert scraped() == 3.0

    asyncio.run(go())
    calls.labels("OK").inc(4)  # off the loop (a thread, the exit path): written at once
    assert scraped() == 7.0
