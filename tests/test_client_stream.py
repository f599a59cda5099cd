"""The client library's stream lane: ``AsyncClient(stream=...)`` over ``ClassifyStream``, end to end.

Real servers on loopback ports: the shipped model (answers checked against unary calls and the
offline logits of real CIFAR-10 test images), and the fake model of the fast tier where a test
must hold a forward pass (deadlines, back-pressure, a server restarted under load).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest

from cifar_serve.client import (
    AsyncClient,
    CifarServeError,
    Classification,
    Client,
    DeadlineExceededError,
    InvalidArgumentError,
    UnauthenticatedError,
    _stream,
)

T = TypeVar("T")
ATOL = 1e-4
TOKEN = "stream-test-token"


def _run(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(make())


def _logits(results: list[Classification]) -> np.ndarray:
    assert all(r.logits is not None for r in results)
    return np.stack([r.logits for r in results])  # type: ignore[misc]


def _same(mine: list[Classification], ref: list[Classification]) -> None:
    """The same ranked classes, probabilities and logits as the reference answers."""
    assert [[q.class_index for q in r.predictions] for r in mine] == [
        [q.class_index for q in r.predictions] for r in ref
    ]
    assert [q.label for r in mine for q in r.predictions] == [q.label for r in ref for q in r.predictions]
    probs = [q.probability for r in mine for q in r.predictions]
    assert probs == pytest.approx([q.probability for r in ref for q in r.predictions], abs=ATOL)


def _stream_ok(srv: Any) -> float:
    """Requests the server answered OK inside ClassifyStream calls."""
    return srv.metric("cifar_serve_stream_messages_total", {"method": "ClassifyStream", "code": "OK"})


def _calls(srv: Any, method: str, code: str = "OK") -> float:
    return srv.metric("cifar_serve_requests_total", {"method": method, "code": code})


async def _other_tasks() -> set[asyncio.Task[Any]]:
    """The loop's tasks but this one, once grpc's own have had their turns to finish (bounded:
    a task of the client's that never ends is still there)."""
    for _ in range(100):
        others = {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}
        if not others:
            break
        await asyncio.sleep(0.01)
    return others


def _wait_for(what: str, cond: Callable[[], bool], limit: float = 30.0) -> None:
    end = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < end, f"never: {what}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def limited_server(model_dir: Path, make_settings: Callable[..., Any]) -> Iterator[Any]:
    """The shipped model, ending every stream after 5 requests, with a bearer token."""
    from cifar_serve.server.launch import ServerThread

    settings = make_settings(model_dir, max_stream_requests=5, auth_token=TOKEN, workers=1)
    with ServerThread(settings) as srv:
        yield srv


# ------------------------------------------------------------------------------- answers and order


def test_concurrent_callers_get_the_unary_answers_over_one_stream(
    server: Any, sample: Any, offline_logits: np.ndarray
) -> None:
    n = 120
    # One to three images a caller, from every class; each caller must get its own images' answers.
    picks = [[(7 * j + 11 * k) % len(sample) for k in range(1 + j % 3)] for j in range(n)]

    async def go() -> tuple[list[list[Classification]], list[list[Classification]], int]:
        async with AsyncClient(server.address, timeout=60, stream=False) as unary:
            expected = [await unary.classify(sample.images[p], top_k=3, include_logits=True) for p in picks]
        async with AsyncClient(server.address, timeout=60, stream=True) as c:
            start = asyncio.Event()

            async def caller(j: int) -> list[Classification]:
                await start.wait()
                return await c.classify(sample.images[picks[j]], top_k=3, include_logits=True)

            tasks = [asyncio.ensure_future(caller(j)) for j in range(n)]
            await asyncio.sleep(0)
            start.set()
            got = list(await asyncio.gather(*tasks))
            return got, expected, c.streams_opened

    before_stream, before_unary = _stream_ok(server), _calls(server, "Classify")
    got, expected, opened = _run(go)
    assert opened == 1
    assert _stream_ok(server) - before_stream == n  # every request went over the stream...
    assert _calls(server, "Classify") - before_unary == n  # ...and only the reference calls were unary
    for mine, ref, p in zip(got, expected, picks, strict=True):
        _same(mine, ref)
        np.testing.assert_allclose(_logits(mine), _logits(ref), atol=ATOL, rtol=0)
        np.testing.assert_allclose(_logits(mine), offline_logits[p], atol=ATOL, rtol=0)


def test_a_large_call_split_over_the_stream_keeps_input_order(
    server: Any, sample: Any, offline_logits: np.ndarray
) -> None:
    async def go() -> list[Classification]:
        async with AsyncClient(
            server.address, timeout=60, stream=True, max_images_per_request=7, max_concurrent_requests=8
        ) as c:
            return await c.classify(sample.images[:100], include_logits=True)

    np.testing.assert_allclose(_logits(_run(go)), offline_logits[:100], atol=ATOL, rtol=0)


def test_auto_uses_the_stream_only_for_concurrent_calls_to_one_server(server: Any, sample: Any) -> None:
    async def go(address: str, concurrent: bool) -> int:
        # stream="auto", the default
        async with AsyncClient(address, timeout=60, max_images_per_request=4) as c:
            if concurrent:
                await asyncio.gather(*(c.classify(sample.images[i]) for i in range(16)))
            else:
                for i in range(4):
                    await c.classify(sample.images[i])
                await c.classify(sample.images[:16])  # one call, four requests at once
            return c.streams_opened

    assert _run(lambda: go(server.address, concurrent=False)) == 0
    assert _run(lambda: go(server.address, concurrent=True)) == 1
    # Two addresses (the same server twice): per-call round robin, no stream pinned to one.
    assert _run(lambda: go(f"{server.address},{server.address}", concurrent=True)) == 0


def test_stream_argument_is_checked() -> None:
    for bad in ("on", 1, None):
        with pytest.raises(ValueError, match="stream"):
            AsyncClient("127.0.0.1:1", stream=bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ errors


def test_an_error_answer_raises_the_unary_exception_for_its_caller_only(
    server: Any, sample: Any, sample_jpegs: list[tuple[str, bytes]]
) -> None:
    jpeg = sample_jpegs[0][1]
    bad_calls: list[tuple[Any, int]] = [
        (b"definitely not an image", 1),
        (jpeg[: len(jpeg) // 3], 1),
        (jpeg, 11),
    ]

    async def errors(stream: bool) -> tuple[list[BaseException | list[Classification]], int]:
        async with AsyncClient(server.address, timeout=60, stream=stream) as c:
            good = [c.classify(sample.images[i]) for i in range(30)]
            bad = [c.classify(x, top_k=k) for x, k in bad_calls]
            # Bad requests among good ones, all on the stream at once.
            got = await asyncio.gather(*good[:15], *bad, *good[15:], return_exceptions=True)
            return list(got), c.streams_opened

    unary, _ = _run(lambda: errors(False))
    streamed, opened = _run(lambda: errors(True))
    assert opened == 1  # the stream carried on past the error answers
    for u, s in zip(unary, streamed, strict=True):
        if isinstance(u, BaseException):
            assert type(s) is type(u) and str(s) == str(u)
            assert isinstance(s, InvalidArgumentError) and s.code is grpc.StatusCode.INVALID_ARGUMENT
        else:
            assert isinstance(s, list) and isinstance(u, list)
            _same(s, u)
    assert sum(isinstance(s, BaseException) for s in streamed) == len(bad_calls)


def test_bearer_token_on_the_stream(limited_server: Any, sample: Any) -> None:
    async def go(token: str | None) -> int:
        async with AsyncClient(limited_server.address, token=token, timeout=30, stream=True) as c:
            await asyncio.gather(*(c.classify(sample.images[i]) for i in range(3)))
            return c.streams_opened

    assert _run(lambda: go(TOKEN)) == 1
    for token in (None, "wrong"):
        with pytest.raises(UnauthenticatedError):
            _run(lambda: go(token))  # noqa: B023 (run at once)


# ------------------------------------------------------------------------------ deadlines, windows


def test_a_call_past_its_deadline_raises_and_the_stream_carries_on(
    fake_server: Callable[..., Any], fake_runtime: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="cifar_serve.client")
    srv = fake_server()
    images = np.arange(4 * 32 * 32 * 3, dtype=np.uint64).astype(np.uint8).reshape(4, 32, 32, 3)

    async def go() -> tuple[BaseException, list[Classification], list[Classification], int]:
        async with AsyncClient(srv.address, stream=True, timeout=60) as c:
            await c.classify(images[0])  # the stream is open
            fake_runtime.gate.clear()  # forward passes now wait
            fake_runtime.entered.clear()
            patient = asyncio.ensure_future(c.classify(images[1]))
            assert await asyncio.to_thread(fake_runtime.entered.wait, 10)  # it holds the model
            with pytest.raises(DeadlineExceededError) as info:
                await c.classify(images[2], timeout=0.3)
            # The server's clock for the request's timeout started when it read the request, a
            # moment after the caller's: the model stays held until that has run out too.
            await asyncio.sleep(0.2)
            fake_runtime.gate.set()
            late = await patient
            after = await c.classify(images[3])
            return info.value, late, after, c.streams_opened

    err, late, after, opened = _run(go)
    assert err.code is grpc.StatusCode.DEADLINE_EXCEEDED and isinstance(err, TimeoutError)
    assert not [r for r in caplog.records if "retry" in r.getMessage()]  # a deadline is not retried
    expected = fake_runtime.expected(images)
    np.testing.assert_array_equal(np.argmax(expected[1]), late[0].class_index)
    np.testing.assert_array_equal(np.argmax(expected[3]), after[0].class_index)
    assert opened == 1  # the late answer was dropped; the stream went on
    # The stream told the server what was left of the caller's deadline: the server dropped
    # the late request uncomputed instead of running it for nobody.
    assert sum(fake_runtime.batches) == 3


def test_requests_in_flight_never_exceed_the_window(
    fake_server: Callable[..., Any], fake_runtime: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_stream, "STREAM_WINDOW", 4)
    srv = fake_server()
    images = np.zeros((20, 32, 32, 3), np.uint8)

    async def go() -> tuple[list[float], int]:
        async with AsyncClient(srv.address, stream=True, timeout=60) as c:
            await c.classify(images[0])
            fake_runtime.gate.clear()
            tasks = [asyncio.ensure_future(c.classify(images[i])) for i in range(20)]
            seen = []
            while srv.metric("cifar_serve_stream_items") < 4:
                await asyncio.sleep(0.01)
            # Time for a client that ignored its window to send the other 16 (the server reads 64).
            for _ in range(20):
                await asyncio.sleep(0.01)
                seen.append(srv.metric("cifar_serve_stream_items"))
            fake_runtime.gate.set()
            assert len(await asyncio.gather(*tasks)) == 20
            return seen, c.streams_opened

    seen, opened = _run(go)
    assert max(seen) == 4
    assert opened == 1


# --------------------------------------------------------------------------- new streams, restarts


def test_a_new_stream_is_opened_before_the_servers_limit(limited_server: Any, sample: Any) -> None:
    async def go() -> tuple[list[list[Classification]], int]:
        async with AsyncClient(limited_server.address, token=TOKEN, timeout=60, stream=True) as c:
            got = [await c.classify(sample.images[i]) for i in range(3)]
            got += await asyncio.gather(*(c.classify(sample.images[i]) for i in range(3, 23)))
            return got, c.streams_opened

    refused = _calls(limited_server, "ClassifyStream", "RESOURCE_EXHAUSTED")
    ended_ok = _calls(limited_server, "ClassifyStream")
    got, opened = _run(go)
    assert len(got) == 23 and all(len(r) == 1 for r in got)
    assert opened == 5  # 23 requests, 5 a stream
    assert _calls(limited_server, "ClassifyStream", "RESOURCE_EXHAUSTED") == refused  # never hit the limit
    assert _calls(limited_server, "ClassifyStream") - ended_ok == 5  # each one half-closed, ended OK


def test_a_stream_the_server_ends_is_replaced(
    limited_server: Any, sample: Any, offline_logits: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A server that does not say its limit (GetModelInfo's 0): the stream runs into it, and
    # the requests the server did not read go again on a new stream.
    async def unknown(self: AsyncClient, deadline: float | None) -> int:
        return 0

    monkeypatch.setattr(AsyncClient, "_stream_limit", unknown)
    idx = list(range(0, 240, 10))

    async def go() -> tuple[list[list[Classification]], int]:
        async with AsyncClient(limited_server.address, token=TOKEN, timeout=60, stream=True) as c:
            got = list(
                await asyncio.gather(*(c.classify(sample.images[i], include_logits=True) for i in idx))
            )
            return got, c.streams_opened

    refused = _calls(limited_server, "ClassifyStream", "RESOURCE_EXHAUSTED")
    got, opened = _run(go)
    assert _calls(limited_server, "ClassifyStream", "RESOURCE_EXHAUSTED") > refused
    assert opened >= len(idx) // 5
    np.testing.assert_allclose(_logits([r for g in got for r in g]), offline_logits[idx], atol=ATOL, rtol=0)


def test_requests_in_flight_survive_a_server_restart(
    fake_server: Callable[..., Any], fake_runtime: Any, free_port: Callable[[], int]
) -> None:
    port = free_port()
    first = fake_server(port=port)
    images = np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    restarted: list[Any] = []

    def restart() -> None:
        first.stop(grace=0.0)  # the open stream is cut with requests unanswered
        restarted.append(fake_server(port=port))

    async def go() -> tuple[list[list[Classification]], int]:
        async with AsyncClient(f"127.0.0.1:{port}", stream=True, timeout=60, backoff=0.05) as c:
            await c.classify(images[0])
            fake_runtime.gate.clear()
            fake_runtime.entered.clear()
            tasks = [asyncio.ensure_future(c.classify(images[i])) for i in range(12)]
            await asyncio.to_thread(fake_runtime.entered.wait, 30)
            stopping = asyncio.ensure_future(asyncio.to_thread(restart))
            await asyncio.sleep(0.05)
            fake_runtime.gate.set()  # let the first server's held batch finish, so it can stop
            await stopping
            got = list(await asyncio.gather(*tasks))
            return got, c.streams_opened

    got, opened = _run(go)
    assert restarted and opened >= 2
    expected = np.argmax(fake_runtime.expected(images), axis=1)
    assert [g[0].class_index for g in got] == expected.tolist()
    assert _stream_ok(restarted[0]) >= 1  # some were answered by the new server


# ------------------------------------------------------------------------------------------- close


def test_close_ends_the_stream_cleanly_and_leaves_no_tasks(
    server: Any, sample: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="asyncio")

    async def go() -> set[asyncio.Task[Any]]:
        c = AsyncClient(server.address, timeout=60, stream=True)
        await asyncio.gather(*(c.classify(sample.images[i]) for i in range(10)))
        await c.close()
        return await _other_tasks()

    ended_ok = _calls(server, "ClassifyStream")
    cancelled = _calls(server, "ClassifyStream", "CANCELLED")
    left = _run(go)
    gc.collect()
    assert not left
    assert not [r for r in caplog.records if "destroyed but it is pending" in r.getMessage()]
    _wait_for("the server to finish the stream", lambda: _calls(server, "ClassifyStream") > ended_ok)
    assert _calls(server, "ClassifyStream", "CANCELLED") == cancelled


def test_close_with_a_caller_waiting_fails_it_and_leaves_no_tasks(
    fake_server: Callable[..., Any], fake_runtime: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="asyncio")
    srv = fake_server()
    images = np.zeros((2, 32, 32, 3), np.uint8)

    async def go() -> tuple[BaseException | None, set[asyncio.Task[Any]]]:
        c = AsyncClient(srv.address, timeout=60, stream=True)
        await c.classify(images[0])
        fake_runtime.gate.clear()
        fake_runtime.entered.clear()
        waiting = asyncio.ensure_future(c.classify(images[1]))
        await asyncio.to_thread(fake_runtime.entered.wait, 30)
        await c.close()
        err = (await asyncio.gather(waiting, return_exceptions=True))[0]
        fake_runtime.gate.set()
        return err if isinstance(err, BaseException) else None, await _other_tasks()

    err, left = _run(go)
    gc.collect()
    assert isinstance(err, CifarServeError) and err.code is grpc.StatusCode.CANCELLED
    assert not left
    assert not [r for r in caplog.records if "destroyed but it is pending" in r.getMessage()]


# ------------------------------------------------------------------ the blocking client, many threads


def _in_threads(n: int, work: Callable[[int], T]) -> list[T | BaseException]:
    """``work(j)`` in ``n`` threads started together; each one's result or exception."""
    barrier = threading.Barrier(n)
    out: list[T | BaseException | None] = [None] * n

    def run(j: int) -> None:
        try:
            barrier.wait(60)
            out[j] = work(j)
        except BaseException as exc:
            out[j] = exc

    threads = [threading.Thread(target=run, args=(j,)) for j in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r is not None for r in out)
    return out  # type: ignore[return-value]


def _lane_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("cifar-stream-")]


def test_threads_share_one_stream_and_a_bad_request_fails_only_its_caller(
    server: Any, sample: Any, offline_logits: np.ndarray
) -> None:
    n = 32
    with Client(server.address, timeout=60, stream=False) as unary:
        with pytest.raises(InvalidArgumentError) as ref:
            unary.classify(b"definitely not an image")
    before = _stream_ok(server)
    ended_ok, cancelled = _calls(server, "ClassifyStream"), _calls(server, "ClassifyStream", "CANCELLED")
    with Client(server.address, timeout=60, stream=True) as c:

        def work(j: int) -> list[Classification]:
            if j == 5:
                return c.classify(b"definitely not an image")
            return c.classify(sample.images[[j, j + 300]], include_logits=True)

        got = _in_threads(n, work)
        opened = c.streams_opened
    assert opened == 1
    assert not _lane_threads()  # close() ended the reader thread
    assert _stream_ok(server) - before == n - 1
    # Half-closed by close(): the server ended the stream OK, nothing was cancelled.
    _wait_for("the server to finish the stream", lambda: _calls(server, "ClassifyStream") > ended_ok)
    assert _calls(server, "ClassifyStream", "CANCELLED") == cancelled
    err = got[5]
    assert type(err) is type(ref.value) and str(err) == str(ref.value)
    for j, g in enumerate(got):
        if j != 5:
            assert isinstance(g, list)
            np.testing.assert_allclose(_logits(g), offline_logits[[j, j + 300]], atol=ATOL, rtol=0)


def test_threads_auto_mode_and_the_servers_limit(limited_server: Any, sample: Any) -> None:
    with Client(limited_server.address, token=TOKEN, timeout=60) as c:  # stream="auto"
        for i in range(3):
            c.classify(sample.images[i])
        assert c.streams_opened == 0  # one thread at a time: unary calls
        before = _calls(limited_server, "ClassifyStream", "RESOURCE_EXHAUSTED")
        got = _in_threads(24, lambda j: c.classify(sample.images[j]))
        assert all(isinstance(g, list) and len(g) == 1 for g in got)
        assert c.streams_opened >= 2  # at most 23 of them on the lane, 5 a stream
        assert _calls(limited_server, "ClassifyStream", "RESOURCE_EXHAUSTED") == before


def test_a_thread_past_its_deadline_raises_and_the_stream_carries_on(
    fake_server: Callable[..., Any], fake_runtime: Any
) -> None:
    srv = fake_server()
    images = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    with Client(srv.address, stream=True, timeout=60) as c:
        c.classify(images[0])
        fake_runtime.gate.clear()
        with pytest.raises(DeadlineExceededError) as info:
            c.classify(images[1], timeout=0.3)
        fake_runtime.gate.set()
        (after,) = c.classify(images[2])
        assert c.streams_opened == 1
    assert info.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert after.class_index == int(np.argmax(fake_runtime.expected(images[2:3])[0]))
    assert not _lane_threads()


def test_threads_requests_survive_a_server_restart(
    fake_server: Callable[..., Any], fake_runtime: Any, free_port: Callable[[], int]
) -> None:
    port = free_port()
    first = fake_server(port=port)
    images = np.random.default_rng(2).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    with Client(f"127.0.0.1:{port}", stream=True, timeout=60, backoff=0.05) as c:
        c.classify(images[0])
        fake_runtime.gate.clear()
        fake_runtime.entered.clear()
        results: list[Any] = []
        callers = threading.Thread(
            target=lambda: results.extend(_in_threads(8, lambda j: c.classify(images[j])))
        )
        callers.start()
        assert fake_runtime.entered.wait(30)
        stopper = threading.Thread(target=first.stop, kwargs={"grace": 0.0})
        stopper.start()
        time.sleep(0.05)
        fake_runtime.gate.set()
        stopper.join(60)
        second = fake_server(port=port)
        callers.join(120)
        opened = c.streams_opened
    assert opened >= 2
    expected = np.argmax(fake_runtime.expected(images), axis=1)
    assert [r[0].class_index for r in results] == expected.tolist()
    assert _stream_ok(second) >= 1


# --------------------------------------------------------------------------------- cifar-bench --lane


@pytest.mark.parametrize("lane", ["unary", "stream"])
def test_bench_drives_the_client_library(server: Any, lane: str) -> None:
    from cifar_serve.client.bench import BenchConfig, format_report, run_bench

    before_stream, before_unary = _stream_ok(server), _calls(server, "Classify")
    cfg = BenchConfig(
        address=server.address, lane=lane, concurrency=8, batch_size=3, requests=40, warmup=0, verify="all"
    )
    r = run_bench(cfg)
    assert r.error_count == 0 and r.requests == 40 and r.lane == lane
    assert r.accuracy is not None and r.accuracy > 0.75  # the shipped model: ~83%
    streamed, unary = _stream_ok(server) - before_stream, _calls(server, "Classify") - before_unary
    assert (streamed, unary) == ((41, 0) if lane == "stream" else (0, 41))  # with the first, checked call
    assert f"through the client library ({lane})" in format_report(r)
    with pytest.raises(ValueError, match="native"):
        run_bench(BenchConfig(address=server.address, lane=lane, api="v2"))


# ------------------------------------------------------------------------------------------------ TLS


def test_the_stream_over_tls(
    fake_server: Callable[..., Any], fake_runtime: Any, self_signed: Callable[..., Any], tmp_path: Path
) -> None:
    crt, key = self_signed(tmp_path, "localhost", ca=True)
    srv = fake_server(tls_cert=str(crt), tls_key=str(key), metrics_port=-1)
    images = np.random.default_rng(3).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    expected = np.argmax(fake_runtime.expected(images), axis=1).tolist()

    async def go() -> tuple[list[int], int]:
        async with AsyncClient(f"localhost:{srv.port}", root_certificates=crt, timeout=30, stream=True) as c:
            got = await asyncio.gather(*(c.classify(images[i]) for i in range(6)))
            return [g[0].class_index for g in got], c.streams_opened

    assert _run(go) == (expected, 1)
    with Client(f"localhost:{srv.port}", root_certificates=crt, timeout=30, stream=True) as c:
        assert [r.class_index for r in c.classify(images)] == expected
        assert c.streams_opened == 1
