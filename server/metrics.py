"""Prometheus metrics of one server instance (its own registry, so tests can run several)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["Metrics"]

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


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
            "time an image waited in the batcher's queue before its batch ran",
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
        self.queued_images = Gauge("cifar_serve_queued_images", "images waiting in the queue", registry=r)
        self.dropped = Counter(
            "cifar_serve_dropped_images",
            "queued images dropped before compute, by reason",
            ["reason"],
            registry=r,
        )
        self.batch_failures = Counter(
            "cifar_serve_batch_failures", "batches whose forward pass failed", ["reason"], registry=r
        )
        self.inflight = Gauge("cifar_serve_inflight_requests", "requests being answered", registry=r)
        self._inflight = 0
        self._idle: asyncio.Event | None = None
        self._http: Any = None

    def answered(self) -> dict[str, int]:
        """Calls answered so far, as ``{"Method/CODE": count}``."""
        out: dict[str, int] = {}
        for metric in self.requests.collect():
            for s in metric.samples:
                if s.name.endswith("_total"):
                    out[f"{s.labels['method']}/{s.labels['code']}"] = int(s.value)
        return out

    @property
    def inflight_count(self) -> int:
        return self._inflight

    @property
    def idle(self) -> bool:
        return self._inflight == 0

    def begin(self) -> None:
        self._inflight += 1
        self.inflight.set(self._inflight)

    def end(self) -> None:
        self._inflight -= 1
        self.inflight.set(self._inflight)
        if self._inflight == 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is being answered (True) or ``timeout`` passes (False)."""
        if self._inflight == 0:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self._idle = None

    def serve_http(self, host: str, port: int) -> int:
        """Expose ``/metrics`` on ``port`` (0: a free one); returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return int(server.server_address[1])

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
