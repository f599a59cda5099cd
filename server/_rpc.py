"""What every servicer method shares: deadlines, the status mapping, and metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import NoReturn, TypeVar

import grpc

from .errors import status_for
from .metrics import Metrics

__all__ = ["abort_with", "deadline_of", "guarded"]

T = TypeVar("T")


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's deadline as a ``time.monotonic()`` instant, or None."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return time.monotonic() + max(0.0, remaining)


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    code, message = status_for(exc)
    await context.abort(code, message)
    raise AssertionError("unreachable")  # abort() always raises


async def guarded(metrics: Metrics, method: str, context: grpc.aio.ServicerContext, work: Awaitable[T]) -> T:
    """Await ``work``; turn a domain error into the caller's status; count and time the call."""
    started = time.monotonic()
    code = grpc.StatusCode.OK
    metrics.begin()
    try:
        return await work
    except asyncio.CancelledError:
        code = grpc.StatusCode.CANCELLED
        raise
    except Exception as exc:
        if isinstance(exc, grpc.aio.AbortError):
            raise
        code, message = status_for(exc)
        await context.abort(code, message)
        raise  # abort() raises; this only satisfies the type checker
    finally:
        metrics.end()
        metrics.requests.labels(method, code.name).inc()
        metrics.latency.labels(method).observe(time.monotonic() - started)
