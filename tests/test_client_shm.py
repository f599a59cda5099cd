"""The client library's system shared memory path: real servers on loopback, real /dev/shm objects.

The real model answers the equality checks (shared memory against the socket, on real CIFAR-10
images); the fake model (fast tier) covers several servers, a server that cannot see our
/dev/shm (as one in a container would) and a server that forgot our regions.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from cifar_serve.client import Client, InvalidArgumentError
from cifar_serve.client._shm import KEY_PREFIX, local_servers
from cifar_serve.client._targets import resolve_target
from cifar_serve.v1 import open_inference_pb2 as pb
from cifar_serve.v1 import open_inference_pb2_grpc as pb_grpc

SHM = Path("/dev/shm")
pytestmark = pytest.mark.skipif(not SHM.is_dir(), reason="system shared memory needs /dev/shm (Linux)")


def _regions(address: str) -> set[str]:
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        status = stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), timeout=30)
        return {name for name in status.regions if name.startswith(KEY_PREFIX)}


def _objects() -> set[str]:
    return {p.name for p in SHM.glob(f"{KEY_PREFIX}*")}


@pytest.fixture
def no_leftovers() -> Iterator[None]:
    """Every object a test's clients made is gone when the test ends."""
    before = _objects()
    yield
    assert _objects() <= before


def test_which_servers_count_as_this_host() -> None:
    def local(servers: str) -> list[str] | None:
        return local_servers(resolve_target(servers))

    assert local("localhost:50051") == ["localhost:50051"]
    assert local("127.0.0.1:1,127.0.0.2:2") == ["127.0.0.1:1", "127.0.0.2:2"]
    assert local("[::1]:7") == ["[::1]:7"]
    assert local("unix:/tmp/cifar.sock") == ["unix:/tmp/cifar.sock"]
    assert local("dns:///127.0.0.1:9") == ["127.0.0.1:9"]
    assert local("10.1.2.3:50051") is None
    assert local("127.0.0.1:1,10.1.2.3:1") is None
    assert local("ipv4:127.0.0.1:5") is None  # a raw gRPC address list: not guessed at


def test_auto_uses_shared_memory_on_loopback_and_answers_as_the_socket(
    server: Any, sample: Any, offline_logits: np.ndarray, no_leftovers: None
) -> None:
    images = np.ascontiguousarray(sample.images[:300])
    kw: dict[str, Any] = {"max_images_per_request": 128, "timeout": 120}
    with Client(server.address, shared_memory="auto", **kw) as shm, Client(server.address, **kw) as sock:
        assert shm.uses_shared_memory() and not sock.uses_shared_memory()  # the library's default: off
        via_shm = shm.classify(images, top_k=3, include_logits=True)  # three requests, concurrently
        via_socket = sock.classify(images, top_k=3, include_logits=True)
        mine = _regions(server.address)
        assert mine and all(n.split("-")[3] == str(os.getpid()) for n in mine)
        assert {p for p in _objects() if p in mine} == mine  # each region is one of our objects
    assert len(via_shm) == len(via_socket) == 300
    for a, b, want in zip(via_shm, via_socket, offline_logits[:300], strict=True):
        assert (a.label, a.class_index) == (b.label, b.class_index)
        assert [p.class_index for p in a.predictions] == [p.class_index for p in b.predictions]
        assert [p.probability for p in a.predictions] == pytest.approx(
            [p.probability for p in b.predictions], abs=1e-5
        )
        assert a.logits is not None and b.logits is not None
        np.testing.assert_allclose(a.logits, b.logits, atol=1e-4, rtol=0)
        np.testing.assert_allclose(a.logits, want, atol=1e-4, rtol=0)
    assert not _regions(server.address) & mine  # unregistered on close


def test_off_and_remote_servers_never_touch_shared_memory() -> None:
    with Client("10.255.255.1:50051", shared_memory="auto") as remote:
        assert not remote.uses_shared_memory()  # decided from the address alone: no call made
    with pytest.raises(ValueError, match="needs every server on this host"):
        Client("10.255.255.1:50051", shared_memory="on")
    with pytest.raises(ValueError, match="shared_memory must be one of"):
        Client("localhost:50051", shared_memory="yes")


@pytest.mark.fast
def test_every_local_replica_gets_the_regions(fake_server: Any, no_leftovers: None) -> None:
    a, b = fake_server(), fake_server()
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    with Client([a.address, b.address], max_images_per_request=8, shared_memory="on") as client:
        results = client.classify(images, include_logits=True)
        assert _regions(a.address) and _regions(a.address) == _regions(b.address)
    expected = images.reshape(40, -1)[:, :10].astype(np.float32)
    got = np.stack([r.logits for r in results if r.logits is not None])
    np.testing.assert_array_equal(got, expected)
    assert not _regions(a.address) and not _regions(b.address)


@pytest.mark.fast
def test_a_server_that_cannot_see_our_objects_means_the_socket(
    fake_server: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    no_leftovers: None,
) -> None:
    # As a server in a container behind a loopback port: its /dev/shm is another folder.
    monkeypatch.setattr("cifar_serve.server.shm.SHM_DIR", tmp_path)
    srv = fake_server()
    images = np.random.default_rng(2).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    with (
        caplog.at_level(logging.DEBUG, logger="cifar_serve.client"),
        Client(srv.address, shared_memory="auto") as client,
    ):
        assert not client.uses_shared_memory()
        results = client.classify(images, include_logits=True)
    assert "system shared memory not used" in caplog.text and "no shared memory object" in caplog.text
    np.testing.assert_array_equal(
        np.stack([r.logits for r in results if r.logits is not None]),
        images.reshape(5, -1)[:, :10].astype(np.float32),
    )
    with Client(srv.address, shared_memory="on") as client, pytest.raises(InvalidArgumentError) as err:
        client.classify(images)
    assert "system shared memory with" in err.value.message and "no shared memory object" in err.value.message


@pytest.mark.fast
def test_a_server_that_forgot_our_regions(
    fake_server: Any, caplog: pytest.LogCaptureFixture, no_leftovers: None
) -> None:
    srv = fake_server()
    images = np.random.default_rng(3).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    expected = images.reshape(6, -1)[:, :10].astype(np.float32)

    def forget() -> None:  # as a restarted server would
        with grpc.insecure_channel(srv.address) as ch:
            pb_grpc.GRPCInferenceServiceStub(ch).SystemSharedMemoryUnregister(
                pb.SystemSharedMemoryUnregisterRequest(), timeout=30
            )

    with Client(srv.address, shared_memory="auto") as client:
        assert client.uses_shared_memory()
        forget()
        with caplog.at_level(logging.WARNING, logger="cifar_serve.client"):
            results = client.classify(images, include_logits=True)
        assert "using the socket from now on" in caplog.text and not client.uses_shared_memory()
        np.testing.assert_array_equal(np.stack([r.logits for r in results if r.logits is not None]), expected)
    with Client(srv.address, shared_memory="on") as client:
        assert client.uses_shared_memory()
        forget()
        with pytest.raises(InvalidArgumentError, match="is not registered"):
            client.classify(images)
        with pytest.raises(InvalidArgumentError, match="top_k must be between 1 and 10, got 11"):
            client.classify(images, top_k=11)
