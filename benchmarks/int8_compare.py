"""BENCHMARKS.md's int8 section: served int8/fp32 ratios from one `make bench` next to raw rates.

    python benchmarks/int8_compare.py   # after perf_analyzer.py (fp32), perf_analyzer.py --label int8
                                        # --precision int8, and int8_rates.py --json (all in `make bench`)

Reads ``perf_analyzer.json`` (fp32), ``perf_analyzer-int8.json`` and ``int8-rates.json`` from
``--out-dir``; a served file that is missing leaves its ratios marked pending.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_benchmark as rb  # a sibling script, not a package

REPO = Path(__file__).resolve().parents[1]
# The issue's targets for the served ratio (int8 images/s over fp32's).
TARGETS = {(64, 4): 1.5, (1, 128): 1.3}


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def markdown(fp32: dict[str, Any] | None, int8: dict[str, Any] | None, rates: dict[str, Any] | None) -> str:
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
    if not (fp32 and int8):
        lines += [
            "Served comparison: **pending** — `make bench` writes it from `perf_analyzer.json` (fp32) and "
            "`perf_analyzer-int8.json`; one of them is missing.",
        ]
        return "\n".join(lines) + "\n"
    by_point = {(p["batch"], p["concurrency"]): p for p in fp32["points"]}
    lines += [
        f"Served, one `make bench` run: fp32 `{fp32['server_command']}` ({fp32['started']}) and int8 "
        f"`{int8['server_command']}` ({int8['started']}), the same perf_analyzer points one after the other.",
        "",
        "| images/request | concurrency | fp32 img/s | int8 img/s | int8/fp32 | target | fp32 server CPU "
        "ms/image | int8 server CPU ms/image |",
        "| ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for p in int8["points"]:
        key = (p["batch"], p["concurrency"])
        f = by_point.get(key)
        if f is None:
            continue
        ratio = p["images_per_s"] / f["images_per_s"]
        target = TARGETS.get(key)
        met = "" if target is None else f">= {target}x: {'met' if ratio >= target else '**missed**'}"
        lines.append(
            f"| {p['batch']} | {p['concurrency']} | {f['images_per_s']:.0f} | {p['images_per_s']:.0f} "
            f"| **{ratio:.2f}x** | {met} | {f['server_cpu_ms_per_request'] / f['batch']:.3f} "
            f"| {p['server_cpu_ms_per_request'] / p['batch']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=str(REPO / "benchmarks"))
    p.add_argument("--fp32-json", default="perf_analyzer.json", help="fp32 results in --out-dir")
    p.add_argument("--int8-json", default="perf_analyzer-int8.json", help="int8 perf_analyzer results")
    p.add_argument("--markdown", default=str(REPO / "BENCHMARKS.md"), help="'' to print instead")
    args = p.parse_args()
    out = Path(args.out_dir)
    text = markdown(
        _load(out / args.fp32_json),
        _load(out / args.int8_json),
        _load(out / "int8-rates.json"),
    )
    if args.markdown:
        rb.update_markdown(Path(args.markdown), text, "int8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
