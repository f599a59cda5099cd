"""The gRPC edge: the interceptor that puts every gRPC call through :mod:`.admission`.

For every handler kind (unary, server-streaming, client-streaming, bidi) it applies the
admission layer (the endpoint's policy, auth, readiness, the byte budget, call accounting and
the status mapping) and adds what only gRPC has:

- the byte budget is taken as each message is parsed (grpc.aio parses on the event loop), and
  given back when its call (or stream item) is answered;
- malformed request bytes: ``INVALID_ARGUMENT`` (grpc's own answer is UNKNOWN and a traceback).

Health and reflection pass untouched (probes and grpcurl carry no token). Servicers stay
plain: protobuf in, a call to the inference core, protobuf out; they raise domain errors.
Every streaming RPC goes through :func:`ordered_stream`, the one bounded, ordered-window
stream helper.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from .admission import Admission, ByteBudget, grpc_status
from .errors import Code, InferenceError, InternalError, InvalidInput, ResourceExhausted, status_for
from .metrics import Metrics

__all__ = ["Edge", "Received", "ordered_stream"]

logger = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")

# Not admitted by the edge at all: the standard health service and reflection.
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


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


def _code_of(context: grpc.aio.ServicerContext) -> Code:
    try:
        code = context.code()
    except Exception:  # an older grpc without code(): the call did abort, with some status
        return Code.UNKNOWN
    if isinstance(code, grpc.StatusCode):
        return Code[code.name]
    for member in grpc.StatusCode:
        if member.value[0] == code:
            return Code[member.name]
    return Code.UNKNOWN


class _Scope:
    """One gRPC call under admission: accounting, release of held bytes, status on failure."""

    __slots__ = ("_call", "_context", "held")

    def __init__(self, admission: Admission, label: str, context: grpc.aio.ServicerContext) -> None:
        self._call = admission.call(label)
        self._context = context
        self.held: Received | None = None

    async def __aenter__(self) -> _Scope:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> bool:
        if self.held is not None:
            self.held.release()
        message = ""
        if exc is None:
            self._call.finish(Code.OK)
        elif isinstance(exc, grpc.aio.AbortError):
            self._call.finish(_code_of(self._context))
        else:
            code, message = self._call.outcome(exc)
            self._call.finish()
            if code is Code.CANCELLED or not isinstance(exc, Exception):
                message = ""
        if message:
            await self._context.abort(grpc_status(self._call.code), message)  # replaces exc
        return False


def _authorization(context: grpc.aio.ServicerContext) -> str | bytes | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value
    return None


class Edge(grpc.aio.ServerInterceptor):
    """The server's one interceptor; see the module docstring for what it owns."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    def _parser(self, parse: Callable[[bytes], Any] | None) -> Callable[[bytes], Received]:
        budget = self._admission.budget

        def parse_held(data: bytes) -> Received:
            try:
                message = parse(data) if parse is not None else data
            except Exception as exc:
                return Received(
                    None, InvalidInput(f"malformed request message ({type(exc).__name__}: {exc})")
                )
            n = len(data)
            try:
                budget.acquire(n)
            except ResourceExhausted as exc:
                return Received(message, exc)
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
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        wrapped = self._wrap(method, handler)
        # The wrapper depends on the method only (auth reads each call's own metadata), so it is
        # built once per method, not once per call.
        self._wrapped[method] = wrapped
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        name = method.rsplit("/", 1)[-1]
        admission = self._admission
        policy = admission.policy(name)
        kw = {
            "request_deserializer": self._parser(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }

        def admit(context: grpc.aio.ServicerContext) -> None:
            admission.admit(policy, _authorization(context))

        if handler.unary_unary:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Received, context: grpc.aio.ServicerContext) -> Any:
                async with _Scope(admission, name, context) as scope:
                    scope.held = request
                    admit(context)
                    return await inner_uu(request.unwrap(), context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, **kw)

        if handler.unary_stream:
            inner_us = handler.unary_stream

            async def unary_stream(
                request: Received, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                async with _Scope(admission, name, context) as scope:
                    scope.held = request
                    admit(context)
                    async for response in inner_us(request.unwrap(), context):
                        yield response

            return grpc.unary_stream_rpc_method_handler(unary_stream, **kw)

        if handler.stream_unary:
            inner_su = handler.stream_unary

            async def stream_unary(
                requests: AsyncIterator[Received], context: grpc.aio.ServicerContext
            ) -> Any:
                async with _Scope(admission, name, context):
                    admit(context)
                    return await inner_su(requests, context)

            return grpc.stream_unary_rpc_method_handler(stream_unary, **kw)

        inner_ss = handler.stream_stream

        async def stream_stream(
            requests: AsyncIterator[Received], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            async with _Scope(admission, name, context):
                admit(context)
                async for response in inner_ss(requests, context):
                    yield response

        return grpc.stream_stream_rpc_method_handler(stream_stream, **kw)


def _releaser(item: Received) -> Callable[[asyncio.Task[Any]], None]:
    def release(_task: asyncio.Task[Any]) -> None:
        item.release()

    return release


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
        code = Code.OK
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
                # A task cancelled before its first step never runs one()'s finally: give its
                # bytes back here too (release is idempotent).
                task.add_done_callback(_releaser(item))
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
