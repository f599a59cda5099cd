"""``--workers N`` heals itself: a killed worker or model process is restarted, a crash loop ends.

Real ``cifar-serve`` processes on free loopback ports, the shipped model, real ``SIGKILL``s. The
figures each test measures (calls failed per kill, seconds from the kill to SERVING again) are
logged (``pytest -o log_cli=true --log-cli-level=INFO``), and by the server itself ("... serving again
1.23s after it died").
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import re
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from cifar_serve.client import CifarServeError, Client
from cifar_serve.v1 import classifier_pb2 as pb
from cifar_serve.v1 import classifier_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

WORKERS = 2
SERVING = health_pb2.HealthCheckResponse.SERVING
# A connection of its own per channel (grpc shares one per target in a process by default), so
# the kernel's SO_REUSEPORT balancing spreads the channels over the workers.
OWN_CONNECTION = ("grpc.use_local_subchannel_pool", 1)


class Server:
    def __init__(self, proc: subprocess.Popen[str], port: int, metrics_port: int, log: Path) -> None:
        self.proc, self.port, self.metrics_port, self.log = proc, port, metrics_port, log

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def text(self) -> str:
        return self.log.read_text()

    def pids(self, role: str) -> list[int]:
        """Pids of the children whose log lines carry ``role`` (``model`` or ``worker-N``), oldest first."""
        seen: dict[int, None] = {}
        for p in re.findall(rf" {role}:(\d+) ", self.text()):
            seen.setdefault(int(p))
        return list(seen)

    def wait_log(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        end = time.monotonic() + timeout
        while (found := re.search(pattern, self.text())) is None:
            assert time.monotonic() < end, f"never logged {pattern!r}:\n{self.text()}"
            time.sleep(0.05)
        return found

    def metric(self, name: str, labels: dict[str, str]) -> float:
        page = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read()
        for family in text_string_to_metric_families(page.decode()):
            for s in family.samples:
                if s.name == name and s.labels == labels:
                    return float(s.value)
        raise AssertionError(f"no {name}{labels} on /metrics")

    def serving(self, checks: int = 6) -> bool:
        """SERVING on ``checks`` fresh connections (each may land on any worker)."""
        for _ in range(checks):
            with grpc.insecure_channel(self.address, options=[OWN_CONNECTION]) as ch:
                try:
                    status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
                except grpc.RpcError:
                    return False
                if status.status != SERVING:
                    return False
        return True

    def wait_serving(self, timeout: float = 30) -> float:
        """Seconds until every worker answers SERVING again."""
        started = time.monotonic()
        while not self.serving():
            assert time.monotonic() < started + timeout and self.proc.poll() is None, self.text()
            time.sleep(0.05)
        return time.monotonic() - started


@pytest.fixture
def start(start_workers: Any) -> Callable[..., Server]:
    return lambda *extra: Server(*start_workers(WORKERS, *extra))


def _request(sample: Any, i: int) -> pb.ClassifyRequest:
    x = sample.images[i : i + 1]
    return pb.ClassifyRequest(packed=pb.PackedImages(data=x.tobytes(), count=1), include_logits=True)


class Load:
    """Callers classifying one image after another until stopped, each on its own connection.

    ``library`` callers use the client library (which retries UNAVAILABLE and lost connections);
    ``raw`` callers make plain grpc calls, waiting for a connection when there is none, so a
    failure is a call that was in flight, or refused, never one that found no connection.
    """

    def __init__(self, address: str, sample: Any, offline_logits: np.ndarray, library: int, raw: int):
        self.address, self.sample, self.offline = address, sample, offline_logits
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.ok = 0
        self.library_failures: list[str] = []
        self.raw_failures: list[tuple[grpc.StatusCode, str]] = []
        self.wrong: list[int] = []
        self.pool = cf.ThreadPoolExecutor(library + raw)
        self.futures = [self.pool.submit(self._library, i) for i in range(library)]
        self.futures += [self.pool.submit(self._raw, library + i) for i in range(raw)]

    def _check(self, i: int, logits: np.ndarray) -> None:
        with self.lock:
            self.ok += 1
            if not np.allclose(logits, self.offline[i], atol=1e-4, rtol=0):
                self.wrong.append(i)

    def _library(self, seed: int) -> None:
        with Client(self.address, timeout=30, options=[OWN_CONNECTION]) as client:
            i = seed
            while not self.stop.is_set():
                i = (i + 1) % len(self.sample)
                try:
                    (answer,) = client.classify(self.sample.images[i], include_logits=True)
                except CifarServeError as exc:
                    with self.lock:
                        self.library_failures.append(f"{exc.code.name}: {exc.message}")
                    continue
                assert answer.logits is not None
                self._check(i, answer.logits)

    def _raw(self, seed: int) -> None:
        with grpc.insecure_channel(self.address, options=[OWN_CONNECTION]) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            i = seed
            while not self.stop.is_set():
                i = (i + 1) % len(self.sample)
                try:
                    answer = stub.Classify(_request(self.sample, i), timeout=30, wait_for_ready=True)
                except grpc.RpcError as exc:
                    with self.lock:
                        self.raw_failures.append((exc.code(), str(exc.details())))
                    self.stop.wait(0.05)  # a caller's own back-off: the 2 cores are the server's
                    continue
                self._check(i, np.asarray(answer.results[0].logits, np.float32))

    def wait_ok(self, more: int, timeout: float = 60) -> None:
        """Until ``more`` further calls have been answered."""
        target, end = self.ok + more, time.monotonic() + timeout
        while self.ok < target:
            assert time.monotonic() < end, f"only {self.ok} of {target} answered"
            assert not any(f.done() for f in self.futures), [f.exception() for f in self.futures if f.done()]
            time.sleep(0.02)

    def finish(self) -> None:
        self.stop.set()
        for f in self.futures:
            f.result()
        self.pool.shutdown()


def test_a_killed_worker_is_replaced_and_the_client_library_sees_no_failure(
    start: Callable[..., Server], sample: Any, offline_logits: np.ndarray
) -> None:
    began = time.monotonic()
    srv = start()
    (victim,) = srv.pids("worker-0")
    load = Load(srv.address, sample, offline_logits, library=16, raw=8)
    try:
        load.wait_ok(200)
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        found = srv.wait_log(r"worker-0 serving again ([\d.]+)s after it died")
        replaced_s = time.monotonic() - killed
        load.wait_ok(200)  # the survivor and the replacement answer on
    finally:
        load.finish()
    log = srv.text()
    assert "worker-0 killed by SIGKILL; restarting (1 of 5 in 60s)" in log, log
    (_, replacement) = srv.pids("worker-0")
    # The client library retried what the dead worker held: not one call failed.
    assert load.library_failures == [], load.library_failures
    # Plain calls failed only where they were in flight on the dead worker (one per caller at most).
    assert len(load.raw_failures) <= 8 and {c for c, _ in load.raw_failures} <= {grpc.StatusCode.UNAVAILABLE}
    assert load.wrong == []
    assert srv.proc.poll() is None
    assert srv.metric("cifar_serve_process_restarts_total", {"role": "worker"}) == 1
    assert srv.metric("cifar_serve_process_restarts_total", {"role": "model"}) == 0
    # New connections reach the replacement too (all twelve on the other worker: odds 1 in 4096).
    channels = [grpc.insecure_channel(srv.address, options=[OWN_CONNECTION]) for _ in range(12)]
    for i, ch in enumerate(channels):
        pb_grpc.ClassifierStub(ch).Classify(_request(sample, i), timeout=30)
        ch.close()
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(timeout=60) == 0, srv.text()
    assert re.search(rf"worker-0:{replacement} .*worker exiting; answered .*Classify/OK=\d+", srv.text())
    logger.info(
        f"worker kill: {len(load.library_failures)} client-library failures, {len(load.raw_failures)} "
        f"raw failures ({load.ok} answered); replacement serving {float(found[1]):.2f}s after the "
        f"supervisor noticed, {replaced_s:.2f}s after the kill; test {time.monotonic() - began:.1f}s"
    )


def test_a_killed_model_process_is_restarted_and_calls_get_only_unavailable_meanwhile(
    start: Callable[..., Server], sample: Any, offline_logits: np.ndarray
) -> None:
    began = time.monotonic()
    srv = start()
    (victim,) = srv.pids("model")
    watch_channel = grpc.insecure_channel(srv.address)
    watch = health_pb2_grpc.HealthStub(watch_channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)
    assert next(watch).status == SERVING
    load = Load(srv.address, sample, offline_logits, library=0, raw=8)
    try:
        load.wait_ok(100)
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        # This worker's health turns NOT_SERVING, then SERVING once the new model process is warm.
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert next(watch).status == SERVING
        srv.wait_serving()
        serving_s = time.monotonic() - killed
        failed_before = len(load.raw_failures)
        load.wait_ok(100)  # right answers again (checked against the offline logits)
    finally:
        load.finish()
        watch.cancel()
        watch_channel.close()
    log = srv.text()
    assert "model killed by SIGKILL; restarting (1 of 5 in 60s)" in log, log
    assert re.search(r"model ready again [\d.]+s after it died", log), log
    # Only UNAVAILABLE, each saying that the model is restarting; none after it was back.
    codes = {c for c, _ in load.raw_failures}
    assert codes <= {grpc.StatusCode.UNAVAILABLE}, load.raw_failures
    assert all("model process restarting" in d for _, d in load.raw_failures), load.raw_failures
    assert len(load.raw_failures) == failed_before
    assert load.wrong == []
    assert srv.metric("cifar_serve_process_restarts_total", {"role": "model"}) == 1
    assert len(srv.pids("model")) == 2 and srv.proc.poll() is None
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(timeout=60) == 0, srv.text()
    logger.info(
        f"model kill: {len(load.raw_failures)} raw calls failed (all UNAVAILABLE: "
        f"{sum('exited' in d for _, d in load.raw_failures)} in flight, the rest refused while it "
        f"restarted; {load.ok} answered); "
        f"SERVING again {serving_s:.2f}s after the kill; test {time.monotonic() - began:.1f}s"
    )


def test_a_crash_loop_makes_the_server_exit_non_zero(start: Callable[..., Server]) -> None:
    began = time.monotonic()
    srv = start("--max-restarts", "1")
    (first,) = srv.pids("worker-1")
    os.kill(first, signal.SIGKILL)
    srv.wait_log("worker-1 serving again")
    (_, second) = srv.pids("worker-1")
    os.kill(second, signal.SIGKILL)
    assert srv.proc.wait(timeout=60) == 1, srv.text()
    log = srv.text()
    assert "worker-1 killed by SIGKILL; restarting (1 of 1 in 60s)" in log, log
    assert "worker-1 killed by SIGKILL; not restarting it (a crash loop: 1 restarts within 60s" in log, log
    # The others drained instead of being killed.
    assert re.search(r"worker-0:\d+ .*worker exiting; answered", log), log
    logger.info(f"crash loop: exited 1; test {time.monotonic() - began:.1f}s")
