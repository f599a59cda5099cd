"""The gRPC edge: every gRPC handler of ours behind :mod:`.admission`, wrapped when it is added.

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

from .admission import Admission, ByteBudget, Call, grpc_status
from .errors import (
    Code,
    InferenceError,
    InternalError,
    InvalidInput,
    ResourceExhausted,
    Unavailable,
    status_for,
)
from .lifecycle import Lifecycle, State
from .metrics import Metrics

__all__ = ["Edge", "Received", "ordered_stream"]

logger = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")


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


async def _answer(
    call: Call, context: grpc.aio.ServicerContext, held: Received | None, exc: BaseException
) -> None:
    """Settle a failed call: give its bytes back, count it once, and answer its status.

    Returns when the call was aborted (the caller re-raises the original exception); an
    exception the admission layer maps is replaced by ``context.abort`` with its status.
    """
    if held is not None:
        held.release()
    if isinstance(exc, grpc.aio.AbortError):
        call.finish(_code_of(context))
        return
    code, message = call.outcome(exc)
    call.finish()
    if message and code is not Code.CANCELLED and isinstance(exc, Exception):
        await context.abort(grpc_status(code), message)  # raises AbortError, chained to exc


def _authorization(context: grpc.aio.ServicerContext) -> str | bytes | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value
    return None


class _Registrar:
    """What a generated ``add_*Servicer_to_server`` needs of a server, wrapping every handler.

    grpc's generated code hands the same handlers twice: a generic handler (looked up per
    call) and by name (``add_registered_method_handlers``). Only the named ones are kept,
    each wrapped by the edge once, and both registrations are then made on the real server
    with the wrapped handlers.
    """

    def __init__(self, edge: Edge, server: grpc.aio.Server) -> None:
        self._edge = edge
        self._server = server
        self.services: list[str] = []

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """Superseded by :meth:`add_registered_method_handlers`, which names each method."""

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        wrapped = {name: self._edge.wrap(f"/{service}/{name}", handler) for name, handler in handlers.items()}
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))
        self._server.add_registered_method_handlers(service, wrapped)
        self.services.append(service)


class Edge:
    """The admission layer's gRPC side; see the module docstring for what it owns.

    Handlers are wrapped once, when a service is added (:meth:`add`), not per call: a
    ``grpc.aio.ServerInterceptor`` would cost an extra coroutine and handler lookup on every
    call (measured: 0.03 ms of 0.35 ms of server CPU per single-image request, BENCHMARKS.md).
    """

    def __init__(self, admission: Admission) -> None:
        self._admission = admission

    def add(self, server: grpc.aio.Server, add_servicer: Callable[[Any, Any], None], servicer: Any) -> str:
        """``add_servicer(servicer, server)`` (a generated ``add_*Servicer_to_server``), every
        handler behind admission; returns the service's full name."""
        registrar = _Registrar(self, server)
        add_servicer(servicer, registrar)
        if len(registrar.services) != 1:
            raise RuntimeError(
                f"{add_servicer.__name__} registered {len(registrar.services)} services by name; "
                "regenerate the stubs with a grpcio-tools that registers methods (>= 1.62)"
            )
        return registrar.services[0]

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

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """``handler`` behind admission: policy, auth, readiness, bytes, accounting, status."""
        name = method.rsplit("/", 1)[-1]
        admission = self._admission
        policy = admission.policy(name)
        # Without a token to check, a call's metadata is not read at all (grpc builds it per call).
        if admission.needs_credentials(policy):

            def credentials(context: grpc.aio.ServicerContext) -> str | bytes | None:
                return _authorization(context)

        else:

            def credentials(context: grpc.aio.ServicerContext) -> str | bytes | None:
                return None

        kw = {
            "request_deserializer": self._parser(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }

        if handler.unary_unary:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Received, context: grpc.aio.ServicerContext) -> Any:
                call = admission.call(name)
                try:
                    admission.admit(policy, credentials(context))
                    response = await inner_uu(request.unwrap(), context)
                except BaseException as exc:
                    await _answer(call, context, request, exc)
                    raise
                request.release()
                call.finish(Code.OK)
                return response

            return grpc.unary_unary_rpc_method_handler(unary_unary, **kw)

        if handler.unary_stream:
            inner_us = handler.unary_stream

            async def unary_stream(
                request: Received, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                call = admission.call(name)
                try:
                    admission.admit(policy, credentials(context))
                    async for response in inner_us(request.unwrap(), context):
                        yield response
                except BaseException as exc:
                    await _answer(call, context, request, exc)
                    raise
                request.release()
                call.finish(Code.OK)

            return grpc.unary_stream_rpc_method_handler(unary_stream, **kw)

        if handler.stream_unary:
            inner_su = handler.stream_unary

            async def stream_unary(
                requests: AsyncIterator[Received], context: grpc.aio.ServicerContext
            ) -> Any:
                call = admission.call(name)
                try:
                    admission.admit(policy, credentials(context))
                    response = await inner_su(requests, context)
                except BaseException as exc:
                    await _answer(call, context, None, exc)
                    raise
                call.finish(Code.OK)
                return response

            return grpc.stream_unary_rpc_method_handler(stream_unary, **kw)

        inner_ss = handler.stream_stream

        async def stream_stream(
            requests: AsyncIterator[Received], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            call = admission.call(name)
            try:
                admission.admit(policy, credentials(context))
                async for response in inner_ss(requests, context):
                    yield response
            except BaseException as exc:
                await _answer(call, context, None, exc)
                raise
            call.finish(Code.OK)

        return grpc.stream_stream_rpc_method_handler(stream_stream, **kw)


_DRAINED = "shutting down: this stream takes no more requests; use another replica"


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
    lifecycle: Lifecycle | None = None,
) -> AsyncIterator[Resp]:
    """Answer a request stream in order, up to ``window`` requests computing at once.

    Bounded both ways: at most ``window`` requests are read ahead of the answer the client is
    waiting for, so a client that stops reading stops the server reading (HTTP/2 flow control
    then holds the client back), and answers never pile up. A failed request is answered in
    the stream with ``error_answer`` and the stream carries on; a malformed message or more than
    ``limit`` requests ends the stream with a status. When the client goes away every task of
    the stream is cancelled. When ``lifecycle`` starts draining, the stream reads no more: it
    answers what it has read, then ends UNAVAILABLE, so its client moves to another replica
    at once instead of when the grace period runs out.
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
                metrics.streamed.add(1)
                task = asyncio.ensure_future(one(item))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                # A task cancelled before its first step never runs one()'s finally: give its
                # bytes back here too (release is idempotent).
                task.add_done_callback(_releaser(item))
                pending.put_nowait(task)
            pending.put_nowait(None)
        except asyncio.CancelledError:
            if not draining:
                raise
            # After the answers to what was read: the client resends the rest elsewhere.
            pending.put_nowait(Unavailable(_DRAINED))
        except Exception as exc:
            pending.put_nowait(exc)

    draining = False
    reader = asyncio.ensure_future(read())

    def on_change(life: Lifecycle) -> None:
        nonlocal draining
        if life.state in (State.DRAINING, State.STOPPED) and not draining:
            draining = True
            reader.cancel()

    if lifecycle is not None:
        lifecycle.subscribe(on_change)
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
            metrics.streamed.add(-1)
            slots.release()
    finally:
        if lifecycle is not None:
            lifecycle.unsubscribe(on_change)
        reader.cancel()
        for task in list(tasks):
            task.cancel()
        metrics.streamed.add(-outstanding)
