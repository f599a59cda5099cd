"""The client library retries a call a server cancelled while shutting down (fast tier).

A gRPC server that shuts down cancels the calls it had received but not yet started; the
caller did not cancel them, and a classification is safe to run again. Served here by a plain
grpc server whose first answer is exactly that.
"""

from __future__ import annotations

import threading
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2_grpc

from cifar_serve.client import CifarServeError, Client
from cifar_serve.v1 import classifier_pb2 as pb
from cifar_serve.v1 import classifier_pb2_grpc as pb_grpc

pytestmark = pytest.mark.fast


class _Flaky(pb_grpc.ClassifierServicer):
    def __init__(self, cancel_first: int, code: grpc.StatusCode) -> None:
        self.calls = 0
        self._cancel_first = cancel_first
        self._code = code
        self._lock = threading.Lock()

    def Classify(self, request: pb.ClassifyRequest, context: grpc.ServicerContext) -> pb.ClassifyResponse:
        with self._lock:
            self.calls += 1
            refuse = self.calls <= self._cancel_first
        if refuse:
            context.abort(self._code, "server shutting down")
        n = request.packed.count or len(request.images)
        pred = pb.ClassPrediction(label="cat", class_index=3, probability=1.0)
        return pb.ClassifyResponse(
            results=[pb.Classification(predictions=[pred]) for _ in range(n)], model_version="1"
        )


def _serve(servicer: _Flaky) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_ClassifierServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)  # SERVING
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def _image() -> np.ndarray:
    return np.zeros((1, 32, 32, 3), np.uint8)


def test_a_call_cancelled_by_the_server_is_retried() -> None:
    servicer = _Flaky(cancel_first=1, code=grpc.StatusCode.CANCELLED)
    server, address = _serve(servicer)
    try:
        with Client(address, retries=2, backoff=0.01) as client:
            result: Any = client.classify(_image())
        assert [r.class_index for r in result] == [3]
        assert servicer.calls == 2
    finally:
        server.stop(None)


def test_other_failures_are_not_retried() -> None:
    servicer = _Flaky(cancel_first=1, code=grpc.StatusCode.INVALID_ARGUMENT)
    server, address = _serve(servicer)
    try:
        with Client(address, retries=2, backoff=0.01) as client:
            with pytest.raises(CifarServeError) as info:
                client.classify(_image())
        assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
        assert servicer.calls == 1
    finally:
        server.stop(None)
