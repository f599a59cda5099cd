"""Dynamic batching: images from concurrent callers share forward passes.

A batch runs at once when the model is idle (waiting would only add latency: nothing else is
using it), unless the callers of the batch that just finished are expected back (``regroup``:
see ``_finish``); while a batch computes, the next one gathers until it holds ``max_batch_size``
images or ``max_delay`` has passed since its oldest image arrived, whichever is first. A
request larger than a batch is split across batches, and each caller gets its own rows back
in order. Forward passes run in the batcher's own compute threads, never on the event loop, and
while one computes the next one fills; a thread hands its batch back with one callback on the
loop (cheaper than an executor's future chain: this is the per-batch cost a fast model, or a
GPU, pays on every few requests). Times are ``time.monotonic()``.

The collector task is supervised: if it ever dies, every waiting caller gets ``UNAVAILABLE``
at once, new work is refused, and ``on_failure`` tells the server (which turns NOT_SERVING and
exits non-zero for its supervisor to restart it) instead of leaving callers to hang.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .errors import DeadlineExceeded, InferenceError, InternalError, QueueFull, ResourceExhausted, Unavailable
from .metrics import Metrics
from .stats import BatchTimes, ModelStats, RequestTimes

__all__ = ["DynamicBatcher", "is_out_of_memory"]

logger = logging.getLogger(__name__)

InferFn = Callable[[np.ndarray], np.ndarray]


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    name = type(exc).__name__
    return name == "OutOfMemoryError" or "out of memory" in str(exc).lower()


@dataclass(eq=False)
class _Work:
    images: np.ndarray
    out: np.ndarray
    future: asyncio.Future[np.ndarray]
    enqueued: float
    deadline: float | None
    times: RequestTimes | None = None
    requests: int = 1  # callers whose images travel together (a worker's group)
    next: int = 0
    running: int = 0
    failed: bool = field(default=False)

    @property
    def size(self) -> int:
        return int(self.images.shape[0])

    @property
    def done(self) -> bool:
        return self.failed or self.future.done()


_Slice = tuple[_Work, int, int]


@dataclass(eq=False)
class _Job:
    """One batch on its way through a compute thread, with its phase instants (perf_counter_ns)."""

    batch: list[_Slice]
    x: np.ndarray
    t0: int  # taken from the queue
    t1: int  # assembled: the forward pass starts
    t2: int = 0  # the forward pass ended
    logits: np.ndarray | None = None
    error: BaseException | None = None


class DynamicBatcher:
    def __init__(
        self,
        infer: InferFn,
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_queue_images: int,
        max_inflight: int = 1,
        idle_dispatch: bool = True,
        regroup: bool = False,
        num_classes: int = 10,
        metrics: Metrics | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
        stats: ModelStats | None = None,
    ) -> None:
        self._infer = infer
        self._stats = stats
        self._on_failure = on_failure
        self.failure: BaseException | None = None
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue_images = max_queue_images
        self.max_inflight = max_inflight
        self._num_classes = num_classes
        self._metrics = metrics
        self._queue: collections.deque[_Work] = collections.deque()
        self._queued = 0
        self._arrived = asyncio.Event()
        # How many queued images wake the gathering collector (see _gather): an arrival below
        # it only queues, so a batch of n costs the collector one wake-up, not n.
        self._wake_at = 1
        self._timed_out = False
        self._inflight = asyncio.Semaphore(max_inflight)
        self._computing = 0
        self._none_computing = asyncio.Event()
        self._none_computing.set()
        self.idle_dispatch = idle_dispatch
        self.regroup = regroup
        # What the idle model waits for after a batch, and until when (regroup; see _finish).
        self._expect = 1
        self._expect_until = 0.0
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._collector: asyncio.Task[None] | None = None
        self._closing = False

    # ------------------------------------------------------------------ public

    @property
    def queued_images(self) -> int:
        return self._queued

    def start(self) -> None:
        self._loop = loop = asyncio.get_running_loop()
        for i in range(self.max_inflight):
            thread = threading.Thread(target=self._compute, name=f"infer_{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self._collector = loop.create_task(self._collect(), name="batcher")
        self._collector.add_done_callback(self._collector_done)

    async def submit(
        self,
        images: np.ndarray,
        deadline: float | None = None,
        times: RequestTimes | None = None,
        requests: int = 1,
    ) -> np.ndarray:
        """Logits ``[n, classes]`` for uint8 ``images [n,32,32,3]``.

        ``deadline`` is a ``time.monotonic()`` instant; work still queued at that instant is
        dropped with :class:`DeadlineExceeded` before it is computed. ``times``, when given, is
        filled with the request's queue wait and the phases of the batches that held it.
        """
        if self.failure is not None:
            raise Unavailable(f"the batcher failed ({type(self.failure).__name__}); the server is exiting")
        if self._closing:
            raise Unavailable("server is shutting down")
        n = int(images.shape[0])
        if self._queued + n > self.max_queue_images:
            self._count_drop("queue_full", n)
            raise QueueFull(
                f"queue full: {self._queued} images waiting, limit {self.max_queue_images}; retry later"
            )
        loop = asyncio.get_running_loop()
        work = _Work(
            images,
            np.empty((n, self._num_classes), np.float32),
            loop.create_future(),
            time.monotonic(),
            deadline,
            times,
            requests,
        )
        self._queue.append(work)
        self._queued += n
        self._gauge()
        if self._queued >= self._wake_at:
            self._arrived.set()
        try:
            return await work.future
        except asyncio.CancelledError:
            # The caller went away: take its images out so they are never computed.
            self._remove(work)
            self._count_drop("cancelled", work.size - work.next)
            raise

    async def stop(self) -> None:
        """Stop taking work, finish everything already accepted, release the threads."""
        self._closing = True
        self._arrived.set()
        if self._collector is not None and self.failure is None:
            await asyncio.gather(self._collector, return_exceptions=True)
        await self._none_computing.wait()
        for _ in self._threads:
            self._jobs.put(None)
        self._threads.clear()

    # ------------------------------------------------------------------ internals

    def _collector_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() and self._closing:
            return  # cancelled while stopping (the event loop is closing): not a failure
        if task.cancelled():
            exc: BaseException = asyncio.CancelledError("the batcher's collector was cancelled")
        else:
            found = task.exception()
            if found is None:
                return  # a clean stop
            exc = found
        self.failure = exc
        self._closing = True
        logger.critical(
            "the batcher's collector died; failing %d waiting calls", len(self._queue), exc_info=exc
        )
        err = Unavailable(f"the batcher failed ({type(exc).__name__}); the server is exiting")
        for work in self._queue:
            if not work.done:
                work.failed = True
                work.future.set_exception(err)
        self._queue.clear()
        self._queued = 0
        self._gauge()
        if self._on_failure is not None:
            self._on_failure(exc)

    def _gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.queued.set(self._queued)

    def _count_drop(self, reason: str, n: int) -> None:
        if self._metrics is not None and n > 0:
            self._metrics.dropped.labels(reason).inc(n)

    def _remove(self, work: _Work) -> None:
        try:
            self._queue.remove(work)
        except ValueError:
            return
        self._queued -= work.size - work.next
        self._gauge()

    def _sweep(self) -> None:
        """Drop finished, cancelled and expired work from the queue."""
        now = time.monotonic()
        keep: collections.deque[_Work] = collections.deque()
        for work in self._queue:
            left = work.size - work.next
            if work.done:
                self._queued -= left
                continue
            if work.deadline is not None and now >= work.deadline:
                self._queued -= left
                work.failed = True
                work.future.set_exception(
                    DeadlineExceeded(
                        f"deadline exceeded after {now - work.enqueued:.3f}s in the queue; not computed"
                    )
                )
                self._count_drop("deadline", left)
                continue
            keep.append(work)
        self._queue = keep
        self._gauge()

    async def _collect(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
            await self._inflight.acquire()
            # Holding a slot: keep gathering until the batch is full or the oldest is due,
            # unless nothing is computing, when the work goes at once (or once the callers of
            # the batch that just finished are back: see _finish).
            while True:
                self._sweep()
                if not self._queue or self._queued >= self.max_batch_size or self._closing:
                    break
                now = time.monotonic()
                if self.idle_dispatch and self._computing == 0:
                    if self._queued >= self._expect:
                        break
                    # The work queued behind the last batch has waited past its delay already.
                    due = self._expect_until - now
                    enough = self._expect
                else:
                    due = self._queue[0].enqueued + self.max_delay_s - now
                    enough = self.max_batch_size
                if due <= 0 or not await self._gather(due, enough):
                    break
            batch = self._take()
            if not batch:
                self._inflight.release()
                continue
            self._dispatch(batch)

    async def _gather(self, due: float, enough: int) -> bool:
        """Wait until ``enough`` images are queued or anything else wakes the collector (a batch
        finished, a stop); False when ``due`` seconds pass first.

        Arrivals below ``enough`` do not wake it: under load a batch of n images would otherwise
        cost n wake-ups of the collector, each sweeping the queue, where it needs one.
        """
        loop = asyncio.get_running_loop()
        self._arrived.clear()
        self._wake_at = enough
        self._timed_out = False
        timer = loop.call_later(due, self._due)
        try:
            await self._arrived.wait()
        finally:
            timer.cancel()
            self._wake_at = 1
        return not self._timed_out

    def _due(self) -> None:
        self._timed_out = True
        self._arrived.set()

    def _take(self) -> list[_Slice]:
        space = self.max_batch_size
        batch: list[_Slice] = []
        now = time.monotonic()
        while self._queue and space:
            work = self._queue[0]
            count = min(work.size - work.next, space)
            batch.append((work, work.next, count))
            if work.next == 0:
                if self._metrics is not None:
                    for _ in range(work.requests):
                        self._metrics.queue_time.observe(now - work.enqueued)
                if work.times is not None:
                    work.times.queue_ns = int((now - work.enqueued) * 1e9)
            work.next += count
            work.running += 1
            space -= count
            self._queued -= count
            if work.next == work.size:
                self._queue.popleft()
        self._gauge()
        return batch

    def _dispatch(self, batch: list[_Slice]) -> None:
        """Hand ``batch`` to a compute thread (a slot is held: one is free)."""
        t0 = time.perf_counter_ns()
        if len(batch) == 1 and batch[0][1] == 0 and batch[0][2] == batch[0][0].size:
            x = batch[0][0].images  # one whole request: no copy
        else:
            x = np.concatenate([w.images[s : s + c] for w, s, c in batch])
        self._computing += 1
        self._none_computing.clear()
        self._jobs.put(_Job(batch, x, t0, time.perf_counter_ns()))

    def _compute(self) -> None:
        """A compute thread: run each job's forward pass, hand the result to the event loop."""
        loop = self._loop
        assert loop is not None
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job.logits = self._forward(job.x)
            except BaseException as exc:  # a thread that died would leave its callers waiting forever
                job.error = exc
            job.t2 = time.perf_counter_ns()
            try:
                loop.call_soon_threadsafe(self._finish, job)
            except RuntimeError:  # the loop closed under a batch nobody waits for any more
                return

    def _finish(self, job: _Job) -> None:
        """On the event loop: give each caller its rows, account the batch, free its slot."""
        batch = job.batch
        try:
            if job.error is not None:
                self._fail(batch, job.error)
                return
            logits = job.logits
            assert logits is not None
            n = len(job.x)
            if self._metrics is not None:
                self._metrics.inference_time.observe((job.t2 - job.t1) / 1e9)
                self._metrics.batch_size.observe(n)
                self._metrics.images.inc(n)
            offset = 0
            for work, start, count in batch:
                work.running -= 1
                if not work.done:
                    work.out[start : start + count] = logits[offset : offset + count]
                    if work.next == work.size and work.running == 0:
                        work.future.set_result(work.out)
                offset += count
            if self._stats is not None:
                # The callers resume on a later loop iteration, so they read complete times.
                phases = BatchTimes(job.t1 - job.t0, job.t2 - job.t1, time.perf_counter_ns() - job.t2)
                self._stats.batch_ran(n, phases)
                for work, _start, _count in batch:
                    if work.times is not None:
                        work.times.charge(phases)
        finally:
            self._computing -= 1
            if self._computing == 0:
                self._none_computing.set()
            if self._computing == 0 and self.regroup:
                # Closed-loop callers come back soon after their answer: a batch that leaves now
                # would hold only the work that queued meanwhile, and the callers just answered
                # would form the next, so under steady load the batches stay half the size they
                # could be. Waiting for as many images as just left regroups them; a batch of 1
                # expects 1, so a lone caller never waits. The wait is at most half the batch's
                # own compute time (the model idles at most a third of the time) or the batch
                # delay, whichever is longer: where the model is nearly free (the null model, a
                # GPU) a batch's cost is the thread hop and the GIL hand-over around it, not its
                # compute, and a wait of microseconds would keep the batches at the few images
                # the event loop parses between two hops.
                wait = max((job.t2 - job.t1) / 2e9, self.max_delay_s)
                self._expect = min(self.max_batch_size, len(job.x) + self._queued)
                self._expect_until = time.monotonic() + wait
            self._inflight.release()
            self._arrived.set()

    def _forward(self, x: np.ndarray) -> np.ndarray:
        """Run one batch; on out-of-memory, retry it in halves before giving up."""
        try:
            return self._infer(x)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            if self._metrics is not None:
                self._metrics.batch_failures.labels("out_of_memory").inc()
            if len(x) == 1:
                raise ResourceExhausted("out of memory running a single image") from exc
            logger.warning("out of memory on a batch of %d; retrying in halves", len(x))
            half = len(x) // 2
            return np.concatenate([self._forward(x[:half]), self._forward(x[half:])])

    def _fail(self, batch: list[_Slice], exc: BaseException) -> None:
        if isinstance(exc, InferenceError):
            err: InferenceError = exc
        else:
            logger.exception("forward pass failed for a batch of %d requests", len(batch), exc_info=exc)
            if self._metrics is not None:
                self._metrics.batch_failures.labels("error").inc()
            err = InternalError(f"inference failed: {type(exc).__name__}: {exc}")
        for work, _start, _count in batch:
            work.running -= 1
            if not work.done:
                work.failed = True
                work.future.set_exception(err)
        self._arrived.set()
