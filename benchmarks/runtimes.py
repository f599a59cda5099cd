"""Which runtime should serve the artifact on this CPU? Measure them side by side.

    .venv/bin/python benchmarks/runtimes.py                 # full (~5-10 minutes on 2 cores)
    CIFAR_SERVE_DATA=/path/to/cifar10-test.zip .venv/bin/python benchmarks/runtimes.py  # 10,000 images
    .venv/bin/python benchmarks/runtimes.py --quick         # smoke run

Every variant runs in its own fresh process (thread counts and TorchScript executor state are
process-wide), at batch sizes 1 and 64 (and the server's), with torch/ORT intra-op threads 1 and 2:

* ``ts_fp32``        TorchScript as the server loads it today (``torch.jit.load``, profiling executor)
* ``ts_frozen``      TorchScript after ``torch.jit.freeze`` + ``optimize_for_inference`` (oneDNN prepacked)
* ``ts_bf16``        TorchScript under CPU autocast bf16 (the server's ``--precision bf16`` today)
* ``ts_frozen_bf16`` frozen TorchScript under CPU autocast bf16 (oneDNN bf16 kernels, AMX when present)
* ``ort_fp32``       ONNX Runtime, CPU execution provider
* ``ort_nospin``     the same with intra-op spin-waiting off (matters when cores are shared)
* ``aoti_fp32``      ``torch.export`` + AOTInductor, compiled here from the checkpoint (same weights)
* ``aoti_bf16``      the same with CPU autocast bf16 inside ``forward`` (recorded by ``torch.export``)

Each variant's logits on real test images (the committed 600, or ``CIFAR_SERVE_DATA`` / ``--data``)
are compared with ``ts_fp32``'s: top-1 agreement and the largest logit difference. Results go to
``benchmarks/runtimes.json`` and a generated section of ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_benchmark import loadavg, machine_info, update_markdown

logger = logging.getLogger("cifar_serve.bench.runtimes")

REPO = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, str] = {
    "ts_fp32": "TorchScript fp32, as the server loads it (torch.jit.load, profiling executor)",
    "ts_frozen": "TorchScript fp32, torch.jit.freeze + optimize_for_inference (oneDNN prepacked weights)",
    "ts_bf16": "TorchScript under CPU autocast bf16 (server --precision bf16)",
    "ts_frozen_bf16": "frozen + optimize_for_inference TorchScript under CPU autocast bf16 (oneDNN bf16/AMX)",
    "ort_fp32": "ONNX Runtime fp32, CPU execution provider",
    "ort_nospin": "ONNX Runtime fp32, intra-op spinning off",
    "aoti_fp32": "torch.export + AOTInductor fp32 (compiled from the checkpoint)",
    "aoti_bf16": "torch.export + AOTInductor, autocast bf16 inside forward",
}
REFERENCE = "ts_fp32"
DEFAULT_OUT = REPO / "benchmarks" / "runtimes.json"
AGREEMENT_GOAL = 0.995


# --------------------------------------------------------------------------- child: build a runtime


def _load_variant(variant: str, model_dir: Path, threads: int, aoti_dir: Path | None) -> Callable[..., Any]:
    """A function uint8 ``[n,32,32,3]`` numpy -> float32 logits numpy for ``variant``."""
    import numpy as np
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    ts_path = model_dir / manifest["artifacts"]["torchscript"]["path"]
    if variant.startswith("ort"):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads > 0:
            opts.intra_op_num_threads = threads
        if variant == "ort_nospin":
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(
            str(model_dir / manifest["artifacts"]["onnx"]["path"]), opts, providers=["CPUExecutionProvider"]
        )
        in_name, out_name = manifest["input"]["name"], manifest["output"]["name"]

        def run_ort(x: np.ndarray) -> np.ndarray:
            return np.asarray(sess.run([out_name], {in_name: x})[0], dtype=np.float32)

        return run_ort
    if variant.startswith("aoti"):
        if aoti_dir is None:
            raise RuntimeError("no AOTInductor package")
        pkg = aoti_dir / f"{variant}.pt2"
        if not pkg.is_file():
            raise RuntimeError(f"{pkg} was not compiled")
        module: Any = torch._inductor.aoti_load_package(str(pkg))
    else:
        module = torch.jit.load(str(ts_path)).eval()
        if variant in ("ts_frozen", "ts_frozen_bf16"):
            module = torch.jit.optimize_for_inference(torch.jit.freeze(module))
    autocast = variant in ("ts_bf16", "ts_frozen_bf16")

    def run_torch(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = module(torch.from_numpy(x))
        result: np.ndarray = out.float().numpy()
        return result

    return run_torch


def measure_main(argv: Sequence[str]) -> int:
    """``runtimes.py _measure``: one variant at one thread count, printed as one JSON line."""
    import warnings

    import numpy as np

    p = argparse.ArgumentParser(prog="runtimes.py _measure")
    p.add_argument("--variant", required=True)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument(
        "--warm-sizes", type=int, default=64, help="warm every batch size 1..N twice, as the server"
    )
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--aoti-dir", default=None)
    p.add_argument("--images", default=None, help=".npy of uint8 images for the logits")
    p.add_argument("--logits-out", default=None)
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch

    t0 = time.perf_counter()
    fn = _load_variant(a.variant, Path(a.model_dir), a.threads, Path(a.aoti_dir) if a.aoti_dir else None)
    load_s = time.perf_counter() - t0
    sizes = [int(s) for s in a.batch_sizes.split(",")]
    pool = np.random.default_rng(0).integers(0, 256, (max(sizes) * 4, 32, 32, 3), dtype=np.uint8)
    if a.images:
        imgs = np.load(a.images)
        reps = -(-len(pool) // len(imgs))
        pool = np.ascontiguousarray(np.concatenate([imgs] * reps)[: len(pool)])
    t0 = time.perf_counter()
    for _ in range(2):
        for n in range(1, a.warm_sizes + 1):
            fn(pool[:n])
    for n in sizes:
        for _ in range(3):
            fn(pool[:n])
    warm_s = time.perf_counter() - t0
    results: dict[str, Any] = {}
    for n in sizes:
        lat = []
        stop = time.perf_counter() + a.seconds
        i = 0
        started = time.perf_counter()
        while time.perf_counter() < stop or len(lat) < 3:
            s = (i * n) % (len(pool) - n + 1)
            t = time.perf_counter()
            fn(pool[s : s + n])
            lat.append(time.perf_counter() - t)
            i += 1
        elapsed = time.perf_counter() - started
        ms = np.array(lat) * 1000
        results[str(n)] = {
            "images_per_s": n * len(lat) / elapsed,
            "ms_p50": float(np.percentile(ms, 50)),
            "ms_p90": float(np.percentile(ms, 90)),
            "runs": len(lat),
        }
    if a.images and a.logits_out:
        imgs = np.load(a.images)
        logits = np.concatenate([fn(np.ascontiguousarray(imgs[i : i + 64])) for i in range(0, len(imgs), 64)])
        np.save(a.logits_out, logits.astype(np.float32))
    out = {
        "variant": a.variant,
        "threads": a.threads,
        "torch_threads": torch.get_num_threads(),
        "load_s": load_s,
        "warm_s": warm_s,
        "batch": results,
    }
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


def compile_main(argv: Sequence[str]) -> int:
    """``runtimes.py _aoti``: torch.export + AOTInductor packages (fp32, bf16) from the checkpoint."""
    import warnings

    import torch

    p = argparse.ArgumentParser(prog="runtimes.py _aoti")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--variants", default="aoti_fp32,aoti_bf16")
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    from cifar_serve.export.checkpoint import load_model
    from cifar_serve.export.model import ServingModel

    class Bf16(torch.nn.Module):
        """Autocast inside forward: torch.export records it (an autocast context around export does not)."""

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = self.inner(images)
            return out.float()

    net, meta = load_model(a.checkpoint)
    model = ServingModel(net, meta["mean"], meta["std"]).eval()
    example = (torch.zeros(8, 32, 32, 3, dtype=torch.uint8),)
    batch = torch.export.Dim("batch", min=1, max=1024)
    report = {}
    for variant in a.variants.split(","):
        t0 = time.perf_counter()
        module = Bf16(model).eval() if variant == "aoti_bf16" else model
        with torch.no_grad():
            ep = torch.export.export(module, example, dynamic_shapes={"images": {0: batch}})
        export_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        torch._inductor.aoti_compile_and_package(ep, package_path=str(Path(a.out) / f"{variant}.pt2"))
        report[variant] = {"export_s": export_s, "compile_s": time.perf_counter() - t0}
        sys.stderr.write(f"{variant}: {report[variant]}\n")
    sys.stdout.write(json.dumps(report) + "\n")
    return 0


# --------------------------------------------------------------------------- child: the server's calibration


def _interleaved(
    run: Callable[[str, Any], Any], names: Sequence[str], xs: dict[int, Any], seconds: float
) -> dict[str, dict[int, list[float]]]:
    """Wall ms of every run of ``run(name, x)``: each name runs each size for about ``seconds`` in
    all, in turns over 4 rounds; names alternate order round by round, so a burst of other work
    hits all alike."""
    out: dict[str, dict[int, list[float]]] = {n: {b: [] for b in xs} for n in names}
    rounds = 4
    for r in range(rounds):
        for b, x in xs.items():
            for name in names if r % 2 == 0 else list(reversed(names)):
                stop = time.perf_counter() + seconds / rounds
                while True:
                    t = time.perf_counter()
                    run(name, x)
                    now = time.perf_counter()
                    out[name][b].append((now - t) * 1000)
                    if now >= stop:
                        break
    return out


def calibration_main(argv: Sequence[str]) -> int:
    """``runtimes.py _calibration``: the server's runtime table next to steady-state timings, one
    JSON line. ``--protocol steady`` is the server's warm-up (ModelRuntime.warmup); ``before`` is
    the warm-up it replaced (each runtime runs each bucket twice, then best of 5 alternating runs)."""
    import warnings

    import numpy as np

    p = argparse.ArgumentParser(prog="runtimes.py _calibration")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--max-batch", type=int, required=True)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--protocol", choices=("steady", "before"), default="steady")
    p.add_argument("--steady-seconds", type=float, default=2.0, help="per runtime and bucket")
    p.add_argument("--first-run-sizes", default="", help="sizes the warm-up skipped: first-run cost")
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from cifar_serve.server.runtime import IMAGE_SHAPE, ModelRuntime

    t0 = time.perf_counter()
    rt = ModelRuntime(
        a.model_dir,
        device="cpu",
        backend="auto",
        max_batch_size=a.max_batch,
        threads=a.threads,
        shape_grid=a.protocol == "steady",  # before: every size as it came
    )
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    xs = {b: rng.integers(0, 256, (b, *IMAGE_SHAPE), dtype=np.uint8) for b in rt.buckets}
    t0 = time.perf_counter()
    if a.protocol == "steady":
        rt.warmup()
        table = {b: dict(rt.timings[b]) for b in rt.buckets}
        calibration_s = rt.calibration_s
    else:
        table = {}
        for b, x in xs.items():
            for name in rt.runtimes:
                rt.run_on(name, x)
                rt.run_on(name, x)
            best = dict.fromkeys(rt.runtimes, float("inf"))
            for _ in range(5):
                for name in rt.runtimes:
                    t = time.perf_counter()
                    rt.run_on(name, x)
                    best[name] = min(best[name], (time.perf_counter() - t) * 1000)
            table[b] = best
        calibration_s = time.perf_counter() - t0
        rt.use_routes({b: min(v, key=v.__getitem__) for b, v in table.items()})
        for _ in range(2):
            for n in range(1, a.max_batch + 1):
                rt.infer(rng.integers(0, 256, (n, *IMAGE_SHAPE), dtype=np.uint8))
    warmup_s = time.perf_counter() - t0
    first: dict[str, list[float]] = {}
    for n in (int(s) for s in a.first_run_sizes.split(",") if s):
        x = rng.integers(0, 256, (n, *IMAGE_SHAPE), dtype=np.uint8)
        times = []
        for _ in range(4):
            t = time.perf_counter()
            rt.infer(x)
            times.append((time.perf_counter() - t) * 1000)
        first[str(n)] = times
    steady = _interleaved(rt.run_on, rt.runtimes, xs, a.steady_seconds)
    out = {
        "protocol": a.protocol,
        "max_batch": a.max_batch,
        "load_s": load_s,
        "calibration_s": calibration_s,
        "warmup_s": warmup_s,
        "table": {str(b): v for b, v in table.items()},
        "routes": {str(b): min(v, key=v.__getitem__) for b, v in table.items()},
        "steady": {
            name: {
                str(b): {
                    "best": float(np.min(v)),
                    "p50": float(np.median(v)),
                    "p25": float(np.percentile(v, 25)),
                    "runs": len(v),
                }
                for b, v in by.items()
            }
            for name, by in steady.items()
        },
        "first_run_ms": first,
    }
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


def mixed_main(argv: Sequence[str]) -> int:
    """``runtimes.py _mixed``: the server's runtime (warmed up as the server does) on a seeded
    random mix of batch sizes, as a loaded server forms them; CPU and wall ms per image, one JSON
    line."""
    import resource
    import warnings

    import numpy as np

    p = argparse.ArgumentParser(prog="runtimes.py _mixed")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--max-batch", type=int, required=True)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--grid", choices=("on", "off"), required=True)
    p.add_argument("--ranges", default="1-64,64-256", help="uniform size ranges, LO-HI each")
    p.add_argument("--images", type=int, default=20000, help="images per range")
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from cifar_serve.server.runtime import IMAGE_SHAPE, ModelRuntime

    rt = ModelRuntime(
        a.model_dir,
        device="cpu",
        backend="auto",
        max_batch_size=a.max_batch,
        threads=a.threads,
        shape_grid=a.grid == "on",
    )
    rt.warmup()
    pool = np.random.default_rng(0).integers(0, 256, (a.max_batch, *IMAGE_SHAPE), dtype=np.uint8)
    out: dict[str, Any] = {"grid": a.grid, "warmup_s": rt.warmup_s, "ranges": {}}
    for i, text in enumerate(a.ranges.split(",")):
        lo, hi = (min(int(v), a.max_batch) for v in text.split("-"))
        rng = np.random.default_rng(i + 1)  # the same sequence in every process
        sizes: list[int] = []
        while sum(sizes) < a.images:
            sizes.append(int(rng.integers(lo, hi + 1)))
        c0, w0 = time.process_time(), time.perf_counter()
        for n in sizes:
            rt.infer(pool[:n])
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        out["ranges"][f"{lo}-{hi}"] = {
            "batches": len(sizes),
            "images": sum(sizes),
            "cpu_ms_per_image": cpu * 1000 / sum(sizes),
            "wall_ms_per_image": wall * 1000 / sum(sizes),
        }
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


def curve_main(argv: Sequence[str]) -> int:
    """``runtimes.py _curve``: one runtime alone, CPU ms per image and wall ms per batch at each
    batch size, sizes taking turns round by round; one JSON line."""
    import resource
    import warnings

    import numpy as np

    p = argparse.ArgumentParser(prog="runtimes.py _curve")
    p.add_argument("--variant", required=True)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--sizes", default="32,64,128,256,512")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--images-per-turn", type=int, default=1024, help="images each size runs per turn")
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    fn = _load_variant(a.variant, Path(a.model_dir), a.threads, None)
    sizes = [int(s) for s in a.sizes.split(",")]
    rng = np.random.default_rng(0)
    xs = {b: rng.integers(0, 256, (b, 32, 32, 3), dtype=np.uint8) for b in sizes}
    rss_mb: dict[str, float] = {}
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for b in sizes:  # ascending: each new peak is this size's working set
        for _ in range(6):
            fn(xs[b])
        rss_mb[str(b)] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cpu: dict[int, list[float]] = {b: [] for b in sizes}
    wall: dict[int, list[float]] = {b: [] for b in sizes}
    for r in range(a.rounds):
        for b in sizes if r % 2 == 0 else list(reversed(sizes)):
            n = max(2, a.images_per_turn // b)
            fn(xs[b])  # the turn's first run follows another size: not counted
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(n):
                fn(xs[b])
            cpu[b].append((time.process_time() - c0) * 1000 / (n * b))
            wall[b].append((time.perf_counter() - w0) * 1000 / n)
    out = {
        "variant": a.variant,
        "rss_mb_before": base,
        "sizes": {
            str(b): {
                "cpu_ms_per_image_best": min(cpu[b]),
                "cpu_ms_per_image_p50": float(np.median(cpu[b])),
                "wall_ms_per_batch_best": min(wall[b]),
                "wall_ms_per_batch_p50": float(np.median(wall[b])),
                "peak_rss_mb": rss_mb[str(b)],
            }
            for b in sizes
        },
    }
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


# --------------------------------------------------------------------------- parent


def _child(args: list[str], timeout: float, log: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    with log.open("a") as err:
        err.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        err.flush()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, timeout=timeout, env=env)
    if proc.returncode != 0 or not proc.stdout.strip():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-8:])
        raise RuntimeError(f"rc {proc.returncode}: {tail}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def agreement_images(data: str | None, limit: int) -> tuple[Any, Any, str]:
    from cifar_serve.client.bench import default_data_path, load_images

    source = data or os.environ.get("CIFAR_SERVE_DATA") or str(default_data_path())
    images, labels = load_images(source)
    if limit and len(images) > limit:
        images, labels = images[:limit], (labels[:limit] if labels is not None else None)
    return images, labels, source


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    import numpy as np

    work = Path(tempfile.mkdtemp(prefix="cifar-runtimes-"))
    log = work / "children.log"
    images, labels, source = agreement_images(args.data, 64 if args.quick else 0)
    np.save(work / "images.npy", images)
    logger.info("agreement on %d images from %s", len(images), source)
    results: dict[str, Any] = {
        "command": " ".join(shlex.quote(a) for a in ["benchmarks/runtimes.py", *argv]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg_start": loadavg(),
        "machine": machine_info("cpu"),
        "agreement_source": source,
        "agreement_images": len(images),
        "batch_sizes": args.batch_sizes,
        "threads": args.threads,
        "variants": {},
        "notes": [],
        "logs": str(log),
    }
    variants = args.variants
    aoti = [v for v in variants if v.startswith("aoti")]
    if aoti:
        logger.info("compiling %s with AOTInductor (timeout %ds)", ", ".join(aoti), args.aoti_timeout)
        try:
            results["aoti_compile"] = _child(
                ["_aoti", "--checkpoint", args.checkpoint, "--out", str(work), "--variants", ",".join(aoti)],
                args.aoti_timeout,
                log,
            )
        except subprocess.TimeoutExpired:
            note = f"AOTInductor: compile took over {args.aoti_timeout}s on this machine; skipped"
            results["notes"].append(note)
            logger.warning(note)
        except RuntimeError as exc:
            note = f"AOTInductor: compile failed ({exc}); skipped"
            results["notes"].append(note)
            logger.warning(note)
    sizes = ",".join(str(b) for b in args.batch_sizes)
    for variant in variants:
        entry: dict[str, Any] = {"description": VARIANTS[variant], "by_threads": {}}
        results["variants"][variant] = entry
        for i, threads in enumerate(args.threads):
            last = i == len(args.threads) - 1
            cmd = [
                "_measure",
                "--variant",
                variant,
                "--model-dir",
                args.model_dir,
                "--threads",
                str(threads),
                "--batch-sizes",
                sizes,
                "--seconds",
                str(args.seconds),
                "--aoti-dir",
                str(work),
                "--images",
                str(work / "images.npy"),
                "--warm-sizes",
                str(args.warm_sizes),
            ]
            if last:
                cmd += ["--logits-out", str(work / f"{variant}.npy")]
            try:
                r = _child(cmd, args.timeout, log)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                entry["error"] = str(exc)[-600:]
                logger.warning("%s threads %d: %s", variant, threads, entry["error"])
                break
            entry["by_threads"][str(threads)] = r
            logger.info(
                "%-11s threads %d: %s",
                variant,
                threads,
                "  ".join(
                    f"b{b}: {v['images_per_s']:.1f} img/s ({v['ms_p50']:.2f} ms)"
                    for b, v in r["batch"].items()
                ),
            )
    ref_path = work / f"{REFERENCE}.npy"
    if REFERENCE not in variants:  # logits only, for the agreement
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            _child(
                [
                    "_measure",
                    "--variant",
                    REFERENCE,
                    "--model-dir",
                    args.model_dir,
                    "--batch-sizes",
                    "1",
                    "--seconds",
                    "0.01",
                    "--warm-sizes",
                    "1",
                    "--images",
                    str(work / "images.npy"),
                    "--logits-out",
                    str(ref_path),
                ],
                args.timeout,
                log,
            )
    if ref_path.is_file():
        ref = np.load(ref_path)
        ref_top = ref.argmax(1)
        for variant, entry in results["variants"].items():
            path = work / f"{variant}.npy"
            if not path.is_file():
                continue
            logits = np.load(path)
            top = logits.argmax(1)
            entry["agreement"] = {
                "top1_agreement": float((top == ref_top).mean()),
                "disagreements": int((top != ref_top).sum()),
                "max_abs_logit_diff": float(np.abs(logits - ref).max()),
                "accuracy": float((top == labels).mean()) if labels is not None else None,
            }
    results["recommendation"] = recommend(results, args.server_batch)
    results["loadavg_end"] = loadavg()
    return results


def _best(entry: dict[str, Any], batch: int) -> tuple[float, int]:
    """(img/s, threads) of the variant's fastest thread count at ``batch``."""
    best = (0.0, 0)
    for t, r in entry.get("by_threads", {}).items():
        v = r["batch"].get(str(batch))
        if v and v["images_per_s"] > best[0]:
            best = (v["images_per_s"], int(t))
    return best


def recommend(results: dict[str, Any], batch: int) -> dict[str, Any]:
    ok: dict[str, tuple[float, int]] = {}
    for name, entry in results["variants"].items():
        agree = entry.get("agreement")
        if not agree or agree["top1_agreement"] < AGREEMENT_GOAL:
            continue
        ok[name] = _best(entry, batch)
    fp32 = {k: v for k, v in ok.items() if "bf16" not in k}
    low = {k: v for k, v in ok.items() if "bf16" in k}
    out: dict[str, Any] = {"batch": batch}
    if fp32:
        name, (rate, threads) = max(fp32.items(), key=lambda kv: kv[1][0])
        out["fp32"] = {"variant": name, "images_per_s": rate, "threads": threads}
        base = fp32.get(REFERENCE)
        if base and base[0] > 0:
            out["fp32"]["speedup_vs_ts_fp32"] = rate / base[0]
    if low:
        name, (rate, threads) = max(low.items(), key=lambda kv: kv[1][0])
        out["bf16"] = {
            "variant": name,
            "images_per_s": rate,
            "threads": threads,
            "top1_agreement": results["variants"][name]["agreement"]["top1_agreement"],
            "faster_than_fp32": bool(fp32) and rate > out["fp32"]["images_per_s"],
        }
    return out


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    sizes = results["batch_sizes"]
    out = [
        "### Runtimes on this CPU"
        + (" (--quick smoke run: numbers meaningless)" if results.get("quick") else ""),
        "",
        f"Command: `{results['command']}` — {results['started']}. "
        f"{m.get('cpu_model')}, {m.get('cpus')} CPUs, "
        f"AMX bf16: {'yes' if m.get('amx_bf16') else 'no'}; torch {m.get('torch')}, onnxruntime "
        f"{m.get('onnxruntime')}. Load average {results['loadavg_start']} -> {results['loadavg_end']}. "
        f"Agreement with `{REFERENCE}` on {results['agreement_images']} real test images "
        f"(`{Path(results['agreement_source']).name}`).",
        "",
    ]
    head = (
        "| variant | threads | "
        + " | ".join(f"b{b} img/s | b{b} ms" for b in sizes)
        + " | top-1 agreement | max logit diff | accuracy |"
    )
    out += [head, "| --- | ---: | " + " | ".join("---: | ---:" for _ in sizes) + " | ---: | ---: | ---: |"]
    for name, entry in results["variants"].items():
        agree = entry.get("agreement") or {}
        for t, r in entry.get("by_threads", {}).items():
            cells = []
            for b in sizes:
                v = r["batch"].get(str(b))
                cells.append(f"{v['images_per_s']:.1f} | {v['ms_p50']:.2f}" if v else "- | -")
            acc = agree.get("accuracy")
            out.append(
                f"| `{name}` | {t} | "
                + " | ".join(cells)
                + " | "
                + (
                    f"{agree['top1_agreement']:.4f} | {agree['max_abs_logit_diff']:.2e} | "
                    + (f"{acc:.4f}" if acc is not None else "-")
                    if agree
                    else "- | - | -"
                )
                + " |"
            )
        if entry.get("error"):
            out.append(f"| `{name}` | - | failed: {entry['error'].splitlines()[-1][:200]} |")
    out.append("")
    for note in results["notes"]:
        out.append(f"- {note}")
    if results.get("aoti_compile"):
        out.append(
            "- AOTInductor compile times: "
            + ", ".join(
                f"{k} {v['export_s'] + v['compile_s']:.0f} s" for k, v in results["aoti_compile"].items()
            )
        )
    rec = results["recommendation"]
    if "fp32" in rec:
        f = rec["fp32"]
        sp = f" ({f['speedup_vs_ts_fp32']:.2f}x `{REFERENCE}`)" if "speedup_vs_ts_fp32" in f else ""
        out.append(
            f"- Fastest fp32 variant at batch {rec['batch']}: `{f['variant']}`, "
            f"{f['images_per_s']:.0f} img/s "
            f"with {f['threads']} thread(s){sp}."
        )
    if "bf16" in rec:
        b = rec["bf16"]
        out.append(
            f"- Fastest bf16 variant with >= {AGREEMENT_GOAL:.1%} agreement: `{b['variant']}`, "
            f"{b['images_per_s']:.0f} img/s with {b['threads']} thread(s), "
            f"agreement {b['top1_agreement']:.4f}; "
            + (
                "faster than the best fp32."
                if b.get("faster_than_fp32")
                else "NOT faster than the best fp32."
            )
        )
    out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------- parent: --calibration


def calibration_run(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    """The server's start-up table (before and now) against steady-state timings; the cost curve."""
    from cifar_serve.server.settings import Settings

    work = Path(tempfile.mkdtemp(prefix="cifar-calibration-"))
    log = work / "children.log"
    # Every child runs as the server would by default: OpenMP's threads sleep when the server's
    # runtimes do not spin (cifar-serve sets this before torch loads; ModelRuntime does ORT's).
    env = dict(os.environ)
    if not Settings().spin_wait:
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    variants = {
        "ts_frozen": "torchscript",
        "ort_fp32" if Settings().spin_wait else "ort_nospin": "onnxruntime",
    }
    results: dict[str, Any] = {
        "command": " ".join(shlex.quote(a) for a in ["benchmarks/runtimes.py", *argv]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg_start": loadavg(),
        "machine": machine_info("cpu"),
        "threads": args.threads[0],
        "omp_wait_policy": env.get("OMP_WAIT_POLICY", ""),
        "tables": [],
        "alone": {},
        "curve": {},
        "logs": str(log),
    }
    top = max(args.max_batches)
    buckets = [1 << i for i in range(top.bit_length()) if 1 << i <= top]
    if buckets[-1] != top:
        buckets.append(top)
    for max_batch in args.max_batches:
        for protocol in ("before", "steady"):
            logger.info("start-up table, max batch %d, %s warm-up", max_batch, protocol)
            cmd = ["_calibration", "--model-dir", args.model_dir, "--max-batch", str(max_batch)]
            cmd += ["--protocol", protocol, "--threads", str(args.threads[0])]
            cmd += ["--steady-seconds", str(args.steady_seconds)]
            if protocol == "steady":
                cmd += ["--first-run-sizes", ",".join(str(n) for n in (3, 48, 100, 200) if n < max_batch)]
            results["tables"].append(_child(cmd, args.timeout, log, env))
    for variant, runtime in variants.items():
        logger.info("%s alone at batch %s", runtime, buckets)
        cmd = ["_measure", "--variant", variant, "--model-dir", args.model_dir]
        cmd += ["--threads", str(args.threads[0]), "--batch-sizes", ",".join(map(str, buckets))]
        cmd += ["--seconds", str(args.steady_seconds)]
        results["alone"][runtime] = _child(cmd, args.timeout, log, env)["batch"]
    for variant, runtime in variants.items():
        logger.info("%s cost curve at batch %s", runtime, args.curve_sizes)
        cmd = ["_curve", "--variant", variant, "--model-dir", args.model_dir]
        cmd += ["--threads", str(args.threads[0]), "--sizes", ",".join(map(str, args.curve_sizes))]
        cmd += ["--rounds", str(args.curve_rounds), "--images-per-turn", "64" if args.quick else "1024"]
        results["curve"][runtime] = _child(cmd, args.timeout, log, env)
    results["mixed"] = {"on": [], "off": []}
    for r in range(args.mixed_rounds):
        for grid in ("on", "off") if r % 2 == 0 else ("off", "on"):
            logger.info("random mix of batch sizes, max batch %d, shape grid %s (round %d)", top, grid, r + 1)
            cmd = ["_mixed", "--model-dir", args.model_dir, "--max-batch", str(top), "--grid", grid]
            cmd += ["--threads", str(args.threads[0]), "--images", "2000" if args.quick else "20000"]
            results["mixed"][grid].append(_child(cmd, args.timeout, log, env))
    results["loadavg_end"] = loadavg()
    return results


def _cells(row: dict[str, float], names: Sequence[str]) -> list[str]:
    """``row``'s ms per batch in ``names``' order, the fastest in bold."""
    win = min(row, key=row.__getitem__)
    return [f"**{row[n]:.2f}**" if n == win else f"{row[n]:.2f}" for n in names]


def _short(name: str) -> str:
    return {"torchscript": "TS", "onnxruntime": "ORT"}.get(name, name)


def calibration_markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    out = [
        "### The start-up runtime table against steady state, and the cost per image by batch size",
        "",
        f"Command: `{results['command']}` — {results['started']}. {m.get('cpu_model')}, {m.get('cpus')} "
        f"CPUs; torch {m.get('torch')}, onnxruntime {m.get('onnxruntime')}; intra-op threads "
        f"{results['threads'] or 'one per core'}; as the server runs them by default, ONNX Runtime's "
        f"threads {'sleep' if results.get('omp_wait_policy') == 'PASSIVE' else 'spin'} when idle, "
        f"`OMP_WAIT_POLICY={results.get('omp_wait_policy') or '(unset)'}`. Load average "
        f"{results['loadavg_start']} -> {results['loadavg_end']} (anything well above 0 means other "
        "work shared the cores).",
        "",
    ]
    alone = results["alone"]
    for steady in (t for t in results["tables"] if t["protocol"] == "steady"):
        same = [t for t in results["tables"] if t["max_batch"] == steady["max_batch"]]
        before = next((t for t in same if t["protocol"] == "before"), None)
        names = list(steady["steady"])
        out += [
            f"Max batch {steady['max_batch']}: ms per batch, TS = frozen TorchScript, ORT = ONNX Runtime; "
            "the runtime that serves the bucket in bold. *Before*: the warm-up this replaced (2 runs, then "
            "best of 5), in a fresh process; *now*: `ModelRuntime.warmup()` as the server runs it, in "
            "another; *steady*: right after that warm-up, in the same process, each runtime run for "
            "seconds per bucket in alternating turns (best, and median in brackets); *alone*: each "
            "runtime in a process of its own (median).",
            "",
            "| bucket | before TS | before ORT | now TS | now ORT | steady TS | steady ORT | alone TS "
            "| alone ORT | now / steady best |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        agree = 0
        worst = 1.0
        for b, now in steady["table"].items():
            st = steady["steady"]
            best = {n: st[n][b]["best"] for n in names}
            ratios = [now[n] / best[n] for n in names]
            worst = max(worst, *ratios)
            agree += min(now, key=now.__getitem__) == min(best, key=best.__getitem__)
            row = [b, *(_cells(before["table"][b], names) if before else ["-"] * len(names))]
            row += _cells(now, names)
            row += [
                f"{'**' if n == min(best, key=best.__getitem__) else ''}{best[n]:.2f}"
                f"{'**' if n == min(best, key=best.__getitem__) else ''} ({st[n][b]['p50']:.2f})"
                for n in names
            ]
            row += [f"{alone[n][b]['ms_p50']:.2f}" if b in alone.get(n, {}) else "-" for n in names]
            row += [" / ".join(f"{_short(n)} {r:.2f}" for n, r in zip(names, ratios, strict=True))]
            out.append("| " + " | ".join(str(c) for c in row) + " |")
        out += [
            "",
            f"- Now against steady state: the same runtime serves {agree} of {len(steady['table'])} buckets; "
            f"the table's times are at most {worst:.2f}x the steady best.",
        ]
        if before:
            out.append(
                f"- Start-up cost, max batch {steady['max_batch']}: before, timing "
                f"{before['calibration_s']:.1f} s and the whole warm-up {before['warmup_s']:.1f} s; "
                f"now {steady['calibration_s']:.1f} s and {steady['warmup_s']:.1f} s."
            )
        else:
            out.append(
                f"- Start-up cost, max batch {steady['max_batch']}: timing "
                f"{steady['calibration_s']:.1f} s, the whole warm-up {steady['warmup_s']:.1f} s."
            )
        if steady["first_run_ms"]:
            out.append(
                "- First runs after the warm-up at sizes it did not run (ms, four runs in a row): "
                + "; ".join(
                    f"{n}: {', '.join(f'{v:.1f}' for v in times)}"
                    for n, times in steady["first_run_ms"].items()
                )
                + "."
            )
        out.append("")
    curve = results["curve"]
    if curve:
        sizes = list(next(iter(curve.values()))["sizes"])
        out += [
            "Cost per image by batch size, each runtime alone, the sizes taking turns round by round "
            "(CPU = `time.process_time`, all threads; best round, median in brackets):",
            "",
            "| batch | "
            + " | ".join(
                f"{r} CPU ms/image | {r} ms/batch | {r} img/s | {r} peak RSS MB" for r in map(_short, curve)
            )
            + " |",
            "| ---: | " + " | ".join("---: | ---: | ---: | ---:" for _ in curve) + " |",
        ]
        for b in sizes:
            row = [b]
            for r in curve.values():
                v = r["sizes"][b]
                row += [
                    f"{v['cpu_ms_per_image_best']:.3f} ({v['cpu_ms_per_image_p50']:.3f})",
                    f"{v['wall_ms_per_batch_best']:.1f} ({v['wall_ms_per_batch_p50']:.1f})",
                    f"{int(b) * 1000 / v['wall_ms_per_batch_best']:.0f}",
                    f"{v['peak_rss_mb']:.0f}",
                ]
            out.append("| " + " | ".join(str(c) for c in row) + " |")
        out.append("")
    mixed = results.get("mixed") or {}
    if mixed.get("on") and mixed.get("off"):
        ranges = list(mixed["on"][0]["ranges"])
        rounds = len(mixed["on"])
        out += [
            "A seeded random mix of batch sizes (as a loaded server forms them), max batch "
            f"{top_batch(results)}, the server's runtime warmed up as the server does, TorchScript's "
            "shapes padded to the grid (`padded_shapes`) or run as they come; the two take turns in "
            f"fresh processes, {rounds} round(s) each; median CPU (wall) ms per image over the rounds:",
            "",
            "| sizes | grid on | grid off | on / off (CPU) | warm-up s, on / off | peak RSS MB, on / off |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for key in ranges:

            def med(grid: str, field: str, key: str = key) -> float:
                return float(statistics.median(r["ranges"][key][field] for r in mixed[grid]))

            on_cpu, off_cpu = med("on", "cpu_ms_per_image"), med("off", "cpu_ms_per_image")
            warm = [statistics.median(r["warmup_s"] for r in mixed[g]) for g in ("on", "off")]
            rss = [
                statistics.median(r.get("peak_rss_mb", float("nan")) for r in mixed[g]) for g in ("on", "off")
            ]
            out.append(
                f"| {key} | {on_cpu:.3f} ({med('on', 'wall_ms_per_image'):.3f}) | {off_cpu:.3f} "
                f"({med('off', 'wall_ms_per_image'):.3f}) | **{on_cpu / off_cpu:.2f}x** | "
                f"{warm[0]:.1f} / {warm[1]:.1f} | {rss[0]:.0f} / {rss[1]:.0f} |"
            )
        out.append("")
    return "\n".join(out)


def top_batch(results: dict[str, Any]) -> int:
    return max(t["max_batch"] for t in results["tables"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="seconds-scale smoke run (no AOTInductor)")
    p.add_argument("--model-dir", default=str(REPO / "artifacts"))
    p.add_argument("--checkpoint", default=str(REPO / "models" / "resnet18_cifar10.pt"))
    p.add_argument("--variants", default=None, help=f"comma list of {', '.join(VARIANTS)} (default: all)")
    p.add_argument("--batch-sizes", default=None, help="default 1,64 (plus --server-batch)")
    p.add_argument("--server-batch", type=int, default=64, help="the server's max batch size")
    p.add_argument("--threads", default=None, help="intra-op thread counts, default 1,2")
    p.add_argument("--seconds", type=float, default=None, help="seconds per batch size (default 3)")
    p.add_argument(
        "--warm-sizes",
        type=int,
        default=None,
        help="warm batch sizes 1..N twice before timing, as the server does (default 64)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="test images for agreement (default $CIFAR_SERVE_DATA, else the committed 600-image sample)",
    )
    p.add_argument(
        "--aoti-timeout", type=int, default=420, help="seconds allowed for the AOTInductor compile"
    )
    p.add_argument("--timeout", type=int, default=900, help="seconds allowed per measurement process")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--markdown", default=str(REPO / "BENCHMARKS.md"), help="'' to skip")
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the other variants already in --out; replace only those measured now",
    )
    p.add_argument(
        "--calibration",
        action="store_true",
        help="instead of the variants: the server's start-up runtime table against steady-state timings, "
        "and each runtime's cost per image by batch size (benchmarks/calibration.json, BENCHMARKS.md)",
    )
    p.add_argument("--max-batches", default=None, help="--calibration: max batch sizes (default 64,256)")
    p.add_argument("--label", default="", help="--calibration: suffix for the results file and section")
    p.add_argument("--curve-sizes", default=None, help="--calibration: default 32,64,128,256,512")
    p.add_argument("--curve-rounds", type=int, default=None, help="--calibration: default 6")
    p.add_argument(
        "--mixed-rounds", type=int, default=None, help="--calibration: grid on/off turns (default 3)"
    )
    p.add_argument(
        "--steady-seconds", type=float, default=None, help="--calibration: per runtime and bucket (default 1)"
    )
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_measure":
        return measure_main(argv[1:])
    if argv and argv[0] == "_aoti":
        return compile_main(argv[1:])
    if argv and argv[0] == "_calibration":
        return calibration_main(argv[1:])
    if argv and argv[0] == "_curve":
        return curve_main(argv[1:])
    if argv and argv[0] == "_mixed":
        return mixed_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    q = args.quick
    if args.calibration:
        return calibration(args, argv)
    default_variants = [v for v in VARIANTS if not (q and v.startswith("aoti"))]
    args.variants = args.variants.split(",") if args.variants else default_variants
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        logger.error("unknown variants %s; choose from %s", unknown, list(VARIANTS))
        return 2
    sizes = [int(b) for b in (args.batch_sizes or ("1,8" if q else "1,64")).split(",")]
    if not q and args.server_batch not in sizes:
        sizes.append(args.server_batch)
    args.batch_sizes = sizes
    if q:
        args.server_batch = max(sizes)
    args.threads = [int(t) for t in (args.threads or ("1" if q else "1,2")).split(",")]
    args.seconds = args.seconds if args.seconds is not None else (0.3 if q else 3.0)
    args.warm_sizes = args.warm_sizes if args.warm_sizes is not None else (max(sizes) if q else 64)
    results = run(args, argv)
    results["quick"] = q
    if args.merge and Path(args.out).is_file():
        old = json.loads(Path(args.out).read_text())
        merged = {**old.get("variants", {}), **results["variants"]}
        results["variants"] = {k: merged[k] for k in VARIANTS if k in merged}
        results["notes"] = [
            *old.get("notes", []),
            *results["notes"],
            f"merged: {', '.join(args.variants)} from {results['started']}, the rest from "
            f"{old.get('started')} ({old.get('command')})",
        ]
        results["recommendation"] = recommend(results, args.server_batch)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown:
        update_markdown(Path(args.markdown), markdown(results), "runtimes")
    logger.info(
        "wrote %s%s; recommendation %s",
        args.out,
        f" and {args.markdown}" if args.markdown else "",
        results["recommendation"],
    )
    return 0


def calibration(args: argparse.Namespace, argv: Sequence[str]) -> int:
    q = args.quick
    args.max_batches = [int(b) for b in (args.max_batches or ("8" if q else "64,256")).split(",")]
    args.curve_sizes = [
        int(b) for b in (args.curve_sizes or ("4,8" if q else "32,64,128,256,512")).split(",")
    ]
    args.curve_rounds = args.curve_rounds or (2 if q else 6)
    args.mixed_rounds = args.mixed_rounds or (1 if q else 3)
    args.steady_seconds = args.steady_seconds or (0.1 if q else 1.0)
    args.threads = [int(t) for t in (args.threads or "0").split(",")]
    results = calibration_run(args, argv)
    results["quick"] = q
    suffix = f"-{args.label}" if args.label else ""
    out = (
        Path(args.out).with_name(f"calibration{suffix}.json")
        if args.out == str(DEFAULT_OUT)
        else Path(args.out)
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    text = calibration_markdown(results)
    if args.markdown and not q:
        update_markdown(Path(args.markdown), text, "calibration" + suffix)
    else:
        sys.stdout.write(text)
    logger.info("wrote %s%s", out, f" and {args.markdown}" if args.markdown and not q else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
