"""``cifar-serve --workers N``: worker processes on shared ports, one model process behind them.

Real ``cifar-serve`` processes on free loopback ports. What the multi-process front end adds
to a single server is checked here; everything else (both APIs, streams, limits, deadlines,
TLS, token, drain) is checked by running the API, reliability and shutdown tests a second time
with ``CIFAR_SERVE_WORKERS=2`` (``make test``).
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import re
import signal
import subprocess
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

from cifar_serve.v1 import classifier_pb2 as pb
from cifar_serve.v1 import classifier_pb2_grpc as pb_grpc

WORKERS = 2


class Server:
    def __init__(self, proc: subprocess.Popen[str], port: int, metrics_port: int, log: Path) -> None:
        self.proc, self.port, self.metrics_port, self.log = proc, port, metrics_port, log

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def text(self) -> str:
        return self.log.read_text()

    def pids(self, role: str) -> list[int]:
        """Pids of the children whose log lines carry ``role`` (``model`` or ``worker-N``)."""
        return sorted({int(p) for p in re.findall(rf" {role}:(\d+) ", self.text())})

    def metric(self, name: str) -> float:
        page = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read()
        for family in text_string_to_metric_families(page.decode()):
            for s in family.samples:
                if s.name == name and not s.labels:
                    return float(s.value)
        return 0.0


def _channel(address: str) -> grpc.Channel:
    # A connection of its own (grpc shares one per target in a process by default), so the
    # kernel's SO_REUSEPORT balancing spreads the channels over the workers.
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


@pytest.fixture
def start(start_workers: Any) -> Callable[..., Server]:
    return lambda *extra: Server(*start_workers(WORKERS, *extra))


def _request(sample: Any, i: int) -> pb.ClassifyRequest:
    x = sample.images[i : i + 1]
    return pb.ClassifyRequest(packed=pb.PackedImages(data=x.tobytes(), count=1), include_logits=True)


def test_workers_share_the_port_and_the_model_batches_across_them(
    start: Any, sample: Any, offline_logits: np.ndarray
) -> None:
    # A batch runs only when full (16 images), so one forward pass must hold all 16 calls,
    # whichever worker each connection landed on.
    srv = start("--max-batch-size", "16", "--max-batch-delay-ms", "60000", "--idle-dispatch", "false")
    assert len(srv.pids("worker-0")) == 1 and len(srv.pids("worker-1")) == 1 and len(srv.pids("model")) == 1
    batches, images = srv.metric("cifar_serve_batch_size_count"), srv.metric("cifar_serve_batch_size_sum")
    channels = [_channel(srv.address) for _ in range(16)]
    try:
        with cf.ThreadPoolExecutor(16) as pool:
            futures = [
                pool.submit(pb_grpc.ClassifierStub(ch).Classify, _request(sample, i), timeout=120)
                for i, ch in enumerate(channels)
            ]
            answers = [f.result() for f in futures]
    finally:
        for ch in channels:
            ch.close()
    for i, answer in enumerate(answers):
        np.testing.assert_allclose(answer.results[0].logits, offline_logits[i], atol=1e-4, rtol=0)
    # One /metrics for every process: batches counted by the model process, calls by the workers.
    assert srv.metric("cifar_serve_batch_size_count") - batches == 1
    assert srv.metric("cifar_serve_batch_size_sum") - images == 16
    assert srv.metric("cifar_serve_images_total") == 16
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(timeout=60) == 0, srv.text()
    log = srv.text()
    per_worker = [int(n) for n in re.findall(r"worker exiting; answered .*?Classify/OK=(\d+)", log)]
    # The kernel spread the 16 connections over both workers (all on one: odds 1 in 2**15).
    assert len(per_worker) == 2 and sum(per_worker) == 16 and min(per_worker) >= 1, log
    assert "stopped; answered Classify/OK=16" in log


def test_a_dead_model_process_fails_calls_at_once_and_the_server_exits_1(start: Any, sample: Any) -> None:
    # With restarts off (tests/test_self_healing.py has them on): the first death ends the server.
    srv = start("--max-restarts", "0")
    (model_pid,) = srv.pids("model")
    channels = [_channel(srv.address) for _ in range(4)]
    watches = [
        health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=120) for ch in channels
    ]
    assert all(next(w).status == health_pb2.HealthCheckResponse.SERVING for w in watches)
    stop_at = time.monotonic() + 120
    codes: list[grpc.StatusCode] = []

    def caller(ch: grpc.Channel) -> None:
        stub = pb_grpc.ClassifierStub(ch)
        while time.monotonic() < stop_at:
            try:
                stub.Classify(_request(sample, 0), timeout=60)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
                return

    try:
        with cf.ThreadPoolExecutor(4) as pool:
            callers = [pool.submit(caller, ch) for ch in channels]
            while codes.count(grpc.StatusCode.OK) < 8:
                time.sleep(0.05)
            os.kill(model_pid, signal.SIGKILL)
            for f in callers:
                f.result()
        # Every caller got an answer, none waited out its deadline: refused at once.
        failed = [c for c in codes if c != grpc.StatusCode.OK]
        assert len(failed) == 4 and set(failed) <= {grpc.StatusCode.UNAVAILABLE}, failed
        for w in watches:  # each worker said NOT_SERVING before it closed
            try:
                assert next(w).status == health_pb2.HealthCheckResponse.NOT_SERVING
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        for ch in channels:
            ch.close()
    assert srv.proc.wait(timeout=60) == 1, srv.text()
    assert "model killed by SIGKILL; not restarting it (--max-restarts 0)" in srv.text()


def test_a_dead_worker_is_noticed_and_the_server_exits_1(start: Any, sample: Any) -> None:
    srv = start("--max-restarts", "0")
    victim, survivor = srv.pids("worker-0")[0], srv.pids("worker-1")[0]
    os.kill(victim, signal.SIGKILL)
    assert srv.proc.wait(timeout=60) == 1, srv.text()
    log = srv.text()
    assert "worker-0 killed by SIGKILL; not restarting it (--max-restarts 0)" in log
    # The other worker drained (NOT_SERVING, then finished) instead of being killed.
    assert re.search(rf"worker-1:{survivor} .*worker exiting; answered", log), log


def test_a_shared_memory_region_registered_through_one_worker_serves_through_all(
    start: Any, sample: Any, offline_logits: np.ndarray
) -> None:
    from multiprocessing import shared_memory

    from cifar_serve.v1 import open_inference_pb2 as oip
    from cifar_serve.v1 import open_inference_pb2_grpc as oip_grpc

    srv = start()
    n = 4
    region = shared_memory.SharedMemory(create=True, size=n * 3072)
    try:
        np.frombuffer(region.buf, np.uint8)[:] = sample.images[:n].reshape(-1)
        channels = [_channel(srv.address) for _ in range(8)]
        stubs = [oip_grpc.GRPCInferenceServiceStub(ch) for ch in channels]
        stubs[0].SystemSharedMemoryRegister(
            oip.SystemSharedMemoryRegisterRequest(name="imgs", key="/" + region.name, byte_size=n * 3072),
            timeout=30,
        )
        params = {
            "shared_memory_region": oip.InferParameter(string_param="imgs"),
            "shared_memory_byte_size": oip.InferParameter(int64_param=n * 3072),
        }
        tensor = oip.ModelInferRequest.InferInputTensor(
            name="images", datatype="UINT8", shape=[n, 32, 32, 3], parameters=params
        )
        request = oip.ModelInferRequest(model_name="cifar10_resnet18", inputs=[tensor])
        for stub in stubs:  # eight connections: both workers (all on one: odds 1 in 128)
            answer = stub.ModelInfer(request, timeout=60)
            logits = np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(n, 10)
            np.testing.assert_allclose(logits, offline_logits[:n], atol=1e-4, rtol=0)
        stubs[-1].SystemSharedMemoryUnregister(
            oip.SystemSharedMemoryUnregisterRequest(name="imgs"), timeout=30
        )
        for stub in stubs:  # gone for every worker at once
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(request, timeout=60)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not registered" in str(err.value.details())
            status = stub.SystemSharedMemoryStatus(oip.SystemSharedMemoryStatusRequest(), timeout=30)
            assert not status.regions
        for ch in channels:
            ch.close()
    finally:
        region.close()
        region.unlink()


@pytest.mark.fast
@pytest.mark.parametrize("kind", ["uvloop", "asyncio"])
def test_a_link_whose_socket_arrives_late_is_still_a_link(kind: str) -> None:
    # The supervisor sends ("link",) and then the socket in a second write: a process reading the
    # pipe between the two must wait for the socket, not take the gap for the supervisor's end.
    import asyncio
    import multiprocessing
    import socket
    import threading
    from multiprocessing import reduction

    from cifar_serve.server.loops import new_event_loop
    from cifar_serve.server.workers import _watch_parent

    ours, theirs = multiprocessing.Pipe()
    peer_a, peer_b = socket.socketpair()
    got: list[Any] = []
    loop = new_event_loop(kind)

    def supervisor() -> None:
        ours.send(("link",))
        time.sleep(0.3)  # the reader is woken by the first write and reads before the second
        reduction.send_handle(ours, peer_a.fileno(), os.getpid())

    async def child() -> None:
        done = asyncio.Event()

        def on_message(message: Any) -> None:
            got.append(message)
            done.set()

        _watch_parent(theirs, on_message)
        threading.Thread(target=supervisor, daemon=True).start()
        await asyncio.wait_for(done.wait(), 10)

    try:
        loop.run_until_complete(child())
    finally:
        loop.close()
    assert len(got) == 1 and got[0] is not None and got[0][0] == "link", got
    received = got[0][1]
    received.sendall(b"x")
    assert peer_b.recv(1) == b"x"
    for s in (received, peer_a, peer_b):
        s.close()


def test_concurrent_small_requests_each_get_their_own_rows_and_count_as_requests(
    start: Any, sample: Any, offline_logits: np.ndarray
) -> None:
    # A worker sends the small requests it holds to the model process as one (server/remote.py):
    # each caller must still get exactly its own images' logits, in order, and the statistics
    # must count callers, not the messages they travelled in.
    from cifar_serve.v1 import open_inference_pb2 as oip_pb
    from cifar_serve.v1 import open_inference_pb2_grpc as oip_grpc

    srv = start()
    channels = [_channel(srv.address) for _ in range(12)]
    sizes = [1, 3, 1, 2, 5, 1, 1, 4]  # images per request, cycled: the rows lie at varied offsets

    def caller(c: int) -> list[tuple[int, int, list[list[float]]]]:
        stub = pb_grpc.ClassifierStub(channels[c])
        got = []
        for j in range(8):
            n = sizes[(c + j) % len(sizes)]
            first = (c * 40 + j * 5) % (len(sample) - n)
            x = sample.images[first : first + n]
            answer = stub.Classify(
                pb.ClassifyRequest(packed=pb.PackedImages(data=x.tobytes(), count=n), include_logits=True),
                timeout=120,
            )
            got.append((first, n, [list(r.logits) for r in answer.results]))
        return got

    stats = oip_grpc.GRPCInferenceServiceStub(channels[0])
    before = stats.ModelStatistics(oip_pb.ModelStatisticsRequest(), timeout=30).model_stats[0]
    try:
        with cf.ThreadPoolExecutor(len(channels)) as pool:
            results = [r for f in [pool.submit(caller, c) for c in range(len(channels))] for r in f.result()]
        after = stats.ModelStatistics(oip_pb.ModelStatisticsRequest(), timeout=30).model_stats[0]
    finally:
        for ch in channels:
            ch.close()
    assert len(results) == 96
    for first, n, rows in results:
        assert len(rows) == n
        np.testing.assert_allclose(np.array(rows), offline_logits[first : first + n], atol=1e-4, rtol=0)
    images = sum(n for _first, n, _rows in results)
    assert after.inference_stats.success.count - before.inference_stats.success.count == 96
    assert after.inference_count - before.inference_count == images
