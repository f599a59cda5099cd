"""The null model under load: what the request path alone costs per request (issue 20).

    .venv/bin/python benchmarks/null_model.py            # first step of `make bench`, ~4 minutes on 2 cores
    .venv/bin/python benchmarks/null_model.py --quick    # seconds-scale: checks the plumbing only

The model is ``cifar-export --null-model`` (``make artifacts-null``): the served contract (uint8
``[N,32,32,3]`` in, float32 ``[N,10]`` out) with a forward of microseconds, served unchanged by the
real server (loader, manifest, batcher, both APIs). What the server spends per request is then the
request path's alone (gRPC, protobuf, asyncio, admission, batcher, answers), the figure that, times
a GPU host's cores, bounds the single-image requests/s a GPU can be fed: Triton measures its own
overhead with identity models the same way.

For each worker count (``--workers N``; 1 = one process, no flag) one server; under it
single-image requests at each concurrency by ``perf_analyzer`` (unary ``ModelInfer``), and a row with
``--streaming`` (``ModelStreamInfer``) to compare. Each point is perf_analyzer.py's: server CPU =
user+system time of the server's whole process tree over the point (``/proc``), divided by the
requests the server's own statistics counted; the batch sizes that ran come from those statistics.

Where perf_analyzer is missing (the GPU machine), ``--load-generator cifar-bench`` drives the same
unary points with the project's load generator (``cifar_serve.client.bench``, several processes),
measured the same way; there is no streaming row then.

Writes ``null_model{-label}.json`` into ``--out-dir`` and the generated section ``null-model{-label}``
of ``--markdown`` (``--quick`` prints it instead).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import perf_analyzer as pa  # sibling scripts, not a package
import run_benchmark as rb

logger = logging.getLogger("cifar_serve.bench.null_model")

REPO = Path(__file__).resolve().parents[1]
GOAL_CPU_MS = 0.30  # server CPU per single-image request at c=128, one process
GOAL_WORKERS2_RATIO = 1.10  # 2 workers' CPU per request within 10% of one process's
GOAL_CONCURRENCY = 128


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short windows, fewer points: checks the plumbing")
    p.add_argument("--model-dir", default=str(REPO / "artifacts-null"), help="the null model's export")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto", choices=("auto", "torchscript", "onnxruntime"))
    p.add_argument("--precision", default="fp32")
    p.add_argument("--torch-threads", type=int, default=0)
    p.add_argument(
        "--workers", type=rb._ints, default=None, help="worker counts (default 1,2,4; --quick 1,2)"
    )
    p.add_argument(
        "--concurrency", type=rb._ints, default=None, help="1-image points (default 32,128,512; --quick 32)"
    )
    p.add_argument(
        "--batch-sizes",
        type=rb._ints,
        default=[1],
        help="images per request (default 1); sizes above 1 run at --batch-concurrency",
    )
    p.add_argument(
        "--batch-concurrency", type=rb._ints, default=[8], help="concurrency of multi-image requests"
    )
    p.add_argument(
        "--stream-concurrency",
        type=rb._ints,
        default=None,
        help="perf_analyzer --streaming points, per worker count (default 128; --quick 32; '' for none)",
    )
    p.add_argument(
        "--load-generator",
        default="auto",
        choices=("auto", "perf_analyzer", "cifar-bench"),
        help="auto: perf_analyzer when it is installed, else cifar-bench",
    )
    p.add_argument("--perf-analyzer", default=None, help="path of the perf_analyzer binary")
    p.add_argument("--request-count", type=int, default=0, help="perf_analyzer: requests per window")
    p.add_argument("--max-trials", type=int, default=3, help="perf_analyzer: windows averaged per point")
    p.add_argument("--stability", type=float, default=0.0, help="perf_analyzer --stability-percentage")
    p.add_argument("--point-timeout", type=float, default=600.0)
    p.add_argument("--duration", type=float, default=None, help="cifar-bench: seconds per point (default 6)")
    p.add_argument(
        "--warmup", type=float, default=None, help="cifar-bench: seconds before each (default 1.5)"
    )
    p.add_argument(
        "--client-processes", type=int, default=4, help="cifar-bench: load generator processes (at most c)"
    )
    p.add_argument("--server-arg", action="append", default=[], help="extra server flag (repeatable)")
    p.add_argument("--label", default="", help="suffix for the output file and the markdown section")
    p.add_argument("--out-dir", default=str(REPO / "benchmarks"))
    p.add_argument(
        "--markdown",
        default=None,
        help="file whose generated section to rewrite (default BENCHMARKS.md; '' or --quick without this "
        "flag: the section is printed instead)",
    )
    p.add_argument("--log-level", default="INFO")
    return p


def _generator(args: argparse.Namespace) -> tuple[str, Path | None, Path | None]:
    """(name, perf_analyzer binary, its library folder); the binary only for perf_analyzer."""
    if args.load_generator in ("auto", "perf_analyzer"):
        try:
            exe = pa.find_perf_analyzer(args.perf_analyzer)
            return "perf_analyzer", exe, pa.prepare(exe)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            if args.load_generator == "perf_analyzer":
                raise
            logger.warning("perf_analyzer unusable (%s): cifar-bench drives the points instead", exc)
    return "cifar-bench", None, None


def server_args(args: argparse.Namespace, workers: int) -> argparse.Namespace:
    """``args`` as perf_analyzer.py's helpers read them, for a server with ``workers`` processes."""
    # A free REST port: the default 8000 may be another server's on a shared machine.
    extra = ["--http-port=0", *args.server_arg, *([f"--workers={workers}"] if workers > 1 else [])]
    return argparse.Namespace(**{**vars(args), "server_arg": extra, "async_mode": False, "profile": False})


def bench_point(
    args: argparse.Namespace,
    address: str,
    pid: int,
    model: str,
    point: pa.Point,
    cpu_per_batch: dict[int, float],
) -> dict[str, Any]:
    """One unary point driven by cifar-bench, measured around as perf_analyzer.py measures its own."""
    duration = args.duration if args.duration is not None else (1.5 if args.quick else 6.0)
    warmup = args.warmup if args.warmup is not None else (0.5 if args.quick else 1.5)
    procs = max(1, min(args.client_processes, point.concurrency))
    before, cpu0, t0 = pa.server_stats(address, model), pa.process_tree_cpu_s(pid), time.perf_counter()
    r = rb.run_cifar_bench(
        address, "v2", point.concurrency, point.batch, warmup, duration, procs, model_name=model
    )
    if not r["verified"] or not r["requests"]:
        raise RuntimeError(f"cifar-bench at {point.name}: {r['requests']} requests; {'; '.join(r['notes'])}")
    wall = time.perf_counter() - t0
    cpu, after = pa.process_tree_cpu_s(pid) - cpu0, pa.server_stats(address, model)
    lat = r.get("latency_ms") or {}
    result = {
        "concurrency": point.concurrency,
        "batch": point.batch,
        "streaming": False,
        # The generator's own window (after its warm-up); CPU and counts cover the whole point.
        "images_per_s": r["images_per_s"],
        "p50_ms": lat.get("p50", float("nan")),
        "p99_ms": lat.get("p99", float("nan")),
        # "failed" is the server's count, which includes the calls cifar-bench cancels when its
        # window ends.
        **pa.server_counts(before, after, cpu, wall, cpu_per_batch),
        "client_processes": procs,
        "errors": r["errors"],
    }
    logger.info(
        "%-9s %8.0f req/s  p50 %6.2f ms  p99 %7.2f ms  server CPU %.3f ms/request, mean batch %.1f",
        point.name,
        result["images_per_s"],
        result["p50_ms"],
        result["p99_ms"],
        result["server_cpu_ms_per_request"],
        result["mean_batch"],
    )
    return result


def _point(rows: list[dict[str, Any]], workers: int, concurrency: int, streaming: bool = False) -> Any:
    """The single-image row of ``workers`` at ``concurrency`` (None when not measured)."""
    key = (workers, concurrency, 1, streaming)
    return next(
        (r for r in rows if (r["workers"], r["concurrency"], r["batch"], r["streaming"]) == key), None
    )


def goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    one = _point(rows, 1, GOAL_CONCURRENCY)
    if one is not None:
        value = one["server_cpu_ms_per_request"]
        out.append(
            {
                "what": f"server CPU per 1-image request, c={GOAL_CONCURRENCY}, 1 process",
                "value": value,
                "goal": f"<= {GOAL_CPU_MS:.2f} ms",
                "met": value <= GOAL_CPU_MS,
            }
        )
    two = _point(rows, 2, GOAL_CONCURRENCY)
    if one is not None and two is not None:
        ratio = two["server_cpu_ms_per_request"] / one["server_cpu_ms_per_request"]
        out.append(
            {
                "what": f"server CPU per request, 2 workers / 1 process, c={GOAL_CONCURRENCY}",
                "value": ratio,
                "goal": f"<= {GOAL_WORKERS2_RATIO:.2f}x",
                "met": ratio <= GOAL_WORKERS2_RATIO,
            }
        )
    return out


def _batches(batches: dict[int, int], top: int = 3) -> str:
    """The batch sizes that ran most often, as ``size x count``."""
    common = sorted(batches.items(), key=lambda kv: -kv[1])[:top]
    shown = ", ".join(f"{size}x{count}" for size, count in common)
    return shown + (f" (+{len(batches) - top} more)" if len(batches) > top else "")


def markdown(results: dict[str, Any]) -> str:
    m = results["model"]
    lines = [
        (
            "### Null model: the request path alone"
            if results["null"]
            else f"### {results['model_name']} by worker count (the model's own cost included)"
        )
        + (f" ({results['label']})" if results["label"] else "")
        + (" (--quick smoke run: numbers meaningless)" if results["quick"] else "")
        + ("" if results["complete"] else " (incomplete: the run stopped before its last worker count)"),
        "",
        f"Command: `{results['command']}` — started {results['started']}, took {results['wall_s']:.0f} s, "
        f"{results['machine']['cpus']} CPUs, load average at start {results['loadavg_start']}, at end "
        f"{results['loadavg_end']} (anything well above 0 at the start is other work sharing the cores; the "
        "load generator runs on the same cores as the server). "
        f"Model `{results['model_dir']}` "
        + (
            "(`cifar-export --null-model`: pixel mean, fixed Linear(3, 10)), "
            if results["null"]
            else f"({results['model_name']}, not the null model), "
        )
        + f"runtime {m['describe']['backend']} on {m['describe']['device']}; server "
        f"`{results['server_command']}` plus `--workers N` for N > 1. Load generator: "
        + (
            f"perf_analyzer (tritonclient {results['tritonclient']}) `-i grpc --measurement-mode "
            f"count_windows`, {results['max_trials']} windows averaged, sync (one thread per "
            "concurrent request); *stream* = `--streaming` (ModelStreamInfer)."
            if results["load_generator"] == "perf_analyzer"
            else "cifar-bench (`cifar_serve.client.bench --api v2`, several processes; perf_analyzer was not "
            "available)."
        ),
        "",
        "Server CPU = user+system time of the server's whole process tree (supervisor, workers, model "
        "process) over the point, divided by the requests its own statistics counted; *model* = what the "
        "model alone needs for the batches that ran (in-process, interpolated); *path* = the rest. "
        "*failed* = the requests the server counted as failed (with cifar-bench, the calls it cancels when "
        "its window ends)."
        + (
            " With the null model *path* is nearly all of it: server CPU ms/request times a host's cores is "
            "the ceiling of single-image requests/s that host can feed a GPU. Goal (issue 20): **<= 0.30 ms "
            "per single-image request at c=128 with 1 process**, and 2 workers within 10% of 1 (the floor, "
            "a bare grpc.aio server answering a pre-serialized reply, is ~0.20 ms on this machine)."
            if results["null"]
            else ""
        ),
        "",
        "| workers | API | images/request | concurrency | req/s | img/s | p50 ms | p99 ms "
        "| server CPU ms/request | model ms | path ms | mean batch | batch sizes that ran (size x count) "
        "| failed |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in results["points"]:
        lines.append(
            f"| {r['workers']} | {'stream' if r['streaming'] else 'unary'} | {r['batch']} "
            f"| {r['concurrency']} "
            f"| {r['images_per_s'] / r['batch']:.0f} | {r['images_per_s']:.0f} | {r['p50_ms']:.2f} "
            f"| {r['p99_ms']:.2f} "
            f"| **{r['server_cpu_ms_per_request']:.3f}** | {r['model_cpu_ms_per_request']:.3f} "
            f"| {r['overhead_cpu_ms_per_request']:.3f} | {r['mean_batch']:.1f} "
            f"| {_batches(r['batches'])} | {r['failed']} |"
        )
    ratios = results["workers_ratio"]
    if ratios:
        lines += [
            "",
            "Server CPU per request relative to 1 process, unary, by concurrency: "
            + "; ".join(
                f"{w} workers: " + ", ".join(f"c={c} {v:.2f}x" for c, v in sorted(by_c.items()))
                for w, by_c in sorted(ratios.items())
            )
            + ".",
        ]
    if not results["null"]:
        return "\n".join(lines) + "\n"
    if not results["goals"]:
        lines += [
            "",
            f"No point at c={GOAL_CONCURRENCY} with 1 process in this run: the goals are not measured.",
        ]
        return "\n".join(lines) + "\n"
    lines += ["", "| goal | measured | target | met |", "| --- | --- | --- | --- |"]
    for g in results["goals"]:
        unit = "x" if "/" in g["what"] else " ms"
        lines.append(
            f"| {g['what']} | {g['value']:.3f}{unit} | {g['goal']} | {'yes' if g['met'] else '**no**'} |"
        )
    return "\n".join(lines) + "\n"


def _shown(path: Path) -> str:
    """``path`` relative to the checkout when it is inside it (the markdown names no home folders)."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def workers_ratio(rows: list[dict[str, Any]]) -> dict[int, dict[int, float]]:
    """Server CPU per single-image request of N workers over one process's, unary, per concurrency."""
    out: dict[int, dict[int, float]] = {}
    for r in rows:
        one = _point(rows, 1, r["concurrency"])
        if r["workers"] > 1 and r["batch"] == 1 and not r["streaming"] and one is not None:
            ratio = r["server_cpu_ms_per_request"] / one["server_cpu_ms_per_request"]
            out.setdefault(r["workers"], {})[r["concurrency"]] = ratio
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args.out_dir = Path(args.out_dir)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = Path(args.model_dir) / "manifest.json"
    if not manifest_path.is_file():
        logger.error(
            "no model in %s: run `make artifacts-null` (cifar-export --null-model) first", args.model_dir
        )
        return 2
    served = json.loads(manifest_path.read_text())["model"]
    null = served.get("arch") == "null"
    if not null:
        logger.warning("%s is not the null model: the model's own cost is in every figure", args.model_dir)
    generator, exe, libdir = _generator(args)
    workers = args.workers or ([1, 2] if args.quick else [1, 2, 4])
    concurrency = args.concurrency or ([32] if args.quick else [32, 128, 512])
    stream = (
        args.stream_concurrency if args.stream_concurrency is not None else ([32] if args.quick else [128])
    )
    if generator != "perf_analyzer":
        stream = []
    # perf_analyzer.py's point settings: a window of this many requests, --max-trials of them.
    args.request_count = args.request_count or (300 if args.quick else 3000)
    from importlib import metadata

    try:
        tritonclient = metadata.version("tritonclient")
    except metadata.PackageNotFoundError:
        tritonclient = ""
    t0 = time.time()
    logdir = Path(tempfile.mkdtemp(prefix="cifar-null-model-"))
    rows: list[dict[str, Any]] = []
    results: dict[str, Any] = {
        "command": "python benchmarks/null_model.py " + " ".join(argv),
        "server_command": "python -m cifar_serve.server "
        + " ".join([*pa._runtime_args(args)[2:], "--torch-threads", str(args.torch_threads), "--http-port=0"])
        + "".join(f" {a}" for a in args.server_arg),
        "model_dir": _shown(Path(args.model_dir)),
        "model_name": served["name"],
        "null": null,
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "quick": args.quick,
        "label": args.label,
        "load_generator": generator,
        "tritonclient": tritonclient,
        "max_trials": args.max_trials,
        "request_count": args.request_count,
        "machine": rb.machine_info(args.device),
        "loadavg_start": rb.loadavg(),
        "workers": workers,
        "logs": str(logdir),
    }
    if args.markdown is None and not args.quick:
        args.markdown = str(REPO / "BENCHMARKS.md")
    model: dict[str, Any] | None = None
    for n in workers:
        ns = server_args(args, n)
        points = [pa.Point(c, 1) for c in concurrency if 1 in args.batch_sizes]
        points += [pa.Point(c, b) for b in args.batch_sizes if b > 1 for c in args.batch_concurrency]
        points += [pa.Point(c, 1, streaming=True) for c in stream]
        wlog = logdir / f"workers{n}"
        wlog.mkdir()
        logger.info(
            "%s, %d worker%s: %s", served["name"], n, "s" if n > 1 else "", ", ".join(p.name for p in points)
        )
        with pa.served(ns, wlog) as (address, proc):
            name = pa.model_name(address)
            if model is None:
                # The model alone, routed as the server's warm-up decided: its share of each point.
                routes = {b["batch_size"]: b["runtime"] for b in pa.runtime_table(address)}
                model = pa.measure_model(ns, [1 << i for i in range(9)], [64], routes)
            for point in points:
                if exe is not None and libdir is not None:
                    r = pa.run_point(
                        ns, exe, libdir, address, proc.pid, name, point, wlog, model["cpu_ms_per_batch"]
                    )
                    r.pop("csv", None)
                else:
                    r = bench_point(ns, address, proc.pid, name, point, model["cpu_ms_per_batch"])
                rows.append({"workers": n, **r})
        # Written after every worker count: a run cut short (a time limit) keeps what it measured.
        results.update(
            wall_s=time.time() - t0,
            loadavg_end=rb.loadavg(),
            model=model,
            points=rows,
            workers_ratio=workers_ratio(rows),
            goals=goals(rows) if null else [],
            complete=n == workers[-1],
        )
        out = write_outputs(args, results)
    if not args.markdown:
        sys.stdout.write(markdown(results))
    for g in results["goals"]:
        logger.info(
            "goal %s: %.3f (target %s) %s", g["what"], g["value"], g["goal"], "met" if g["met"] else "MISSED"
        )
    logger.info("wrote %s", out)
    return 0


def write_outputs(args: argparse.Namespace, results: dict[str, Any]) -> Path:
    """The JSON file, and the generated section of ``--markdown`` when there is one."""
    out = (
        args.out_dir
        / f"null_model{'-' + args.label if args.label else ''}{'-quick' if args.quick else ''}.json"
    )
    out.write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown:
        key = "null-model" + (f"-{args.label}" if args.label else "")
        rb.update_markdown(Path(args.markdown), markdown(results), key)
    return out


if __name__ == "__main__":
    sys.exit(main())
