"""What an operator sees of a real `cifar-serve` process: start-up errors, /metrics, logs, memory."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from cifar_serve.v1 import classifier_pb2 as pb
from cifar_serve.v1 import classifier_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]


def _cmd(model_dir: Path, port: int, metrics_port: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cifar_serve.server",
        "--model-dir",
        str(model_dir),
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        *extra,
    ]


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


@pytest.mark.parametrize("which", ["port", "metrics-port"])
def test_a_port_in_use_is_one_line_naming_the_flag(
    which: str, busy_port: int, model_dir: Path, free_port: Any
) -> None:
    port, metrics_port = (busy_port, free_port()) if which == "port" else (free_port(), busy_port)
    proc = subprocess.run(_cmd(model_dir, port, metrics_port), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "cannot start" in ln]
    assert len(lines) == 1, proc.stderr
    assert f"--{which}" in lines[0] and str(busy_port) in lines[0] and "in use" in lines[0], lines[0]
    for noise in ("Traceback", "Event loop is closed", "never awaited"):
        assert noise not in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def served(
    model_dir: Path, free_port: Any, wait_serving: Any
) -> Iterator[tuple[str, int, subprocess.Popen[str]]]:
    port, metrics_port = free_port(), free_port()
    proc = subprocess.Popen(
        _cmd(model_dir, port, metrics_port, "--max-batch-size", "16"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_serving(f"127.0.0.1:{port}", proc)
        yield f"127.0.0.1:{port}", metrics_port, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _scrape(metrics_port: int, path: str = "/metrics") -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}{path}", timeout=10).read().decode()


def _gauge(page: str, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", page, re.M)
    assert m, f"{name} not on the page"
    return float(m.group(1))


def test_metrics_page_only_at_metrics_and_without_created_series(served: tuple[str, int, object]) -> None:
    _address, metrics_port, _proc = served
    page = _scrape(metrics_port)
    assert "cifar_serve_requests_total" in page or "cifar_serve_images_total" in page
    assert "_created" not in page
    assert _gauge(page, "cifar_serve_ready") == 1.0
    for path in ("/", "/healthz"):
        with pytest.raises(urllib.error.HTTPError) as info:
            _scrape(metrics_port, path)
        assert info.value.code == 404


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_stream_nobody_reads_holds_no_memory_and_ends_clean(
    served: tuple[str, int, subprocess.Popen[str]], sample: object
) -> None:
    address, metrics_port, proc = served
    images = sample.images  # type: ignore[attr-defined]
    stub = pb_grpc.ClassifierStub(grpc.insecure_channel(address))
    stub.Classify(
        pb.ClassifyRequest(packed=pb.PackedImages(data=images[:64].tobytes(), count=64)), timeout=60
    )
    before = _rss_mib(proc.pid)
    sent = 0

    def requests() -> Iterator[pb.ClassifyStreamRequest]:
        nonlocal sent
        for i in range(50_000):
            sent += 1
            raw = images[i % len(images)].tobytes()
            yield pb.ClassifyStreamRequest(
                id=str(i), request=pb.ClassifyRequest(images=[pb.Image(raw_rgb=raw)])
            )

    # No BDP probing: the HTTP/2 window stays small, so flow control stops the client quickly
    # (with it grpc first grows the window to megabytes of small answers, all in the transport).
    ch = grpc.insecure_channel(address, options=[("grpc.http2.bdp_probe", 0)])
    call = pb_grpc.ClassifierStub(ch).ClassifyStream(requests(), timeout=120)
    last, peak = -1, 0.0
    while sent != last:
        last = sent
        time.sleep(1.0)
        page = _scrape(metrics_port)
        peak = max(peak, _gauge(page, "cifar_serve_stream_items"))
    grown = _rss_mib(proc.pid) - before
    assert sent < 50_000
    assert grown < 100, f"server RSS grew {grown:.0f} MiB"
    assert 0 < peak <= 64  # the stream window
    other = stub.Classify(
        pb.ClassifyRequest(packed=pb.PackedImages(data=images[:3].tobytes(), count=3)), timeout=30
    )
    assert len(other.results) == 3
    call.cancel()
    ch.close()
    end = time.monotonic() + 30
    while _gauge(_scrape(metrics_port), "cifar_serve_stream_items") != 0:
        assert time.monotonic() < end, "the stream's tasks outlived the client"
        time.sleep(0.2)
    assert _gauge(_scrape(metrics_port), "cifar_serve_inflight_requests") == 0
    sys.stderr.write(f"sent {sent} of 50000, server RSS grew {grown:.1f} MiB, peak stream items {peak:.0f}\n")


def test_idle_shutdown_log_says_so(model_dir: Path, free_port: Any, wait_serving: Any) -> None:
    port = free_port()
    proc = subprocess.Popen(
        _cmd(model_dir, port, -1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_serving(f"127.0.0.1:{port}", proc)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopped; answered no calls" in err
    serving = next(ln for ln in err.splitlines() if " serving " in ln)
    assert "{" not in serving and "[" not in serving and "device" in serving, serving
