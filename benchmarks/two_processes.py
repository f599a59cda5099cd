"""What a second server process costs on these cores, apart from how ``--workers`` is built (issue 20).

    .venv/bin/python benchmarks/two_processes.py           # in `make bench`, ~3 minutes on 2 cores
    .venv/bin/python benchmarks/two_processes.py --quick   # seconds-scale: checks the plumbing only

Issue 20 asks that ``--workers 2`` cost within 10% of one process's server CPU per single-image
request (the null model, c=128). Two things add to that cost: how ``--workers`` is built (one
model process behind the workers: a link hop per request) and the mere fact of two busy server
processes sharing the cores with the load generator. This script tells them apart. Three
servers of the null model run side by side:

* **one process** (no flag);
* **``--workers 2``**: two front ends and one model process;
* **two replicas**: two independent one-process servers on two ports, each with its own model
  (the other way to build workers: no hop, the cores shared the same way).

Each is driven the same way, by two perf_analyzer processes at c/2 each (to the one address,
or one to each replica), by turns for ``--rounds`` rounds. Server CPU = user+system time of the
servers' whole process trees over the point, divided by the requests their own statistics
counted. *Replicas over one process* is the price of two processes on these cores alone;
*workers over replicas* is the price of the model process's hop.

Writes ``two_processes{-quick}.json`` into ``--out-dir`` and the generated section ``two-processes``
of ``--markdown`` (``--quick`` prints it instead).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import null_model as nm  # sibling scripts, not a package
import perf_analyzer as pa
import run_benchmark as rb

logger = logging.getLogger("cifar_serve.bench.two_processes")

REPO = Path(__file__).resolve().parents[1]
SETUPS = ("one process", "--workers 2", "two replicas")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short windows, one round: checks the plumbing")
    p.add_argument("--model-dir", default=str(REPO / "artifacts-null"), help="the null model's export")
    p.add_argument("--concurrency", type=int, default=128, help="total; each perf_analyzer takes half")
    p.add_argument("--rounds", type=int, default=None, help="rounds by turns (default 3; --quick 1)")
    p.add_argument("--request-count", type=int, default=0, help="perf_analyzer: requests per window")
    p.add_argument("--max-trials", type=int, default=3, help="perf_analyzer: windows per point")
    p.add_argument("--perf-analyzer", default=None, help="path of the perf_analyzer binary")
    p.add_argument("--point-timeout", type=float, default=600.0)
    p.add_argument("--server-arg", action="append", default=[], help="extra server flag (repeatable)")
    p.add_argument("--out-dir", default=str(REPO / "benchmarks"))
    p.add_argument(
        "--markdown",
        default=None,
        help="file whose generated section to rewrite (default BENCHMARKS.md; '' or --quick without "
        "this flag: the section is printed instead)",
    )
    p.add_argument("--log-level", default="INFO")
    return p


def _server_ns(args: argparse.Namespace, workers: int) -> argparse.Namespace:
    """The namespace perf_analyzer.py's ``served`` reads, for the null model with ``workers``."""
    base = argparse.Namespace(
        model_dir=args.model_dir,
        device="cpu",
        backend="auto",
        precision="fp32",
        torch_threads=0,
        server_arg=list(args.server_arg),
    )
    return nm.server_args(base, workers)


def _drive(
    args: argparse.Namespace,
    exe: Path,
    libdir: Path,
    addresses: Sequence[str],
    model: str,
    logdir: Path,
    name: str,
) -> list[dict[str, float]]:
    """Two perf_analyzer processes at c/2 each, at once, to ``addresses`` in turn; their CSV rows."""
    half = max(1, args.concurrency // 2)
    env = dict(os.environ, LD_LIBRARY_PATH=f"{libdir}:{os.environ.get('LD_LIBRARY_PATH', '')}")
    procs: list[tuple[subprocess.Popen[bytes], Path, Path]] = []
    with ExitStack() as stack:
        for i in range(2):
            csv, log = logdir / f"{name}-{i}.csv", logdir / f"{name}-{i}.log"
            cmd = [
                str(exe),
                *("-i", "grpc", "-u", addresses[i % len(addresses)], "-m", model),
                *("--concurrency-range", f"{half}:{half}"),
                *(
                    "--measurement-mode",
                    "count_windows",
                    "--measurement-request-count",
                    str(args.request_count),
                ),
                # No stability criterion: the mean of max-trials windows (a shared machine never settles).
                *(
                    "--stability-percentage",
                    "1000",
                    "--max-trials",
                    str(args.max_trials),
                    "--percentile",
                    "99",
                ),
                *("-f", str(csv)),
            ]
            fh = stack.enter_context(log.open("w"))
            procs.append((subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env), csv, log))
        rows = []
        try:
            for proc, csv, log in procs:
                if proc.wait(timeout=args.point_timeout) != 0:
                    raise RuntimeError(f"perf_analyzer failed at {name}:\n{rb._tail(log)}")
                rows.append(pa.parse_csv(csv))
        finally:  # a failed or stuck one must not leave the other loading the next setup
            for proc, _csv, _log in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    return rows


def _point(
    args: argparse.Namespace,
    exe: Path,
    libdir: Path,
    servers: Sequence[tuple[str, int]],
    model: str,
    logdir: Path,
    name: str,
) -> dict[str, Any]:
    """One setup's point: the load of :func:`_drive`, measured on every server of the setup."""
    addresses = [a for a, _ in servers]
    before = [pa.server_stats(a, model) for a in addresses]
    cpu0, t0 = sum(pa.process_tree_cpu_s(p) for _, p in servers), time.perf_counter()
    rows = _drive(args, exe, libdir, addresses, model, logdir, name)
    wall = time.perf_counter() - t0
    cpu = sum(pa.process_tree_cpu_s(p) for _, p in servers) - cpu0
    after = [pa.server_stats(a, model) for a in addresses]
    requests = sum(x["requests"] - b["requests"] for b, x in zip(before, after, strict=True))
    images = sum(x["images"] - b["images"] for b, x in zip(before, after, strict=True))
    executions = sum(x["executions"] - b["executions"] for b, x in zip(before, after, strict=True))
    return {
        "requests": requests,
        "wall_s": round(wall, 1),
        "server_cpu_s": cpu,
        "server_cpu_ms_per_request": 1000 * cpu / max(1, requests),
        "requests_per_s": sum(r.get("Inferences/Second", 0.0) for r in rows),
        # The worse of the two generators' percentiles (perf_analyzer reports no joint one).
        "p50_ms": max(r.get("p50 latency", float("nan")) for r in rows) / 1000,
        "p99_ms": max(r.get("p99 latency", float("nan")) for r in rows) / 1000,
        "mean_batch": images / max(1, executions),
    }


def summary(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Per setup, the median server CPU per request over the rounds, and the ratios between them."""

    def median(setup: str) -> float:
        values = sorted(p["server_cpu_ms_per_request"] for p in points if p["setup"] == setup)
        mid = len(values) // 2
        return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2

    one, workers, replicas = (median(s) for s in SETUPS)
    return {
        "median_ms": dict(zip(SETUPS, (one, workers, replicas), strict=True)),
        "workers_over_one": workers / one,
        "replicas_over_one": replicas / one,
        "workers_over_replicas": workers / replicas,
    }


def markdown(results: dict[str, Any]) -> str:
    s = results["summary"]
    lines = [
        f"`{results['command']}` ({results['started']}, {results['wall_s']:.0f} s; load average "
        f"{results['loadavg_start'][0]:.1f} at the start, {results['loadavg_end'][0]:.1f} at the end; "
        f"{results['machine'].get('cpus', '?')} cores). The null model, single-image unary `ModelInfer`, "
        f"two perf_analyzer processes at c={results['concurrency'] // 2} each, the setups by turns.",
        "",
        "| round | setup | server CPU ms/request | req/s | p50 ms (worse of two) | p99 ms (worse of two) "
        "| mean batch |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in results["points"]:
        lines.append(
            f"| {p['round']} | {p['setup']} | {p['server_cpu_ms_per_request']:.3f} "
            f"| {p['requests_per_s']:,.0f} | {p['p50_ms']:.1f} | {p['p99_ms']:.1f} | {p['mean_batch']:.1f} |"
        )
    m = s["median_ms"]
    lines += [
        "",
        f"Medians: one process {m['one process']:.3f} ms, `--workers 2` {m['--workers 2']:.3f}, two replicas "
        f"{m['two replicas']:.3f}. **`--workers 2` over one process: {s['workers_over_one']:.2f}x** "
        f"(the goal: at most 1.10x), of which two processes sharing these cores alone (replicas over one "
        f"process) {s['replicas_over_one']:.2f}x and the model process's hop (workers over replicas) "
        f"{s['workers_over_replicas']:.2f}x.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if not (Path(args.model_dir) / "manifest.json").is_file():
        logger.error("no model in %s: run `make artifacts-null` first", args.model_dir)
        return 2
    exe = pa.find_perf_analyzer(args.perf_analyzer)
    libdir = pa.prepare(exe)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    if rounds < 1:
        logger.error("--rounds must be at least 1")
        return 2
    args.request_count = args.request_count or (200 if args.quick else 3000)
    if args.markdown is None and not args.quick:
        args.markdown = str(REPO / "BENCHMARKS.md")
    logdir = Path(tempfile.mkdtemp(prefix="cifar-two-processes-"))
    results: dict[str, Any] = {
        "command": "python benchmarks/two_processes.py " + " ".join(argv),
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "concurrency": args.concurrency,
        "machine": rb.machine_info("cpu"),
        "loadavg_start": rb.loadavg(),
        "logs": str(logdir),
    }
    t0 = time.time()
    points: list[dict[str, Any]] = []
    with ExitStack() as stack:
        # Every server starts first and idles while the others are measured (an idle server costs
        # nothing measurable): each setup then meets the same machine, by turns.
        setups: dict[str, list[tuple[str, int]]] = {}
        for setup, workers, count in zip(SETUPS, (1, 2, 1), (1, 1, 2), strict=True):
            setups[setup] = []
            for i in range(count):
                slog = logdir / f"{setup.replace(' ', '_').strip('-')}-{i}"
                slog.mkdir()
                address, proc = stack.enter_context(pa.served(_server_ns(args, workers), slog))
                setups[setup].append((address, proc.pid))
        model = pa.model_name(setups[SETUPS[0]][0][0])
        for r in range(1, rounds + 1):
            for setup in SETUPS:
                point = _point(args, exe, libdir, setups[setup], model, logdir, f"r{r}-{setup}")
                points.append({"round": r, "setup": setup, **point})
                logger.info(
                    "round %d, %-12s server CPU %.3f ms/request, %.0f req/s, mean batch %.1f",
                    r,
                    setup,
                    point["server_cpu_ms_per_request"],
                    point["requests_per_s"],
                    point["mean_batch"],
                )
    results.update(points=points, summary=summary(points), wall_s=time.time() - t0, loadavg_end=rb.loadavg())
    out = Path(args.out_dir) / f"two_processes{'-quick' if args.quick else ''}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown:
        rb.update_markdown(Path(args.markdown), markdown(results), "two-processes")
    else:
        sys.stdout.write(markdown(results))
    s = results["summary"]
    logger.info(
        "--workers 2 over one process %.2fx: replicas over one %.2fx, workers over replicas %.2fx",
        s["workers_over_one"],
        s["replicas_over_one"],
        s["workers_over_replicas"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
