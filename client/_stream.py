"""The stream lane: concurrent ``classify()`` requests of one client carried by one ``ClassifyStream``.

Why: a request on an open stream costs the server a little over half the CPU of a unary
``Classify`` call (0.33-0.40 ms against 0.56-0.65 through the library with the null model, single
images, BENCHMARKS.md): no call set-up, no per-call metadata, no per-call admission. An
application that sends many small requests at once gains the most, so the clients route those
through one long-lived stream: :class:`StreamLane` for ``AsyncClient`` (one writer task and one
reader task per stream), :class:`SyncStreamLane` for ``Client`` (a request queue that grpc's
request iterator drains, and one reader thread per stream).

What the lane keeps of a unary call's contract:

- each request has its own deadline: the stream has none (it is long-lived), so the lane waits
  for the answer only until the caller's deadline and then raises :class:`DeadlineExceededError`;
  the late answer, when it comes, is dropped;
- an error answer raises the exception a unary call would have raised (same code, same message),
  for that caller only: the server answers a bad request on the stream and carries on;
- a stream that breaks (server restarted, UNAVAILABLE, cancelled by a server shutting down)
  fails the requests it had not answered with its status, and the client's retry policy
  (:meth:`_Config.next_attempt`) sends them again on a fresh stream; requests a stream ended
  without reading (``--max-stream-requests`` reached, or a clean end) were never run and are
  resent at once. A new stream is opened before the server's ``max_stream_requests``
  (``GetModelInfo``'s ``limits``) is reached: the full one is half-closed and drains;
- at most ``window`` requests are in flight on the lane's streams (the server computes up to 64
  of one stream at once: more would only queue in HTTP/2 buffers, holding memory on both sides).

Answers come back in request order (the server's ``ordered_stream``), so a slow request (a large
encoded file) holds back the answers behind it: the lane is for many small requests.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from concurrent import futures
from typing import TYPE_CHECKING, Any

import grpc

from cifar_serve.v1 import classifier_pb2 as pb

from ._errors import (
    CifarServeError,
    DeadlineExceededError,
    UnavailableError,
    error_for,
    error_from_rpc,
    readable_message,
)

if TYPE_CHECKING:
    from ._client import _Config

__all__ = ["STREAM_WINDOW", "StreamLane", "SyncStreamLane"]

logger = logging.getLogger("cifar_serve.client.stream")

STREAM_WINDOW = 64
"""Requests in flight on a lane at most: the server's own window per stream (server/servicer.py)."""

METHOD = "ClassifyStream"
_CODES = {code.value[0]: code for code in grpc.StatusCode}
# A request a stream never read (the stream ended first) is sent again without counting as a
# retry, a few times: a server that keeps ending streams at once then fails it as unavailable.
_FREE_RESENDS = 2


def _timeout_us(deadline: float | None) -> int:
    """What is left of the caller's deadline, for the server: the stream's own deadline cannot
    say it, and work whose caller gave up is then dropped uncomputed, not run for nobody."""
    if deadline is None:
        return 0
    return max(1, int((deadline - time.monotonic()) * 1e6))


OpenStream = Callable[
    [bool], "grpc.aio.StreamStreamCall[pb.ClassifyStreamRequest, pb.ClassifyStreamResponse]"
]
StreamLimit = Callable[[float | None], Awaitable[int]]
WaitServing = Callable[[str, Any, float], Awaitable[str]]


class _Resend(Exception):
    """The stream ended without reading the request: it was never run, send it again."""


class _Window:
    """A counting semaphore whose waits end at a deadline, without losing a slot to a race."""

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self, deadline: float | None) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            await asyncio.wait([waiter], timeout=left)
        except BaseException:
            self._abandon(waiter)
            raise
        if not waiter.done():
            self._abandon(waiter)
            raise DeadlineExceededError(grpc.StatusCode.DEADLINE_EXCEEDED, f"{METHOD}: deadline exceeded")

    def _abandon(self, waiter: asyncio.Future[None]) -> None:
        if waiter.done() and not waiter.cancelled():
            self.release()  # granted as the wait ended: hand the slot on
        else:
            waiter.cancel()
            try:
                self._waiters.remove(waiter)
            except ValueError:
                pass

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes straight to the oldest waiter
                return
        self._free += 1


def _broken(err: CifarServeError) -> CifarServeError:
    """A stream's end as its unanswered requests see it.

    grpc's core ends a call whose transport went away, or whose server ended it, under a write
    still in progress with INTERNAL "Internal error from Core" instead of the status (seen with a
    server cut off at a restart, and at its --max-stream-requests): the requests were not
    answered, so it counts as UNAVAILABLE, which the retry policy resends. The server's own errors
    come as error answers, never as the stream's status.
    """
    if err.code is grpc.StatusCode.INTERNAL and err.message == "Internal error from Core":
        return UnavailableError(grpc.StatusCode.UNAVAILABLE, f"the stream broke ({err.message})")
    return err


def _fresh(exc: Exception) -> Exception:
    """A copy of ``exc`` for one caller: one instance raised in many would share its traceback."""
    if isinstance(exc, CifarServeError):
        return error_for(exc.code, exc.message)
    return type(exc)(*exc.args)


def _expire(answer: asyncio.Future[pb.ClassifyResponse]) -> None:
    if not answer.done():
        answer.set_exception(
            DeadlineExceededError(grpc.StatusCode.DEADLINE_EXCEEDED, f"{METHOD}: deadline exceeded")
        )


class _Stream:
    """One ``ClassifyStream`` call: its writes, its reader task and the requests it owes answers."""

    def __init__(
        self,
        call: grpc.aio.StreamStreamCall[pb.ClassifyStreamRequest, pb.ClassifyStreamResponse],
        limit: int,
        window: _Window,
        number: int,
    ) -> None:
        self.call = call
        self.limit = limit
        self.number = number
        self.sent = 0
        self.writable = True
        self.error: CifarServeError | None = None
        self.hit_limit = False  # the server ended it at its max_stream_requests
        self._window = window
        self._waiting: dict[str, asyncio.Future[pb.ClassifyResponse]] = {}
        # Callers hand their requests to one writer task: a write can wait (for a connection,
        # for HTTP/2 flow control), and a caller waits only for its answer, until its deadline.
        self._outbox: asyncio.Queue[tuple[pb.ClassifyStreamRequest, asyncio.Future[Any]] | None]
        self._outbox = asyncio.Queue()
        self._half_closed = False
        self.reader = asyncio.ensure_future(self._read())
        self.writer = asyncio.ensure_future(self._write())

    @property
    def idle(self) -> bool:
        return not self._waiting

    def submit(
        self, request: pb.ClassifyRequest, deadline: float | None
    ) -> asyncio.Future[pb.ClassifyResponse] | None:
        """Queue ``request`` (its window slot already taken); None when this stream takes no more."""
        if not self.writable:
            return None
        self.sent += 1
        rid = str(self.sent)
        answer: asyncio.Future[pb.ClassifyResponse] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = answer
        item = pb.ClassifyStreamRequest(id=rid, request=request, timeout_us=_timeout_us(deadline))
        self._outbox.put_nowait((item, answer))
        if self.sent >= self.limit:
            self.half_close()  # the next request opens a new stream
        return answer

    def half_close(self) -> None:
        """Take no more requests; once the queued ones are written, the server ends the stream."""
        self.writable = False
        if not self._half_closed:
            self._half_closed = True
            self._outbox.put_nowait(None)

    async def _write(self) -> None:
        try:
            while (item := await self._outbox.get()) is not None:
                msg, answer = item
                if answer.done():  # its caller gave up before it was sent: never sent at all
                    if self._waiting.pop(msg.id, None) is not None:
                        self._window.release()
                    continue
                await self.call.write(msg)
            await self.call.done_writing()
        except (grpc.RpcError, asyncio.InvalidStateError, asyncio.CancelledError):
            # The call has ended: its reader reports the status and fails what it owed.
            self.writable = False

    async def _read(self) -> None:
        ended: Exception = _Resend()
        try:
            while True:
                answer = await self.call.read()
                if answer is grpc.aio.EOF:
                    break
                self._deliver(answer)
        except grpc.RpcError as exc:
            err = _broken(error_from_rpc(exc))
            if err.code is grpc.StatusCode.RESOURCE_EXHAUSTED and "open a new stream" in err.message:
                logger.debug("stream %d ended by the server at its request limit", self.number)
                self.hit_limit = True
            else:
                self.error = err
                ended = err
                logger.debug("stream %d ended: %s", self.number, err)
        except asyncio.CancelledError:
            self.error = CifarServeError(grpc.StatusCode.CANCELLED, f"{METHOD}: the client was closed")
            ended = self.error
        finally:
            self.half_close()
            # A write still waiting for the call to start is not woken by its end (grpc.aio).
            self.writer.cancel()
            waiting, self._waiting = self._waiting, {}
            for answer in waiting.values():
                self._window.release()
                if not answer.done():
                    answer.set_exception(_fresh(ended))

    def _deliver(self, msg: pb.ClassifyStreamResponse) -> None:
        answer = self._waiting.pop(msg.id, None)
        if answer is None:
            logger.warning("stream %d: an answer for unknown request id %r dropped", self.number, msg.id)
            return
        self._window.release()
        if answer.done():  # its caller's deadline passed, or it was cancelled
            return
        if msg.error_code:
            code = _CODES.get(msg.error_code, grpc.StatusCode.UNKNOWN)
            answer.set_exception(error_for(code, readable_message(msg.error_message or code.name)))
        else:
            answer.set_result(msg.response)


class StreamLane:
    """Requests of one client multiplexed over one long-lived ``ClassifyStream`` (see the module doc).

    Lives in one event loop (the client's channel's). ``open_stream(wait_for_ready)`` starts a
    stream call with the client's metadata; ``stream_limit(deadline)`` asks the server for its
    ``max_stream_requests`` (0: none); ``wait_serving`` is the client's own wait for SERVING.
    """

    def __init__(
        self,
        cfg: _Config,
        open_stream: OpenStream,
        stream_limit: StreamLimit,
        wait_serving: WaitServing,
        window: int = STREAM_WINDOW,
    ) -> None:
        if window < 1:
            raise ValueError("the stream window must be at least 1")
        self._cfg = cfg
        self._open_stream = open_stream
        self._stream_limit = stream_limit
        self._wait_serving = wait_serving
        self._window = _Window(window)
        self._limit: int | None = None
        self._limit_lock = asyncio.Lock()
        self._current: _Stream | None = None
        self._streams: set[_Stream] = set()
        self._opened = 0
        self.closed = False

    @property
    def streams_opened(self) -> int:
        """How many streams this lane has opened (a new one per limit reached or break)."""
        return self._opened

    async def classify(self, request: pb.ClassifyRequest, deadline: float | None) -> pb.ClassifyResponse:
        """``request``'s answer, retried as the client's unary calls are (see ``_Config.next_attempt``)."""
        retry = self._cfg.retry(METHOD, deadline)
        resends = 0
        while True:
            try:
                return await self._once(request, deadline, retry.waited)
            except _Resend:
                if resends < _FREE_RESENDS:
                    resends += 1
                    continue
                err: CifarServeError = UnavailableError(
                    grpc.StatusCode.UNAVAILABLE, "the server ended the stream before answering"
                )
            except CifarServeError as exc:
                err = exc
            if self.closed:
                raise err
            if retry.wait_first(err):
                assert deadline is not None
                retry.waited_for(await self._wait_serving(METHOD, request, deadline))
            await asyncio.sleep(retry.delay(err))

    async def _once(
        self, request: pb.ClassifyRequest, deadline: float | None, wait_for_ready: bool
    ) -> pb.ClassifyResponse:
        if self.closed:
            raise CifarServeError(grpc.StatusCode.CANCELLED, f"{METHOD}: the client was closed")
        if deadline is not None and deadline <= time.monotonic():
            raise DeadlineExceededError(grpc.StatusCode.DEADLINE_EXCEEDED, f"{METHOD}: deadline exceeded")
        limit = self._limit
        if limit is None:
            async with self._limit_lock:
                if self._limit is None:
                    self._limit = await self._stream_limit(deadline) or 2**62
                limit = self._limit
        await self._window.acquire(deadline)
        answer: asyncio.Future[pb.ClassifyResponse] | None = None
        try:
            while answer is None:
                answer = self._stream(wait_for_ready, limit).submit(request, deadline)
        except BaseException:
            self._window.release()  # never queued: the slot is not held by the stream
            raise
        if deadline is None:
            return await answer  # a cancelled caller cancels it: the stream drops its answer
        # A timer, not asyncio.wait(): the deadline settles the answer itself, the stream then
        # drops the late one (asyncio.wait's per-call set and callbacks cost more CPU per request).
        timer = asyncio.get_running_loop().call_later(max(0.0, deadline - time.monotonic()), _expire, answer)
        try:
            return await answer
        finally:
            timer.cancel()

    def _stream(self, wait_for_ready: bool, limit: int) -> _Stream:
        current = self._current
        if current is not None and current.writable:
            return current
        self._opened += 1
        stream = _Stream(self._open_stream(wait_for_ready), limit, self._window, self._opened)
        logger.debug("stream %d opened to %s", stream.number, self._cfg.address)
        self._current = stream
        self._streams.add(stream)
        stream.reader.add_done_callback(lambda _task: self._ended(stream))
        return stream

    def _ended(self, stream: _Stream) -> None:
        self._streams.discard(stream)
        if self._current is stream:
            self._current = None
        if stream.hit_limit:
            self._limit = None  # before ours: the server's limit has changed, ask it again

    async def close(self) -> None:
        """End every stream: half-closed when it owes no answers (the server ends it cleanly),
        cancelled otherwise (its callers get CANCELLED, as a closed channel's calls do)."""
        self.closed = True
        streams = list(self._streams)
        for stream in streams:
            if stream.idle:
                stream.half_close()
            else:
                stream.call.cancel()
        tasks = [t for s in streams for t in (s.reader, s.writer)]
        if tasks:
            # A server that does not end a half-closed stream promptly is not waited for long.
            _, late = await asyncio.wait(tasks, timeout=2.0)
            for stream in streams:
                if stream.reader in late or stream.writer in late:
                    stream.call.cancel()
                    stream.writer.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self._current = None


# --------------------------------------------------------------------------- the blocking client's lane

_END = None  # ends a stream's request iterator: the call is half-closed

SyncOpenStream = Callable[[Iterator[pb.ClassifyStreamRequest], bool], Any]
SyncStreamLimit = Callable[[float | None], int]
SyncWaitServing = Callable[[str, Any, float], str]


class _SyncStream:
    """One ``ClassifyStream`` call of the blocking client: a request queue and one reader thread."""

    def __init__(
        self, open_stream: SyncOpenStream, wait_for_ready: bool, limit: int, lane: SyncStreamLane
    ) -> None:
        self.limit = limit
        self.number = lane.streams_opened
        self.sent = 0
        self.writable = True
        self.hit_limit = False
        self._lane = lane
        self._queue: queue.SimpleQueue[pb.ClassifyStreamRequest | None] = queue.SimpleQueue()
        self._waiting: dict[str, futures.Future[pb.ClassifyResponse]] = {}
        self._lock = threading.Lock()
        self.call = open_stream(self._requests(), wait_for_ready)
        self.reader = threading.Thread(target=self._read, name=f"cifar-stream-{self.number}", daemon=True)
        self.reader.start()

    def _requests(self) -> Iterator[pb.ClassifyStreamRequest]:
        while (msg := self._queue.get()) is not _END:
            yield msg

    @property
    def idle(self) -> bool:
        with self._lock:
            return not self._waiting

    def submit(
        self, request: pb.ClassifyRequest, deadline: float | None
    ) -> futures.Future[pb.ClassifyResponse] | None:
        """Queue ``request`` (its window slot already taken); None when this stream takes no more."""
        with self._lock:
            if not self.writable:
                return None
            self.sent += 1
            rid = str(self.sent)
            answer: futures.Future[pb.ClassifyResponse] = futures.Future()
            self._waiting[rid] = answer
            self._queue.put(
                pb.ClassifyStreamRequest(id=rid, request=request, timeout_us=_timeout_us(deadline))
            )
            if self.sent >= self.limit:
                self.writable = False  # the next request opens a new stream
                self._queue.put(_END)
            return answer

    def half_close(self) -> None:
        with self._lock:
            if self.writable:
                self.writable = False
                self._queue.put(_END)

    def _read(self) -> None:
        ended: Exception = _Resend()
        try:
            for msg in self.call:
                self._deliver(msg)
        except grpc.RpcError as exc:
            err = _broken(error_from_rpc(exc))
            if err.code is grpc.StatusCode.RESOURCE_EXHAUSTED and "open a new stream" in err.message:
                logger.debug("stream %d ended by the server at its request limit", self.number)
                self.hit_limit = True
            elif self._lane.closed and err.code is grpc.StatusCode.CANCELLED:
                ended = CifarServeError(grpc.StatusCode.CANCELLED, f"{METHOD}: the client was closed")
            else:
                ended = err
                logger.debug("stream %d ended: %s", self.number, err)
        finally:
            with self._lock:
                self.writable = False
                waiting, self._waiting = self._waiting, {}
            self._queue.put(_END)  # grpc's request-iterator thread stops too
            for answer in waiting.values():
                self._lane.window.release()
                _settle(answer, _fresh(ended))
            self._lane.ended(self)

    def _deliver(self, msg: pb.ClassifyStreamResponse) -> None:
        with self._lock:
            answer = self._waiting.pop(msg.id, None)
        if answer is None:
            logger.warning("stream %d: an answer for unknown request id %r dropped", self.number, msg.id)
            return
        self._lane.window.release()
        if msg.error_code:
            code = _CODES.get(msg.error_code, grpc.StatusCode.UNKNOWN)
            _settle(answer, error_for(code, readable_message(msg.error_message or code.name)))
        else:
            _settle(answer, msg.response)


def _settle(answer: futures.Future[pb.ClassifyResponse], outcome: pb.ClassifyResponse | Exception) -> None:
    """Set ``answer`` unless its caller gave up on it (a deadline cancels the future)."""
    if not answer.set_running_or_notify_cancel():
        return
    if isinstance(outcome, Exception):
        answer.set_exception(outcome)
    else:
        answer.set_result(outcome)


class SyncStreamLane:
    """The blocking :class:`Client`'s stream lane: threads share one ``ClassifyStream``.

    The same contract as :class:`StreamLane` (see the module docstring); the requests of a stream
    go through a queue that grpc's request iterator drains, and one reader thread per stream
    hands each answer to the thread waiting for it.
    """

    def __init__(
        self,
        cfg: _Config,
        open_stream: SyncOpenStream,
        stream_limit: SyncStreamLimit,
        wait_serving: SyncWaitServing,
        window: int = STREAM_WINDOW,
    ) -> None:
        if window < 1:
            raise ValueError("the stream window must be at least 1")
        self._cfg = cfg
        self._open_stream = open_stream
        self._stream_limit = stream_limit
        self._wait_serving = wait_serving
        self.window = threading.BoundedSemaphore(window)
        self._limit: int | None = None
        self._lock = threading.Lock()
        self._limit_lock = threading.Lock()
        self._current: _SyncStream | None = None
        self._streams: set[_SyncStream] = set()
        self.streams_opened = 0
        self.closed = False

    def classify(self, request: pb.ClassifyRequest, deadline: float | None) -> pb.ClassifyResponse:
        """``request``'s answer, retried as the client's unary calls are (see ``_Config.next_attempt``)."""
        retry = self._cfg.retry(METHOD, deadline)
        resends = 0
        while True:
            try:
                return self._once(request, deadline, retry.waited)
            except _Resend:
                if resends < _FREE_RESENDS:
                    resends += 1
                    continue
                err: CifarServeError = UnavailableError(
                    grpc.StatusCode.UNAVAILABLE, "the server ended the stream before answering"
                )
            except CifarServeError as exc:
                err = exc
            if self.closed:
                raise err
            if retry.wait_first(err):
                assert deadline is not None
                retry.waited_for(self._wait_serving(METHOD, request, deadline))
            time.sleep(retry.delay(err))

    def _once(
        self, request: pb.ClassifyRequest, deadline: float | None, wait_for_ready: bool
    ) -> pb.ClassifyResponse:
        if self.closed:
            raise CifarServeError(grpc.StatusCode.CANCELLED, f"{METHOD}: the client was closed")
        late = DeadlineExceededError(grpc.StatusCode.DEADLINE_EXCEEDED, f"{METHOD}: deadline exceeded")
        limit = self._limit
        if limit is None:
            with self._limit_lock:
                if self._limit is None:
                    self._limit = self._stream_limit(deadline) or 2**62
                limit = self._limit
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise late
        if not self.window.acquire(timeout=left):
            raise late
        answer: futures.Future[pb.ClassifyResponse] | None = None
        try:
            while answer is None:
                answer = self._stream(wait_for_ready, limit).submit(request, deadline)
        except BaseException:
            self.window.release()
            raise
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return answer.result(timeout=left)
        except futures.TimeoutError:
            answer.cancel()  # the reader drops the answer when it comes
            raise late from None

    def _stream(self, wait_for_ready: bool, limit: int) -> _SyncStream:
        with self._lock:
            current = self._current
            if current is not None and current.writable:
                return current
            if self.closed:
                raise CifarServeError(grpc.StatusCode.CANCELLED, f"{METHOD}: the client was closed")
            self.streams_opened += 1
            stream = _SyncStream(self._open_stream, wait_for_ready, limit, self)
            logger.debug("stream %d opened to %s", stream.number, self._cfg.address)
            self._current = stream
            self._streams.add(stream)
            return stream

    def ended(self, stream: _SyncStream) -> None:
        with self._lock:
            self._streams.discard(stream)
            if self._current is stream:
                self._current = None
            if stream.hit_limit:
                self._limit = None  # before ours: the server's limit has changed, ask it again

    def close(self) -> None:
        """End every stream: half-closed when it owes no answers, cancelled otherwise."""
        with self._lock:
            self.closed = True
            streams = list(self._streams)
        for stream in streams:
            if stream.idle:
                stream.half_close()
            else:
                stream.call.cancel()
        for stream in streams:
            # A server that does not end a half-closed stream promptly is not waited for long.
            stream.reader.join(2.0)
            if stream.reader.is_alive():
                stream.call.cancel()
                stream.reader.join()
