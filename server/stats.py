"""Cumulative inference statistics of one model, in the shape of Triton's statistics extension.

Transport-free: the core records each request's outcome and the batcher each forward pass;
the gRPC (and any other) front end reads a :meth:`ModelStats.snapshot` and renders it. Durations
are integer nanoseconds from ``time.perf_counter_ns()``. Recording takes a lock, so it is safe
from any thread, and costs well under a microsecond per call.

The counts follow Triton's definitions: ``inference_count`` counts images of successful requests,
``execution_count`` forward passes; ``success``/``fail`` count requests and their time from
arrival at the core to the answer; ``queue`` and ``compute_*`` count successful requests, each
charged the full duration of every batch that held part of it (so, as in Triton, the per-request
compute sums exceed the wall time when requests share a batch); ``batch_stats`` count forward
passes per batch size.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

__all__ = ["BatchTimes", "Duration", "ModelStats", "RequestTimes", "StatsSnapshot"]


@dataclass
class Duration:
    """How many events, and their cumulative duration in nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def copy(self) -> Duration:
        return Duration(self.count, self.ns)


@dataclass
class BatchTimes:
    """One forward pass's phases: assembling the batch, running the model, scattering the answer."""

    input_ns: int = 0
    infer_ns: int = 0
    output_ns: int = 0


@dataclass
class RequestTimes:
    """A request's queue wait and the summed phases of every batch that held part of it."""

    queue_ns: int = 0
    input_ns: int = 0
    infer_ns: int = 0
    output_ns: int = 0

    def charge(self, batch: BatchTimes) -> None:
        self.input_ns += batch.input_ns
        self.infer_ns += batch.infer_ns
        self.output_ns += batch.output_ns


@dataclass
class StatsSnapshot:
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    # batch size -> (compute_input, compute_infer, compute_output), one count per forward pass
    batches: dict[int, tuple[Duration, Duration, Duration]] = field(default_factory=dict)


class ModelStats:
    """The accumulator: one per served model version."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._s = StatsSnapshot()

    def request_succeeded(
        self, images: int, duration_ns: int, times: RequestTimes | None, requests: int = 1
    ) -> None:
        """One request, or ``requests`` that travelled together (a worker's group), each charged
        the same times."""
        with self._lock:
            s = self._s
            s.inference_count += images
            s.success.add(duration_ns * requests, requests)
            if times is not None:
                s.queue.add(times.queue_ns * requests, requests)
                s.compute_input.add(times.input_ns * requests, requests)
                s.compute_infer.add(times.infer_ns * requests, requests)
                s.compute_output.add(times.output_ns * requests, requests)

    def request_failed(self, duration_ns: int, requests: int = 1) -> None:
        with self._lock:
            self._s.fail.add(duration_ns * requests, requests)

    def batch_ran(self, size: int, times: BatchTimes) -> None:
        wall_ms = time.time_ns() // 1_000_000
        with self._lock:
            s = self._s
            s.execution_count += 1
            s.last_inference_ms = wall_ms
            per = s.batches.get(size)
            if per is None:
                per = s.batches[size] = (Duration(), Duration(), Duration())
            per[0].add(times.input_ns)
            per[1].add(times.infer_ns)
            per[2].add(times.output_ns)

    def snapshot(self) -> StatsSnapshot:
        """A consistent copy, batch sizes in ascending order."""
        with self._lock:
            s = self._s
            return StatsSnapshot(
                inference_count=s.inference_count,
                execution_count=s.execution_count,
                last_inference_ms=s.last_inference_ms,
                success=s.success.copy(),
                fail=s.fail.copy(),
                queue=s.queue.copy(),
                compute_input=s.compute_input.copy(),
                compute_infer=s.compute_infer.copy(),
                compute_output=s.compute_output.copy(),
                batches={
                    size: (d[0].copy(), d[1].copy(), d[2].copy()) for size, d in sorted(s.batches.items())
                },
            )
