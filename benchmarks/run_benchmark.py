"""The serving benchmark: the model's own limit and the served throughput, in one run, on one machine.

    .venv/bin/python benchmarks/run_benchmark.py            # full run (`make bench`), ~10 minutes
    .venv/bin/python benchmarks/run_benchmark.py --quick    # seconds-scale smoke run (tests, CI)

What it measures, each part in its own process so no two share a GIL:

1. **The limit**: the raw in-process throughput of the same runtime (``ModelRuntime``, same
   backend, precision, threads and device) at the server's batch size, and the raw single-image
   forward latency. No gRPC, no batcher.
2. **Served**: a real ``python -m cifar_serve.server`` with dynamic batching, loaded by
   ``cifar-bench`` (separate process(es)) at each concurrency with single-image and 64-image
   requests.
3. **Unbatched**: the same server with ``--max-batch-size 1``, single-image requests.
4. **The generator's own ceiling**: ``cifar-bench`` against a model-free echo server.
5. **Thread split** (full run): served throughput at concurrency 32 with ``--torch-threads`` 1
   and 2, so the event loop / batcher / model split of the cores is measured, not guessed.

It writes ``results.json``, ``serving.png`` (throughput and p99 latency against concurrency)
into ``--out-dir`` (``benchmarks/``) and a generated section of ``--markdown``
(``BENCHMARKS.md``), between markers, leaving the hand-written text around it alone.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("cifar_serve.bench.run")

REPO = Path(__file__).resolve().parents[1]
BEGIN = "<!-- BEGIN generated:{key} (written by benchmarks/; edits here are overwritten) -->"
END = "<!-- END generated:{key} -->"
GOALS = {"saturation": 0.9, "batching": 3.0, "latency_ms": 1.0}


# --------------------------------------------------------------------------- options


@dataclass
class Plan:
    model_dir: str
    device: str
    backend: str
    precision: str
    torch_threads: int
    max_batch_size: int
    max_batch_delay_ms: float
    concurrency: list[int]
    batch_sizes: list[int]
    unbatched_batch_sizes: list[int]
    duration: float
    warmup: float
    max_window: float
    api: str
    client_processes: int
    thread_splits: list[int]
    echo: bool
    raw_seconds: float
    data: str | None
    profile: bool
    out_dir: Path
    markdown: Path | None
    label: str
    quick: bool
    command: str = ""
    extra_notes: list[str] = field(default_factory=list)
    server_args: list[str] = field(default_factory=list)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()] if text else []


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run in seconds: small batch, short windows, concurrency 1,4 (numbers meaningless)",
    )
    p.add_argument("--model-dir", default=str(REPO / "artifacts"))
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--backend", default="auto", choices=("auto", "torchscript", "onnxruntime"))
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument(
        "--torch-threads", type=int, default=0, help="the server's --torch-threads (0: its default)"
    )
    p.add_argument("--max-batch-size", type=int, default=None, help="default 64 (--quick: 8)")
    p.add_argument("--max-batch-delay-ms", type=float, default=2.0)
    p.add_argument("--concurrency", type=_ints, default=None, help="default 1,8,32,128 (--quick: 1,4)")
    p.add_argument(
        "--batch-sizes", type=_ints, default=None, help="images per request, default 1,64 (--quick: 1,8)"
    )
    p.add_argument(
        "--unbatched-batch-sizes",
        type=_ints,
        default=[1],
        help="request sizes run against the max-batch-size 1 server (default 1)",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        help="measured seconds per point, at least (default 10; --quick 1)",
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="warm-up seconds per point, at least (default 3; --quick 0.5); "
        "stretched to cover the round trip of a full queue",
    )
    p.add_argument("--max-window", type=float, default=60.0, help="cap on a point's stretched duration")
    p.add_argument("--api", default="native", choices=("native", "v2"))
    p.add_argument(
        "--client-processes",
        type=int,
        default=1,
        help="cifar-bench processes per point (used when concurrency allows)",
    )
    p.add_argument(
        "--thread-splits",
        type=_ints,
        default=None,
        help="--torch-threads values to compare at concurrency 32 (default 1,2; --quick: none)",
    )
    p.add_argument("--no-echo", action="store_true", help="skip the generator-ceiling measurement")
    p.add_argument("--raw-seconds", type=float, default=None, help="seconds per raw measurement (default 8)")
    p.add_argument("--data", default=None, help="test images for payloads (default: the committed sample)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the batched server at concurrency 32 (single images) into --out-dir",
    )
    p.add_argument("--out-dir", default=str(REPO / "benchmarks"))
    p.add_argument(
        "--markdown",
        default=str(REPO / "BENCHMARKS.md"),
        help="file whose generated section is replaced ('' to skip)",
    )
    p.add_argument("--label", default="", help="suffix for output names and the markdown section (e.g. cuda)")
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra flag for the served server, e.g. --server-arg=--workers=4 (repeatable)",
    )
    p.add_argument("--log-level", default="INFO")
    return p


def plan_from_args(args: argparse.Namespace, argv: Sequence[str]) -> Plan:
    q = args.quick

    def pick(value: Any, full: Any, quick: Any) -> Any:
        return value if value is not None else (quick if q else full)

    return Plan(
        model_dir=args.model_dir,
        device=args.device,
        backend=args.backend,
        precision=args.precision,
        torch_threads=args.torch_threads,
        max_batch_size=pick(args.max_batch_size, 64, 8),
        max_batch_delay_ms=args.max_batch_delay_ms,
        concurrency=pick(args.concurrency, [1, 8, 32, 128], [1, 4]),
        batch_sizes=pick(args.batch_sizes, [1, 64], [1, 8]),
        unbatched_batch_sizes=args.unbatched_batch_sizes,
        duration=pick(args.duration, 10.0, 1.0),
        warmup=pick(args.warmup, 3.0, 0.5),
        max_window=args.max_window,
        api=args.api,
        client_processes=max(1, args.client_processes),
        thread_splits=pick(args.thread_splits, [1, 2], []),
        echo=not args.no_echo,
        raw_seconds=pick(args.raw_seconds, 8.0, 1.0),
        data=args.data,
        profile=args.profile,
        out_dir=Path(args.out_dir),
        markdown=Path(args.markdown) if args.markdown else None,
        label=args.label,
        quick=q,
        command=" ".join(shlex.quote(a) for a in ["benchmarks/run_benchmark.py", *argv]),
        server_args=list(args.server_arg),
    )


# --------------------------------------------------------------------------- machine


def machine_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info["cpu_model"] = fields.get("Model name", "")
        info["cores_per_socket"] = fields.get("Core(s) per socket", "")
        info["threads_per_core"] = fields.get("Thread(s) per core", "")
        info["hypervisor"] = fields.get("Hypervisor vendor", "")
        flags = fields.get("Flags", "").split()
        info["amx_bf16"] = "amx_bf16" in flags
        info["avx512_bf16"] = "avx512_bf16" in flags
    code = (
        "import json, torch, grpc, numpy; d = {'torch': torch.__version__, 'grpcio': grpc.__version__, "
        "'numpy': numpy.__version__}\n"
        "try:\n import onnxruntime; d['onnxruntime'] = onnxruntime.__version__\n"
        "except Exception: pass\n"
        "import google.protobuf as pb; d['protobuf'] = pb.__version__\n"
        "if torch.cuda.is_available(): d['gpu'] = torch.cuda.get_device_name(); "
        "d['cuda'] = torch.version.cuda\n"
        "print(json.dumps(d))"
    )
    with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
        info.update(json.loads(out.strip().splitlines()[-1]))
    return info


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# --------------------------------------------------------------------------- raw (child process)


def runtime_parser(prog: str) -> argparse.ArgumentParser:
    """A measuring child's options so far: the runtime :func:`_runtime_args` picks, its threads."""
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--threads", type=int, default=0)
    return p


def raw_main(argv: Sequence[str]) -> int:
    """``run_benchmark.py _raw ...``: the runtime alone, printed as one JSON line."""
    import threading
    import warnings

    import numpy as np

    p = runtime_parser("run_benchmark.py _raw")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--inflight", type=int, default=0, help="threads calling infer at once (0: as the server)")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--data", default=None)
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from cifar_serve.client.bench import load_images
    from cifar_serve.server.runtime import ModelRuntime

    images, _ = load_images(a.data)
    rt = ModelRuntime(
        a.model_dir,
        device=a.device,
        backend=a.backend,
        precision=a.precision,
        max_batch_size=a.batch,
        slots=2,
        threads=a.threads,
    )
    inflight = a.inflight or (2 if rt.device.type == "cuda" else 1)
    reps = -(-a.batch // len(images))
    pool = np.ascontiguousarray(np.concatenate([images] * max(1, reps)))
    batch = pool[: a.batch]
    one = pool[:1]
    # Warm up as the server does (every batch size 1..max, twice), then what will be timed.
    rt.warmup()
    for _ in range(3):
        rt.infer(batch)
        rt.infer(one)
    # Single-image forward latency: one at a time, the model otherwise idle.
    single: list[float] = []
    t_end = time.perf_counter() + max(1.0, a.seconds / 4)
    i = 0
    while time.perf_counter() < t_end or len(single) < 20:
        x = pool[i % len(pool) : i % len(pool) + 1]
        t0 = time.perf_counter()
        rt.infer(x)
        single.append(time.perf_counter() - t0)
        i += 1
    # Throughput at the server's batch size, with as many batches in flight as the server allows.
    stop = time.perf_counter() + a.seconds
    counts = [0] * inflight
    lat: list[list[float]] = [[] for _ in range(inflight)]

    def worker(k: int) -> None:
        j = k
        while time.perf_counter() < stop:
            s = (j * a.batch) % max(1, len(pool) - a.batch + 1)
            t0 = time.perf_counter()
            rt.infer(pool[s : s + a.batch])
            lat[k].append(time.perf_counter() - t0)
            counts[k] += 1
            j += inflight

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(inflight)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    batches = sum(counts)
    all_lat = np.array([x for ls in lat for x in ls]) * 1000
    s_ms = np.array(single) * 1000
    out = {
        "batch": a.batch,
        "inflight": inflight,
        "threads": a.threads,
        "torch_threads": _torch_threads(),
        "describe": {k: v for k, v in rt.describe().items() if k != "sha256"},
        "images_per_s": batches * a.batch / elapsed,
        "batches": batches,
        "batch_ms_p50": float(np.percentile(all_lat, 50)),
        "single_ms_p50": float(np.percentile(s_ms, 50)),
        "single_ms_mean": float(s_ms.mean()),
        "single_ms_p99": float(np.percentile(s_ms, 99)),
        "single_count": len(single),
        "single_images_per_s": 1000.0 / float(np.percentile(s_ms, 50)),
    }
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def _runtime_args(plan: Plan) -> list[str]:
    """The flags that pick the runtime, identical for the raw measurement and the servers."""
    return [
        "--model-dir",
        plan.model_dir,
        "--device",
        plan.device,
        "--backend",
        plan.backend,
        "--precision",
        plan.precision,
    ]


def run_raw(plan: Plan, threads: int, logdir: Path) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "_raw",
        *_runtime_args(plan),
        "--threads",
        str(threads),
        "--batch",
        str(plan.max_batch_size),
        "--seconds",
        str(plan.raw_seconds),
    ]
    if plan.data:
        cmd += ["--data", plan.data]
    log = logdir / f"raw-t{threads}.log"
    with log.open("w") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"raw measurement failed (rc {proc.returncode}):\n{_tail(log)}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_serving(address: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 600.0) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{_tail(log)}")
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.3)
    raise RuntimeError(f"server at {address} not SERVING after {timeout:.0f}s:\n{_tail(log)}")


@contextlib.contextmanager
def cifar_server(flags: list[str], log: Path, what: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """(address, process) of ``cifar-serve`` with ``flags`` on a free loopback port, once SERVING."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "cifar_serve.server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        "-1",
        *flags,
    ]
    started = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    try:
        wait_serving(address, proc, log)
        logger.info("%s ready on %s in %.1fs", what, address, time.monotonic() - started)
        yield address, proc
    finally:
        _stop(proc)


@contextlib.contextmanager
def model_server(
    plan: Plan, logdir: Path, name: str, *, max_batch_size: int, torch_threads: int, max_queue_images: int
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    flags = [
        *_runtime_args(plan),
        "--max-batch-size",
        str(max_batch_size),
        "--max-batch-delay-ms",
        str(plan.max_batch_delay_ms),
        "--torch-threads",
        str(torch_threads),
        "--max-queue-images",
        str(max_queue_images),
        "--log-level",
        "WARNING",
        *plan.server_args,
    ]
    with cifar_server(flags, logdir / f"server-{name}.log", f"server {name}") as served:
        yield served


@contextlib.contextmanager
def echo_server(logdir: Path) -> Iterator[str]:
    log = logdir / "echo.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "benchmarks" / "echo_server.py"), "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line.startswith("listening on "):
            raise RuntimeError(f"echo server did not start:\n{_tail(log)}")
        yield line.removeprefix("listening on ")
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- load


def window_for(plan: Plan, concurrency: int, batch: int, rate: float) -> tuple[float, float]:
    """Warm-up and duration for a point: long enough to cover a full queue's round trip."""
    round_trip = concurrency * batch / max(rate, 1e-6)
    warmup = max(plan.warmup, min(1.5 * round_trip, plan.max_window))
    duration = max(plan.duration, min(3.0 * round_trip, plan.max_window))
    return warmup, duration


def run_load(
    plan: Plan,
    address: str,
    concurrency: int,
    batch: int,
    warmup: float,
    duration: float,
    processes: int | None = None,
) -> dict[str, Any]:
    procs = processes if processes is not None else min(plan.client_processes, concurrency)
    return run_cifar_bench(address, plan.api, concurrency, batch, warmup, duration, procs, plan.data)


def run_cifar_bench(
    address: str,
    api: str,
    concurrency: int,
    batch: int,
    warmup: float,
    duration: float,
    procs: int,
    data: str | None = None,
    model_name: str | None = None,
) -> dict[str, Any]:
    """One point of ``cifar-bench`` (the project's load generator, ``procs`` processes): its JSON.

    ``model_name``: the served model's, for ``--api v2`` (cifar-bench assumes the shipped model's).
    """
    cmd = [
        sys.executable,
        "-m",
        "cifar_serve.client.bench",
        "--server",
        address,
        "--api",
        api,
        "--concurrency",
        str(concurrency),
        "--batch-size",
        str(batch),
        "--duration",
        f"{duration:.2f}",
        "--warmup",
        f"{warmup:.2f}",
        "--processes",
        str(procs),
        "--json",
        "--timeout",
        "600",
    ]
    if data:
        cmd += ["--data", data]
    if model_name:
        cmd += ["--model-name", model_name]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=warmup + duration + 300)
    if proc.returncode not in (0, 1) or not proc.stdout.strip():
        raise RuntimeError(f"cifar-bench failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout)
    lat = result.get("latency_ms") or {}
    logger.info(
        "  c=%-4d b=%-3d %8.1f img/s %8.1f req/s  p50 %8.2f ms  p99 %8.2f ms  errors %s",
        concurrency,
        batch,
        result["images_per_s"],
        result["requests_per_s"],
        lat.get("p50", float("nan")),
        lat.get("p99", float("nan")),
        result["errors"] or "-",
    )
    return result


def profile_server(plan: Plan, pid: int, seconds: float, name: str) -> str | None:
    """Sample the server with py-spy while load runs; returns the output path or None."""
    exe = Path(sys.executable).with_name("py-spy")
    if not exe.exists():
        logger.warning("py-spy not installed (pip install py-spy): skipping the profile")
        return None
    out = plan.out_dir / f"profile-{name}{_suffix(plan)}.txt"
    cmd = [
        str(exe),
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(int(max(1, seconds))),
        "--format",
        "raw",
        "--output",
        str(out) + ".raw",
        "--nonblocking",
        "--threads",
    ]
    return_code = subprocess.run(cmd, capture_output=True, text=True).returncode
    if return_code != 0:
        logger.warning("py-spy failed (rc %d): no profile", return_code)
        return None
    out.write_text(summarise_profile(Path(str(out) + ".raw")))
    Path(str(out) + ".raw").unlink(missing_ok=True)
    return str(out)


@contextlib.contextmanager
def profiling(plan: Plan, pid: int, delay: float, seconds: float, name: str) -> Iterator[dict[str, Any]]:
    """py-spy the server in the background for ``seconds`` after ``delay`` (the load's warm-up)."""
    import threading

    found: dict[str, Any] = {}

    def sample() -> None:
        time.sleep(delay)
        found["path"] = profile_server(plan, pid, seconds, name)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        yield found
    finally:
        th.join()


def summarise_profile(raw: Path, top: int = 25) -> str:
    """py-spy's collapsed stacks -> a self-time and an inclusive-time table by function."""
    self_t: dict[str, int] = {}
    incl: dict[str, int] = {}
    thread_t: dict[str, int] = {}
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        n = int(count_text)
        total += n
        frames = stack.split(";")
        thread_t[frames[0]] = thread_t.get(frames[0], 0) + n
        names = [f.split(" (")[0] + " (" + f.rsplit("/", 1)[-1] if " (" in f else f for f in frames[1:]]
        if names:
            self_t[names[-1]] = self_t.get(names[-1], 0) + n
        for fn in set(names):
            incl[fn] = incl.get(fn, 0) + n
    lines = [f"py-spy samples: {total}", "", "by thread:"]
    lines += [f"  {100 * v / total:5.1f}%  {k}" for k, v in sorted(thread_t.items(), key=lambda kv: -kv[1])]
    lines += ["", "self time (top):"]
    lines += [
        f"  {100 * v / total:5.1f}%  {k}" for k, v in sorted(self_t.items(), key=lambda kv: -kv[1])[:top]
    ]
    lines += ["", "inclusive time (top):"]
    lines += [f"  {100 * v / total:5.1f}%  {k}" for k, v in sorted(incl.items(), key=lambda kv: -kv[1])[:top]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the run


def run(plan: Plan) -> dict[str, Any]:
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    logdir = Path(tempfile.mkdtemp(prefix="cifar-bench-logs-"))
    started = time.time()
    results: dict[str, Any] = {
        "label": plan.label or plan.device,
        "command": plan.command,
        "quick": plan.quick,
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_start": loadavg(),
        "machine": machine_info(plan.device),
        "config": {
            "model_dir": plan.model_dir,
            "device": plan.device,
            "backend": plan.backend,
            "precision": plan.precision,
            "torch_threads": plan.torch_threads,
            "max_batch_size": plan.max_batch_size,
            "max_batch_delay_ms": plan.max_batch_delay_ms,
            "api": plan.api,
            "client_processes": plan.client_processes,
        },
        "logs": str(logdir),
    }
    logger.info("machine: %s", results["machine"])

    logger.info("raw model, batch %d, torch threads %s", plan.max_batch_size, plan.torch_threads or "default")
    raw = run_raw(plan, plan.torch_threads, logdir)
    results["raw"] = raw
    logger.info(
        "  raw: %.1f img/s at batch %d; single image %.2f ms p50",
        raw["images_per_s"],
        raw["batch"],
        raw["single_ms_p50"],
    )

    max_conc = max(plan.concurrency)
    queue_images = max(4096, max_conc * max(plan.batch_sizes + plan.unbatched_batch_sizes))

    if plan.echo:
        with echo_server(logdir) as address:
            conc = 32 if 32 in plan.concurrency else max_conc
            logger.info("generator ceiling against the echo server (c=%d)", conc)
            results["echo"] = [
                run_load(plan, address, conc, b, plan.warmup, plan.duration) for b in plan.batch_sizes
            ]

    served: list[dict[str, Any]] = []
    with model_server(
        plan,
        logdir,
        "batched",
        max_batch_size=plan.max_batch_size,
        torch_threads=plan.torch_threads,
        max_queue_images=queue_images,
    ) as (address, proc):
        logger.info(
            "batched server (max batch %d, delay %g ms)", plan.max_batch_size, plan.max_batch_delay_ms
        )
        for b in plan.batch_sizes:
            for c in plan.concurrency:
                warm, dur = window_for(plan, c, b, raw["images_per_s"])
                if plan.profile and b == 1 and c == (32 if 32 in plan.concurrency else max_conc):
                    with profiling(plan, proc.pid, warm, dur, "batched-c32-b1") as prof:
                        r = run_load(plan, address, c, b, warm, dur)
                    results["profile"] = prof.get("path")
                else:
                    r = run_load(plan, address, c, b, warm, dur)
                served.append({"server": "batched", **_row(r)})

    with model_server(
        plan,
        logdir,
        "unbatched",
        max_batch_size=1,
        torch_threads=plan.torch_threads,
        max_queue_images=queue_images,
    ) as (address, _proc):
        logger.info("unbatched server (max batch 1)")
        for b in plan.unbatched_batch_sizes:
            for c in plan.concurrency:
                warm, dur = window_for(plan, c, b, raw["single_images_per_s"])
                served.append({"server": "unbatched", **_row(run_load(plan, address, c, b, warm, dur))})
    results["served"] = served

    splits = []
    for t in plan.thread_splits:
        logger.info("thread split: --torch-threads %d", t)
        raw_t = run_raw(plan, t, logdir)
        c = 32
        with model_server(
            plan,
            logdir,
            f"t{t}",
            max_batch_size=plan.max_batch_size,
            torch_threads=t,
            max_queue_images=queue_images,
        ) as (address, _proc):
            for b in plan.batch_sizes:
                warm, dur = window_for(plan, c, b, raw_t["images_per_s"])
                splits.append(
                    {
                        "torch_threads": t,
                        "raw_images_per_s": raw_t["images_per_s"],
                        "raw_single_ms_p50": raw_t["single_ms_p50"],
                        **_row(run_load(plan, address, c, b, warm, dur)),
                    }
                )
    results["thread_splits"] = splits
    results["ratios"] = ratios(results)
    results["loadavg_end"] = loadavg()
    results["wall_s"] = round(time.time() - started, 1)
    return results


def _row(r: dict[str, Any]) -> dict[str, Any]:
    lat = r.get("latency_ms") or {}
    return {
        "concurrency": r["concurrency"],
        "batch_size": r["batch_size"],
        "images_per_s": r["images_per_s"],
        "requests_per_s": r["requests_per_s"],
        "p50_ms": lat.get("p50"),
        "p90_ms": lat.get("p90"),
        "p99_ms": lat.get("p99"),
        "max_ms": lat.get("max"),
        "requests": r["requests"],
        "errors": r["errors"],
        "window_s": r["window_s"],
        "warmup_s": r["warmup_s"],
        "client_cpu_percent": r["client_cpu_percent"],
    }


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    raw = results["raw"]
    rows = results["served"]
    batched = [r for r in rows if r["server"] == "batched" and not r["errors"]]
    out: dict[str, Any] = {}
    if batched:
        best = max(batched, key=lambda r: r["images_per_s"])
        out["saturation"] = {
            "value": best["images_per_s"] / raw["images_per_s"],
            "goal": GOALS["saturation"],
            "served_images_per_s": best["images_per_s"],
            "raw_images_per_s": raw["images_per_s"],
            "at": {"concurrency": best["concurrency"], "batch_size": best["batch_size"]},
        }
        singles = [r for r in batched if r["batch_size"] == 1]
        if singles:
            b1 = max(singles, key=lambda r: r["images_per_s"])
            out["saturation_single_image"] = {
                "value": b1["images_per_s"] / raw["images_per_s"],
                "served_images_per_s": b1["images_per_s"],
                "at": {"concurrency": b1["concurrency"], "batch_size": 1},
            }

    def find(server: str, c: int, b: int) -> dict[str, Any] | None:
        return next(
            (r for r in rows if r["server"] == server and r["concurrency"] == c and r["batch_size"] == b),
            None,
        )

    concs = sorted({r["concurrency"] for r in rows})
    c_ref = 32 if 32 in concs else (max(concs) if concs else 0)
    on, off = find("batched", c_ref, 1), find("unbatched", c_ref, 1)
    if on and off and off["images_per_s"] > 0:
        out["batching"] = {
            "value": on["images_per_s"] / off["images_per_s"],
            "goal": GOALS["batching"],
            "concurrency": c_ref,
            "batched_images_per_s": on["images_per_s"],
            "unbatched_images_per_s": off["images_per_s"],
        }
    one = find("batched", 1, 1)
    if one and one["p50_ms"] is not None:
        out["latency_overhead_ms"] = {
            "value": one["p50_ms"] - raw["single_ms_p50"],
            "goal": GOALS["latency_ms"],
            "served_p50_ms": one["p50_ms"],
            "raw_single_ms_p50": raw["single_ms_p50"],
        }
        one_off = find("unbatched", 1, 1)
        if one_off and one_off["p50_ms"] is not None:
            out["latency_overhead_unbatched_ms"] = {
                "value": one_off["p50_ms"] - raw["single_ms_p50"],
                "served_p50_ms": one_off["p50_ms"],
            }
    return out


# --------------------------------------------------------------------------- outputs


def _suffix(plan: Plan) -> str:
    return f"-{plan.label}" if plan.label else ""


def plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib not installed: no plot")
        return False
    rows = results["served"]
    series: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        series.setdefault(f"{r['server']}, {r['batch_size']} img/request", []).append(r)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, pts in series.items():
        pts = sorted(pts, key=lambda r: r["concurrency"])
        xs = [p["concurrency"] for p in pts]
        ax1.plot(xs, [p["images_per_s"] for p in pts], marker="o", label=name)
        ax2.plot(xs, [p["p99_ms"] or float("nan") for p in pts], marker="o", label=name)
    raw = results["raw"]
    ax1.axhline(
        raw["images_per_s"], color="k", linestyle="--", linewidth=1, label=f"raw model, batch {raw['batch']}"
    )
    ax1.axhline(
        raw["single_images_per_s"], color="grey", linestyle=":", linewidth=1, label="raw model, batch 1"
    )
    concs = sorted({r["concurrency"] for r in rows})
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(concs, [str(c) for c in concs])
        ax.set_xlabel("concurrent requests")
        ax.grid(True, which="both", alpha=0.3)
    ax1.set_ylabel("images / s")
    ax1.set_title("throughput")
    ax2.set_yscale("log")
    ax2.set_ylabel("p99 latency (ms)")
    ax2.set_title("p99 latency")
    ax1.legend(fontsize=8)
    m = results["machine"]
    fig.suptitle(
        f"cifar-serve {results['config']['backend']} {results['config']['precision']} on "
        f"{m.get('gpu') or m.get('cpu_model', '?')} ({m.get('cpus')} CPUs)"
        + (" [--quick]" if results["quick"] else ""),
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def markdown(results: dict[str, Any], png: str | None) -> str:
    m, cfg, raw, r = results["machine"], results["config"], results["raw"], results["ratios"]
    out = [
        f"### Serving benchmark: {results['label']}"
        + (" (--quick smoke run: numbers meaningless)" if results["quick"] else ""),
        "",
    ]
    out.append(f"Command: `{results['command']}` — started {results['started']}, took {results['wall_s']} s.")
    out.append("")
    gpu = f", GPU {m['gpu']} (CUDA {m.get('cuda')})" if m.get("gpu") else ""
    out.append(
        f"Machine: {m.get('cpu_model', '?')}, {m.get('cpus')} CPUs "
        f"({m.get('cores_per_socket')} cores/socket, "
        f"{m.get('threads_per_core')} thread/core, {m.get('hypervisor') or 'bare metal'}), "
        f"AMX bf16: {'yes' if m.get('amx_bf16') else 'no'}{gpu}; Python {m.get('python')}, torch "
        f"{m.get('torch')}, onnxruntime {m.get('onnxruntime', '-')}, grpcio {m.get('grpcio')}, numpy "
        f"{m.get('numpy')}. Load average at start {results['loadavg_start']}, at end "
        f"{results['loadavg_end']} (anything well above 0 means other work shared the cores)."
    )
    out.append("")
    out.append(
        f"Server: `--device {cfg['device']} --backend {cfg['backend']} --precision {cfg['precision']} "
        f"--max-batch-size {cfg['max_batch_size']} --max-batch-delay-ms {cfg['max_batch_delay_ms']:g} "
        f"--torch-threads {cfg['torch_threads']}` (torch uses {raw['torch_threads']} threads); load: "
        f"`cifar-bench --api {cfg['api']}` in separate process(es), closed loop, real CIFAR-10 test images."
    )
    out.append("")
    out.append("| what | value | goal | met |")
    out.append("| --- | --- | --- | --- |")
    if "saturation" in r:
        s = r["saturation"]
        out.append(
            f"| served at saturation / raw model | **{s['value']:.2f}** ({s['served_images_per_s']:.0f} / "
            f"{s['raw_images_per_s']:.0f} img/s; c={s['at']['concurrency']}, {s['at']['batch_size']} "
            f"img/request) | >= {s['goal']} | {'yes' if s['value'] >= s['goal'] else 'no'} |"
        )
    if "saturation_single_image" in r:
        s = r["saturation_single_image"]
        out.append(
            f"| same, single-image requests only | {s['value']:.2f} ({s['served_images_per_s']:.0f} img/s, "
            f"c={s['at']['concurrency']}) | | |"
        )
    if "batching" in r:
        s = r["batching"]
        out.append(
            f"| batched / unbatched, c={s['concurrency']}, 1 img/request | **{s['value']:.2f}x** "
            f"({s['batched_images_per_s']:.0f} / {s['unbatched_images_per_s']:.0f} img/s) | >= "
            f"{s['goal']:g}x | {'yes' if s['value'] >= s['goal'] else 'no'} |"
        )
    if "latency_overhead_ms" in r:
        s = r["latency_overhead_ms"]
        out.append(
            f"| served p50 at c=1 minus raw single-image forward | **{s['value']:+.2f} ms** "
            f"({s['served_p50_ms']:.2f} - {s['raw_single_ms_p50']:.2f}) | <= {s['goal']:g} ms | "
            f"{'yes' if s['value'] <= s['goal'] else 'no'} |"
        )
    if "latency_overhead_unbatched_ms" in r:
        s = r["latency_overhead_unbatched_ms"]
        out.append(
            f"| same, unbatched server (no batching delay) | {s['value']:+.2f} ms ({s['served_p50_ms']:.2f} "
            f"ms) | | |"
        )
    out.append("")
    out.append(
        f"Raw model (no gRPC): {raw['images_per_s']:.1f} img/s at batch {raw['batch']} "
        f"({raw['batch_ms_p50']:.1f} ms a batch, {raw['inflight']} in flight); single image "
        f"{raw['single_ms_p50']:.2f} ms p50 ({raw['single_ms_p99']:.2f} ms p99)."
    )
    out.append("")
    out.append(
        "| server | img/request | concurrency | img/s | req/s | p50 ms | p90 ms | p99 ms | max ms | "
        "errors | client CPU |"
    )
    out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    for row in results["served"]:
        errs = ", ".join(f"{k} {v}" for k, v in row["errors"].items()) or "0"
        out.append(
            f"| {row['server']} | {row['batch_size']} | {row['concurrency']} | {row['images_per_s']:.1f} | "
            f"{row['requests_per_s']:.1f} | {_fmt(row['p50_ms'], '.2f')} | {_fmt(row['p90_ms'], '.2f')} | "
            f"{_fmt(row['p99_ms'], '.2f')} | {_fmt(row['max_ms'], '.1f')} | {errs} | "
            f"{row['client_cpu_percent']:.0f}% |"
        )
    out.append("")
    if results.get("echo"):
        parts = [
            f"{e['images_per_s']:.0f} img/s ({e['requests_per_s']:.0f} req/s) with {e['batch_size']} "
            f"img/request at c={e['concurrency']}"
            for e in results["echo"]
        ]
        out.append(
            "Generator ceiling (cifar-bench against the model-free echo server, same machine): "
            + "; ".join(parts)
            + "."
        )
        out.append("")
    if results.get("thread_splits"):
        out.append("Thread split (server `--torch-threads`, c=32; the event loop and batcher take the rest):")
        out.append("")
        out.append(
            "| torch threads | raw img/s (batch) | raw single ms | img/request | served img/s | p50 ms | "
            "p99 ms |"
        )
        out.append("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for s in results["thread_splits"]:
            out.append(
                f"| {s['torch_threads']} | {s['raw_images_per_s']:.1f} | {s['raw_single_ms_p50']:.2f} | "
                f"{s['batch_size']} | {s['images_per_s']:.1f} | {_fmt(s['p50_ms'], '.2f')} | "
                f"{_fmt(s['p99_ms'], '.2f')} |"
            )
        out.append("")
    if results.get("profile"):
        out.append(
            f"Server profile (py-spy, batched, c=32, single images): `{Path(results['profile']).name}` "
            "beside the results."
        )
        out.append("")
    if png:
        out.append(f"![throughput and p99 latency against concurrency]({png})")
        out.append("")
    return "\n".join(out)


def update_markdown(path: Path, section: str, key: str) -> None:
    """Replace the section between ``key``'s markers in ``path`` (append it when absent)."""
    begin, end = BEGIN.format(key=key), END.format(key=key)
    block = f"{begin}\n{section}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def write_outputs(plan: Plan, results: dict[str, Any]) -> None:
    sfx = _suffix(plan)
    json_path = plan.out_dir / f"results{sfx}.json"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    png = plan.out_dir / f"serving{sfx}.png"
    png_ref: str | None = None
    if plot(results, png):
        if plan.markdown is not None:
            try:
                png_ref = os.path.relpath(png, plan.markdown.parent)
            except ValueError:
                png_ref = str(png)
        else:
            png_ref = str(png)
    if plan.markdown is not None:
        update_markdown(plan.markdown, markdown(results, png_ref), "serving" + _suffix(plan))
    logger.info(
        "wrote %s, %s%s",
        json_path,
        png if png_ref else "(no plot)",
        f", {plan.markdown}" if plan.markdown else "",
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_raw":
        return raw_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    plan = plan_from_args(args, argv)
    if not (Path(plan.model_dir) / "manifest.json").is_file():
        logger.error(
            "no model in %s: run `make artifacts` (or cifar-export --out %s) first",
            plan.model_dir,
            plan.model_dir,
        )
        return 2
    results = run(plan)
    write_outputs(plan, results)
    for name, r in results["ratios"].items():
        logger.info("ratio %s: %.3f%s", name, r["value"], f" (goal {r['goal']})" if "goal" in r else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
