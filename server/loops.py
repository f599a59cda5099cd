"""The event loop every server process runs on: uvloop where it is installed, else asyncio's own.

uvloop (libuv) is chosen by measurement, not taste: on the 2-core CPU machine, grpc.aio's bare
unary floor fell from 0.172 to 0.146 ms of CPU per request under it; the whole server, served by
turns with asyncio's loop, took 0.92x the CPU per single-image request at c=32 (1.12x the images)
and 0.97-0.99x on the null model, where grpc's own core dominates (BENCHMARKS.md). ``--event-loop
asyncio`` keeps the standard loop, for debugging or a platform uvloop does not build on.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["LOOP_KINDS", "running_loop_name", "new_event_loop", "run"]

logger = logging.getLogger(__name__)

LOOP_KINDS = ("auto", "uvloop", "asyncio")

T = TypeVar("T")


def _wants_uvloop(kind: str) -> bool:
    if kind == "asyncio":
        return False
    # Settings refuse an explicit "uvloop" where it is missing; "auto" falls back quietly.
    return importlib.util.find_spec("uvloop") is not None


def running_loop_name() -> str:
    """``uvloop`` or ``asyncio``: what the calling coroutine runs on (for the start-up log)."""
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"


def new_event_loop(kind: str) -> asyncio.AbstractEventLoop:
    """A fresh loop of ``kind`` (auto, uvloop or asyncio), for a thread to run."""
    if _wants_uvloop(kind):
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run(main: Coroutine[Any, Any, T], kind: str) -> T:
    """``asyncio.run(main)`` on a loop of ``kind``."""
    if _wants_uvloop(kind):
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
