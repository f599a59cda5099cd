"""Prometheus metrics of one server instance (its own registry, so tests can run several)."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    make_wsgi_app,
)

__all__ = [
    "LiveValue",
    "Metrics",
    "answered",
    "enter_multiprocess_mode",
    "flush_metrics",
    "multiprocess_registry",
    "process_restarts",
    "serve_registry",
]

logger = logging.getLogger(__name__)

# A `_created` sample per series doubles the page and no dashboard of ours reads it.
disable_created_metrics()

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

_StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _ThreadingWSGIServer6(_ThreadingWSGIServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes every few seconds: not news
        logger.debug("metrics: " + format, *args)


class LiveValue:
    """A count the request path changes several times per call (calls in flight, bytes held,
    images queued), written to its gauge at most once per event-loop iteration.

    A gauge write takes a lock (and, under ``--workers N``, writes a memory-mapped file); the
    path changes these counts about five times per single-image call. Off the event loop (no
    running loop), each change is written at once.
    """

    __slots__ = ("_gauge", "_pending", "value")

    def __init__(self, gauge: Gauge) -> None:
        self._gauge = gauge
        self._pending = False
        self.value = 0

    def add(self, n: int) -> None:
        self.value += n
        self._changed()

    def set(self, value: int) -> None:
        self.value = value
        self._changed()

    def _changed(self) -> None:
        if self._pending:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._gauge.set(self.value)
            return
        self._pending = True
        loop.call_soon(self._write)

    def _write(self) -> None:
        self._pending = False
        self._gauge.set(self.value)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "cifar_serve_requests", "RPCs answered, by method and status code", ["method", "code"], registry=r
        )
        self.latency = Histogram(
            "cifar_serve_request_latency_seconds",
            "RPC latency, by method",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "cifar_serve_queue_time_seconds",
            "time from a request's arrival in the batcher's queue to the start of its first batch "
            "(one observation per request)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "cifar_serve_batch_size", "images per forward pass", buckets=_BATCH_BUCKETS, registry=r
        )
        self.inference_time = Histogram(
            "cifar_serve_inference_seconds",
            "forward pass time per batch",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.images = Counter(
            "cifar_serve_images", "images classified (rate() gives images per second)", registry=r
        )
        self.queued_images = Gauge(
            "cifar_serve_queued_images",
            "images waiting in the queue",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.dropped = Counter(
            "cifar_serve_dropped_images",
            "queued images dropped before compute, by reason",
            ["reason"],
            registry=r,
        )
        self.batch_failures = Counter(
            "cifar_serve_batch_failures", "batches whose forward pass failed", ["reason"], registry=r
        )
        self.inflight = Gauge(
            "cifar_serve_inflight_requests",
            "calls being answered (a stream is one)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.inflight_bytes = Gauge(
            "cifar_serve_inflight_request_bytes",
            "request bytes held from parsing until answered (bounded by --max-inflight-request-bytes)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.stream_items = Gauge(
            "cifar_serve_stream_items",
            "requests of open streams being computed or awaiting delivery",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.stream_messages = Counter(
            "cifar_serve_stream_messages",
            "requests answered inside streams, by method and status code",
            ["method", "code"],
            registry=r,
        )
        self.model_version = Gauge(
            "cifar_serve_model_version",
            "1 for the model version serving",
            ["model", "version"],
            registry=r,
            multiprocess_mode="livemax",
        )
        # What computes the answers (an int8 model answers slightly differently from fp32).
        self.model_runtime = Gauge(
            "cifar_serve_model_runtime",
            "1 for the runtime serving the model: backend, precision (fp32, bf16, fp16, int8) and device",
            ["model", "backend", "precision", "device"],
            registry=r,
            multiprocess_mode="livemax",
        )
        # With --workers N, the least of every process's: 1 only when all take calls.
        self.ready = Gauge(
            "cifar_serve_ready",
            "1 when the server takes inference calls",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.calls = LiveValue(self.inflight)
        self.held_bytes = LiveValue(self.inflight_bytes)
        self.queued = LiveValue(self.queued_images)
        self.streamed = LiveValue(self.stream_items)
        self._http: WSGIServer | None = None

    def answered(self) -> dict[str, int]:
        """Calls answered so far, as ``{"Method/CODE": count}``."""
        return answered(self.registry)

    @property
    def inflight_count(self) -> int:
        return self.calls.value

    @property
    def idle(self) -> bool:
        return self.calls.value == 0

    def begin(self) -> None:
        self.calls.add(1)

    def end(self) -> None:
        self.calls.add(-1)

    def serve_http(self, host: str, port: int) -> int:
        """Expose ``/metrics`` on ``port`` (0: a free one); returns the bound port."""
        self._http = serve_registry(self.registry, host, port)
        return int(self._http.server_address[1])

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def serve_registry(registry: CollectorRegistry, host: str, port: int) -> WSGIServer:
    """Serve ``registry`` at ``/metrics`` on ``host:port`` (0: a free one) from a daemon thread.

    Only ``/metrics`` answers (404 elsewhere), so a probe pointed at ``/`` or ``/healthz``
    by mistake fails loudly instead of reading a metrics page as "healthy".
    """
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: _StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "") == "/metrics":
            result: Iterable[bytes] = metrics_app(environ, start_response)
            return result
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: metrics are at /metrics\n"]

    server_class = _ThreadingWSGIServer6 if ":" in host else _ThreadingWSGIServer
    server = make_server(host, port, app, server_class, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server


def multiprocess_registry(path: str) -> CollectorRegistry:
    """One registry over the metrics every process of ``--workers N`` writes under ``path``."""
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)
    return registry


def process_restarts() -> Counter:
    """``cifar_serve_process_restarts_total`` by ``role`` (``worker``, ``model``), the supervisor's own.

    In no registry yet: the supervisor adds it to each registry it builds over the children's
    multiprocess files (it is not a child and writes no such file of its own). Both roles start at
    0, so a dashboard sees the series before the first restart.
    """
    counter = Counter(
        "cifar_serve_process_restarts",
        "crashed processes of --workers N restarted by the supervisor, by role (worker, model)",
        ["role"],
        registry=None,
    )
    for role in ("worker", "model"):
        counter.labels(role)
    return counter


def enter_multiprocess_mode(path: str, deferred: bool = False) -> None:
    """Make metrics created from now on in this process write to ``path`` (a child of ``--workers``).

    prometheus-client picks its value class when first imported, which a spawned child may have
    done (importing its parent's main module) before it learnt the folder: pick it again.
    ``deferred`` (a worker: every metric changes on its event loop) writes changed values to the
    file once per loop iteration instead of at each change (see :func:`_deferred_value_class`).
    """
    import os

    from prometheus_client import values

    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    values.ValueClass = _deferred_value_class() if deferred else values.get_value_class()


_dirty: dict[int, Any] = {}  # id -> value changed on the loop, not yet in its file


def flush_metrics() -> None:
    """Write every deferred change to the process's metric files (each loop iteration, at exit)."""
    while _dirty:
        _id, value = _dirty.popitem()
        value.write()


def _deferred_value_class() -> Any:
    """prometheus-client's multi-process value, written to its file once per loop iteration.

    The stock one takes a lock, asks the kernel for the process id (to notice a fork) and writes
    the memory-mapped file at every change: the request path makes several changes per call.
    Measured by turns on the null model at c=128 (``/proc``, two rounds), ``--workers 2`` cost
    0.296 / 0.294 ms of server CPU per request with stock values, 0.283 / 0.292 with these, and
    0.282 / 0.291 with no worker metrics at all (BENCHMARKS.md, issue 20's sixth pass). Changes
    made on the event loop only update the value and mark it; one callback at the end of the
    iteration writes each marked value once, so a scrape sees them within the iteration. Off the
    loop a change is written at once. The process id is taken once: children are spawned, never
    forked.
    """
    import os

    from prometheus_client import values

    pid = os.getpid()
    stock: Any = values.MultiProcessValue(process_identifier=lambda: pid)

    class DeferredValue(stock):
        def inc(self, amount: float) -> None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                super().inc(amount)
                return
            self._value += amount
            self._timestamp = 0.0
            self._mark(loop)

        def set(self, value: float, timestamp: float | None = None) -> None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                super().set(value, timestamp)
                return
            self._value = value
            self._timestamp = timestamp or 0.0
            self._mark(loop)

        def _mark(self, loop: asyncio.AbstractEventLoop) -> None:
            if not _dirty:
                loop.call_soon(flush_metrics)
            _dirty[id(self)] = self

        def write(self) -> None:
            self._file.write_value(self._key, self._value, self._timestamp)

    return DeferredValue


def answered(registry: CollectorRegistry) -> dict[str, int]:
    """Calls answered, as ``{"Method/CODE": count}``, from ``cifar_serve_requests_total``."""
    out: dict[str, int] = {}
    for metric in registry.collect():
        for s in metric.samples:
            if s.name == "cifar_serve_requests_total" and s.value:
                out[f"{s.labels['method']}/{s.labels['code']}"] = int(s.value)
    return out
