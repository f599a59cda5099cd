"""BENCHMARKS.md's spin-policy section: the server with its CPU runtimes' threads spinning or not.

    python benchmarks/spin_compare.py --rounds 3      # ~10 minutes on 2 cores

``--spin-wait`` decides what the CPU runtimes' idle intra-op threads do between parallel work:
spin (ONNX Runtime's pool; OpenMP, for TorchScript, by its default policy) or sleep (ONNX
Runtime ``session.intra_op.allow_spinning=0``, ``OMP_WAIT_POLICY=PASSIVE``). Spinning can save a
wake-up per parallel region; it also burns the cores the event loop and the other runtime need.
This serves the model both ways under ``perf_analyzer`` (``perf_analyzer.py``, one fresh server
per run) at the points that load it hardest: single images at c=32 and c=128, and 64-image
requests at c=4. The two settings take turns, round after round, the order flipping each round,
so a burst of other work on the machine hits both alike; each figure is the median over the
rounds, with the range.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_benchmark as rb  # a sibling script, not a package

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
SETTINGS = ("true", "false")
ATTEMPTS = 3
logger = logging.getLogger("cifar_serve.bench.spin_compare")


def run_rounds(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SETTINGS}
    out_dir = Path(args.out_dir)
    for i in range(1, args.rounds + 1):
        for spin in SETTINGS if i % 2 else tuple(reversed(SETTINGS)):
            label = f"spin-{'on' if spin == 'true' else 'off'}-r{i}"
            cmd = [sys.executable, str(HERE / "perf_analyzer.py"), "--model-dir", args.model_dir]
            cmd += ["--label", label, "--out-dir", str(out_dir), "--markdown", ""]
            cmd += [f"--server-arg=--spin-wait={spin}", "--concurrency", args.concurrency]
            cmd += ["--batch-concurrency", args.batch_concurrency]
            if args.request_count:
                cmd += ["--request-count", str(args.request_count)]
            if args.quick:
                cmd.append("--quick")
            for attempt in range(1, ATTEMPTS + 1):
                # perf_analyzer gives up on a point whose windows a burst of other work made too
                # unequal; the run is repeated rather than the comparison lost.
                if subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode == 0:
                    break
                logger.warning("%s failed (attempt %d of %d)", label, attempt, ATTEMPTS)
            else:
                raise RuntimeError(f"{label}: perf_analyzer.py failed {ATTEMPTS} times")
            suffix = f"-{label}" + ("-quick" if args.quick else "")
            runs[spin].append(json.loads((out_dir / f"perf_analyzer{suffix}.json").read_text()))
    return runs


def _by_point(runs: list[dict[str, Any]]) -> dict[tuple[int, int], dict[str, list[float]]]:
    by: dict[tuple[int, int], dict[str, list[float]]] = {}
    for run in runs:
        for p in run["points"]:
            d = by.setdefault((p["batch"], p["concurrency"]), {})
            d.setdefault("img/s", []).append(p["images_per_s"])
            d.setdefault("cpu", []).append(p["server_cpu_ms_per_request"])
            d.setdefault("p50", []).append(p["p50_ms"])
            d.setdefault("p99", []).append(p["p99_ms"])
            d.setdefault("batch", []).append(p.get("mean_batch", float("nan")))
    return by


def _cell(values: list[float], fmt: str) -> str:
    mid = statistics.median(values)
    if len(values) < 2:
        return format(mid, fmt)
    return f"{format(mid, fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def markdown(results: dict[str, Any]) -> str:
    runs = results["runs"]
    on, off = _by_point(runs["true"]), _by_point(runs["false"])
    first = runs["true"][0]
    server = first["server_command"].replace(" --spin-wait=true", "")
    loads = ", ".join(f"{r['loadavg_start'][0]:.2f}" for s in SETTINGS for r in runs[s])
    lines = [
        "### Spin-waiting under load: `--spin-wait true` against `false`"
        + (" (--quick smoke run: numbers meaningless)" if results["quick"] else ""),
        "",
        f"Command: `{results['command']}` — {results['started']}, took {results['wall_s']:.0f} s; "
        f"{len(runs['true'])} perf_analyzer run(s) per setting, taking turns; server "
        f"`{server}` with `--spin-wait` added. Median over the runs (range in brackets). "
        f"1-minute load average at the start of each run (on, then off): {loads}.",
        "",
        "| images/request | concurrency | spin img/s | no-spin img/s | no-spin / spin | spin server CPU "
        "ms/request | no-spin server CPU ms/request | spin p50 / p99 ms | no-spin p50 / p99 ms | mean batch, "
        "spin / no-spin |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key in sorted(on):
        a, b = on[key], off.get(key)
        if b is None:
            continue
        ratio = statistics.median(b["img/s"]) / statistics.median(a["img/s"])
        lines.append(
            f"| {key[0]} | {key[1]} | {_cell(a['img/s'], '.0f')} | {_cell(b['img/s'], '.0f')} | "
            f"**{ratio:.2f}x** | {_cell(a['cpu'], '.3f')} | {_cell(b['cpu'], '.3f')} | "
            f"{statistics.median(a['p50']):.1f} / {statistics.median(a['p99']):.1f} | "
            f"{statistics.median(b['p50']):.1f} / {statistics.median(b['p99']):.1f} | "
            f"{statistics.median(a['batch']):.1f} / {statistics.median(b['batch']):.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="runs per setting, taking turns")
    p.add_argument("--quick", action="store_true", help="perf_analyzer.py --quick: checks the set-up")
    p.add_argument("--concurrency", default="32,128", help="single-image points")
    p.add_argument("--batch-concurrency", default="4", help="64-image points")
    p.add_argument("--request-count", type=int, default=0, help="requests per perf_analyzer window")
    p.add_argument("--model-dir", default=str(REPO / "artifacts"))
    p.add_argument("--out-dir", default=str(REPO / "benchmarks"))
    p.add_argument("--json", default="", help="results file (default OUT_DIR/spin_compare.json)")
    p.add_argument("--markdown", default=str(REPO / "BENCHMARKS.md"), help="'' to print instead")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    started, t0 = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.time()
    runs = run_rounds(args)
    results = {
        "command": "python benchmarks/spin_compare.py " + " ".join(argv),
        "started": started,
        "wall_s": time.time() - t0,
        "quick": args.quick,
        "runs": runs,
    }
    out = Path(args.json or Path(args.out_dir) / "spin_compare.json")
    out.write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    if args.markdown and not args.quick:
        rb.update_markdown(Path(args.markdown), text, "spin")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
