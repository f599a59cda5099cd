"""BENCHMARKS.md's int8 section: served int8/fp32 ratios next to the raw in-process rates.

    python benchmarks/int8_compare.py --rounds 3   # `make bench`: serves fp32, then int8, 3 times

With ``--rounds N`` it runs ``perf_analyzer.py`` N times for each precision, alternating fp32
and int8 (a burst of other work on the machine then hits both alike), at the points the issue
names (single images at c=32 and c=128, 64-image requests at c=4), and keeps each point's median
over the rounds. Without it, it reads ``--fp32-json``/``--int8-json`` from ``--out-dir``. The raw
rates come from ``int8-rates.json`` (``int8_rates.py``); a missing served run leaves the ratios
marked pending.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_benchmark as rb  # a sibling script, not a package

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
# The issue's targets for the served ratio (int8 images/s over fp32's).
TARGETS = {(64, 4): 1.5, (1, 128): 1.3}


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def run_rounds(
    rounds: int, out_dir: Path, model_dir: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """perf_analyzer.py for fp32 then int8, ``rounds`` times; their results, in order."""
    runs: dict[str, list[dict[str, Any]]] = {"fp32": [], "int8": []}
    for i in range(1, rounds + 1):
        for precision in ("fp32", "int8"):
            label = f"int8cmp-{precision}-r{i}"
            cmd = [sys.executable, str(HERE / "perf_analyzer.py"), "--model-dir", model_dir]
            cmd += ["--label", label, "--precision", precision, "--out-dir", str(out_dir), "--markdown", ""]
            cmd += ["--concurrency", "32,128", "--batch-concurrency", "4"]
            subprocess.run(cmd, check=True)
            result = _load(out_dir / f"perf_analyzer-{label}.json")
            assert result is not None
            runs[precision].append(result)
    return runs["fp32"], runs["int8"]


def _load1(loadavg: Any) -> float:
    """The 1-minute load average, from a list of three or a number."""
    return float(loadavg[0] if isinstance(loadavg, list) else loadavg)


def _median_points(runs: list[dict[str, Any]]) -> dict[tuple[int, int], dict[str, float]]:
    """Per (images/request, concurrency): the median over runs of img/s and server CPU ms/image."""
    by: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for run in runs:
        for p in run["points"]:
            by.setdefault((p["batch"], p["concurrency"]), []).append(p)
    return {
        key: {
            "images_per_s": statistics.median(p["images_per_s"] for p in ps),
            "cpu_ms_per_image": statistics.median(p["server_cpu_ms_per_request"] / p["batch"] for p in ps),
            "min_images_per_s": min(p["images_per_s"] for p in ps),
            "max_images_per_s": max(p["images_per_s"] for p in ps),
        }
        for key, ps in by.items()
    }


def markdown(
    fp32_runs: list[dict[str, Any]], int8_runs: list[dict[str, Any]], rates: dict[str, Any] | None
) -> str:
    lines = ["### int8 against fp32 (CPU)", ""]
    if rates:
        lines += [
            f"Raw in-process rates, no server: `{rates['command']}` ({rates['created']}; "
            f"{rates['threads']} threads, {rates['rounds']} alternating rounds of "
            f"{rates['seconds_per_turn']} s per model and batch, best round; load average "
            f"{rates['loadavg_start_end'][0]:.2f} -> {rates['loadavg_start_end'][1]:.2f}).",
            "",
            "| batch | fp32 ONNX Runtime img/s | int8 ONNX Runtime img/s | int8/fp32 "
            "| fp32 TorchScript img/s | int8/best fp32 |",
            "| ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in rates["rows"]:
            lines.append(
                f"| {r['batch']} | {r['fp32 onnxruntime best']} | {r['int8 onnxruntime best']} "
                f"| **{r['int8/fp32 onnxruntime (best)']:.2f}x** | {r.get('fp32 torchscript best', '-')} "
                f"| {r.get('int8/best fp32 (best)', '-')} |"
            )
        lines.append("")
    if not (fp32_runs and int8_runs):
        lines += [
            "Served comparison: **pending** — `make bench` writes it (`int8_compare.py --rounds 3`); "
            "no served run of one of the precisions was found.",
        ]
        return "\n".join(lines) + "\n"
    fp32, int8 = _median_points(fp32_runs), _median_points(int8_runs)
    lines += [
        f"Served: {len(fp32_runs)} perf_analyzer run(s) per precision, alternating fp32 and int8, "
        f"{fp32_runs[0]['started']} to {int8_runs[-1]['started']}; servers "
        f"`{fp32_runs[0]['server_command']}` "
        f"and `{int8_runs[0]['server_command']}`; each figure is the median over the runs (range in "
        "brackets). 1-minute load average at the start of each run (fp32 runs, then int8): "
        + ", ".join(f"{_load1(r['loadavg_start']):.2f}" for r in [*fp32_runs, *int8_runs])
        + ".",
        "",
        "| images/request | concurrency | fp32 img/s | int8 img/s | int8/fp32 | target | fp32 server CPU "
        "ms/image | int8 server CPU ms/image |",
        "| ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for key in sorted(int8, key=lambda k: (k[0], k[1])):
        f, q = fp32.get(key), int8[key]
        if f is None:
            continue
        ratio = q["images_per_s"] / f["images_per_s"]
        target = TARGETS.get(key)
        met = "" if target is None else f">= {target}x: {'met' if ratio >= target else '**missed**'}"
        lines.append(
            f"| {key[0]} | {key[1]} | {f['images_per_s']:.0f} ({f['min_images_per_s']:.0f}-"
            f"{f['max_images_per_s']:.0f}) | {q['images_per_s']:.0f} ({q['min_images_per_s']:.0f}-"
            f"{q['max_images_per_s']:.0f}) | **{ratio:.2f}x** | {met} | {f['cpu_ms_per_image']:.3f} "
            f"| {q['cpu_ms_per_image']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=str(REPO / "benchmarks"))
    p.add_argument("--model-dir", default=str(REPO / "artifacts"))
    p.add_argument("--rounds", type=int, default=0, help="serve and measure each precision this many times")
    p.add_argument("--fp32-json", default="perf_analyzer.json", help="fp32 results in --out-dir")
    p.add_argument("--int8-json", default="perf_analyzer-int8.json", help="int8 perf_analyzer results")
    p.add_argument("--markdown", default=str(REPO / "BENCHMARKS.md"), help="'' to print instead")
    args = p.parse_args()
    out = Path(args.out_dir)
    if args.rounds > 0:
        fp32_runs, int8_runs = run_rounds(args.rounds, out, args.model_dir)
    else:
        fp32, int8 = _load(out / args.fp32_json), _load(out / args.int8_json)
        fp32_runs, int8_runs = [fp32] if fp32 else [], [int8] if int8 else []
    text = markdown(fp32_runs, int8_runs, _load(out / "int8-rates.json"))
    if args.markdown:
        rb.update_markdown(Path(args.markdown), text, "int8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
