"""GPU correctness: the GPU runtime and the GPU server against the CPU's fp32 logits.

Called by ``benchmarks/gpu_check.sh``; runs anywhere (``--device cpu`` checks the plumbing).

* Runtime: ``ModelRuntime`` on ``--device`` at each precision (fp32, bf16, fp16 on CUDA), fed a
  mix of batch sizes (so CUDA graph buckets and padding are exercised), against ``ModelRuntime``
  on the CPU in fp32: largest logit difference and top-1 agreement.
* Served: a real server on ``--device`` (native API, packed images, ``include_logits``) against
  the same CPU logits.
* ONNX Runtime's CUDA provider too, when it is installed and the ONNX artifact is present.
* The null model (``--null-model-dir``, ``cifar-export --null-model``): served on ``--device``
  against its own CPU logits, so the GPU pass serves it before benchmarking it.

Thresholds: fp32 logits within ``--fp32-atol`` (TF32 convolutions are allowed, hence not 1e-5)
and >= 99.5% top-1 agreement; bf16/fp16 >= ``--low-agreement`` (99.5%). Writes
``gpu_check.json`` into ``--out``; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("cifar_serve.bench.gpu_check")

REPO = Path(__file__).resolve().parents[1]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ensure_model_dir(model_dir: Path, checkpoint: Path | None, scratch: Path) -> Path:
    """``model_dir`` if its TorchScript loads here, else a TorchScript-only re-export into ``scratch``.

    The artifact may come from a newer torch than the GPU machine's; re-tracing the checkpoint
    with the local torch gives the same weights in a file this torch can read. ``checkpoint``
    None: the null model (``cifar-export --null-model``), which needs no checkpoint to re-trace.
    """
    from cifar_serve.server.runtime import ArtifactError, ModelRuntime

    try:
        ModelRuntime(model_dir, device="cpu", max_batch_size=2)
        return model_dir
    except (ArtifactError, RuntimeError) as exc:
        logger.warning(
            "cannot use %s (%s); re-exporting TorchScript from %s", model_dir, exc, checkpoint or "NullNet"
        )
    from cifar_serve.export import exporter
    from cifar_serve.export.checkpoint import load_model
    from cifar_serve.export.data import CIFAR10_CLASSES
    from cifar_serve.export.model import CIFAR10_MEAN, CIFAR10_STD, NullNet, ServingModel

    if checkpoint is None:
        model = ServingModel(NullNet(len(CIFAR10_CLASSES)), CIFAR10_MEAN, CIFAR10_STD).eval()
        identity = {"name": exporter.NULL_MODEL_NAME, "version": "1", "arch": exporter.NULL_ARCH}
        labels = list(CIFAR10_CLASSES)
    else:
        net, meta = load_model(checkpoint)
        model = ServingModel(net, meta["mean"], meta["std"]).eval()
        identity = {"name": "cifar10_resnet18", "version": "1", "arch": "ResNet18"}
        labels = list(meta.get("labels") or [])
    scratch.mkdir(parents=True, exist_ok=True)
    ts = scratch / "model.torchscript.pt"
    exporter.export_torchscript(model, ts)
    manifest_path = model_dir / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
    else:
        manifest = {
            "format": "cifar-serve-manifest/1",
            "model": identity,
            "input": {"name": "images", "datatype": "UINT8", "shape": [-1, 32, 32, 3], "layout": "NHWC"},
            "output": {"name": "logits", "datatype": "FP32", "shape": [-1, len(labels) or 10]},
            "labels": labels,
            # Seeded noise and this model's logits for it: the server's load check.
            "check_sample": exporter.check_sample(model, None),
        }
    manifest["artifacts"] = {"torchscript": {"path": ts.name, "sha256": _sha256(ts)}}
    manifest["note"] = "TorchScript re-exported by benchmarks/gpu_check.py with the local torch"
    (scratch / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return scratch


def batched_logits(infer: Any, images: np.ndarray, sizes: tuple[int, ...] = (1, 7, 64, 33)) -> np.ndarray:
    """Logits for all images, fed in a rotating mix of batch sizes."""
    out, i, k = [], 0, 0
    while i < len(images):
        n = sizes[k % len(sizes)]
        out.append(infer(np.ascontiguousarray(images[i : i + n])))
        i += n
        k += 1
    return np.concatenate(out)


def compare(
    name: str,
    logits: np.ndarray,
    ref: np.ndarray,
    labels: np.ndarray | None,
    atol: float | None,
    min_agreement: float,
    seconds: float,
) -> dict[str, Any]:
    top, ref_top = logits.argmax(1), ref.argmax(1)
    diff = float(np.abs(logits - ref).max())
    agree = float((top == ref_top).mean())
    ok = agree >= min_agreement and (atol is None or diff <= atol)
    r = {
        "check": name,
        "ok": ok,
        "max_abs_logit_diff": diff,
        "top1_agreement": agree,
        "disagreements": int((top != ref_top).sum()),
        "atol": atol,
        "min_agreement": min_agreement,
        "accuracy": float((top == labels).mean()) if labels is not None else None,
        "seconds": round(seconds, 2),
    }
    logger.info(
        "%-34s %s  max|diff| %.2e  agreement %.4f (%d differ)  accuracy %s",
        name,
        "OK  " if ok else "FAIL",
        diff,
        agree,
        r["disagreements"],
        f"{r['accuracy']:.4f}" if r["accuracy"] is not None else "-",
    )
    return r


def served_logits(model_dir: Path, device: str, precision: str, images: np.ndarray) -> np.ndarray:
    import grpc

    from cifar_serve.server.launch import ServerThread
    from cifar_serve.server.settings import Settings
    from cifar_serve.v1 import classifier_pb2 as pb
    from cifar_serve.v1 import classifier_pb2_grpc as pb_grpc

    settings = Settings(
        host="127.0.0.1",
        port=0,
        metrics_port=-1,
        model_dir=str(model_dir),
        device=device,
        precision=precision,
        max_batch_size=64,
        log_level="WARNING",
    )
    with ServerThread(settings) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        rows = []
        for i in range(0, len(images), 50):
            chunk = np.ascontiguousarray(images[i : i + 50])
            resp = stub.Classify(
                pb.ClassifyRequest(
                    packed=pb.PackedImages(data=chunk.tobytes(), count=len(chunk)), include_logits=True
                ),
                timeout=120,
            )
            rows.extend(list(r.logits) for r in resp.results)
    return np.asarray(rows, dtype=np.float32)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--model-dir", default=str(REPO / "artifacts"))
    p.add_argument("--checkpoint", default=str(REPO / "models" / "resnet18_cifar10.pt"))
    p.add_argument("--scratch", default="/tmp/cifar-gpu-artifacts")
    p.add_argument(
        "--null-model-dir",
        default=str(REPO / "artifacts-null"),
        help="the null model's export (re-exported TorchScript-only into --scratch-null when unusable); "
        "'' to skip its served check",
    )
    p.add_argument("--scratch-null", default="/tmp/cifar-gpu-artifacts-null")
    p.add_argument(
        "--data", default=None, help="test images (default $CIFAR_SERVE_DATA, else the 600 committed)"
    )
    p.add_argument("--precisions", default=None, help="default fp32,bf16,fp16 on CUDA; fp32 on CPU")
    p.add_argument("--fp32-atol", type=float, default=5e-2)
    p.add_argument("--low-agreement", type=float, default=0.995)
    p.add_argument("--no-serve", action="store_true", help="skip the end-to-end server check")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout
    )
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch

    from cifar_serve.client.bench import default_data_path, load_images
    from cifar_serve.server.runtime import ModelRuntime

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        logger.error("--device %s but CUDA is not available", args.device)
        return 2
    report: dict[str, Any] = {"device": args.device, "torch": torch.__version__, "checks": []}
    if cuda:
        report["gpu"] = torch.cuda.get_device_name()
        report["cuda"] = torch.version.cuda
    source = args.data or os.environ.get("CIFAR_SERVE_DATA") or str(default_data_path())
    images, labels = load_images(source)
    report["images"], report["source"] = len(images), source
    model_dir = ensure_model_dir(Path(args.model_dir), Path(args.checkpoint), Path(args.scratch))
    report["model_dir"] = str(model_dir)
    logger.info(
        "%d images from %s; model %s; torch %s on %s",
        len(images),
        source,
        model_dir,
        torch.__version__,
        report.get("gpu", args.device),
    )

    t0 = time.perf_counter()
    cpu = ModelRuntime(model_dir, device="cpu", max_batch_size=64)
    ref = batched_logits(cpu.infer, images, sizes=(64,))
    ref_s = time.perf_counter() - t0
    report["checks"].append(compare("cpu fp32 reference (vs itself)", ref, ref, labels, 0.0, 1.0, ref_s))
    precisions = (args.precisions or ("fp32,bf16,fp16" if cuda else "fp32")).split(",")
    for precision in precisions:
        t0 = time.perf_counter()
        try:
            rt = ModelRuntime(model_dir, device=args.device, precision=precision, max_batch_size=64, slots=2)
            rt.warmup()
            got = batched_logits(rt.infer, images)
        except Exception as exc:
            logger.error("runtime %s %s failed: %s", args.device, precision, exc)
            report["checks"].append(
                {"check": f"runtime {args.device} {precision}", "ok": False, "error": str(exc)}
            )
            continue
        extra = f" graphs={rt.describe().get('cuda_graphs')}" if cuda else ""
        report["checks"].append(
            compare(
                f"runtime {args.device} {precision}{extra}",
                got,
                ref,
                labels,
                args.fp32_atol if precision == "fp32" else None,
                0.995 if precision == "fp32" else args.low_agreement,
                time.perf_counter() - t0,
            )
        )
        del rt
    if cuda:
        try:
            import onnxruntime as ort

            have = "CUDAExecutionProvider" in ort.get_available_providers()
        except ImportError:
            have = False
        manifest = json.loads((model_dir / "manifest.json").read_text())
        if have and "onnx" in manifest.get("artifacts", {}):
            t0 = time.perf_counter()
            try:
                rt = ModelRuntime(model_dir, device=args.device, backend="onnxruntime", max_batch_size=64)
                got = batched_logits(rt.infer, images)
                report["checks"].append(
                    compare(
                        f"onnxruntime {args.device} fp32",
                        got,
                        ref,
                        labels,
                        args.fp32_atol,
                        0.995,
                        time.perf_counter() - t0,
                    )
                )
            except Exception as exc:
                logger.warning("onnxruntime on %s failed: %s", args.device, exc)
                report["checks"].append({"check": "onnxruntime cuda", "ok": False, "error": str(exc)})
        else:
            logger.info("onnxruntime CUDA provider or ONNX artifact not available: skipped")
    if not args.no_serve:
        for precision in ("fp32", "fp16") if cuda else ("fp32",):
            t0 = time.perf_counter()
            try:
                got = served_logits(model_dir, args.device, precision, images)
            except Exception as exc:
                logger.error("served check %s failed: %s", precision, exc)
                report["checks"].append(
                    {"check": f"served {args.device} {precision}", "ok": False, "error": str(exc)}
                )
                continue
            report["checks"].append(
                compare(
                    f"served {args.device} {precision} (native API)",
                    got,
                    ref,
                    labels,
                    args.fp32_atol if precision == "fp32" else None,
                    0.995 if precision == "fp32" else args.low_agreement,
                    time.perf_counter() - t0,
                )
            )
    if args.null_model_dir and not args.no_serve:
        t0 = time.perf_counter()
        try:
            null_dir = ensure_model_dir(Path(args.null_model_dir), None, Path(args.scratch_null))
            report["null_model_dir"] = str(null_dir)
            null_ref = batched_logits(ModelRuntime(null_dir, device="cpu", max_batch_size=64).infer, images)
            got = served_logits(null_dir, args.device, "fp32", images)
            report["checks"].append(
                compare(
                    f"served {args.device} fp32 null model",
                    got,
                    null_ref,
                    None,
                    args.fp32_atol,
                    0.995,
                    time.perf_counter() - t0,
                )
            )
        except Exception as exc:
            logger.error("null model check failed: %s", exc)
            report["checks"].append(
                {"check": f"served {args.device} null model", "ok": False, "error": str(exc)}
            )
    report["ok"] = all(c.get("ok") for c in report["checks"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    logger.info("correctness %s; wrote %s", "PASSED" if report["ok"] else "FAILED", out / "gpu_check.json")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
