"""The RPC edge over a fake model (fast tier): readiness, auth, accounting, bounds, errors, streams."""

from __future__ import annotations

import logging
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cifar_serve.v1 import classifier_pb2 as pb
from cifar_serve.v1 import classifier_pb2_grpc as pb_grpc
from cifar_serve.v1 import open_inference_pb2 as oip
from cifar_serve.v1 import open_inference_pb2_grpc as oip_grpc

pytestmark = pytest.mark.fast

RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, size=(256, 32, 32, 3), dtype=np.uint8)


def _classify(n: int = 1, offset: int = 0) -> pb.ClassifyRequest:
    x = IMAGES[offset : offset + n]
    return pb.ClassifyRequest(packed=pb.PackedImages(data=x.tobytes(), count=n), include_logits=True)


def _logits(resp: pb.ClassifyResponse) -> np.ndarray:
    return np.array([list(r.logits) for r in resp.results], np.float32)


def _infer(n: int = 1, offset: int = 0, id: str = "") -> oip.ModelInferRequest:
    req = oip.ModelInferRequest(model_name="cifar10_resnet18", id=id)
    req.inputs.add(name="images", datatype="UINT8", shape=[n, 32, 32, 3])
    req.raw_input_contents.append(IMAGES[offset : offset + n].tobytes())
    return req


def _metric(srv: Any, name: str, labels: dict[str, str] | None = None) -> float:
    value = srv.server.metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else float(value)


def _wait_for(predicate: Any, what: str, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def channel_to() -> Iterator[Any]:
    opened: list[grpc.Channel] = []

    def open_(srv: Any) -> grpc.Channel:
        ch = grpc.insecure_channel(srv.address)
        opened.append(ch)
        return ch

    yield open_
    for ch in opened:
        ch.close()


# --------------------------------------------------------------------------- readiness (defect 2)


def test_warming_up_answers_unavailable_then_the_client_retry_gets_an_answer(
    fake_server: Any, fake_runtime: Any, channel_to: Any
) -> None:
    from cifar_serve.client import Client

    fake_runtime.warm_gate.clear()
    srv = fake_server(wait_ready=False)
    ch = channel_to(srv)
    with pytest.raises(grpc.RpcError) as info:
        pb_grpc.ClassifierStub(ch).Classify(_classify(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "warming up" in (info.value.details() or "")
    v2 = oip_grpc.GRPCInferenceServiceStub(ch)
    with pytest.raises(grpc.RpcError) as info:
        v2.ModelInfer(_infer(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # Probes answer while warming up, and say "not ready".
    assert v2.ServerLive(oip.ServerLiveRequest(), timeout=10).live
    assert not v2.ServerReady(oip.ServerReadyRequest(), timeout=10).ready
    health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING

    answers: list[Any] = []
    with Client(srv.address, timeout=30, retries=8, backoff=0.05) as client:
        caller = threading.Thread(target=lambda: answers.append(client.classify(IMAGES[:2], top_k=1)))
        caller.start()
        time.sleep(0.3)  # let the first attempts meet the warm-up (the outcome does not depend on it)
        fake_runtime.warm_gate.set()
        caller.join(30)
    assert len(answers) == 1 and len(answers[0]) == 2
    assert [r.class_index for r in answers[0]] == list(np.argmax(fake_runtime.expected(IMAGES[:2]), axis=1))
    assert v2.ServerReady(oip.ServerReadyRequest(), timeout=10).ready


# --------------------------------------------------------------------------- accounting (defect 4)


def test_inflight_counts_each_call_once_for_every_handler_kind(
    fake_server: Any, fake_runtime: Any, channel_to: Any
) -> None:
    srv = fake_server()
    ch = channel_to(srv)
    fake_runtime.gate.clear()
    fake_runtime.entered.clear()
    unary = pb_grpc.ClassifierStub(ch).Classify.future(_classify(), timeout=30)
    assert fake_runtime.entered.wait(10)
    assert _metric(srv, "cifar_serve_inflight_requests") == 1
    fake_runtime.gate.set()
    assert len(unary.result().results) == 1
    _wait_for(lambda: _metric(srv, "cifar_serve_inflight_requests") == 0, "the unary call to end")

    fake_runtime.gate.clear()
    fake_runtime.entered.clear()
    release = threading.Event()

    def requests() -> Iterator[oip.ModelInferRequest]:
        yield _infer(id="a")
        release.wait(30)

    stream = oip_grpc.GRPCInferenceServiceStub(ch).ModelStreamInfer(requests(), timeout=30)
    assert fake_runtime.entered.wait(10)
    assert _metric(srv, "cifar_serve_inflight_requests") == 1
    fake_runtime.gate.set()
    release.set()
    assert [r.infer_response.id for r in stream] == ["a"]
    _wait_for(lambda: _metric(srv, "cifar_serve_inflight_requests") == 0, "the stream to end")
    assert _metric(srv, "cifar_serve_requests_total", {"method": "ModelStreamInfer", "code": "OK"}) == 1
    assert (
        _metric(srv, "cifar_serve_stream_messages_total", {"method": "ModelStreamInfer", "code": "OK"}) == 1
    )


# --------------------------------------------------------------------------- memory bound (defect 6)


def test_request_bytes_in_flight_are_bounded(fake_server: Any, fake_runtime: Any, channel_to: Any) -> None:
    srv = fake_server(max_receive_message_bytes=64 * 1024, max_inflight_request_bytes=100 * 1024)
    stub = pb_grpc.ClassifierStub(channel_to(srv))
    fake_runtime.gate.clear()
    fake_runtime.entered.clear()
    held = stub.Classify.future(_classify(18), timeout=30)  # ~55 KB, held while the model is gated
    assert fake_runtime.entered.wait(10)
    assert _metric(srv, "cifar_serve_inflight_request_bytes") > 50_000
    with pytest.raises(grpc.RpcError) as info:
        stub.Classify(_classify(18, offset=18), timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-inflight-request-bytes" in (info.value.details() or "")
    fake_runtime.gate.set()
    np.testing.assert_array_equal(_logits(held.result()), fake_runtime.expected(IMAGES[:18]))
    _wait_for(lambda: _metric(srv, "cifar_serve_inflight_request_bytes") == 0, "the bytes to be released")
    np.testing.assert_array_equal(
        _logits(stub.Classify(_classify(18, offset=18), timeout=10)), fake_runtime.expected(IMAGES[18:36])
    )


# --------------------------------------------------------------------------- errors (defect 7)


def test_unexpected_error_is_logged_with_traceback_and_answered_internal(
    fake_server: Any, fake_runtime: Any, channel_to: Any, caplog: pytest.LogCaptureFixture
) -> None:
    srv = fake_server()

    def broken() -> dict[str, object]:
        raise KeyError("a bug in describe()")

    fake_runtime.describe = broken
    caplog.set_level(logging.ERROR, logger="cifar_serve.server.edge")
    stub = pb_grpc.ClassifierStub(channel_to(srv))
    with pytest.raises(grpc.RpcError) as info:
        stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "KeyError" in (info.value.details() or "")
    logged = [r for r in caplog.records if "GetModelInfo" in r.getMessage()]
    assert logged and logged[0].exc_info is not None and "a bug in describe()" in str(logged[0].exc_info[1])
    assert len(stub.Classify(_classify(), timeout=10).results) == 1  # and the server carries on


def test_malformed_bytes_are_invalid_argument_for_unary_and_stream(fake_server: Any, channel_to: Any) -> None:
    srv = fake_server()
    ch = channel_to(srv)
    garbage = b"\xff\xff\xff\xff"
    with pytest.raises(grpc.RpcError) as info:
        ch.unary_unary("/cifar_serve.v1.Classifier/Classify")(garbage, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:
        list(
            ch.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")(iter([garbage]), timeout=10)
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed request message" in (info.value.details() or "")


# --------------------------------------------------------------------------- auth (defect 8)


def test_bearer_token_is_compared_in_constant_time(
    fake_server: Any, channel_to: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hmac

    from cifar_serve.server import admission as edge

    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(edge.hmac, "compare_digest", spy)
    srv = fake_server(auth_token="s3cret")
    stub = pb_grpc.ClassifierStub(channel_to(srv))
    for metadata in ([], [("authorization", "Bearer wrong")], [("authorization", "Bearer s3cret-and-more")]):
        with pytest.raises(grpc.RpcError) as info:
            stub.Classify(_classify(), timeout=10, metadata=metadata)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (
        len(stub.Classify(_classify(), timeout=10, metadata=[("authorization", "Bearer s3cret")]).results)
        == 1
    )
    assert (b"Bearer s3cret", b"Bearer s3cret") in compared
    assert len(compared) == 3  # every presented token went through compare_digest, never ==
    # Health stays open for load balancers.
    health = health_pb2_grpc.HealthStub(channel_to(srv)).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


# --------------------------------------------------------------------------- streams (defect 3)


def test_stream_stops_reading_when_the_client_stops_reading_and_cleans_up_on_disconnect(
    fake_server: Any, channel_to: Any
) -> None:
    from cifar_serve.server.servicer import STREAM_WINDOW

    srv = fake_server(metrics_port=0)
    # Without BDP probing the HTTP/2 window stays at 64 KiB, so the transport holds only a few
    # hundred answers and the server's own bound shows at once (with it, grpc grows the window to
    # megabytes of small answers first).
    ch = grpc.insecure_channel(srv.address, options=[("grpc.http2.bdp_probe", 0)])
    sent = 0

    def requests() -> Iterator[pb.ClassifyStreamRequest]:
        nonlocal sent
        for i in range(50_000):
            sent += 1
            yield pb.ClassifyStreamRequest(id=str(i), request=_classify(1, offset=i % 256))

    call = pb_grpc.ClassifierStub(ch).ClassifyStream(requests(), timeout=60)
    # Never read the answers: the server must stop taking requests, not buffer answers.
    _wait_for(lambda: _metric(srv, "cifar_serve_stream_items") > 0, "the stream to start")
    last = -1
    while sent != last:  # until the client is held back by flow control
        last = sent
        time.sleep(0.5)
        assert _metric(srv, "cifar_serve_stream_items") <= STREAM_WINDOW
    assert sent < 50_000, "the server read the whole stream although nobody read its answers"
    assert _metric(srv, "cifar_serve_stream_items") <= STREAM_WINDOW
    # Others are still answered.
    other = pb_grpc.ClassifierStub(channel_to(srv)).Classify(_classify(3), timeout=10)
    assert len(other.results) == 3
    call.cancel()
    _wait_for(lambda: _metric(srv, "cifar_serve_stream_items") == 0, "the stream's tasks to be cancelled")
    _wait_for(lambda: _metric(srv, "cifar_serve_inflight_requests") == 0, "the stream call to end")
    body = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()
    assert "cifar_serve_stream_items 0.0" in body
    ch.close()


def test_streams_answer_in_order_with_errors_in_band(fake_server: Any, channel_to: Any) -> None:
    srv = fake_server()
    reqs = [pb.ClassifyStreamRequest(id=str(i), request=_classify(1, offset=i)) for i in range(100)]
    reqs[7] = pb.ClassifyStreamRequest(id="7", request=pb.ClassifyRequest())  # no images
    answers = list(pb_grpc.ClassifierStub(channel_to(srv)).ClassifyStream(iter(reqs), timeout=30))
    assert [a.id for a in answers] == [str(i) for i in range(100)]
    assert answers[7].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "no images" in answers[7].error_message
    for i in (0, 50, 99):
        np.testing.assert_array_equal(
            np.array(answers[i].response.results[0].logits, np.float32), IMAGES[i].reshape(-1)[:10]
        )


# --------------------------------------------------------------------------- the batcher's supervision


def test_a_dead_batcher_fails_waiting_callers_at_once_and_turns_not_serving(
    fake_server: Any, fake_runtime: Any, channel_to: Any
) -> None:
    srv = fake_server()
    ch = channel_to(srv)
    batcher = srv.server.core.batcher
    fake_runtime.gate.clear()
    fake_runtime.entered.clear()
    stub = pb_grpc.ClassifierStub(ch)
    first = stub.Classify.future(_classify(1), timeout=30)
    assert fake_runtime.entered.wait(10)
    waiting = stub.Classify.future(_classify(2, offset=1), timeout=30)
    _wait_for(lambda: batcher.queued_images == 2, "the second call to queue")

    def bug() -> None:
        raise RuntimeError("a bug in the collector")

    batcher._take = bug  # the collector's next step raises: the task dies
    fake_runtime.gate.set()
    with pytest.raises(grpc.RpcError) as info:
        waiting.result(timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "batcher failed" in (info.value.details() or "")
    assert len(first.result(timeout=10).results) == 1  # the batch that was computing still answers
    assert srv.server.failed.is_set() and srv.server.exit_code == 1
    health = health_pb2_grpc.HealthStub(ch)
    _wait_for(
        lambda: (
            health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            == health_pb2.HealthCheckResponse.NOT_SERVING
        ),
        "health to turn NOT_SERVING",
    )
    with pytest.raises(grpc.RpcError) as info:
        stub.Classify(_classify(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


# --------------------------------------------------------------------------- lifecycle


def test_sigterm_during_warm_up_stops_at_once(fake_runtime: Any, make_settings: Any, tmp_path: Any) -> None:
    """The warm-up never ends here: the server must stop without waiting for it."""
    import asyncio
    import os
    import signal

    from cifar_serve.server.app import CifarServer
    from cifar_serve.server.launch import serve
    from cifar_serve.server.lifecycle import State

    fake_runtime.warm_gate.clear()
    settings = make_settings(tmp_path, workers=1, metrics_port=-1, http_port=-1)

    async def main() -> tuple[int, State]:
        server = CifarServer(settings, runtime=fake_runtime)
        running = asyncio.ensure_future(serve(settings, server=server))
        while server.lifecycle.state is State.STARTING and server.port == 0:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert server.lifecycle.state is State.STARTING  # still warming up
        os.kill(os.getpid(), signal.SIGTERM)
        code = await asyncio.wait_for(running, 30)
        return code, server.lifecycle.state

    try:
        code, state = asyncio.run(main())
    finally:
        fake_runtime.warm_gate.set()
    assert code == 0
    assert state is State.STOPPED


def test_check_sample_runs_in_batches_the_runtime_takes() -> None:
    """A runtime built for batches of at most 4 (CUDA graphs up to --max-batch-size) still passes
    the manifest's 8-image check on a reload."""
    import base64
    from types import SimpleNamespace

    from cifar_serve.server.core import check_sample

    images = np.arange(8 * 32 * 32 * 3, dtype=np.uint32).astype(np.uint8).reshape(8, 32, 32, 3)

    class Capped:
        def __init__(self) -> None:
            logits = images.reshape(8, -1)[:, :10].astype(np.float32)
            self.manifest = SimpleNamespace(
                raw={
                    "check_sample": {
                        "count": 8,
                        "images_b64": base64.b64encode(images.tobytes()).decode(),
                        "logits": logits.tolist(),
                        "atol": 1e-4,
                    }
                }
            )

        def infer(self, x: np.ndarray) -> np.ndarray:
            assert len(x) <= 4, f"a batch of {len(x)}, more than this runtime was built for"
            return x.reshape(len(x), -1)[:, :10].astype(np.float32)

        def describe(self) -> dict[str, object]:
            return {"precision": "fp32"}

    assert "8 sample images match" in check_sample(Capped(), max_batch=4)  # type: ignore[arg-type]


def test_out_of_descriptors_is_resource_exhausted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registering a region when the process has no descriptor left: RESOURCE_EXHAUSTED saying so."""
    import errno
    import os
    import uuid
    from pathlib import Path

    from cifar_serve.server import shm
    from cifar_serve.server.errors import ResourceExhausted

    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm on this host")
    key = f"/cifar-serve-test-{uuid.uuid4().hex}"
    Path("/dev/shm" + key).write_bytes(b"\0" * 64)
    registry = shm.SharedMemoryRegistry()
    real_open = os.open

    def no_descriptors(path: Any, *args: Any, **kw: Any) -> int:
        if str(path).startswith("/dev/shm/cifar-serve-test-"):
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, *args, **kw)

    try:
        monkeypatch.setattr(shm.os, "open", no_descriptors)
        with pytest.raises(ResourceExhausted) as info:
            registry.register("r", key, 0, 16)
        assert "file descriptors" in info.value.message
        monkeypatch.undo()
        registry.register("r", key, 0, 16)  # descriptors back: the same call works
    finally:
        registry.close()
        Path("/dev/shm" + key).unlink()


def test_an_exposed_server_without_tokens_says_so(
    make_settings: Any, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from cifar_serve.server.app import warn_exposure

    caplog.set_level(logging.WARNING, logger="cifar_serve.server.app")
    warn_exposure(make_settings(tmp_path, host="127.0.0.1"))
    warn_exposure(make_settings(tmp_path, host="::1"))
    assert not caplog.records  # loopback: only this host reaches it
    warn_exposure(make_settings(tmp_path, host="0.0.0.0", model_control_mode="explicit"))
    messages = [r.getMessage() for r in caplog.records]
    assert any("--auth-token" in m for m in messages)
    assert any("--admin-token" in m for m in messages)
    caplog.clear()
    warn_exposure(make_settings(tmp_path, host="0.0.0.0", auth_token="a", admin_token="b"))
    assert not caplog.records


# --------------------------------------------------------------------------- the event loop


@pytest.mark.parametrize("kind", ["uvloop", "asyncio"])
def test_each_event_loop_serves_unary_streams_and_rest_alike(
    fake_server: Any, fake_runtime: Any, channel_to: Any, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    import json

    with caplog.at_level(logging.INFO, logger="cifar_serve.server.app"):
        srv = fake_server(event_loop=kind, log_level="INFO")
    assert f"on {kind}'s event loop" in caplog.text
    ch = channel_to(srv)
    want = fake_runtime.expected(IMAGES[:8])
    unary = pb_grpc.ClassifierStub(ch).Classify(_classify(8), timeout=30)
    np.testing.assert_allclose(_logits(unary), want, rtol=1e-6)
    stream = oip_grpc.GRPCInferenceServiceStub(ch).ModelStreamInfer(
        iter([_infer(1, i, id=str(i)) for i in range(8)]), timeout=30
    )
    got = [np.frombuffer(a.infer_response.raw_output_contents[0], np.float32) for a in stream]
    np.testing.assert_allclose(np.stack(got), want, rtol=1e-6)
    tensor = {
        "name": "images",
        "datatype": "UINT8",
        "shape": [1, 32, 32, 3],
        "data": IMAGES[0].ravel().tolist(),
    }
    body = json.dumps({"inputs": [tensor]}).encode()
    url = f"http://127.0.0.1:{srv.server.http_port}/v2/models/cifar10_resnet18/infer"
    with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=30) as resp:
        answer = json.loads(resp.read())
    np.testing.assert_allclose(np.array(answer["outputs"][0]["data"], np.float32), want[0], rtol=1e-6)


# --------------------------------------------------------------------------- streams when draining


@pytest.mark.parametrize("api", ["ClassifyStream", "ModelStreamInfer"])
def test_a_draining_server_answers_what_a_stream_sent_then_ends_it(
    fake_server: Any, fake_runtime: Any, channel_to: Any, api: str
) -> None:
    import queue

    from cifar_serve.server.lifecycle import State

    srv = fake_server(grace_period_s=60.0)
    life = srv.server.lifecycle
    outgoing: queue.Queue[Any] = queue.Queue()

    def requests() -> Any:
        while (item := outgoing.get()) is not None:
            yield item

    def request(i: int) -> Any:
        if api == "ClassifyStream":
            return pb.ClassifyStreamRequest(id=str(i), request=_classify(1, i))
        return _infer(1, i, id=str(i))

    ch = channel_to(srv)
    if api == "ClassifyStream":
        answers = pb_grpc.ClassifierStub(ch).ClassifyStream(requests(), timeout=60)
    else:
        answers = oip_grpc.GRPCInferenceServiceStub(ch).ModelStreamInfer(requests(), timeout=60)
    fake_runtime.gate.clear()
    fake_runtime.entered.clear()
    outgoing.put(request(0))
    outgoing.put(request(1))
    assert fake_runtime.entered.wait(10)
    # Wait until the server has read request 1 too (in the model's batch or queued behind it),
    # or the drain may begin while 1 is still in flight and rightly leave it unread.
    batcher = srv.server.core.batcher
    _wait_for(lambda: fake_runtime.batches[-1] + batcher.queued_images == 2, "the server to read both")
    stopper = threading.Thread(target=srv.stop, kwargs={"grace": 60.0})
    stopper.start()
    _wait_for(lambda: life.state is State.DRAINING, "the drain")
    outgoing.put(request(2))  # sent after the drain began: never read
    fake_runtime.gate.set()
    got: list[str] = []
    with pytest.raises(grpc.RpcError) as info:
        for a in answers:
            got.append(a.id if api == "ClassifyStream" else a.infer_response.id)
    # The two requests read before the drain were answered; then the stream ended on its own,
    # long before the 60 s grace period (which the test's bounds do not leave time for).
    assert got == ["0", "1"]
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "this stream takes no more requests" in (info.value.details() or "")
    outgoing.put(None)
    stopper.join(30)
    assert not stopper.is_alive()


# --------------------------------------------------------------------------- a request's own timeout


@pytest.mark.parametrize("api", ["ClassifyStream", "ModelStreamInfer", "ModelInfer"])
def test_a_request_whose_own_timeout_runs_out_in_the_queue_is_answered_and_never_computed(
    fake_server: Any, fake_runtime: Any, channel_to: Any, api: str
) -> None:
    """A stream item's ``timeout_us`` (native) or v2's ``timeout`` parameter (Triton's, in
    microseconds) is its deadline in the queue, where the stream's or call's deadline is far."""
    import queue

    srv = fake_server()
    ch = channel_to(srv)
    native = pb_grpc.ClassifierStub(ch)
    v2 = oip_grpc.GRPCInferenceServiceStub(ch)
    fake_runtime.gate.clear()
    fake_runtime.entered.clear()
    blocker = native.Classify.future(_classify(1, 0), timeout=60)  # holds the model
    assert fake_runtime.entered.wait(10)

    def request(i: int, timeout_us: int) -> Any:
        if api == "ClassifyStream":
            return pb.ClassifyStreamRequest(id=str(i), request=_classify(2, i), timeout_us=timeout_us)
        req = _infer(2, i, id=str(i))
        if timeout_us:
            req.parameters["timeout"].int64_param = timeout_us
        return req

    batcher = srv.server.core.batcher
    if api == "ModelInfer":
        late = v2.ModelInfer.future(request(1, 200_000), timeout=60)
        _wait_for(lambda: batcher.queued_images == 2, "the request to queue")
        time.sleep(0.3)  # past its own timeout, far from the call's
        fake_runtime.gate.set()
        with pytest.raises(grpc.RpcError) as info:
            late.result(timeout=30)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value.details()
        assert "not computed" in (info.value.details() or "")
        answered = v2.ModelInfer(request(3, 0), timeout=30)
        assert answered.id == "3"
    else:
        outgoing: queue.Queue[Any] = queue.Queue()

        def requests() -> Any:
            while (item := outgoing.get()) is not None:
                yield item

        if api == "ClassifyStream":
            answers = native.ClassifyStream(requests(), timeout=60)
        else:
            answers = v2.ModelStreamInfer(requests(), timeout=60)
        outgoing.put(request(1, 200_000))
        _wait_for(lambda: batcher.queued_images == 2, "the stream's first request to queue")
        time.sleep(0.3)
        fake_runtime.gate.set()
        outgoing.put(request(3, 0))  # no timeout of its own: the stream carries on and answers it
        outgoing.put(None)
        got = list(answers)
        assert len(got) == 2
        if api == "ClassifyStream":
            assert (got[0].id, got[0].error_code) == ("1", grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
            assert "not computed" in got[0].error_message
            assert (got[1].id, got[1].error_code) == ("3", 0)
        else:
            assert got[0].infer_response.id == "1" and "not computed" in got[0].error_message
            assert got[1].infer_response.id == "3" and not got[1].error_message
    blocker.result(timeout=30)
    # The model saw the blocker and the last request, never the one that ran out of time.
    assert fake_runtime.batches == [1, 2]


def test_a_v2_timeout_that_is_not_a_count_of_microseconds_is_invalid(
    fake_server: Any, channel_to: Any
) -> None:
    v2 = oip_grpc.GRPCInferenceServiceStub(channel_to(fake_server()))
    req = _infer(1)
    req.parameters["timeout"].string_param = "soon"
    with pytest.raises(grpc.RpcError) as info:
        v2.ModelInfer(req, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'timeout'" in (info.value.details() or "")
    req.parameters["timeout"].int64_param = -5
    with pytest.raises(grpc.RpcError) as info:
        v2.ModelInfer(req, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    req.parameters["timeout"].int64_param = 0  # none, as Triton reads it
    assert v2.ModelInfer(req, timeout=30).outputs[0].name == "logits"
