"""cifar_serve.client end to end: a real server on loopback, real stubs, real CIFAR-10 test images.

Served answers are checked against the offline TorchScript logits of the same images.
"""

from __future__ import annotations

import asyncio
import datetime
import io
import ipaddress
import logging
import pickle
import re
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from cifar_serve.client import (
    AsyncClient,
    CifarServeError,
    Classification,
    Client,
    DeadlineExceededError,
    InvalidArgumentError,
    ModelInfo,
    Prediction,
    UnauthenticatedError,
    UnavailableError,
    load_image_file,
)
from cifar_serve.server.preprocess import decode_image, pil_to_array

ATOL = 1e-4
Jpegs = list[tuple[str, bytes]]
Model = Callable[[np.ndarray], np.ndarray]
Stats = tuple[float, float, float]
TOKEN = "s3cret-test-token"


# --------------------------------------------------------------------------------------------- helpers


def _logits(results: list[Classification]) -> np.ndarray:
    assert all(r.logits is not None for r in results)
    return np.stack([r.logits for r in results])  # type: ignore[misc]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _check(results: list[Classification], expected_logits: np.ndarray, top_k: int = 1) -> None:
    """Top-1 equal, logits within 1e-4, ranked predictions and probabilities consistent with the logits."""
    assert len(results) == len(expected_logits)
    np.testing.assert_allclose(_logits(results), expected_logits, atol=ATOL, rtol=0)
    probs = _softmax(expected_logits.astype(np.float64))
    for r, logit, p in zip(results, expected_logits, probs, strict=True):
        order = np.argsort(-logit, kind="stable")[:top_k]
        assert r.class_index == order[0]
        assert [q.class_index for q in r.predictions] == order.tolist()
        assert r.label == r.predictions[0].label
        assert r.probability == pytest.approx(p[order[0]], abs=1e-4)
        assert [q.probability for q in r.predictions] == pytest.approx(p[order].tolist(), abs=1e-4)


def _metrics(metrics_port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The server's Prometheus text, as {(name, labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)$", line)
        if m:
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            out[(m.group(1), labels)] = float(m.group(3))
    return out


def _metric(snapshot: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return snapshot.get((name, frozenset(labels.items())), 0.0)


def _ok_classify_calls(metrics_port: int) -> float:
    return _metric(_metrics(metrics_port), "cifar_serve_requests_total", method="Classify", code="OK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def offline_model(model_dir: Path) -> Model:
    """Offline TorchScript logits for any uint8 [N,32,32,3] batch (no server)."""
    import torch

    module = torch.jit.load(str(model_dir / "model.torchscript.pt")).eval()

    def run(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(np.ascontiguousarray(images))).numpy()

    return run


@pytest.fixture(scope="module")
def client(server: Any) -> Iterator[Client]:
    with Client(server.address, timeout=60) as c:
        yield c


# ------------------------------------------------------------------------------- parity with offline


def test_packed_batch_matches_offline_and_is_split(
    server: Any, client: Client, sample: Any, offline_logits: np.ndarray
) -> None:
    # 600 images with the default 256 a request: three packed requests, answers in input order.
    before = _ok_classify_calls(server.metrics_port)
    results = client.classify(sample.images, include_logits=True)
    assert _ok_classify_calls(server.metrics_port) - before == 3
    _check(results, offline_logits)
    assert np.mean([r.class_index for r in results] == sample.labels) > 0.75  # the shipped model: ~83%


def test_encoded_jpeg_bytes_match_offline(
    client: Client, sample_jpegs: Jpegs, offline_logits: np.ndarray
) -> None:
    # The sample's JPEGs decode to exactly the sample arrays, so the server's decoding of these
    # bytes must give the offline logits.
    idx = list(range(0, 600, 2))
    results = client.classify([sample_jpegs[i][1] for i in idx], top_k=3, include_logits=True)
    _check(results, offline_logits[idx], top_k=3)


def test_mixed_inputs_raw_and_encoded_in_order(
    client: Client, sample: Any, sample_jpegs: Jpegs, offline_logits: np.ndarray, tmp_path: Path
) -> None:
    # Encoded bytes in the list: one request of Image messages, pixels travelling as raw_rgb.
    path = tmp_path / "img.jpg"
    path.write_bytes(sample_jpegs[4][1])
    inputs = [
        sample_jpegs[0][1],  # encoded bytes: decoded by the server
        sample.images[1],  # one HWC array: raw_rgb
        Image.fromarray(sample.images[2]),  # PIL: raw_rgb
        bytearray(sample_jpegs[3][1]),  # bytearray: encoded
        path,  # a path: decoded here
        str(path),  # the same, as str
        sample.images[5:9],  # an NHWC batch: four results
    ]
    results = client.classify(inputs, top_k=2, include_logits=True)
    _check(results, offline_logits[[0, 1, 2, 3, 4, 4, 5, 6, 7, 8]], top_k=2)


def test_split_into_small_requests_keeps_order(
    server: Any, sample: Any, sample_jpegs: Jpegs, offline_logits: np.ndarray
) -> None:
    with Client(server.address, max_images_per_request=7, max_concurrent_requests=3) as c:
        before = _ok_classify_calls(server.metrics_port)
        packed = c.classify(sample.images[100:120], include_logits=True)
        encoded = c.classify([b for _, b in sample_jpegs[200:215]], include_logits=True)
        assert _ok_classify_calls(server.metrics_port) - before == 3 + 3
    _check(packed, offline_logits[100:120])
    _check(encoded, offline_logits[200:215])


def test_single_inputs_give_one_result(
    client: Client, sample: Any, sample_jpegs: Jpegs, offline_logits: np.ndarray, tmp_path: Path
) -> None:
    path = tmp_path / "one.jpg"
    path.write_bytes(sample_jpegs[9][1])
    for one in (
        sample.images[9],
        sample.images[9:10],
        sample_jpegs[9][1],
        Image.fromarray(sample.images[9]),
        path,
        str(path),
    ):
        results = client.classify(one, include_logits=True)
        assert len(results) == 1
        _check(results, offline_logits[9:10])
    assert client.classify([]) == []
    assert client.classify(np.empty((0, 32, 32, 3), np.uint8)) == []


def test_result_types(client: Client, sample: Any, offline_logits: np.ndarray) -> None:
    (r,) = client.classify(sample.images[3], top_k=10)
    assert isinstance(r, Classification)
    assert r.logits is None  # only on request
    assert len(r.predictions) == 10 and isinstance(r.predictions[0], Prediction)
    label, index, prob = r.predictions[0]
    assert (label, index, prob) == (r.label, r.class_index, r.probability)
    assert sorted(p.class_index for p in r.predictions) == list(range(10))
    assert sum(p.probability for p in r.predictions) == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(AttributeError):
        r.label = "x"  # type: ignore[misc]
    (again,) = client.classify(sample.images[3], top_k=10, include_logits=True)
    assert again == r  # logits are not part of equality


def test_model_info(client: Client) -> None:
    info = client.model_info()
    assert isinstance(info, ModelInfo)
    assert info.labels == (
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    )
    assert info.input.shape[1:] == (32, 32, 3) and info.input.datatype.upper() == "UINT8"
    assert len(info.artifact_sha256) == 64
    assert 0.8 < info.test_accuracy < 1
    assert info.batching.max_batch_size == 32
    assert info.limits.max_images_per_request == 1024


def test_async_client_matches_offline(
    server: Any, sample: Any, sample_jpegs: Jpegs, offline_logits: np.ndarray, tmp_path: Path
) -> None:
    path = tmp_path / "a.jpg"
    path.write_bytes(sample_jpegs[11][1])

    async def go() -> tuple[list[Classification], ...]:
        async with AsyncClient(server.address, timeout=60, max_images_per_request=100) as c:
            info = await c.model_info()
            assert len(info.labels) == 10
            packed = await c.classify(sample.images, include_logits=True, top_k=3)  # 6 concurrent requests
            encoded = await c.classify([b for _, b in sample_jpegs[:150]], include_logits=True)
            mixed = await c.classify(
                [sample_jpegs[10][1], path, sample.images[12], Image.fromarray(sample.images[13])],
                include_logits=True,
            )
            return packed, encoded, mixed

    packed, encoded, mixed = asyncio.run(go())
    _check(packed, offline_logits, top_k=3)
    _check(encoded, offline_logits[:150])
    _check(mixed, offline_logits[10:14])


# --------------------------------------------------------------------------------------------- formats


def _format_cases(sample: Any) -> dict[str, bytes]:
    """Real sample images saved as other formats, sizes and modes."""

    def save(img: Image.Image, fmt: str, **kw: Any) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        return buf.getvalue()

    base = [Image.fromarray(sample.images[i]) for i in range(20, 30)]
    big = base[5].resize((200, 150), Image.Resampling.BICUBIC)
    alpha = Image.linear_gradient("L").resize((200, 150))
    big_rgba = big.copy()
    big_rgba.putalpha(alpha)
    return {
        "png": save(base[0], "PNG"),
        "bmp": save(base[1], "BMP"),
        "webp": save(base[2], "WEBP", quality=90),
        "webp-lossless": save(base[3], "WEBP", lossless=True),
        "gif": save(base[4], "GIF"),
        "png-rgba-200x150": save(big_rgba, "PNG"),
        "png-grayscale": save(base[6].convert("L"), "PNG"),
        "jpeg-96x96": save(base[7].resize((96, 96), Image.Resampling.BICUBIC), "JPEG", quality=92),
        "png-palette": save(base[8].convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "png-16x16": save(base[9].resize((16, 16)), "PNG"),
    }


def test_other_formats_match_offline(
    client: Client, sample: Any, offline_model: Model, offline_logits: np.ndarray, tmp_path: Path
) -> None:
    cases = _format_cases(sample)
    # What offline inference of these files gives, through the very preprocess function the server uses.
    decoded = np.stack([decode_image(data) for data in cases.values()])
    expected = offline_model(decoded)
    # Lossless formats at 32x32 RGB give back the sample image itself.
    assert np.array_equal(decoded[0], sample.images[20]) and np.array_equal(decoded[1], sample.images[21])
    np.testing.assert_allclose(expected[[0, 1, 3]], offline_logits[[20, 21, 23]], atol=ATOL, rtol=0)

    # Encoded bytes: decoded by the server.
    _check(client.classify(list(cases.values()), include_logits=True), expected)
    # Files: decoded by the client with the same function, sent packed.
    paths = []
    for name, data in cases.items():
        ext = name.split("-")[0].replace("jpeg", "jpg")
        paths.append(tmp_path / f"{name}.{ext}")
        paths[-1].write_bytes(data)
    assert all(np.array_equal(load_image_file(p), d) for p, d in zip(paths, decoded, strict=True))
    _check(client.classify(paths, include_logits=True), expected)


def test_arrays_and_pil_of_other_sizes_and_modes(client: Client, sample: Any, offline_model: Model) -> None:
    big = np.asarray(Image.fromarray(sample.images[40]).resize((200, 150), Image.Resampling.BICUBIC))
    rgba = np.dstack([big, np.full(big.shape[:2], 200, np.uint8)])  # [150,200,4]
    gray = np.asarray(Image.fromarray(sample.images[41]).convert("L"))  # [32,32]
    gray1 = gray[..., None]  # [32,32,1]
    batch64 = np.stack([np.asarray(Image.fromarray(sample.images[i]).resize((64, 64))) for i in (42, 43)])
    as_int = sample.images[44].astype(np.int64)  # integers in 0..255 are accepted
    pil_rgba = Image.fromarray(rgba)
    inputs: list[Any] = [big, rgba, gray, gray1, batch64, as_int, pil_rgba, pil_rgba.convert("L")]
    expected_images = np.stack(
        [
            pil_to_array(Image.fromarray(big)),
            pil_to_array(Image.fromarray(rgba)),
            pil_to_array(Image.fromarray(gray)),
            pil_to_array(Image.fromarray(gray)),
            pil_to_array(Image.fromarray(batch64[0])),
            pil_to_array(Image.fromarray(batch64[1])),
            sample.images[44],
            pil_to_array(pil_rgba),
            pil_to_array(pil_rgba.convert("L")),
        ]
    )
    _check(client.classify(inputs, include_logits=True), offline_model(expected_images))


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("top_k", [0, 11])
def test_top_k_out_of_range_is_invalid_argument(client: Client, sample: Any, top_k: int) -> None:
    with pytest.raises(CifarServeError) as info:
        client.classify(sample.images[:2], top_k=top_k)
    err = info.value
    assert err.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "top_k" in err.message and str(err).startswith("INVALID_ARGUMENT: ")
    assert pickle.loads(pickle.dumps(err)).code is grpc.StatusCode.INVALID_ARGUMENT
    assert isinstance(err, InvalidArgumentError) and isinstance(err, ValueError)
    assert not isinstance(err, grpc.RpcError)


def test_async_errors_are_wrapped(server: Any, sample: Any) -> None:
    async def go() -> CifarServeError:
        async with AsyncClient(server.address) as c:
            with pytest.raises(CifarServeError) as info:
                await c.classify(sample.images[0], top_k=11)
            return info.value

    err = asyncio.run(go())
    assert err.code is grpc.StatusCode.INVALID_ARGUMENT and not isinstance(err, grpc.RpcError)


def test_undecodable_inputs(client: Client, server: Any, sample_jpegs: Jpegs, tmp_path: Path) -> None:
    jpeg = sample_jpegs[0][1]
    # Encoded bytes are the server's to judge.
    for bad in (b"definitely not an image", jpeg[: len(jpeg) // 3], b""):
        with pytest.raises(InvalidArgumentError) as info:
            client.classify([jpeg, bad])
        assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
        assert "BytesIO" not in str(info.value) and "0x" not in str(info.value)
    # Files are decoded here: refused before anything is sent, naming the file.
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    before = _ok_classify_calls(server.metrics_port)
    with pytest.raises(InvalidArgumentError, match=r"broken\.png") as info:
        client.classify([jpeg, broken])
    assert str(info.value) == f"INVALID_ARGUMENT: {broken}: corrupt or truncated image (Truncated File Read)"
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"definitely not an image")
    with pytest.raises(InvalidArgumentError) as info:
        client.classify(garbage)
    assert str(info.value).startswith(f"INVALID_ARGUMENT: {garbage}: not an image file (23 bytes in none of")
    assert "BytesIO" not in str(info.value)
    # Arrays that are not uint8 images, and things that are not images at all.
    with pytest.raises(InvalidArgumentError, match="uint8"):
        client.classify(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(InvalidArgumentError, match=r"0\.\.255"):
        client.classify(np.full((32, 32, 3), 300, np.int32))
    with pytest.raises(InvalidArgumentError, match="shape"):
        client.classify(np.zeros((32, 32, 3, 1, 1), np.uint8))
    with pytest.raises(InvalidArgumentError, match="channels"):
        client.classify(np.zeros((32, 32, 7), np.uint8))
    with pytest.raises(TypeError):
        client.classify(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        client.classify([sample_jpegs[0][1], None])  # type: ignore[list-item]
    assert _ok_classify_calls(server.metrics_port) == before


def test_missing_file_is_a_cifar_serve_error(client: Client, sample_jpegs: Jpegs, tmp_path: Path) -> None:
    missing = tmp_path / "missing.png"
    with pytest.raises(CifarServeError) as info:
        client.classify([sample_jpegs[0][1], missing])
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert str(info.value) == f"INVALID_ARGUMENT: inputs[1]: cannot read {missing}: No such file or directory"
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_a_server_without_a_port_is_on_50051(model_dir: Path, make_settings: Any, sample: Any) -> None:
    """``127.0.0.1`` means port 50051 (gRPC's own default would be 443)."""
    from cifar_serve.server.launch import ServerThread

    assert Client("127.0.0.1").address == "127.0.0.1:50051"
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", 50051))
        except OSError:
            pytest.skip("port 50051 is in use here: cannot start a server on the default port")
    with ServerThread(make_settings(model_dir, port=50051)), Client("127.0.0.1", timeout=30) as c:
        assert len(c.classify(sample.images[:2])) == 2


def test_deadline_exceeded_is_not_retried(
    client: Client, sample: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="cifar_serve.client")
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError) as info:
        client.classify(sample.images, timeout=0.001)  # far more than a millisecond of work
    assert info.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert isinstance(info.value, TimeoutError)
    assert time.monotonic() - started < 5
    assert not [r for r in caplog.records if "retry" in r.getMessage()]
    # The client is still usable afterwards.
    assert len(client.classify(sample.images[:3])) == 3


def test_unreachable_port_retries_then_raises(sample: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="cifar_serve.client")
    address = f"127.0.0.1:{_free_port()}"
    started = time.monotonic()
    # No deadline to wait within: the retries decide (with one, the client waits for SERVING;
    # tests/test_patience.py).
    with Client(address, retries=2, backoff=0.05) as c, pytest.raises(CifarServeError) as info:
        c.classify(sample.images[0])
    elapsed = time.monotonic() - started
    assert info.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert not isinstance(info.value, grpc.RpcError)
    if info.value.code is grpc.StatusCode.UNAVAILABLE:
        assert isinstance(info.value, UnavailableError) and isinstance(info.value, ConnectionError)
    retries = [re.search(r"retry (\d+ of \d+)", r.getMessage()) for r in caplog.records]
    assert [m.group(1) for m in retries if m] == ["1 of 2", "2 of 2"]
    assert elapsed < 6


def test_unreachable_port_async_and_no_retries(sample: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="cifar_serve.client")
    address = f"127.0.0.1:{_free_port()}"

    async def go() -> CifarServeError:
        async with AsyncClient(address, retries=1, backoff=0.05) as c:
            with pytest.raises(CifarServeError) as info:
                await c.model_info()
            return info.value

    err = asyncio.run(go())
    assert err.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert len([r for r in caplog.records if "retry" in r.getMessage()]) == 1
    caplog.clear()
    with Client(address, retries=0, timeout=5) as c, pytest.raises(CifarServeError):
        c.model_info()
    assert not [r for r in caplog.records if "retry" in r.getMessage()]


def test_client_argument_checks() -> None:
    for kw in (
        {"retries": -1},
        {"backoff": -1.0},
        {"max_images_per_request": 0},
        {"max_concurrent_requests": 0},
        {"client_cert": b"x"},
    ):
        with pytest.raises(ValueError):
            Client("127.0.0.1:1", **kw)


# ------------------------------------------------------------------ dynamic batching across callers


@pytest.fixture(scope="module")
def batching_server(model_dir: Path, make_settings: Callable[..., Any]) -> Iterator[Any]:
    """A dedicated server that waits 20 ms to fill a batch (so batching is reliable), bearer token on."""
    from cifar_serve.server.launch import ServerThread

    settings = make_settings(model_dir, max_batch_size=16, max_batch_delay_ms=20.0, auth_token=TOKEN)
    with ServerThread(settings) as srv:
        yield srv


def _batch_stats(metrics_port: int) -> Stats:
    """(batches run, images in them, batches of exactly one image)."""
    m = _metrics(metrics_port)
    return (
        _metric(m, "cifar_serve_batch_size_count"),
        _metric(m, "cifar_serve_batch_size_sum"),
        _metric(m, "cifar_serve_batch_size_bucket", le="1.0"),
    )


def _assert_batched(before: Stats, after: Stats, images: int) -> None:
    batches, total, singles = (a - b for a, b in zip(after, before, strict=True))
    assert total == images
    assert batches < images, f"{images} single-image calls ran as {batches} batches: no batching"
    assert batches - singles >= 1  # at least one batch held more than one image
    assert batches >= images / 16  # and none more than the server's maximum


def test_32_concurrent_threads_get_their_own_answers(
    batching_server: Any, sample: Any, offline_logits: np.ndarray
) -> None:
    n = 32
    idx = [7 * j + 3 for j in range(n)]  # distinct images of every class
    barrier = threading.Barrier(n)
    results: list[Classification | BaseException | None] = [None] * n

    def caller(j: int) -> None:
        try:
            with Client(batching_server.address, token=TOKEN, timeout=60) as c:
                c.model_info()  # connected before the start line
                barrier.wait(timeout=60)
                (results[j],) = c.classify(sample.images[idx[j]], top_k=3, include_logits=True)
        except BaseException as exc:
            results[j] = exc
            barrier.abort()

    before = _batch_stats(batching_server.metrics_port)
    threads = [threading.Thread(target=caller, args=(j,)) for j in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    errors = [r for r in results if not isinstance(r, Classification)]
    assert not errors, errors[:3]
    _check(results, offline_logits[idx], top_k=3)  # type: ignore[arg-type]
    _assert_batched(before, _batch_stats(batching_server.metrics_port), n)


def test_32_concurrent_async_tasks_get_their_own_answers(
    batching_server: Any, sample: Any, sample_jpegs: Jpegs, offline_logits: np.ndarray
) -> None:
    n = 32
    idx = [11 * j + 5 for j in range(n)]

    async def go() -> list[Classification]:
        async with AsyncClient(batching_server.address, token=TOKEN, timeout=60) as c:
            await c.model_info()
            start = asyncio.Event()

            async def caller(j: int) -> Classification:
                await start.wait()
                # Half send pixels, half encoded JPEG bytes: both feed the same batches.
                one: Any = sample.images[idx[j]] if j % 2 else sample_jpegs[idx[j]][1]
                (r,) = await c.classify(one, include_logits=True)
                return r

            tasks = [asyncio.ensure_future(caller(j)) for j in range(n)]
            await asyncio.sleep(0)
            start.set()
            return list(await asyncio.gather(*tasks))

    before = _batch_stats(batching_server.metrics_port)
    results = asyncio.run(go())
    _check(results, offline_logits[idx])
    _assert_batched(before, _batch_stats(batching_server.metrics_port), n)


def test_bearer_token(batching_server: Any, sample: Any) -> None:
    for token in (None, "wrong"):
        with (
            Client(batching_server.address, token=token, timeout=30) as c,
            pytest.raises(UnauthenticatedError) as info,
        ):
            c.classify(sample.images[0])
        assert info.value.code is grpc.StatusCode.UNAUTHENTICATED
    with Client(batching_server.address, token=TOKEN, timeout=30) as c:
        assert c.model_info().batching.max_batch_delay_ms == 20.0


# ------------------------------------------------------------------------------------------------- TLS


def _pki(tmp: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> Any:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def cert(cn: str, key: Any, issuer: Any, issuer_key: Any, ca: bool, sans: list[Any] | None = None) -> Any:
        b = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    def write(stem: str, key: Any, crt: Any) -> None:
        (tmp / f"{stem}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        (tmp / f"{stem}.crt").write_bytes(crt.public_bytes(serialization.Encoding.PEM))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = cert("test ca", ca_key, name("test ca"), ca_key, True)
    srv_key = ec.generate_private_key(ec.SECP256R1())
    srv = cert(
        "localhost",
        srv_key,
        ca.subject,
        ca_key,
        False,
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    cli_key = ec.generate_private_key(ec.SECP256R1())
    cli = cert("client", cli_key, ca.subject, ca_key, False)
    write("ca", ca_key, ca)
    write("server", srv_key, srv)
    write("client", cli_key, cli)
    return {n: tmp / n for n in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


def test_mutual_tls(
    model_dir: Path,
    make_settings: Callable[..., Any],
    sample: Any,
    offline_logits: np.ndarray,
    tmp_path: Path,
) -> None:
    from cifar_serve.server.launch import ServerThread

    pki = _pki(tmp_path)
    settings = make_settings(
        model_dir,
        max_batch_size=2,
        metrics_port=-1,
        tls_cert=str(pki["server.crt"]),
        tls_key=str(pki["server.key"]),
        tls_client_ca=str(pki["ca.crt"]),
    )
    with ServerThread(settings) as srv:
        address = f"localhost:{srv.port}"
        # CA as a path, client certificate and key as a path and as PEM bytes.
        with Client(
            address,
            root_certificates=pki["ca.crt"],
            client_cert=str(pki["client.crt"]),
            client_key=pki["client.key"].read_bytes(),
            timeout=30,
        ) as c:
            _check(c.classify(sample.images[:5], include_logits=True), offline_logits[:5])

        async def go() -> list[Classification]:
            async with AsyncClient(
                address,
                root_certificates=pki["ca.crt"].read_text(),
                timeout=30,
                client_cert=pki["client.crt"],
                client_key=pki["client.key"],
            ) as c:
                return await c.classify(sample.images[5:8], include_logits=True)

        _check(asyncio.run(go()), offline_logits[5:8])
        # No client certificate, or a server the CA does not vouch for: refused, as our own error.
        with (
            Client(address, root_certificates=pki["ca.crt"], retries=0, timeout=10) as c,
            pytest.raises(CifarServeError) as info,
        ):
            c.classify(sample.images[0])
        assert info.value.code is grpc.StatusCode.UNAVAILABLE
        with (
            Client(
                address,
                root_certificates=pki["client.crt"],
                client_cert=pki["client.crt"],
                client_key=pki["client.key"],
                retries=0,
                timeout=10,
            ) as c,
            pytest.raises(CifarServeError) as info,
        ):
            c.classify(sample.images[0])
        assert info.value.code is grpc.StatusCode.UNAVAILABLE
