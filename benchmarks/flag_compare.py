"""BENCHMARKS.md's A/B sections: the server with one flag set two ways, served by turns.

    python benchmarks/flag_compare.py --flag spin-wait --values true,false --rounds 3   # ~10 min
    python benchmarks/flag_compare.py --flag event-loop --values asyncio,uvloop --rounds 2

This serves the model with ``--FLAG=A`` and ``--FLAG=B`` under ``perf_analyzer``
(``perf_analyzer.py``, one fresh server per run) at the points that load it hardest: single
images at c=32 and c=128, and 64-image requests at c=4. The two settings take turns, round after
round, the order flipping each round, so a burst of other work on the machine hits both alike;
each figure is the median over the rounds, with the range. Each flag has its own section in
BENCHMARKS.md (``--section``, default the flag's name), and ``--model-dir`` may name the null
model (``make artifacts-null``), where the request path is all the server does.

``--spin-wait`` decides what the CPU runtimes' idle intra-op threads do between parallel work:
spin (ONNX Runtime's pool; OpenMP, for TorchScript, by its default policy) or sleep. Spinning can
save a wake-up per parallel region; it also burns the cores the event loop and the other runtime
need. ``--event-loop`` runs every server process on uvloop or on asyncio's own loop.
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
ATTEMPTS = 3
logger = logging.getLogger("cifar_serve.bench.flag_compare")
# What BENCHMARKS.md's section has always been called, for flags compared before this script.
SECTIONS = {"spin-wait": "spin"}


def run_rounds(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    values: tuple[str, str] = tuple(args.values)  # type: ignore[assignment]
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in values}
    out_dir = Path(args.out_dir)
    for i in range(1, args.rounds + 1):
        for value in values if i % 2 else tuple(reversed(values)):
            label = f"{args.section}-{value or 'empty'}-r{i}"
            cmd = [sys.executable, str(HERE / "perf_analyzer.py"), "--model-dir", args.model_dir]
            cmd += ["--label", label, "--out-dir", str(out_dir), "--markdown", ""]
            cmd += [f"--server-arg=--{args.flag}={value}", "--concurrency", args.concurrency]
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
            runs[value].append(json.loads((out_dir / f"perf_analyzer{suffix}.json").read_text()))
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
    flag, (a_name, b_name) = results["flag"], results["values"]
    runs = results["runs"]
    a_by, b_by = _by_point(runs[a_name]), _by_point(runs[b_name])
    first = runs[a_name][0]
    server = first["server_command"].replace(f" --{flag}={a_name}", "")
    loads = ", ".join(f"{r['loadavg_start'][0]:.2f}" for v in (a_name, b_name) for r in runs[v])
    a_shown, b_shown = (v or "''" for v in (a_name, b_name))  # an empty setting is a value too
    a, b = f"`{a_shown}`", f"`{b_shown}`"
    lines = [
        f"### {results['title']}: `--{flag} {a_shown}` against `{b_shown}`"
        + (" (--quick smoke run: numbers meaningless)" if results["quick"] else ""),
        "",
        f"Command: `{results['command']}` — {results['started']}, took {results['wall_s']:.0f} s; "
        f"{len(runs[a_name])} perf_analyzer run(s) per setting, taking turns; server "
        f"`{server}` with `--{flag}` added. Median over the runs (range in brackets). "
        f"1-minute load average at the start of each run ({a_shown}, then {b_shown}): {loads}.",
        "",
        f"| images/request | concurrency | {a} img/s | {b} img/s | {b} / {a} | {a} server CPU "
        f"ms/request | {b} server CPU ms/request | {a} p50 / p99 ms | {b} p50 / p99 ms | mean batch, "
        f"{a} / {b} |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key in sorted(a_by):
        x, y = a_by[key], b_by.get(key)
        if y is None:
            continue
        ratio = statistics.median(y["img/s"]) / statistics.median(x["img/s"])
        lines.append(
            f"| {key[0]} | {key[1]} | {_cell(x['img/s'], '.0f')} | {_cell(y['img/s'], '.0f')} | "
            f"**{ratio:.2f}x** | {_cell(x['cpu'], '.3f')} | {_cell(y['cpu'], '.3f')} | "
            f"{statistics.median(x['p50']):.1f} / {statistics.median(x['p99']):.1f} | "
            f"{statistics.median(y['p50']):.1f} / {statistics.median(y['p99']):.1f} | "
            f"{statistics.median(x['batch']):.1f} / {statistics.median(y['batch']):.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flag", required=True, help="the server flag, without its dashes (spin-wait)")
    p.add_argument(
        "--values",
        type=lambda text: text.split(","),
        required=True,
        help="its two settings, A,B; the table's ratios are B over A",
    )
    p.add_argument("--title", default="", help="the section's heading (default: the flag)")
    p.add_argument("--section", default="", help="BENCHMARKS.md section key (default: the flag)")
    p.add_argument("--rounds", type=int, default=3, help="runs per setting, taking turns")
    p.add_argument("--quick", action="store_true", help="perf_analyzer.py --quick: checks the set-up")
    p.add_argument("--concurrency", default="32,128", help="single-image points")
    p.add_argument("--batch-concurrency", default="4", help="64-image points")
    p.add_argument("--request-count", type=int, default=0, help="requests per perf_analyzer window")
    p.add_argument("--model-dir", default=str(REPO / "artifacts"))
    p.add_argument("--out-dir", default=str(REPO / "benchmarks"))
    p.add_argument("--json", default="", help="results file (default OUT_DIR/compare-FLAG.json)")
    p.add_argument("--markdown", default=str(REPO / "BENCHMARKS.md"), help="'' to print instead")
    args = p.parse_args(argv)
    if len(args.values) != 2 or args.values[0] == args.values[1]:
        p.error(f"--values takes two different settings, A,B; got {','.join(args.values)!r}")
    args.section = args.section or SECTIONS.get(args.flag, args.flag)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    started, t0 = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.time()
    runs = run_rounds(args)
    results = {
        "command": "python benchmarks/flag_compare.py " + " ".join(argv),
        "flag": args.flag,
        "values": args.values,
        "title": args.title or f"`--{args.flag}`",
        "started": started,
        "wall_s": time.time() - t0,
        "quick": args.quick,
        "runs": runs,
    }
    out = Path(args.json or Path(args.out_dir) / f"compare-{args.section}.json")
    out.write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    if args.markdown and not args.quick:
        rb.update_markdown(Path(args.markdown), text, args.section)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
