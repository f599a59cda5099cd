"""What system shared memory buys: ``cifar-bench`` over gRPC, socket against shared memory, side by side.

    .venv/bin/python benchmarks/shm_bench.py --json benchmarks/results-shm.json   # `make bench` runs this
    .venv/bin/python benchmarks/shm_bench.py --rounds 1 --requests 2              # a quick look

One ``python -m cifar_serve.server`` process with its default batching, on loopback, and the
load generator in this process (:func:`cifar_serve.client.bench.run_bench`, the Open Inference
Protocol's ``ModelInfer``, real CIFAR-10 test images, every answer checked). For each request
size, the socket (``raw_input_contents``) and shared memory (``--shared-memory on``: the pixels
written into a registered region before each call, the logits read back from it) take turns,
round after round, so load from other jobs on a shared machine falls on both alike; the
latencies of all rounds are pooled. The ratio column is shared memory against the socket.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import transport_bench  # a sibling script: its server() starts and stops the server

from cifar_serve.client.bench import BenchConfig, build_payloads, load_images, run_bench

REPO = Path(__file__).resolve().parents[1]
MODES = {"off": "gRPC, socket", "on": "gRPC, shared memory"}


def measure(
    address: str, sizes: list[int], rounds: int, requests: int, concurrency: int
) -> list[dict[str, Any]]:
    images, labels = load_images()
    payloads = {n: build_payloads("v2", images, labels, n) for n in sizes}
    lat: dict[tuple[int, str], list[float]] = {(n, m): [] for n in sizes for m in MODES}
    window = dict.fromkeys(lat, 0.0)
    shm_used = dict.fromkeys(lat, True)

    def run(n: int, mode: str, count: int) -> Any:
        cfg = BenchConfig(
            address=address,
            api="v2",
            batch_size=n,
            concurrency=concurrency,
            requests=count,
            warmup=0,
            verify="all",
            shared_memory=mode,
            keep_latencies=True,
            timeout=600,
        )
        r = run_bench(cfg, payloads[n])
        if r.error_count or not r.verified:
            raise RuntimeError(f"{n} images, shared memory {mode}: errors {r.errors}, notes {r.notes}")
        return r

    for n in sizes:  # one untimed pass each: connections, regions, the server's first batches
        for mode in MODES:
            run(n, mode, concurrency)
    for i in range(rounds):
        for n in sizes:
            for mode in MODES if i % 2 == 0 else reversed(list(MODES)):
                r = run(n, mode, requests)
                lat[n, mode].extend(r.latencies_ms or [])
                window[n, mode] += r.window_s
                shm_used[n, mode] = r.shared_memory
        sys.stderr.write(f"round {i + 1}/{rounds} done\n")
    rows = []
    for n in sizes:
        base: dict[str, float] = {}
        for mode, label in MODES.items():
            ms = np.asarray(lat[n, mode])
            row: dict[str, Any] = {
                "images": n,
                "transport": label,
                "shared_memory": shm_used[n, mode] and mode == "on",
                "requests": int(ms.size),
                "images_per_s": ms.size * n / window[n, mode],
                "p50_ms": float(np.percentile(ms, 50)),
                "p99_ms": float(np.percentile(ms, 99)),
            }
            if mode == "off":
                base = row
            else:
                row["throughput_ratio"] = row["images_per_s"] / base["images_per_s"]
                row["p50_ratio"] = row["p50_ms"] / base["p50_ms"]
            rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| images | transport | requests | images/s | p50 ms | p99 ms | vs socket |",
        "| ---: | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        ratio = (
            f"{r['throughput_ratio']:.3f}x throughput, {r['p50_ratio']:.3f}x p50"
            if "throughput_ratio" in r
            else "-"
        )
        lines.append(
            f"| {r['images']} | {r['transport']} | {r['requests']} | {r['images_per_s']:.0f} "
            f"| {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", default=str(REPO / "artifacts"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256], help="images per request")
    ap.add_argument("--rounds", type=int, default=4, help="turns of socket and shared memory per size")
    ap.add_argument("--requests", type=int, default=8, help="timed requests per transport, size and round")
    ap.add_argument("--concurrency", type=int, default=2, help="requests in flight (closed loop)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    if not Path("/dev/shm").is_dir():
        sys.stderr.write("shm_bench: system shared memory needs /dev/shm (Linux)\n")
        return 2
    load_before = os.getloadavg()
    with transport_bench.server(args.model_dir) as (grpc_address, _):
        rows = measure(grpc_address, args.sizes, args.rounds, args.requests, args.concurrency)
    load_after = os.getloadavg()
    sys.stdout.write(markdown(rows))
    sys.stderr.write(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}\n")
    if args.json:
        doc = {
            "command": "benchmarks/shm_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "cpus": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": load_after,
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "requests_per_round": args.requests,
            "rows": rows,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
