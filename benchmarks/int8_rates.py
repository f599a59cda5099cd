"""Raw in-process rates: fp32 against int8 on ONNX Runtime (and frozen TorchScript fp32), no server.

    python benchmarks/int8_rates.py --model-dir artifacts --json benchmarks/int8-rates.json

Each batch size runs every model in turn, round after round (alternating, so a burst of other
work on the machine hits all alike), each turn for ``--seconds``; the best turn of each counts
(the least disturbed), and the median is kept beside it. Inputs are real CIFAR-10 test images
(the committed sample, tiled). Threads: ``--threads`` for every runtime.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cifar_serve.export.data import load_split
from cifar_serve.server.runtime import ModelRuntime

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "fixtures" / "cifar10-test-sample.zip"


def _rate(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, seconds: float) -> float:
    """Images per second over one turn of at least ``seconds``."""
    n = 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or n == 0:
        run(x)
        n += len(x)
    return n / elapsed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default="artifacts")
    p.add_argument("--batches", default="1,8,64,256")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=1.0, help="length of one turn")
    p.add_argument("--no-torchscript", action="store_true", help="leave frozen TorchScript fp32 out")
    p.add_argument("--json", default="")
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    top = max(batches)

    def load(**kw: str) -> ModelRuntime:
        return ModelRuntime(args.model_dir, device="cpu", max_batch_size=top, threads=args.threads, **kw)

    runtimes = {
        "fp32 onnxruntime": load(backend="onnxruntime"),
        "int8 onnxruntime": load(backend="onnxruntime", precision="int8"),
    }
    if not args.no_torchscript:
        runtimes["fp32 torchscript"] = load(backend="torchscript")
    images = load_split(SAMPLE, "test").images
    loadavg = [os.getloadavg()[0]]
    rows = []
    for b in batches:
        x = np.ascontiguousarray(np.resize(images, (b, *images.shape[1:])))
        # Two first runs each: TorchScript's profiling executor optimises on the second.
        for rt in runtimes.values():
            rt.infer(x)
            rt.infer(x)
        turns: dict[str, list[float]] = {name: [] for name in runtimes}
        for _ in range(args.rounds):
            for name, rt in runtimes.items():
                turns[name].append(_rate(rt.infer, x, args.seconds))
        row: dict[str, object] = {"batch": b}
        for name, rates in turns.items():
            row[f"{name} best"] = round(max(rates))
            row[f"{name} median"] = round(statistics.median(rates))
        int8 = max(turns["int8 onnxruntime"])
        row["int8/fp32 onnxruntime (best)"] = round(int8 / max(turns["fp32 onnxruntime"]), 2)
        if "fp32 torchscript" in turns:
            best_fp32 = max(max(turns["fp32 onnxruntime"]), max(turns["fp32 torchscript"]))
            row["int8/best fp32 (best)"] = round(int8 / best_fp32, 2)
        rows.append(row)
        sys.stdout.write(json.dumps(row) + "\n")
        sys.stdout.flush()
    loadavg.append(os.getloadavg()[0])
    if args.json:
        doc = {
            "command": " ".join(["python", *sys.argv]),
            "threads": args.threads,
            "rounds": args.rounds,
            "seconds_per_turn": args.seconds,
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "loadavg_start_end": loadavg,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "rows": rows,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
