"""``cifar-bench``: a closed-loop gRPC load generator for cifar-serve.

Each of ``--concurrency`` asyncio tasks sends one request, waits for its answer and sends the
next (closed loop), over the native API (``Classify`` with packed pixels) or the Open Inference
Protocol (``ModelInfer`` with ``raw_input_contents``). Payloads are real CIFAR-10 test images,
serialized once before the run; answers come back as bytes and are parsed only when checked, so
the generator spends its time on gRPC, not on protobuf. ``--processes N`` splits the concurrency
over N client processes when one Python process cannot keep up.

Two modes:

* ``--duration S`` (default): after ``--warmup`` seconds, count the requests that *complete*
  within the next ``S`` seconds; latency percentiles are over those requests. Calls still in
  flight at the end are cancelled. The warm-up must be longer than one round trip at the
  chosen concurrency, or the first answers measured include the queue filling up.
* ``--requests N``: after the warm-up, send exactly ``N`` requests (all of them counted,
  waited for) and report over them.

``--lane unary|stream`` drives the native API through the client library instead
(:class:`cifar_serve.client.AsyncClient`, one per process, every caller's ``classify()`` on it):
``unary`` makes one ``Classify`` call per request, ``stream`` carries every request over the
client's stream lane (one long-lived ``ClassifyStream``). Run both, side by side, to see what the
lane saves the server and the client; both include the library's own work (building requests,
parsing answers into :class:`Classification` objects), which the raw generator skips.

With ``--api v2`` and the server on this host (loopback or a unix socket), the images and
logits pass through system shared memory by default (``--shared-memory auto``): each concurrent
caller registers one region, writes its request's images into it before each call (as a real
client would) and sends a ``ModelInfer`` that names the region; the server writes the logits
back into it. ``--shared-memory off`` sends the pixels through the socket.

Only numpy, grpc, the generated stubs and the CIFAR-10 loader are imported, never torch, so
the generator starts in a fraction of a second and stays light.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import logging
import multiprocessing
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import numpy as np

from cifar_serve.v1 import classifier_pb2, open_inference_pb2, open_inference_pb2_grpc

from ._client import AsyncClient
from ._errors import CifarServeError
from ._shm import SHARED_MEMORY_MODES, SharedMemorySession, _Slot, local_servers
from ._targets import channel_options, resolve_target
from ._types import Classification

__all__ = [
    "APIS",
    "BenchConfig",
    "BenchResult",
    "Payload",
    "build_payloads",
    "default_data_path",
    "load_images",
    "main",
    "run_bench",
]

logger = logging.getLogger("cifar_serve.client.bench")

APIS = {
    "native": "/cifar_serve.v1.Classifier/Classify",
    "v2": "/inference.GRPCInferenceService/ModelInfer",
}
LANES = ("", "unary", "stream")
DEFAULT_MODEL_NAME = "cifar10_resnet18"
IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
_FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "cifar10-test-sample.zip"
_MESSAGE_LIMIT = 256 * 1024 * 1024


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class BenchConfig:
    address: str = "localhost:50051"
    api: str = "native"
    concurrency: int = 1
    batch_size: int = 1
    duration: float = 10.0
    requests: int = 0  # > 0: send exactly this many measured requests instead of a duration
    warmup: float = 2.0
    data: str | None = None  # None: the committed 600-image fixture
    synthetic: bool = False  # random pixels instead of real images (no data needed)
    model_name: str = DEFAULT_MODEL_NAME
    top_k: int = 1
    timeout: float = 120.0  # per-request deadline, seconds
    channels: int = 1  # gRPC channels (HTTP/2 connections) per process
    processes: int = 1
    verify: str = "first"  # first: check one answer per process; all: check every answer; none
    connect_timeout: float = 30.0
    shared_memory: str = "auto"  # v2 only: auto (when the server is on this host), on, off
    keep_latencies: bool = False  # the result lists every measured request's latency
    lane: str = ""  # "": raw gRPC bytes; "unary" or "stream": through AsyncClient (native API)

    def check(self) -> None:
        if self.api not in APIS:
            raise ValueError(f"api must be one of {sorted(APIS)}, got {self.api!r}")
        if self.concurrency < 1 or self.batch_size < 1 or self.channels < 1 or self.processes < 1:
            raise ValueError("concurrency, batch size, channels and processes must be at least 1")
        if self.processes > self.concurrency:
            raise ValueError("more processes than concurrent requests: lower --processes")
        if self.requests < 0 or self.warmup < 0 or (self.duration <= 0 and self.requests == 0):
            raise ValueError("need a positive --duration or --requests, and a non-negative --warmup")
        if self.verify not in ("first", "all", "none"):
            raise ValueError("verify must be first, all or none")
        if self.shared_memory not in SHARED_MEMORY_MODES:
            raise ValueError(f"shared memory must be one of {', '.join(SHARED_MEMORY_MODES)}")
        if self.lane not in LANES:
            raise ValueError(f"lane must be one of {', '.join(LANES[1:])}")
        if self.lane and self.api != "native":
            raise ValueError("--lane drives the client library, which speaks the native API: drop --api v2")
        if self.shared_memory == "on" and self.api != "v2":
            raise ValueError("shared memory needs the Open Inference Protocol: add --api v2")


@dataclass
class BenchResult:
    api: str
    address: str
    concurrency: int
    batch_size: int
    processes: int
    channels: int
    mode: str
    warmup_s: float
    window_s: float
    requests: int
    images: int
    requests_per_s: float
    images_per_s: float
    latency_ms: dict[str, float]
    errors: dict[str, int]
    error_count: int
    client_cpu_percent: float
    accuracy: float | None = None
    verified: bool = True
    notes: list[str] = field(default_factory=list)
    shared_memory: bool = False  # the images and logits went through system shared memory
    lane: str = ""  # through the client library: "unary" calls or its "stream" lane
    latencies_ms: list[float] | None = None  # every measured request, when asked for (keep_latencies)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- payloads


def default_data_path() -> Path | None:
    """The committed 600-image CIFAR-10 test sample, when running from a source tree."""
    return _FIXTURE if _FIXTURE.is_file() else None


def _data_module() -> ModuleType:
    """``cifar_serve.export.data`` without running ``cifar_serve.export/__init__`` (which imports torch)."""
    loaded = sys.modules.get("cifar_serve.export.data")
    if loaded is not None:
        return loaded
    spec = importlib.util.find_spec("cifar_serve.export")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("cifar_serve.export is not importable")
    path = Path(next(iter(spec.submodule_search_locations))) / "data.py"
    name = "_cifar_serve_bench_data"
    if name in sys.modules:
        return sys.modules[name]
    file_spec = importlib.util.spec_from_file_location(name, path)
    if file_spec is None or file_spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(file_spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    file_spec.loader.exec_module(module)
    return module


def load_images(
    data: str | os.PathLike[str] | None = None, *, synthetic: bool = False, count: int = 600
) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 ``[N,32,32,3]`` test images and their labels (None for synthetic pixels)."""
    if synthetic:
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, (count, *IMAGE_SHAPE), dtype=np.uint8), None
    path = Path(data) if data else default_data_path()
    if path is None:
        raise FileNotFoundError(
            "no --data given and the committed test sample is not here; "
            "pass --data PATH (a CIFAR-10 test set) or --synthetic"
        )
    split = _data_module().load_split(path, "test")
    return np.ascontiguousarray(split.images), np.asarray(split.labels)


@dataclass(frozen=True)
class Payload:
    """One serialized request and the true labels of its images (None: unknown)."""

    body: bytes
    labels: np.ndarray | None
    images: np.ndarray | None = None  # the request's pixels: for shared memory and --lane


def build_payloads(
    api: str,
    images: np.ndarray,
    labels: np.ndarray | None,
    batch_size: int,
    *,
    model_name: str = DEFAULT_MODEL_NAME,
    top_k: int = 1,
) -> list[Payload]:
    """Serialized requests of ``batch_size`` images each, walking through ``images`` once.

    With fewer images than a batch the images repeat; every request is exactly ``batch_size``.
    """
    n = len(images)
    count = max(1, n // batch_size)
    out = []
    for r in range(count):
        idx = np.arange(r * batch_size, (r + 1) * batch_size) % n
        batch = np.ascontiguousarray(images[idx])
        if api == "native":
            body = classifier_pb2.ClassifyRequest(
                packed=classifier_pb2.PackedImages(data=batch.tobytes(), count=batch_size),
                top_k=top_k,
            ).SerializeToString()
        elif api == "v2":
            req = open_inference_pb2.ModelInferRequest(model_name=model_name)
            tensor = req.inputs.add()
            tensor.name, tensor.datatype = "images", "UINT8"
            tensor.shape.extend([batch_size, *IMAGE_SHAPE])
            req.outputs.add().name = "logits"
            req.raw_input_contents.append(batch.tobytes())
            body = req.SerializeToString()
        else:
            raise ValueError(f"unknown api {api!r}")
        out.append(Payload(body, None if labels is None else labels[idx], batch))
    return out


def predicted_classes(api: str, answer: bytes, batch_size: int) -> np.ndarray:
    """Top-1 class per image from a serialized answer; ValueError when it does not fit the request."""
    if api == "native":
        resp = classifier_pb2.ClassifyResponse.FromString(answer)
        if len(resp.results) != batch_size:
            raise ValueError(f"{len(resp.results)} results for {batch_size} images")
        return np.array([r.predictions[0].class_index for r in resp.results], dtype=np.int64)
    v2 = open_inference_pb2.ModelInferResponse.FromString(answer)
    if v2.raw_output_contents:
        logits = np.frombuffer(v2.raw_output_contents[0], dtype=np.float32)
    elif v2.outputs:
        logits = np.asarray(v2.outputs[0].contents.fp32_contents, dtype=np.float32)
    else:
        raise ValueError("answer holds no output")
    if logits.size != batch_size * NUM_CLASSES:
        raise ValueError(f"{logits.size} logits for {batch_size} images")
    return np.asarray(logits.reshape(batch_size, NUM_CLASSES).argmax(axis=1), dtype=np.int64)


# --------------------------------------------------------------------------- the load loop


@dataclass
class _Samples:
    """What one process measured; merged by the parent."""

    starts: list[float] = field(default_factory=list)  # time.monotonic() (system-wide on Linux)
    ends: list[float] = field(default_factory=list)
    errors: list[tuple[float, str]] = field(default_factory=list)  # (end, status name)
    window: tuple[float, float] = (0.0, 0.0)
    cpu_s: float = 0.0
    elapsed_s: float = 0.0
    correct: int = 0
    checked: int = 0
    verify_error: str = ""
    shared_memory: bool = False


_Shm = tuple[SharedMemorySession, list[_Slot]]


@contextlib.contextmanager
def _shared_memory(cfg: BenchConfig, concurrency: int) -> Iterator[_Shm | None]:
    """One registered region per concurrent caller, when ``cfg`` asks for shared memory and it works.

    Registered with every server (round robin may send any request to any of them), unregistered
    and removed on the way out, whatever ends the run.
    """
    if cfg.api != "v2" or cfg.shared_memory == "off":
        yield None
        return
    servers = local_servers(resolve_target(cfg.address))
    if servers is None:
        if cfg.shared_memory == "on":
            raise ValueError(
                f"--shared-memory on needs every server on this host (loopback or a unix socket); "
                f"{cfg.address} is not"
            )
        logger.debug("shared memory not used: %s is not on this host", cfg.address)
        yield None
        return
    channels = [grpc.insecure_channel(t) for t in servers]
    session = SharedMemorySession(
        [open_inference_pb2_grpc.GRPCInferenceServiceStub(ch) for ch in channels],
        model_name=cfg.model_name,
        labels=[str(i) for i in range(NUM_CLASSES)],
        capacity=cfg.batch_size,
    )
    try:
        try:
            slots = [session.acquire() for _ in range(concurrency)]
        except CifarServeError as exc:
            if cfg.shared_memory == "on":
                raise ValueError(f"--shared-memory on: {cfg.address}: {exc.message}") from None
            logger.debug("shared memory not used with %s (%s): the socket is", cfg.address, exc.message)
            yield None
            return
        yield session, slots
    finally:
        session.close()
        for ch in channels:
            ch.close()


def _shm_predicted(session: SharedMemorySession, slot: _Slot, answer: bytes, batch_size: int) -> np.ndarray:
    """Top-1 class per image from the logits the server wrote into ``slot``."""
    resp = open_inference_pb2.ModelInferResponse.FromString(answer)
    return np.asarray(session.logits(slot, resp, batch_size).argmax(axis=1), dtype=np.int64)


async def _drive(
    cfg: BenchConfig,
    concurrency: int,
    payloads: list[Payload],
    requests: int,
    first_offset: int = 0,
    shm: _Shm | None = None,
) -> _Samples:
    """Run ``concurrency`` closed loops in this process; ``requests`` > 0 counts requests instead of time."""
    # Several servers (or a DNS name standing for several): gRPC's round_robin over the healthy ones.
    target = resolve_target(cfg.address)
    options = [
        ("grpc.max_receive_message_length", _MESSAGE_LIMIT),
        ("grpc.max_send_message_length", _MESSAGE_LIMIT),
        *channel_options(target),
    ]
    channels = [
        grpc.aio.insecure_channel(target.target, options=[*options, ("cifar_bench.channel", i)])
        for i in range(cfg.channels)
    ]
    samples = _Samples(shared_memory=shm is not None)
    lib: AsyncClient | None = None
    if cfg.lane:
        lib = AsyncClient(
            cfg.address,
            stream=cfg.lane == "stream",
            retries=0,
            max_images_per_request=max(cfg.batch_size, 256),
            options=[("grpc.max_send_message_length", _MESSAGE_LIMIT)],
        )
    # With shared memory each caller sends the same small request, naming its own region; the
    # pixels go into the region before each call.
    bodies: list[bytes] = []
    if shm is not None:
        session, slots = shm
        images = payloads[0].images
        assert images is not None  # v2 payloads carry their pixels
        bodies = [session.request(slot, images).SerializeToString() for slot in slots]

    def send_payload(worker: int, p: Payload) -> bytes:
        if shm is None:
            return p.body
        assert p.images is not None
        shm[0].write_images(shm[1][worker], p.images)
        return bodies[worker]

    async def library_call(p: Payload, timeout: float) -> list[Classification]:
        assert lib is not None and p.images is not None
        return await lib.classify(p.images, top_k=cfg.top_k, timeout=timeout)

    def predicted(worker: int, answer: Any) -> np.ndarray:
        if lib is not None:
            return np.array([r.class_index for r in answer], dtype=np.int64)
        if shm is None:
            return predicted_classes(cfg.api, answer, cfg.batch_size)
        return _shm_predicted(shm[0], shm[1][worker], answer, cfg.batch_size)

    try:
        calls = [ch.unary_unary(APIS[cfg.api]) for ch in channels]  # bytes in, bytes out
        for ch in channels:
            await asyncio.wait_for(ch.channel_ready(), cfg.connect_timeout)
        # One checked call before anything is timed: the server answers what we asked.
        first = payloads[first_offset % len(payloads)]
        answer: Any
        if lib is not None:
            answer = await library_call(first, cfg.timeout)
        else:
            answer = await calls[0](send_payload(0, first), timeout=cfg.timeout)
        if cfg.verify != "none":
            try:
                predicted(0, answer)
            except Exception as exc:
                samples.verify_error = f"first answer does not fit the request: {exc}"
                return samples

        started = time.monotonic()
        measure_from = started + cfg.warmup
        stop_at = measure_from + cfg.duration if requests == 0 else float("inf")
        issued = 0  # measured requests handed out (requests mode)
        check_all = cfg.verify == "all"
        cpu0 = time.process_time()

        async def loop(worker: int) -> None:
            nonlocal issued
            call = calls[worker % len(calls)]
            i = first_offset + worker
            while True:
                t0 = time.monotonic()
                if t0 >= stop_at:
                    return
                counted = t0 >= measure_from
                if requests and counted:
                    if issued >= requests:
                        return
                    issued += 1
                p = payloads[i % len(payloads)]
                i += concurrency
                try:
                    if lib is not None:
                        answer = await library_call(p, cfg.timeout)
                    else:
                        answer = await call(send_payload(worker, p), timeout=cfg.timeout)
                except (grpc.aio.AioRpcError, CifarServeError) as exc:
                    t1 = time.monotonic()
                    if requests == 0 or counted:
                        code = exc.code if isinstance(exc, CifarServeError) else exc.code()
                        samples.errors.append((t1, code.name))
                    continue
                t1 = time.monotonic()
                if requests and not counted:
                    continue
                samples.starts.append(t0)
                samples.ends.append(t1)
                if check_all and p.labels is not None:
                    pred = predicted(worker, answer)
                    samples.correct += int((pred == p.labels).sum())
                    samples.checked += len(pred)

        tasks = [asyncio.ensure_future(loop(w)) for w in range(concurrency)]
        if requests:
            await asyncio.gather(*tasks)
            samples.window = (measure_from, time.monotonic())
        else:
            await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
            samples.window = (measure_from, stop_at)
            for t in tasks:
                t.cancel()  # answers still owed would land after the window: drop them
            await asyncio.gather(*tasks, return_exceptions=True)
        samples.cpu_s = time.process_time() - cpu0
        samples.elapsed_s = time.monotonic() - started
        return samples
    finally:
        if lib is not None:
            await lib.close()
        for ch in channels:
            await ch.close()


def _process_main(
    cfg: BenchConfig, concurrency: int, requests: int, offset: int, barrier: Any, queue: Any
) -> None:
    """One client process: load the payloads, wait for the others, drive, send the samples back."""
    try:
        images, labels = load_images(cfg.data, synthetic=cfg.synthetic)
        payloads = build_payloads(
            cfg.api, images, labels, cfg.batch_size, model_name=cfg.model_name, top_k=cfg.top_k
        )
        with _shared_memory(cfg, concurrency) as shm:
            barrier.wait(timeout=120)
            queue.put(asdict(asyncio.run(_drive(cfg, concurrency, payloads, requests, offset, shm))))
    except BaseException as exc:
        queue.put({"verify_error": f"client process failed: {type(exc).__name__}: {exc}"})
        raise


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _collect(cfg: BenchConfig, parts: list[_Samples]) -> BenchResult:
    requests_mode = cfg.requests > 0
    lat_parts: list[np.ndarray] = []
    errors: Counter[str] = Counter()
    for p in parts:
        starts = np.asarray(p.starts, dtype=np.float64)
        ends = np.asarray(p.ends, dtype=np.float64)
        if requests_mode:  # every measured request counts, however long it took
            lat_parts.append(ends - starts)
            errors.update(code for _, code in p.errors)
        else:  # the requests that completed inside this process's window
            lo, hi = p.window
            keep = (ends >= lo) & (ends <= hi)
            lat_parts.append((ends - starts)[keep])
            errors.update(code for end, code in p.errors if lo <= end <= hi)
    lat = np.concatenate(lat_parts) * 1000.0 if lat_parts else np.zeros(0)
    if requests_mode:
        spans = [p.window for p in parts if p.window[1] > p.window[0]]
        window = (max(w[1] for w in spans) - min(w[0] for w in spans)) if spans else 0.0
    else:
        window = cfg.duration  # every process measured this long, at (nearly) the same time
    n = int(lat.size)
    pct: dict[str, float] = {}
    if n:
        q = np.percentile(lat, [50, 90, 99])
        pct = {
            "p50": float(q[0]),
            "p90": float(q[1]),
            "p99": float(q[2]),
            "max": float(lat.max()),
            "min": float(lat.min()),
            "mean": float(lat.mean()),
        }
    checked = sum(p.checked for p in parts)
    notes = [p.verify_error for p in parts if p.verify_error]
    elapsed = max((p.elapsed_s for p in parts), default=0.0)
    rate = 1.0 / window if window > 0 else 0.0
    return BenchResult(
        api=cfg.api,
        address=cfg.address,
        concurrency=cfg.concurrency,
        batch_size=cfg.batch_size,
        processes=cfg.processes,
        channels=cfg.channels,
        mode="requests" if requests_mode else "duration",
        warmup_s=cfg.warmup,
        window_s=window,
        requests=n,
        images=n * cfg.batch_size,
        requests_per_s=n * rate,
        images_per_s=n * cfg.batch_size * rate,
        latency_ms=pct,
        errors=dict(sorted(errors.items())),
        error_count=sum(errors.values()),
        client_cpu_percent=100.0 * sum(p.cpu_s for p in parts) / elapsed if elapsed > 0 else 0.0,
        accuracy=(sum(p.correct for p in parts) / checked) if checked else None,
        verified=not notes,
        notes=notes,
        shared_memory=bool(parts) and all(p.shared_memory for p in parts),
        lane=cfg.lane,
        latencies_ms=lat.tolist() if cfg.keep_latencies else None,
    )


def run_bench(cfg: BenchConfig, payloads: list[Payload] | None = None) -> BenchResult:
    """Run one load test and summarise it (blocking)."""
    cfg.check()
    if cfg.processes == 1:
        if payloads is None:
            images, labels = load_images(cfg.data, synthetic=cfg.synthetic)
            payloads = build_payloads(
                cfg.api, images, labels, cfg.batch_size, model_name=cfg.model_name, top_k=cfg.top_k
            )
        with _shared_memory(cfg, cfg.concurrency) as shm:
            samples = asyncio.run(_drive(cfg, cfg.concurrency, payloads, cfg.requests, shm=shm))
        parts = [samples]
    else:
        ctx = multiprocessing.get_context("spawn")  # no grpc state shared across a fork
        barrier = ctx.Barrier(cfg.processes)
        queue = ctx.Queue()
        conc = _split(cfg.concurrency, cfg.processes)
        reqs = _split(cfg.requests, cfg.processes) if cfg.requests else [0] * cfg.processes
        procs = [
            ctx.Process(target=_process_main, args=(cfg, c, r, i * 7919, barrier, queue), daemon=True)
            for i, (c, r) in enumerate(zip(conc, reqs, strict=True))
        ]
        for p in procs:
            p.start()
        raw = [queue.get() for _ in procs]
        for p in procs:
            p.join()
        parts = []
        for d in raw:
            s = _Samples()
            for k, v in d.items():
                setattr(s, k, tuple(v) if k == "window" else v)
            parts.append(s)
    return _collect(cfg, parts)


# --------------------------------------------------------------------------- CLI


def format_report(r: BenchResult) -> str:
    lat = r.latency_ms
    lines = [
        f"cifar-bench: {r.api} API at {r.address}{' through shared memory' if r.shared_memory else ''}"
        f"{f' through the client library ({r.lane})' if r.lane else ''}, "
        f"concurrency {r.concurrency}, "
        f"{r.batch_size} image(s)/request, {r.processes} process(es), {r.mode} mode, "
        f"warm-up {r.warmup_s:g}s excluded",
        f"  window      {r.window_s:.2f} s",
        f"  requests    {r.requests}  ({r.requests_per_s:.1f} req/s)",
        f"  images      {r.images}  ({r.images_per_s:.1f} img/s)",
    ]
    if lat:
        lines.append(
            f"  latency ms  p50 {lat['p50']:.2f}  p90 {lat['p90']:.2f}  p99 {lat['p99']:.2f}  "
            f"max {lat['max']:.2f}"
        )
    lines.append("  errors      " + (", ".join(f"{k}: {v}" for k, v in r.errors.items()) or "none"))
    if r.accuracy is not None:
        lines.append(f"  top-1 vs labels  {r.accuracy:.4f}")
    lines.append(f"  client CPU  {r.client_cpu_percent:.0f}% of one core")
    lines.extend(f"  NOTE {n}" for n in r.notes)
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    d = BenchConfig()
    p = argparse.ArgumentParser(
        prog="cifar-bench",
        description="Closed-loop load generator for cifar-serve: real CIFAR-10 test images over the "
        "native API or the Open Inference Protocol; reports throughput, latency percentiles and errors.",
    )
    p.add_argument(
        "--server",
        "-s",
        dest="server",
        default=None,
        metavar="HOST:PORT[,HOST:PORT...]",
        help="server, several comma-separated, or dns:///NAME:PORT; requests are spread over the "
        f"healthy ones (round_robin) [default: $CIFAR_SERVE_ADDRESS or {d.address}]",
    )
    p.add_argument("--address", dest="address", default=None, help=argparse.SUPPRESS)  # deprecated: --server
    p.add_argument(
        "--api",
        choices=sorted(APIS),
        default=d.api,
        help="native: cifar_serve.v1.Classifier/Classify (packed pixels); "
        "v2: Open Inference Protocol ModelInfer (raw_input_contents)",
    )
    p.add_argument("--concurrency", "-c", type=int, default=d.concurrency, help="requests in flight at once")
    p.add_argument("--batch-size", "-b", type=int, default=d.batch_size, help="images per request")
    p.add_argument(
        "--duration", "-d", type=float, default=d.duration, help="seconds measured (after warm-up)"
    )
    p.add_argument(
        "--requests",
        "-n",
        type=int,
        default=0,
        help="send exactly N measured requests instead of running for --duration",
    )
    p.add_argument("--warmup", "-w", type=float, default=d.warmup, help="seconds of load before measuring")
    p.add_argument(
        "--data",
        default=None,
        help="CIFAR-10 test set (zip/folder/official tarball) for payloads "
        "[default: the committed 600-image sample]",
    )
    p.add_argument("--synthetic", action="store_true", help="random pixels instead of real images")
    p.add_argument(
        "--model-name",
        default=None,
        help="model name for --api v2 [default: the one the server serves, from its statistics]",
    )
    p.add_argument("--top-k", type=int, default=d.top_k, help="top_k for --api native")
    p.add_argument("--timeout", type=float, default=d.timeout, help="per-request deadline, seconds")
    p.add_argument("--channels", type=int, default=d.channels, help="gRPC connections per process")
    p.add_argument(
        "--processes",
        "-p",
        type=int,
        default=d.processes,
        help="client processes sharing the concurrency (for when one process cannot keep up)",
    )
    p.add_argument(
        "--verify",
        choices=("first", "all", "none"),
        default=d.verify,
        help="check the first answer (default), every answer (reports top-1 accuracy), or none",
    )
    p.add_argument(
        "--shared-memory",
        choices=SHARED_MEMORY_MODES,
        default=d.shared_memory,
        help="v2 only: pass images and logits through system shared memory; auto: when every server is "
        "on this host and accepts a region (default), on: fail if not, off: through the socket",
    )
    p.add_argument(
        "--lane",
        choices=LANES[1:],
        default=None,
        help="native API through the client library's AsyncClient instead of raw gRPC bytes: unary "
        "Classify calls, or its stream lane (one ClassifyStream); run both to compare",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def served_model(address: str, timeout: float) -> str:
    """The model ``address`` serves (its statistics with no name list every model it serves);
    the shipped model's name when the server does not say."""
    try:
        target = resolve_target(address)
        with grpc.insecure_channel(target.target, options=channel_options(target)) as channel:
            stub = open_inference_pb2_grpc.GRPCInferenceServiceStub(channel)
            stats = stub.ModelStatistics(open_inference_pb2.ModelStatisticsRequest(), timeout=timeout)
    except (grpc.RpcError, ValueError) as exc:
        logger.debug("cannot ask %s which model it serves (%s): using %s", address, exc, DEFAULT_MODEL_NAME)
        return DEFAULT_MODEL_NAME
    return str(stats.model_stats[0].name) if stats.model_stats else DEFAULT_MODEL_NAME


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.address is not None:
        if args.server is not None:
            parser.error("--address is the old name of --server: give one of them")
        sys.stderr.write("cifar-bench: --address is deprecated, use --server\n")
    server = args.server or args.address or os.environ.get("CIFAR_SERVE_ADDRESS") or BenchConfig.address
    cfg = BenchConfig(
        address=server,
        api=args.api,
        concurrency=args.concurrency,
        batch_size=args.batch_size,
        duration=args.duration,
        requests=args.requests,
        warmup=args.warmup,
        data=args.data,
        synthetic=args.synthetic,
        model_name=args.model_name
        or (served_model(server, args.timeout) if args.api == "v2" else DEFAULT_MODEL_NAME),
        top_k=args.top_k,
        timeout=args.timeout,
        channels=args.channels,
        processes=args.processes,
        verify=args.verify,
        shared_memory=args.shared_memory,
        lane=args.lane or "",
    )
    try:
        cfg.check()
        result = run_bench(cfg)
    except ValueError as exc:
        sys.stderr.write(f"cifar-bench: {exc}\n")
        return 2
    except (TimeoutError, grpc.aio.AioRpcError, FileNotFoundError) as exc:
        what = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else (str(exc) or "timed out")
        sys.stderr.write(f"cifar-bench: cannot run against {cfg.address}: {what}\n")
        return 2
    if args.json:
        sys.stdout.write(json.dumps(result.as_dict(), indent=2) + "\n")
    else:
        sys.stdout.write(format_report(result))
    return 0 if result.verified else 1


if __name__ == "__main__":
    sys.exit(main())
