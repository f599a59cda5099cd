"""Pick the int8 quantizer's choices by measurement: calibration method x per-channel weights.

    python benchmarks/int8_calibration.py --model-dir artifacts \\
        --calibration-data tests/fixtures/cifar10-train-calibration.zip \\
        --test-data ../shared/data/cifar10/cifar10-test-jpeg.zip --json benchmarks/int8-calibration.json

Each combination is quantized from the export's ``model.onnx`` on the same seeded training
sample, then compared with fp32 on the test images (the export gate's figures), and timed at
batch 64 against fp32 (2 threads, alternating, best of 5). The export's defaults
(export/quantize.py ``Int8Config``) are the choice this measures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cifar_serve.export.data import load_split
from cifar_serve.export.exporter import INPUT_NAME, OUTPUT_NAME
from cifar_serve.export.quantize import (
    CALIBRATION_METHODS,
    Int8Config,
    _session,
    calibration_sample,
    compare_int8,
    quantize_int8,
)


def _best_ms(paths: list[Path], x: np.ndarray, runs: int = 5) -> list[float]:
    """Best ms per batch of each model, runs alternating so a burst of other work hits all alike."""
    sessions = [_session(path, threads=2) for path in paths]
    for sess in sessions:
        sess.run([OUTPUT_NAME], {INPUT_NAME: x})
    best = [float("inf")] * len(sessions)
    for _ in range(runs):
        for i, sess in enumerate(sessions):
            started = time.perf_counter()
            sess.run([OUTPUT_NAME], {INPUT_NAME: x})
            best[i] = min(best[i], time.perf_counter() - started)
    return [b * 1000 for b in best]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default="artifacts")
    p.add_argument("--calibration-data", required=True, help="CIFAR-10 source with a train split")
    p.add_argument("--test-data", required=True, help="CIFAR-10 source with a test split")
    p.add_argument("--methods", default=",".join(CALIBRATION_METHODS))
    p.add_argument("--json", default="")
    args = p.parse_args()
    fp32 = Path(args.model_dir) / "model.onnx"
    train = load_split(args.calibration_data, "train")
    calib, record = calibration_sample(train.images, args.calibration_data)
    test = load_split(args.test_data, "test")
    x64 = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            for per_channel in (True, False):
                config = Int8Config(method=method, per_channel=per_channel)
                out = Path(tmp) / f"{method}-{per_channel}.onnx"
                started = time.perf_counter()
                quantize_int8(fp32, out, calib, INPUT_NAME, config)
                quant_s = time.perf_counter() - started
                gate = compare_int8(
                    fp32, out, test.images, test.labels, args.test_data, INPUT_NAME, OUTPUT_NAME
                )
                fp32_ms, ms = _best_ms([fp32, out], x64)
                row = {
                    "method": method,
                    "per_channel": per_channel,
                    "quantize_s": round(quant_s, 1),
                    **gate.as_dict(),
                    "b64_ms": round(ms, 2),
                    "fp32_b64_ms": round(fp32_ms, 2),
                    "b64_speedup_vs_fp32": round(fp32_ms / ms, 2),
                }
                rows.append(row)
                sys.stdout.write(json.dumps(row) + "\n")
                sys.stdout.flush()
    if args.json:
        Path(args.json).write_text(json.dumps({"calibration": record, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
