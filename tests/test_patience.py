"""Patient clients: started while the server warms up, they wait (health Watch) for SERVING within
their deadline; when they give up they say why, naming the server."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cifar_serve.client import AsyncClient, Client, UnavailableError
from cifar_serve.client.cli import EXIT_FAILED, EXIT_OK

IMAGES = np.arange(2 * 32 * 32 * 3, dtype=np.uint8).reshape(2, 32, 32, 3)


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("cifar-classify")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "cifar_serve.client.cli"]


def _labels(fake_runtime: Any, images: np.ndarray) -> list[int]:
    return [int(i) for i in fake_runtime.expected(images).argmax(axis=1)]


def _wait_for(predicate: Any, what: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"never saw {what}")
        time.sleep(0.02)


class _Records(io.StringIO):
    """The client library's log lines, to see that a call is waiting before the test moves on."""

    def waiting(self) -> bool:
        return "waiting up to" in self.getvalue()


@pytest.fixture
def client_log() -> Any:
    import logging

    stream = _Records()
    handler = logging.StreamHandler(stream)
    log = logging.getLogger("cifar_serve.client")
    log.addHandler(handler)
    previous = log.level
    log.setLevel(logging.INFO)
    yield stream
    log.removeHandler(handler)
    log.setLevel(previous)


def test_client_started_during_warm_up_waits_for_serving(
    fake_server: Any, fake_runtime: Any, client_log: _Records
) -> None:
    fake_runtime.warm_gate.clear()
    srv = fake_server(wait_ready=False)
    with Client(srv.address, timeout=120) as client, ThreadPoolExecutor(1) as pool:
        call: Future[Any] = pool.submit(client.classify, IMAGES)
        _wait_for(client_log.waiting, "the client waiting for SERVING")
        assert "warming up" in client_log.getvalue() and not call.done()
        fake_runtime.warm_gate.set()
        results = call.result(timeout=120)
    assert [r.class_index for r in results] == _labels(fake_runtime, IMAGES)


def test_async_client_started_during_warm_up_waits_for_serving(
    fake_server: Any, fake_runtime: Any, client_log: _Records
) -> None:
    fake_runtime.warm_gate.clear()
    srv = fake_server(wait_ready=False)

    async def run() -> list[int]:
        async with AsyncClient(srv.address, timeout=120) as client:
            call = asyncio.ensure_future(client.classify(IMAGES))
            while not client_log.waiting():
                await asyncio.sleep(0.02)
            assert not call.done()
            fake_runtime.warm_gate.set()
            return [r.class_index for r in await call]

    assert asyncio.run(run()) == _labels(fake_runtime, IMAGES)


def test_giving_up_during_warm_up_says_so(fake_server: Any, fake_runtime: Any) -> None:
    fake_runtime.warm_gate.clear()
    srv = fake_server(wait_ready=False)
    with Client(srv.address, timeout=1.5) as client, pytest.raises(UnavailableError) as info:
        client.classify(IMAGES)
    message = str(info.value)
    assert srv.address in message and "did not report SERVING" in message and "warming up" in message

    async def run() -> str:
        async with AsyncClient(srv.address, timeout=1.5) as client:
            with pytest.raises(UnavailableError) as info:
                await client.classify(IMAGES)
            return str(info.value)

    message = asyncio.run(run())
    assert srv.address in message and "warming up" in message


def test_pointed_at_nothing_fails_within_its_timeout_naming_the_address(free_port: Any) -> None:
    address = f"127.0.0.1:{free_port()}"
    with Client(address, timeout=2) as client, pytest.raises(UnavailableError) as info:
        client.model_info()
    assert address in str(info.value) and "unreachable" in str(info.value)
    # Without a deadline there is nothing to wait within: the retries decide, and the words are plain.
    with Client(address, retries=1, backoff=0.01) as client, pytest.raises(UnavailableError) as info:
        client.model_info()
    assert str(info.value).startswith(f"UNAVAILABLE: {address}: it is unreachable")


def test_cifar_classify_started_during_warm_up_succeeds(
    fake_server: Any, fake_runtime: Any, tmp_path: Path, free_port: Any
) -> None:
    for i in range(3):
        Image.fromarray(IMAGES[i % 2]).save(tmp_path / f"{i}.png")
    fake_runtime.warm_gate.clear()
    srv = fake_server(wait_ready=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIFAR_SERVE_")}
    stderr = tmp_path / "stderr"
    with stderr.open("w") as err:
        proc = subprocess.Popen(
            [*_cli(), str(tmp_path), "-s", srv.address, "-f", "jsonl", "-v"],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
        )
    waiting = threading.Event()

    def watch() -> None:
        _wait_for(lambda: "waiting up to" in stderr.read_text() or proc.poll() is not None, "cifar-classify")
        waiting.set()

    watcher = threading.Thread(target=watch)
    watcher.start()
    watcher.join()
    assert waiting.is_set() and proc.poll() is None, stderr.read_text()
    assert "warming up" in stderr.read_text()
    fake_runtime.warm_gate.set()
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_OK, stderr.read_text()
    assert len(out.splitlines()) == 3

    # Pointed at nothing, it fails within its timeout, naming the address.
    address = f"127.0.0.1:{free_port()}"
    done = subprocess.run(
        [*_cli(), str(tmp_path), "-s", address, "--timeout", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == EXIT_FAILED
    assert f"{address} did not report SERVING within 2s: it is unreachable" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
