"""Triton's ``perf_analyzer`` against cifar-serve: throughput, latency and server CPU per request.

    .venv/bin/python benchmarks/perf_analyzer.py            # full run (`make bench`), ~5 minutes
    .venv/bin/python benchmarks/perf_analyzer.py --quick    # short windows: checks the set-up works

``perf_analyzer`` ships as ``bin/perf_analyzer`` in the ``tritonclient`` wheel (2.41 here). It
links ``libb64.so.0d`` (Debian's ``libb64-0d``) and ``libcudart.so.12`` (PyPI's
``nvidia-cuda-runtime-cu12``, which loads without a GPU); when the system lacks them they are
fetched once into ``.cache/perf_analyzer/lib`` (``apt-get download`` + ``dpkg -x``, and
``pip download``), never installed.

What one run measures, each part in its own process:

1. **The model alone** (no gRPC, no batcher): the same runtime as the server, CPU milliseconds
   per forward pass at each power-of-two batch size (``time.process_time``, all threads), and the
   raw throughput at batch 64 and 256.
2. **The served model** under ``perf_analyzer`` (``-i grpc``, ``count_windows``), at each point:
   single-image requests at concurrency 1, 8, 32, 128 and 64-image requests. Around each point it
   reads the server's CPU time (``/proc/<pid>/stat`` user+system of the server and every process
   under it) and the server's own statistics (Triton's ModelStatistics: requests, images and the
   batch sizes that ran). Server CPU per request = CPU used / requests answered; the model's share
   = the CPU the model alone needs for the batches that ran (step 1, interpolated between powers
   of two) / requests; the rest is the request path.

It writes ``perf_analyzer.json`` into ``--out-dir`` and a generated section of ``--markdown``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import itertools

import run_benchmark as rb  # a sibling script, not a package

logger = logging.getLogger("cifar_serve.bench.perf_analyzer")

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "perf_analyzer"
NEEDED = ("libb64.so.0d", "libcudart.so.12")
GOALS = {
    "server_cpu_ms_c32": 1.0,
    "overhead_cpu_ms_c32": 0.25,
    "batch64_vs_raw": 0.9,
    "c128_vs_raw_b64": 0.65,
}


@dataclass(frozen=True)
class Point:
    concurrency: int
    batch: int
    streaming: bool = False  # perf_analyzer --streaming: ModelStreamInfer, one stream per context

    @property
    def name(self) -> str:
        return f"c{self.concurrency}-b{self.batch}" + ("-stream" if self.streaming else "")


# --------------------------------------------------------------------------- perf_analyzer set-up


def _missing_libs(exe: Path, libdir: Path | None) -> list[str]:
    env = dict(os.environ)
    if libdir is not None:
        env["LD_LIBRARY_PATH"] = f"{libdir}:{env.get('LD_LIBRARY_PATH', '')}"
    out = subprocess.run(["ldd", str(exe)], capture_output=True, text=True, env=env).stdout
    return [line.split()[0] for line in out.splitlines() if "not found" in line]


def _fetch_libb64(libdir: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", "libb64-0d"], cwd=tmp, check=True, capture_output=True)
        (deb,) = Path(tmp).glob("libb64-0d_*.deb")
        subprocess.run(["dpkg", "-x", str(deb), str(Path(tmp) / "x")], check=True)
        (lib,) = (Path(tmp) / "x").rglob("libb64.so.0d")
        shutil.copy2(lib, libdir / "libb64.so.0d")


def _fetch_cudart(libdir: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "-d",
                tmp,
                "nvidia-cuda-runtime-cu12",
            ],
            check=True,
        )
        (wheel,) = Path(tmp).glob("nvidia_cuda_runtime_cu12-*.whl")
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith("/libcudart.so.12"))
            (libdir / "libcudart.so.12").write_bytes(zf.read(member))


def prepare(exe: Path, cache: Path = CACHE) -> Path:
    """Make ``exe`` loadable: the library folder to put on LD_LIBRARY_PATH (fetched when missing)."""
    libdir = cache / "lib"
    libdir.mkdir(parents=True, exist_ok=True)
    missing = _missing_libs(exe, libdir)
    if "libb64.so.0d" in missing:
        logger.info("fetching libb64.so.0d (Debian libb64-0d) into %s", libdir)
        _fetch_libb64(libdir)
    if "libcudart.so.12" in missing:
        logger.info("fetching libcudart.so.12 (PyPI nvidia-cuda-runtime-cu12) into %s", libdir)
        _fetch_cudart(libdir)
    still = _missing_libs(exe, libdir)
    if still:
        raise RuntimeError(f"{exe} still misses {', '.join(still)}")
    return libdir


def find_perf_analyzer(given: str | None) -> Path:
    candidates = [given] if given else [str(Path(sys.executable).with_name("perf_analyzer")), "perf_analyzer"]
    for c in candidates:
        found = shutil.which(c) if c else None
        if found:
            return Path(found)
    raise RuntimeError(
        "perf_analyzer not found: it ships in the tritonclient wheel "
        "(pip install 'tritonclient[all]==2.41.0'), or pass --perf-analyzer PATH"
    )


# --------------------------------------------------------------------------- the model alone


def model_main(argv: Sequence[str]) -> int:
    """``perf_analyzer.py _model ...``: the runtime alone, printed as one JSON line."""
    import warnings

    import numpy as np

    p = rb.runtime_parser("perf_analyzer.py _model")
    p.add_argument("--sizes", type=rb._ints, required=True)
    p.add_argument("--raw-sizes", type=rb._ints, required=True)
    p.add_argument("--seconds", type=float, default=0.5, help="per batch size, CPU cost")
    p.add_argument("--raw-seconds", type=float, default=4.0, help="per raw throughput size")
    p.add_argument("--routes", default="", help="JSON {bucket: runtime} to route as the server does")
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from cifar_serve.client.bench import load_images
    from cifar_serve.server.runtime import ModelRuntime

    images, _ = load_images(None)
    top = max(a.sizes + a.raw_sizes)
    pool = np.ascontiguousarray(np.concatenate([images] * max(1, -(-top // len(images)))))
    rt = ModelRuntime(
        a.model_dir,
        device=a.device,
        backend=a.backend,
        precision=a.precision,
        max_batch_size=top,
        threads=a.threads,
    )
    if a.routes:
        rt.use_routes({int(k): v for k, v in json.loads(a.routes).items()})
    rt.warmup(sorted(set(a.sizes + a.raw_sizes)), calibrate=not a.routes)

    def run(n: int, seconds: float) -> tuple[float, float, int]:
        """CPU ms per batch, wall images/s, batches run."""
        x = pool[:n]
        for _ in range(2):
            rt.infer(x)
        count = 0
        cpu0, wall0 = time.process_time(), time.perf_counter()
        while count < 3 or time.perf_counter() - wall0 < seconds:
            rt.infer(x)
            count += 1
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        return 1000 * cpu / count, n * count / wall, count

    cpu_ms = {}
    for n in a.sizes:
        cpu_ms[n], _, _ = run(n, a.seconds)
    raw = {}
    for n in a.raw_sizes:
        batch_cpu, rate, count = run(n, a.raw_seconds)
        raw[n] = {"images_per_s": rate, "cpu_ms_per_image": batch_cpu / n, "batches": count}
    out = {"cpu_ms_per_batch": cpu_ms, "raw": raw, "describe": rt.describe()}
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


def measure_model(
    args: argparse.Namespace, sizes: list[int], raw_sizes: list[int], routes: dict[int, str]
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "_model",
        *_runtime_args(args),
        "--threads",
        str(args.torch_threads),
        "--sizes",
        ",".join(map(str, sizes)),
        "--raw-sizes",
        ",".join(map(str, raw_sizes)),
        "--seconds",
        str(0.2 if args.quick else 0.6),
        "--raw-seconds",
        str(1.0 if args.quick else 5.0),
        "--routes",
        json.dumps(routes),
    ]
    # OpenMP's own wait policy, not the server's PASSIVE: alone, its spinning threads give the
    # model its best rate (b64 3,829-3,989 img/s against 3,131-3,161, side by side, 2026-12-05),
    # and the served figures are held to that best.
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"model measurement failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["cpu_ms_per_batch"] = {int(k): v for k, v in out["cpu_ms_per_batch"].items()}
    out["raw"] = {int(k): v for k, v in out["raw"].items()}
    out["routes"] = routes
    return out


def model_cpu_ms(cpu_per_batch: dict[int, float], size: int) -> float:
    """CPU ms of one forward pass of ``size`` images, interpolated between the measured sizes."""
    sizes = sorted(cpu_per_batch)
    if size in cpu_per_batch:
        return cpu_per_batch[size]
    if size < sizes[0]:
        return cpu_per_batch[sizes[0]]
    if size > sizes[-1]:
        return cpu_per_batch[sizes[-1]] * size / sizes[-1]
    hi = next(s for s in sizes if s > size)
    lo = max(s for s in sizes if s < size)
    f = (size - lo) / (hi - lo)
    return cpu_per_batch[lo] * (1 - f) + cpu_per_batch[hi] * f


# --------------------------------------------------------------------------- the server


def _runtime_args(args: argparse.Namespace) -> list[str]:
    return [
        "--model-dir",
        args.model_dir,
        "--device",
        args.device,
        "--backend",
        args.backend,
        "--precision",
        args.precision,
    ]


def process_tree_cpu_s(root: int) -> float:
    """User+system CPU seconds of ``root`` and every live process under it."""
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    times: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = int(fields[11]) + int(fields[12])  # utime, stime
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in tree:
                tree.add(pid)
                frontier.append(pid)
    return sum(times.get(pid, 0) for pid in tree) / tick


@contextmanager
def served(args: argparse.Namespace, logdir: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    flags = [
        *_runtime_args(args),
        "--torch-threads",
        str(args.torch_threads),
        "--log-level",
        "WARNING",
        *args.server_arg,
    ]
    with rb.cifar_server(flags, logdir / "server.log", "server") as server:
        yield server


def server_stats(address: str, model: str) -> dict[str, Any]:
    """The server's own counters (ModelStatistics), as plain numbers."""
    import grpc

    from cifar_serve.v1 import open_inference_pb2 as pb
    from cifar_serve.v1 import open_inference_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as ch:
        resp = pb_grpc.GRPCInferenceServiceStub(ch).ModelStatistics(
            pb.ModelStatisticsRequest(name=model), timeout=30
        )
    out: dict[str, Any] = {"requests": 0, "failed": 0, "images": 0, "executions": 0, "batches": {}}
    for s in resp.model_stats:  # one entry per version that has served: summed
        out["requests"] += s.inference_stats.success.count
        out["failed"] += s.inference_stats.fail.count
        out["images"] += s.inference_count
        out["executions"] += s.execution_count
        for b in s.batch_stats:
            out["batches"][b.batch_size] = out["batches"].get(b.batch_size, 0) + b.compute_infer.count
    return out


def model_name(address: str) -> str:
    import grpc

    from cifar_serve.v1 import open_inference_pb2 as pb
    from cifar_serve.v1 import open_inference_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as ch:
        # With no name, statistics cover every model: the one this server serves.
        resp = pb_grpc.GRPCInferenceServiceStub(ch).ModelStatistics(pb.ModelStatisticsRequest(), timeout=30)
    return str(resp.model_stats[0].name)


def runtime_table(address: str) -> list[dict[str, Any]]:
    """The server's warm-up measurement: which runtime serves each batch bucket (GetModelInfo)."""
    import grpc

    from cifar_serve.v1 import classifier_pb2, classifier_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        info = classifier_pb2_grpc.ClassifierStub(ch).GetModelInfo(
            classifier_pb2.GetModelInfoRequest(), timeout=30
        )
    return [
        {"batch_size": b.batch_size, "runtime": b.runtime, "ms_per_batch": dict(b.ms_per_batch)}
        for b in info.runtime_table
    ]


# --------------------------------------------------------------------------- one point


def parse_csv(path: Path) -> dict[str, float]:
    """perf_analyzer's ``-f`` CSV: one row per concurrency; latencies converted to ms."""
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise RuntimeError(f"{path}: no rows")
    row = rows[-1]
    out: dict[str, float] = {}
    for key, value in row.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def server_counts(
    before: dict[str, Any], after: dict[str, Any], cpu: float, wall: float, cpu_per_batch: dict[int, float]
) -> dict[str, Any]:
    """A point's fields that the server counts, whatever drove the load.

    ``before`` and ``after`` are :func:`server_stats` around the point, ``cpu`` the server's
    process-tree CPU seconds over it; the model's share is priced by ``cpu_per_batch`` per batch
    size, and the rest is the request path's overhead.
    """
    requests = after["requests"] - before["requests"]
    images = after["images"] - before["images"]
    batches = {
        size: n - before["batches"].get(size, 0)
        for size, n in after["batches"].items()
        if n - before["batches"].get(size, 0) > 0
    }
    model_cpu_s = sum(n * model_cpu_ms(cpu_per_batch, size) for size, n in batches.items()) / 1000
    server_ms, model_ms = 1000 * cpu / max(1, requests), 1000 * model_cpu_s / max(1, requests)
    return {
        "requests": requests,
        "failed": after["failed"] - before["failed"],
        "images": images,
        "mean_batch": images / max(1, sum(batches.values())),
        "batches": dict(sorted(batches.items())),
        "wall_s": round(wall, 1),
        "server_cpu_s": cpu,
        "server_cpu_ms_per_request": server_ms,
        "model_cpu_ms_per_request": model_ms,
        "overhead_cpu_ms_per_request": server_ms - model_ms,
    }


def run_point(
    args: argparse.Namespace,
    exe: Path,
    libdir: Path,
    address: str,
    pid: int,
    model: str,
    point: Point,
    logdir: Path,
    cpu_per_batch: dict[int, float],
) -> dict[str, Any]:
    out_csv = logdir / f"{point.name}.csv"
    count = args.request_count or (50 if args.quick else 2000)
    if point.batch > 1:
        count = max(10, count // point.batch * 2)
    cmd = [
        str(exe),
        "-i",
        "grpc",
        "-u",
        address,
        "-m",
        model,
        "-b",
        str(point.batch),
        "--concurrency-range",
        f"{point.concurrency}:{point.concurrency}",
        "--measurement-mode",
        "count_windows",
        "--measurement-request-count",
        str(count),
        # 0: no stability criterion, the mean of max-trials windows (a shared machine never settles).
        "--stability-percentage",
        str(args.stability or 1000),
        "--max-trials",
        str(args.max_trials),
        "--percentile",
        "99",
        "-f",
        str(out_csv),
        *(["--async"] if args.async_mode else []),
        *(["--streaming"] if point.streaming else []),
    ]
    env = dict(os.environ, LD_LIBRARY_PATH=f"{libdir}:{os.environ.get('LD_LIBRARY_PATH', '')}")
    log = logdir / f"{point.name}.log"
    before, cpu0, t0 = server_stats(address, model), process_tree_cpu_s(pid), time.perf_counter()
    # perf_analyzer is the only child that ends during the point (the server lives on).
    client0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with log.open("w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=args.point_timeout)
    wall = time.perf_counter() - t0
    client1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_cpu = (client1.ru_utime + client1.ru_stime) - (client0.ru_utime + client0.ru_stime)
    cpu, after = process_tree_cpu_s(pid) - cpu0, server_stats(address, model)
    if proc.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed at {point.name} (rc {proc.returncode}):\n{rb._tail(log)}")
    row = parse_csv(out_csv)
    counted = server_counts(before, after, cpu, wall, cpu_per_batch)
    profile = None
    if args.profile and point == Point(32, 1):
        # The profile comes from a second pass of the same point: a profiler sampling beside the
        # server on the same cores would raise the CPU per request that the measured pass reports.
        spy = start_profile(args, pid, logdir)
        if spy is not None:
            again = [str(logdir / f"{point.name}-profiled.csv") if a == str(out_csv) else a for a in cmd]
            with (logdir / f"{point.name}-profiled.log").open("w") as fh:
                subprocess.run(
                    again, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=args.point_timeout
                )
            profile = finish_profile(args, spy, logdir)
    result = {
        "concurrency": point.concurrency,
        "batch": point.batch,
        "streaming": point.streaming,
        "images_per_s": row.get("Inferences/Second", float("nan")),
        "p50_ms": row.get("p50 latency", float("nan")) / 1000,
        "p99_ms": row.get("p99 latency", float("nan")) / 1000,
        "server_queue_ms": row.get("Server Queue", float("nan")) / 1000,
        "server_compute_ms": row.get("Server Compute Infer", float("nan")) / 1000,
        **counted,
        "client_cpu_ms_per_request": 1000 * client_cpu / max(1, counted["requests"]),
        "csv": row,
    }
    if profile is not None:
        result["profile"] = os.path.relpath(profile, REPO)
    logger.info(
        "%-9s %8.0f img/s  p50 %6.2f ms  p99 %7.2f ms  server CPU %.3f ms/request (model %.3f, path %.3f), "
        "mean batch %.1f",
        point.name,
        result["images_per_s"],
        result["p50_ms"],
        result["p99_ms"],
        result["server_cpu_ms_per_request"],
        result["model_cpu_ms_per_request"],
        result["overhead_cpu_ms_per_request"],
        result["mean_batch"],
    )
    return result


def _suffix(args: argparse.Namespace) -> str:
    return (f"-{args.label}" if args.label else "") + ("-quick" if args.quick else "")


def start_profile(args: argparse.Namespace, pid: int, logdir: Path) -> subprocess.Popen[bytes] | None:
    """py-spy on the server until :func:`finish_profile` (a whole pass of the point, its first windows
    included)."""
    exe = Path(sys.executable).with_name("py-spy")
    if not exe.exists():
        logger.warning("py-spy not installed (pip install py-spy): no profile")
        return None
    cmd = [str(exe), "record", "--pid", str(pid), "--duration", str(int(args.point_timeout)), "--format"]
    cmd += ["raw", "--output", str(logdir / "profile.raw"), "--nonblocking", "--threads"]
    with (logdir / "py-spy.log").open("wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def finish_profile(args: argparse.Namespace, spy: subprocess.Popen[bytes], logdir: Path) -> Path | None:
    spy.send_signal(signal.SIGINT)  # py-spy writes what it sampled, then exits
    try:
        rc = spy.wait(60)
    except subprocess.TimeoutExpired:
        spy.kill()
        rc = spy.wait()
    raw = logdir / "profile.raw"
    if rc != 0 or not raw.exists():
        logger.warning("py-spy failed (rc %d): %s", rc, rb._tail(logdir / "py-spy.log", 5))
        return None
    out = args.out_dir / f"profile-perf_analyzer-c32-b1{_suffix(args)}.txt"
    out.write_text(rb.summarise_profile(raw))
    return out


# --------------------------------------------------------------------------- report


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    by = {(p["concurrency"], p["batch"]): p for p in results["points"]}
    raw = results["model"]["raw"]
    out: list[dict[str, Any]] = []
    if (32, 1) in by:
        p = by[(32, 1)]
        out.append(
            {
                "what": "server CPU per 1-image request, c=32",
                "value": p["server_cpu_ms_per_request"],
                "goal": GOALS["server_cpu_ms_c32"],
                "unit": "ms",
                "met": p["server_cpu_ms_per_request"] <= GOALS["server_cpu_ms_c32"],
            }
        )
        out.append(
            {
                "what": "of which above the model's own CPU, c=32",
                "value": p["overhead_cpu_ms_per_request"],
                "goal": GOALS["overhead_cpu_ms_c32"],
                "unit": "ms",
                "met": p["overhead_cpu_ms_per_request"] <= GOALS["overhead_cpu_ms_c32"],
            }
        )
    singles = [by[(c, 1)]["images_per_s"] for c in (1, 8, 32, 128) if (c, 1) in by]
    if len(singles) >= 2:
        out.append(
            {
                "what": "throughput non-decreasing c=1 -> 8 -> 32 -> 128",
                "value": " -> ".join(f"{v:.0f}" for v in singles),
                "goal": "non-decreasing",
                "unit": "img/s",
                "met": all(b >= a for a, b in itertools.pairwise(singles)),
            }
        )
    if (128, 1) in by and 64 in raw:
        p = by[(128, 1)]
        ratio = p["images_per_s"] / raw[64]["images_per_s"]
        # What the cores allow at the CPU this point cost, server and load generator together:
        # when that bound is under the goal, no scheduling of this server's work can meet it here.
        cores = os.cpu_count() or 1
        per_image = p["server_cpu_ms_per_request"] + p["client_cpu_ms_per_request"]
        bound = cores * 1000 / per_image
        out.append(
            {
                "what": "1-image requests at c=128 / raw model at batch 64",
                "value": ratio,
                "goal": GOALS["c128_vs_raw_b64"],
                "unit": "x",
                "met": ratio >= GOALS["c128_vs_raw_b64"],
                "detail": (
                    f"{p['images_per_s']:.0f} / {raw[64]['images_per_s']:.0f} img/s; the {cores} cores at "
                    f"{p['server_cpu_ms_per_request']:.3f} ms server + {p['client_cpu_ms_per_request']:.3f} "
                    f"ms perf_analyzer CPU per image allow at most {bound:.0f} img/s = "
                    f"{bound / raw[64]['images_per_s']:.2f}x"
                ),
            }
        )
    big = [p for p in results["points"] if p["batch"] == 64]
    if big and 64 in raw:
        best = max(p["images_per_s"] for p in big)
        ratio = best / raw[64]["images_per_s"]
        out.append(
            {
                "what": "64-image requests / raw model at batch 64",
                "value": ratio,
                "goal": GOALS["batch64_vs_raw"],
                "unit": "x",
                "met": ratio >= GOALS["batch64_vs_raw"],
                "detail": f"{best:.0f} / {raw[64]['images_per_s']:.0f} img/s",
            }
        )
    return out


def markdown(results: dict[str, Any]) -> str:
    m = results["model"]
    lines = [
        "### perf_analyzer"
        + (f" ({results['label']})" if results["label"] else "")
        + (" (--quick smoke run: numbers meaningless)" if results["quick"] else ""),
        "",
        f"Command: `{results['command']}` — started {results['started']}, took {results['wall_s']:.0f} s; "
        f"perf_analyzer from tritonclient {results['tritonclient']}, "
        f"`-i grpc {'--async ' if results['async'] else ''}--measurement-mode count_windows`"
        f"{results['windows']}, one process per point; server `{results['server_command']}` "
        f"(1 process; runtime {m['describe']['backend']} {m['describe'].get('precision', 'fp32')}, "
        f"{m['describe']['device']}). "
        f"Load average at start {results['loadavg_start']}, at end "
        f"{results['loadavg_end']}: anything well above 0 means other work shared the 2 cores, and "
        "perf_analyzer itself runs on the same cores as the server.",
        "",
        "Server CPU = user+system time of the server process(es) over the point, divided by the "
        "requests it answered (its own statistics); *model* = the CPU the model alone needs for the "
        "batch sizes that actually ran (measured in-process, interpolated between powers of two); "
        "*path* = the difference (gRPC, protobuf, asyncio, batcher). The load generator's own CPU "
        "(perf_analyzer, same cores) is in the last column.",
        "",
        "| images/request | concurrency | img/s | p50 ms | p99 ms | mean batch | server CPU ms/request "
        "| model ms | path ms | server CPU ms/image | perf_analyzer CPU ms/request |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in results["points"]:
        lines.append(
            f"| {p['batch']} | {p['concurrency']} | {p['images_per_s']:.0f} | {p['p50_ms']:.2f} "
            f"| {p['p99_ms']:.2f} "
            f"| {p['mean_batch']:.1f} | **{p['server_cpu_ms_per_request']:.3f}** | "
            f"{p['model_cpu_ms_per_request']:.3f} | {p['overhead_cpu_ms_per_request']:+.3f} | "
            f"{p['server_cpu_ms_per_request'] / p['batch']:.3f} | "
            f"{p.get('client_cpu_ms_per_request', 0):.3f} |"
        )
    lines += ["", "The model alone (same runtime, in-process, no gRPC):", ""]
    lines += ["| batch | img/s | CPU ms/image |", "| ---: | ---: | ---: |"]
    for n, r in sorted(m["raw"].items()):
        lines.append(f"| {n} | {r['images_per_s']:.0f} | {r['cpu_ms_per_image']:.3f} |")
    per = ", ".join(f"{n}: {v:.2f}" for n, v in sorted(m["cpu_ms_per_batch"].items()))
    lines += [
        "",
        f"CPU ms per forward pass by batch size: {per}.",
        "",
        "| goal | measured | target | met |",
        "| --- | --- | --- | --- |",
    ]
    for g in results["goals"]:
        value = g["value"]
        shown = f"{value:.3f} {g['unit']}" if isinstance(value, float) else f"{value} {g['unit']}"
        if "detail" in g:
            shown += f" ({g['detail']})"
        lines.append(f"| {g['what']} | {shown} | {g['goal']} | {'yes' if g['met'] else '**no**'} |")
    table = results.get("runtime_table") or []
    if table:
        names = sorted({n for b in table for n in b["ms_per_batch"]})
        lines += [
            "",
            "The server's own warm-up measurement (GetModelInfo `runtime_table`: best of 5 runs per "
            "runtime and batch bucket while the server starts; the faster serves the bucket):",
            "",
            "| bucket | " + " | ".join(f"{n} ms" for n in names) + " | serves |",
            "| ---: | " + " | ".join("---:" for _ in names) + " | --- |",
        ]
        for b in table:
            ms = " | ".join(f"{b['ms_per_batch'].get(n, float('nan')):.2f}" for n in names)
            lines.append(f"| {b['batch_size']} | {ms} | {b['runtime']} |")
    if any(p.get("profile") for p in results["points"]):
        prof = next(p["profile"] for p in results["points"] if p.get("profile"))
        lines += [
            "",
            f"py-spy profile of the server at c=32, 1-image requests: `{prof}` (from a second pass of "
            "that point, so the profiler does not weigh on the figures above).",
        ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short windows, fewer points: checks the set-up")
    p.add_argument("--model-dir", default=str(REPO / "artifacts"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto", choices=("auto", "torchscript", "onnxruntime"))
    p.add_argument(
        "--precision", default="fp32", help="the server's --precision (int8: the export's model.int8.onnx)"
    )
    p.add_argument("--torch-threads", type=int, default=0)
    p.add_argument("--concurrency", type=rb._ints, default=None, help="1-image points (default 1,8,32,128)")
    p.add_argument("--batch-concurrency", type=rb._ints, default=None, help="64-image points (default 4)")
    p.add_argument("--request-count", type=int, default=0, help="requests per measurement window")
    p.add_argument(
        "--stability",
        type=float,
        default=0.0,
        help="perf_analyzer --stability-percentage (default 0: none; every point runs --max-trials windows)",
    )
    p.add_argument("--max-trials", type=int, default=3)
    p.add_argument("--async", dest="async_mode", action="store_true", help="perf_analyzer --async")
    p.add_argument("--point-timeout", type=float, default=600.0)
    p.add_argument("--profile", action="store_true", help="py-spy the server at c=32, 1-image requests")
    p.add_argument("--perf-analyzer", default=None, help="path of the perf_analyzer binary")
    p.add_argument("--server-arg", action="append", default=[], help="extra server flag (repeatable)")
    p.add_argument(
        "--label",
        default="",
        help="suffix for output files and the markdown section (workers2, with --server-arg=--workers=2)",
    )
    p.add_argument("--out-dir", default=str(REPO / "benchmarks"))
    p.add_argument("--markdown", default=str(REPO / "BENCHMARKS.md"), help="'' to skip")
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_model":
        return model_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args.out_dir = Path(args.out_dir)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if not (Path(args.model_dir) / "manifest.json").is_file():
        logger.error("no model in %s: run `make artifacts` first", args.model_dir)
        return 2
    exe = find_perf_analyzer(args.perf_analyzer)
    libdir = prepare(exe)
    concurrency = args.concurrency or ([1, 8] if args.quick else [1, 8, 32, 128])
    batch_concurrency = args.batch_concurrency or ([2] if args.quick else [4])
    points = [Point(c, 1) for c in concurrency] + [Point(c, 64) for c in batch_concurrency]
    started, t0, load0 = dt.datetime.now().isoformat(timespec="seconds"), time.time(), rb.loadavg()
    sizes = [1 << i for i in range(9)]  # 1..256: every batch the server can form, and the raw sizes
    logdir = Path(tempfile.mkdtemp(prefix="cifar-perf-analyzer-"))
    results_points = []
    with served(args, logdir) as (address, proc):
        name = model_name(address)
        table = runtime_table(address)
        # The model alone runs while the server idles, routed as the server's warm-up decided,
        # so its share is for the same runtime at each batch size.
        logger.info("measuring the model alone at batch sizes %s", sizes)
        routes = {b["batch_size"]: b["runtime"] for b in table}
        model = measure_model(args, sizes, [64, 256], routes)
        for n, r in sorted(model["raw"].items()):
            logger.info(
                "raw batch %d: %.0f img/s, %.3f CPU ms/image", n, r["images_per_s"], r["cpu_ms_per_image"]
            )
        for point in points:
            results_points.append(
                run_point(
                    args, exe, libdir, address, proc.pid, name, point, logdir, model["cpu_ms_per_batch"]
                )
            )
    from importlib import metadata

    results: dict[str, Any] = {
        "command": "python benchmarks/perf_analyzer.py " + " ".join(argv),
        "server_command": "python -m cifar_serve.server "
        + " ".join([*_runtime_args(args)[2:], "--torch-threads", str(args.torch_threads), *args.server_arg]),
        "started": started,
        "wall_s": time.time() - t0,
        "quick": args.quick,
        "label": args.label,
        "async": args.async_mode,
        "windows": (
            f" (stability {args.stability:g}%, at most {args.max_trials} windows)"
            if args.stability
            else f" ({args.max_trials} windows averaged, no stability criterion)"
        ),
        "tritonclient": metadata.version("tritonclient"),
        "loadavg_start": load0,
        "loadavg_end": rb.loadavg(),
        "model": model,
        "points": results_points,
        "runtime_table": table,
        "logs": str(logdir),
    }
    results["goals"] = goals(results)
    out = args.out_dir / f"perf_analyzer{_suffix(args)}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown and not args.quick:
        rb.update_markdown(
            Path(args.markdown), markdown(results), "perf_analyzer" + (f"-{args.label}" if args.label else "")
        )
    elif args.markdown:
        sys.stdout.write(markdown(results))
    for g in results["goals"]:
        logger.info(
            "goal %s: %s (target %s) %s", g["what"], g["value"], g["goal"], "met" if g["met"] else "MISSED"
        )
    logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
