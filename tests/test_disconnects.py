"""A client that goes away is not a server fault: counted CANCELLED, logged without a traceback.

On both transports: REST clients that hang up in the middle of their upload, gRPC clients that
cancel calls the server is still working on.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from typing import Any

import grpc
import numpy as np
import pytest

from cifar_serve.v1 import classifier_pb2, classifier_pb2_grpc

pytestmark = pytest.mark.fast
CLIENTS = 16


def _count(srv: Any, method: str, code: str) -> float:
    value = srv.server.metrics.registry.get_sample_value(
        "cifar_serve_requests_total", {"method": method, "code": code}
    )
    return 0.0 if value is None else float(value)


def _inflight(srv: Any) -> float:
    value = srv.server.metrics.registry.get_sample_value("cifar_serve_inflight_requests", {})
    return 0.0 if value is None else float(value)


def _codes(srv: Any) -> set[str]:
    return {
        sample.labels["code"]
        for metric in srv.server.metrics.registry.collect()
        if metric.name == "cifar_serve_requests"
        for sample in metric.samples
        if sample.name == "cifar_serve_requests_total" and sample.value
    }


def _wait_for(predicate: Any, what: str, timeout: float = 60.0) -> None:
    """Poll until ``predicate()`` holds: the server counts a call when its handler has finished."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"never saw {what}")
        time.sleep(0.02)


def _hang_up_mid_upload(address: str, start: threading.Barrier) -> None:
    host, port = address.rsplit(":", 1)
    header = b'{"inputs": [{"name": "images", "datatype": "UINT8", "shape": [64, 32, 32, 3]}]}'
    body_size = len(header) + 64 * 32 * 32 * 3
    with socket.create_connection((host, int(port)), timeout=30) as s:
        start.wait()
        head = (
            "POST /v2/models/cifar10_resnet18/infer HTTP/1.1\r\nHost: test\r\n"
            "Content-Type: application/octet-stream\r\n"
            f"Inference-Header-Content-Length: {len(header)}\r\nContent-Length: {body_size}\r\n\r\n"
        )
        s.sendall(
            head.encode() + header + b"\0" * 4096  # a sliver of the pixels, then gone
        )
        # RST rather than FIN: the connection is dropped, as by a killed process or a lost network.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def test_rest_clients_that_hang_up_mid_upload_are_cancelled_not_errors(
    fake_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    srv = fake_server()
    caplog.set_level(logging.DEBUG)
    start = threading.Barrier(CLIENTS)
    clients = [
        threading.Thread(target=_hang_up_mid_upload, args=(srv.http_address, start)) for _ in range(CLIENTS)
    ]
    for t in clients:
        t.start()
    for t in clients:
        t.join()
    _wait_for(lambda: _count(srv, "REST/ModelInfer", "CANCELLED") == CLIENTS, "16 CANCELLED uploads")
    assert "INTERNAL" not in _codes(srv) and "UNKNOWN" not in _codes(srv)
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not loud, [r.getMessage() for r in loud]
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    # The server is none the worse: the next upload is answered.
    x = np.zeros((1, 32, 32, 3), np.uint8)
    with grpc.insecure_channel(srv.address) as ch:
        reply = classifier_pb2_grpc.ClassifierStub(ch).Classify(
            classifier_pb2.ClassifyRequest(packed=classifier_pb2.PackedImages(data=x.tobytes(), count=1)),
            timeout=30,
        )
    assert len(reply.results) == 1


def test_grpc_clients_that_cancel_are_cancelled_not_errors(
    fake_server: Any, fake_runtime: Any, caplog: pytest.LogCaptureFixture
) -> None:
    srv = fake_server()
    caplog.set_level(logging.DEBUG)
    fake_runtime.gate.clear()  # the calls stay in the server until their clients cancel them
    x = np.zeros((1, 32, 32, 3), np.uint8)
    request = classifier_pb2.ClassifyRequest(packed=classifier_pb2.PackedImages(data=x.tobytes(), count=1))
    with grpc.insecure_channel(srv.address) as ch:
        stub = classifier_pb2_grpc.ClassifierStub(ch)
        calls = [stub.Classify.future(request, timeout=60) for _ in range(CLIENTS)]
        # Every call is in a handler (one in the held forward pass, the rest queued behind it)
        # before its client goes: a call cancelled on the wire never reaches the server to count.
        _wait_for(lambda: _inflight(srv) == CLIENTS, "16 calls in flight")
        for call in calls:
            call.cancel()
        # Counted as each cancellation reaches the server, the held one's too: the forward pass
        # opens only then (opened sooner, it could answer a call whose cancellation is still on
        # its way, and that call would rightly count OK).
        _wait_for(lambda: _count(srv, "Classify", "CANCELLED") == CLIENTS, "16 CANCELLED calls")
        fake_runtime.gate.set()
        assert len(stub.Classify(request, timeout=30).results) == 1
    assert "INTERNAL" not in _codes(srv) and "UNKNOWN" not in _codes(srv)
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not loud, [r.getMessage() for r in loud]
