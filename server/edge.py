"""The RPC edge: the one layer every call of the inference services passes through.

For every handler kind (unary, server-streaming, client-streaming, bidi) one interceptor owns:

- auth: ``authorization: Bearer <token>`` compared in constant time (health and reflection stay
  open, as load balancers and grpcurl need them);
- readiness: ``UNAVAILABLE`` while the model warms up, while the server drains, and after the
  batcher died, with a message saying which (the client library retries ``UNAVAILABLE``);
- a memory bound on request bytes held before their images are queued: every message is
  counted from the moment it is parsed until its call (or stream item) is answered, and past
  ``--max-inflight-request-bytes`` a new one gets ``RESOURCE_EXHAUSTED`` instead of being held;
- malformed request bytes: ``INVALID_ARGUMENT`` (grpc's own answer is UNKNOWN and a traceback);
- in-flight accounting, the request counter and the latency histogram, once per call;
- the one mapping from domain errors to status codes (:func:`.errors.status_for`), and a
  logged traceback for anything unexpected.

Servicers stay plain: protobuf in, a call to the inference core, protobuf out; they raise
domain errors. Every streaming RPC goes through :func:`ordered_stream`, the one bounded,
ordered-window stream helper.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

import grpc

from .core import Readiness
from .errors import (
    InferenceError,
    InternalError,
    InvalidInput,
    ResourceExhausted,
    Unauthenticated,
    status_for,
)
from .metrics import Metrics

__all__ = ["ByteBudget", "Edge", "Received", "ordered_stream"]

logger = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")

_MIB = 1024 * 1024


class ByteBudget:
    """Request bytes held at once. Only the event loop touches it (grpc.aio parses there)."""

    def __init__(self, limit: int, metrics: Metrics | None = None) -> None:
        self.limit = limit
        self.held = 0
        self._metrics = metrics

    def try_acquire(self, n: int) -> bool:
        if self.held + n > self.limit:
            return False
        self.held += n
        self._gauge()
        return True

    def release(self, n: int) -> None:
        self.held -= n
        self._gauge()

    def _gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.inflight_bytes.set(self.held)


class Received:
    """A parsed request message, the bytes it holds against the budget, or why it is refused."""

    __slots__ = ("_budget", "_nbytes", "error", "message")

    def __init__(
        self,
        message: Any,
        error: InferenceError | None = None,
        budget: ByteBudget | None = None,
        nbytes: int = 0,
    ) -> None:
        self.message = message
        self.error = error
        self._budget = budget
        self._nbytes = nbytes

    def release(self) -> None:
        if self._budget is not None:
            self._budget.release(self._nbytes)
            self._budget = None

    def unwrap(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.message


class _Call:
    """One call's accounting: in-flight count, bytes held, status, latency, error mapping."""

    __slots__ = ("_context", "_method", "_metrics", "_started", "held")

    def __init__(self, metrics: Metrics, method: str, context: grpc.aio.ServicerContext) -> None:
        self._metrics = metrics
        self._method = method
        self._context = context
        self._started = 0.0
        self.held: Received | None = None

    async def __aenter__(self) -> _Call:
        self._started = time.monotonic()
        self._metrics.begin()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> bool:
        message = ""
        if exc is None:
            code = grpc.StatusCode.OK
        elif isinstance(exc, grpc.aio.AbortError):
            code = _code_of(self._context)
        elif isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            code = grpc.StatusCode.CANCELLED
        elif isinstance(exc, InferenceError):
            code, message = status_for(exc)
        elif isinstance(exc, Exception):
            logger.error("unexpected error in %s", self._method, exc_info=exc)
            code, message = status_for(exc)
        else:
            code = grpc.StatusCode.UNKNOWN
        if self.held is not None:
            self.held.release()
        self._metrics.end()
        self._metrics.requests.labels(self._method, code.name).inc()
        self._metrics.latency.labels(self._method).observe(time.monotonic() - self._started)
        if message:
            await self._context.abort(code, message)  # raises AbortError in place of exc
        return False


def _code_of(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    try:
        code = context.code()
    except Exception:  # an older grpc without code(): the call did abort, with some status
        return grpc.StatusCode.UNKNOWN
    if isinstance(code, grpc.StatusCode):
        return code
    for member in grpc.StatusCode:
        if member.value[0] == code:
            return member
    return grpc.StatusCode.UNKNOWN


class Edge(grpc.aio.ServerInterceptor):
    """The server's one interceptor; see the module docstring for what it owns.

    ``open_prefixes``: method prefixes passed through untouched (health, reflection).
    ``ungated``: full method names answered while not ready (liveness and readiness probes).
    """

    def __init__(
        self,
        *,
        metrics: Metrics,
        readiness: Readiness,
        budget: ByteBudget,
        auth_token: str = "",
        open_prefixes: tuple[str, ...] = (),
        ungated: Iterable[str] = (),
    ) -> None:
        self._metrics = metrics
        self._readiness = readiness
        self._budget = budget
        self._expected = f"Bearer {auth_token}".encode() if auth_token else b""
        self._open = open_prefixes
        self._ungated = frozenset(ungated)
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    def _authorized(self, context: grpc.aio.ServicerContext) -> bool:
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else bytes(value)
                return hmac.compare_digest(given, self._expected)
        return False

    def _parser(self, parse: Callable[[bytes], Any] | None) -> Callable[[bytes], Received]:
        budget = self._budget

        def parse_held(data: bytes) -> Received:
            try:
                message = parse(data) if parse is not None else data
            except Exception as exc:
                return Received(
                    None, InvalidInput(f"malformed request message ({type(exc).__name__}: {exc})")
                )
            n = len(data)
            if not budget.try_acquire(n):
                return Received(
                    message,
                    ResourceExhausted(
                        f"server is holding {budget.held / _MIB:.1f} MiB of requests, limit "
                        f"{budget.limit / _MIB:.1f} MiB (--max-inflight-request-bytes); retry later"
                    ),
                )
            return Received(message, budget=budget, nbytes=n)

        return parse_held

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = details.method
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(details)
        if handler is None or method.startswith(self._open):
            return handler
        wrapped = self._wrap(method, handler)
        # The wrapper depends on the method only (auth reads each call's own metadata), so it is
        # built once per method, not once per call.
        self._wrapped[method] = wrapped
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        name = method.rsplit("/", 1)[-1]
        gated = method not in self._ungated
        checks_token = bool(self._expected)
        kw = {
            "request_deserializer": self._parser(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }

        def admit(context: grpc.aio.ServicerContext) -> None:
            if checks_token and not self._authorized(context):
                raise Unauthenticated("missing or invalid bearer token")
            if gated:
                self._readiness.check()

        metrics = self._metrics

        if handler.unary_unary:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Received, context: grpc.aio.ServicerContext) -> Any:
                async with _Call(metrics, name, context) as call:
                    call.held = request
                    admit(context)
                    return await inner_uu(request.unwrap(), context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, **kw)

        if handler.unary_stream:
            inner_us = handler.unary_stream

            async def unary_stream(
                request: Received, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                async with _Call(metrics, name, context) as call:
                    call.held = request
                    admit(context)
                    async for response in inner_us(request.unwrap(), context):
                        yield response

            return grpc.unary_stream_rpc_method_handler(unary_stream, **kw)

        if handler.stream_unary:
            inner_su = handler.stream_unary

            async def stream_unary(
                requests: AsyncIterator[Received], context: grpc.aio.ServicerContext
            ) -> Any:
                async with _Call(metrics, name, context):
                    admit(context)
                    return await inner_su(requests, context)

            return grpc.stream_unary_rpc_method_handler(stream_unary, **kw)

        inner_ss = handler.stream_stream

        async def stream_stream(
            requests: AsyncIterator[Received], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            async with _Call(metrics, name, context):
                admit(context)
                async for response in inner_ss(requests, context):
                    yield response

        return grpc.stream_stream_rpc_method_handler(stream_stream, **kw)


async def ordered_stream(
    requests: AsyncIterator[Received],
    handle: Callable[[Req], Awaitable[Resp]],
    error_answer: Callable[[Req, InferenceError], Resp],
    *,
    method: str,
    metrics: Metrics,
    limit: int,
    window: int,
) -> AsyncIterator[Resp]:
    """Answer a request stream in order, up to ``window`` requests computing at once.

    Bounded both ways: at most ``window`` requests are read ahead of the answer the client is
    waiting for, so a client that stops reading stops the server reading (HTTP/2 flow control
    then holds the client back), and answers never pile up. A failed request is answered in
    the stream with ``error_answer`` and the stream carries on; a malformed message or more than
    ``limit`` requests ends the stream with a status. When the client goes away every task of
    the stream is cancelled.
    """
    slots = asyncio.Semaphore(window)  # requests read and not yet delivered
    pending: asyncio.Queue[asyncio.Task[Resp] | Exception | None] = asyncio.Queue()
    tasks: set[asyncio.Task[Resp]] = set()
    outstanding = 0

    async def one(item: Received) -> Resp:
        code = grpc.StatusCode.OK
        try:
            return await handle(item.unwrap())
        except InferenceError as exc:
            code = exc.code
            return error_answer(item.message, exc)
        except Exception as exc:
            logger.error("unexpected error in a %s request", method, exc_info=exc)
            err = InternalError(status_for(exc)[1])
            code = err.code
            return error_answer(item.message, err)
        finally:
            item.release()
            metrics.stream_messages.labels(method, code.name).inc()

    async def read() -> None:
        nonlocal outstanding
        count = 0
        try:
            iterator = aiter(requests)
            while True:
                # A slot first, then the next message: a full window stops reading altogether.
                await slots.acquire()
                try:
                    item = await anext(iterator)
                except StopAsyncIteration:
                    break
                if item.message is None:
                    item.unwrap()  # raises: a malformed message has no id to answer it with
                count += 1
                if count > limit:
                    item.release()
                    raise ResourceExhausted(
                        f"stream exceeded {limit} requests (--max-stream-requests); open a new stream"
                    )
                outstanding += 1
                metrics.stream_items.inc()
                task = asyncio.ensure_future(one(item))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                pending.put_nowait(task)
            pending.put_nowait(None)
        except Exception as exc:
            pending.put_nowait(exc)

    reader = asyncio.ensure_future(read())
    try:
        while True:
            got = await pending.get()
            if got is None:
                return
            if isinstance(got, Exception):
                raise got
            answer = await got
            yield answer
            outstanding -= 1
            metrics.stream_items.dec()
            slots.release()
    finally:
        reader.cancel()
        for task in list(tasks):
            task.cancel()
        metrics.stream_items.dec(outstanding)
