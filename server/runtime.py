"""The model runtime: loads an exported artifact once, keeps it resident, runs batches.

Transport-free: numpy uint8 ``[N,32,32,3]`` in, float32 logits ``[N,10]`` out. The batcher
calls :meth:`ModelRuntime.infer` from worker threads, never from the event loop.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["ArtifactError", "Manifest", "ModelRuntime", "load_manifest", "resolve_device"]

logger = logging.getLogger(__name__)

IMAGE_SHAPE = (32, 32, 3)
# The manifest's entry for the int8 model (cifar-export's model.int8.onnx), and its runtime's
# name in the runtime table.
INT8_ARTIFACT = "onnx_int8"
INT8_RUNTIME = "onnxruntime-int8"
# Timed turns per runtime and batch bucket at warm-up, the runtimes taking turns; the best run
# counts (the least disturbed by other work on the machine). A turn is TURN_RUNS runs in a row,
# because the first run after the other runtime's is slowed by it (its idle threads still spin
# on the cores: TorchScript's b64 right after ONNX Runtime's took 42 ms, its next one 16).
CALIBRATION_RUNS = 5
TURN_RUNS = 2
# ... but after two turns, a bucket whose turns have taken CALIBRATION_BUCKET_S stops there: on a
# busy machine the table then costs seconds, not a minute (the best of fewer runs still counts).
CALIBRATION_BUCKET_S = 1.0
# Turns are only for close calls: where one runtime's settled time is more than CALIBRATION_CLOSE
# times the other's, the settled times decide (most buckets: TorchScript takes 2x ONNX Runtime's
# time at batch 1-4 and half of it from 32 up on this project's CPUs), which keeps the table
# cheap at large buckets, where a run costs the most.
CALIBRATION_CLOSE = 1.25
# On the CPU, TorchScript runs a batch padded up to the next of a few shapes, the extra rows
# computed and dropped (eval-mode BatchNorm treats every image on its own): every size up to
# SHAPES_EXACT_UP_TO, then SHAPES_PER_OCTAVE sizes per doubling (20, 24, 28, 32, 40, ...; 32
# shapes up to 256). oneDNN builds ~25 kernels per input shape for this model and keeps 1024 (40
# shapes' worth), so with any size from 1 to 256 arriving under load it kept rebuilding them:
# after 60 other sizes, a batch of 100 took 28.5 ms against 19.5 settled, a batch of 8 11.2 ms
# against 4.2 (the cost on a mix of sizes: BENCHMARKS.md). Padding adds at most a quarter.
SHAPES_EXACT_UP_TO = 16
SHAPES_PER_OCTAVE = 4
# Before it is timed, each runtime runs each bucket until its time per batch has settled:
# TorchScript's profiling executor optimises the graph after the first runs, and both runtimes
# keep getting faster for a few more (oneDNN primitives, ONNX Runtime's allocation plans,
# caches): TorchScript's first runs at batch 1 took 44, 7.0, 4.0, 3.3, 3.1 ms, ONNX Runtime's
# 4.7, 1.7, 0.9, 0.7, 0.6. Settled = SETTLE_PATIENCE runs in a row none of which beats the best
# so far by more than SETTLE_GAIN, after at least SETTLE_MIN_RUNS; bounded by SETTLE_MAX_RUNS
# and SETTLE_MAX_S per runtime and bucket, so a machine too busy to settle still starts.
SETTLE_MIN_RUNS = 3
SETTLE_PATIENCE = 3
SETTLE_GAIN = 0.03
SETTLE_MAX_RUNS = 40
SETTLE_MAX_S = 0.5


class ArtifactError(RuntimeError):
    """The model artifacts are missing, corrupt or do not match their manifest."""


@dataclass(frozen=True)
class Manifest:
    path: Path
    name: str
    version: str
    labels: tuple[str, ...]
    input_name: str
    output_name: str
    artifacts: dict[str, dict[str, Any]]
    test_accuracy: float
    raw: dict[str, Any]

    def artifact_path(self, kind: str) -> Path:
        try:
            name = str(self.artifacts[kind]["path"])
        except KeyError:
            raise ArtifactError(f"{self.path}: manifest lists no {kind!r} artifact") from None
        # A manifest names files beside itself only: an absolute path, a '..' or a symlink out of
        # the folder would let whoever wrote the manifest make the server read any file.
        folder = os.path.realpath(self.path.parent)
        resolved = os.path.realpath(os.path.join(folder, name))
        if os.path.isabs(name) or os.path.commonpath([folder, resolved]) != folder:
            raise ArtifactError(f"{self.path}: the {kind!r} artifact path leaves the manifest's folder")
        return Path(resolved)


def load_manifest(model_dir: str | os.PathLike[str]) -> Manifest:
    path = Path(model_dir) / "manifest.json"
    if not path.is_file():
        raise ArtifactError(
            f"no manifest at {path}: export the model first "
            f"(`make artifacts` or `cifar-export --out {model_dir}`)"
        )
    try:
        raw = json.loads(path.read_text())
        return Manifest(
            path=path,
            name=str(raw["model"]["name"]),
            version=str(raw["model"]["version"]),
            labels=tuple(raw["labels"]),
            input_name=str(raw["input"]["name"]),
            output_name=str(raw["output"]["name"]),
            artifacts=dict(raw["artifacts"]),
            test_accuracy=float(raw.get("test_accuracy") or 0.0),
            raw=raw,
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{path}: not a valid manifest ({exc})") from exc


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ArtifactError(f"--device {name}: CUDA is not available on this machine")
    return dev


class ModelRuntime:
    """One loaded model on one device.

    On a GPU, each in-flight slot owns a pinned host buffer and a CUDA stream, so one batch's
    host-to-device copy overlaps another's compute.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        device: str = "auto",
        backend: str = "torchscript",
        precision: str = "fp32",
        max_batch_size: int = 64,
        slots: int = 1,
        threads: int = 0,
        verify_sha256: bool = True,
        cuda_graphs: bool = True,
        spin_wait: bool = False,
        shape_grid: bool = True,
    ) -> None:
        self.manifest = load_manifest(model_dir)
        self.spin_wait = spin_wait
        self.backend = backend
        self.precision = precision
        self.max_batch_size = max_batch_size
        if precision == "int8":
            # int8 is ONNX Runtime's CPU kernels on the QDQ model: "auto" means the CPU, and
            # anything else is refused before a model loads.
            _check_int8(self.manifest, device, backend)
            device, backend = "cpu", "onnxruntime"
        self.device = resolve_device(device)
        if backend == "auto":
            # On the CPU, ONNX Runtime wins small batches and frozen TorchScript large ones, with a
            # crossover that depends on the machine: both load, and warm-up times them at every
            # batch bucket (calibrate). On a GPU, or at reduced precision, TorchScript alone.
            backend = "auto" if self.device.type == "cpu" and precision == "fp32" else "torchscript"
        self.backend = backend
        self._verify = verify_sha256
        self._sha: dict[str, str] = {}
        if threads > 0:
            torch.set_num_threads(threads)
        self._autocast: torch.dtype | None = None
        if precision == "bf16":
            self._autocast = torch.bfloat16
        elif precision == "fp16":
            if self.device.type != "cuda":
                raise ArtifactError("--precision fp16 needs a CUDA device")
            self._autocast = torch.float16
        self._ort: Any = None
        self._module: Any = None
        if backend not in ("onnxruntime", "torchscript", "auto"):
            raise ArtifactError(f"unknown backend {backend!r}")
        if backend in ("onnxruntime", "auto"):
            kind = INT8_ARTIFACT if precision == "int8" else "onnx"
            self._init_onnxruntime(self._artifact(kind), threads)
        if backend in ("torchscript", "auto"):
            artifact = self._artifact("torchscript")
            self._init_torchscript(artifact)
        # Which runtime runs a batch of each size: the first loaded until warm-up has timed them.
        self._runners: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
        if self._module is not None:
            self._runners["torchscript"] = self._run_torchscript
        if self._ort is not None:
            self._runners[INT8_RUNTIME if precision == "int8" else "onnxruntime"] = self._run_onnxruntime
        first = next(iter(self._runners))
        self.buckets = graph_buckets(max_batch_size)
        self.routes: dict[int, str] = dict.fromkeys(self.buckets, first)
        self.timings: dict[int, dict[str, float]] = {}
        # Seconds the last calibrate() and warmup() took (start-up cost, for logs and benchmarks).
        self.calibration_s: float | None = None
        self.warmup_s: float | None = None
        self._by_size: list[Callable[[np.ndarray], np.ndarray]] = []
        self._route_sizes()
        # The shape TorchScript runs a batch of n images at (index n): padded on the CPU only,
        # where oneDNN's per-shape kernels are the cost (a GPU replays CUDA graphs per bucket).
        grid = shape_grid and self.device.type == "cpu"
        self.shapes = padded_shapes(max_batch_size) if grid else list(range(1, max_batch_size + 1))
        self._shape_of = [0] + [next(s for s in self.shapes if s >= n) for n in range(1, max_batch_size + 1)]
        self.sha256 = self._sha["torchscript" if self._module is not None else next(iter(self._sha))]
        self._slots: queue.Queue[_Slot] = queue.Queue()
        for _ in range(max(1, slots)):
            self._slots.put(_Slot(self.device, max_batch_size))
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda" and backend == "torchscript"
        logger.info(
            "loaded %s (%s, %s, %s) sha256 %s", model_dir, backend, precision, self.device, self.sha256[:12]
        )

    def _artifact(self, kind: str) -> Path:
        """The artifact's path, after checking its sha256 against the manifest."""
        artifact = self.manifest.artifact_path(kind)
        if not artifact.is_file():
            raise ArtifactError(f"artifact missing: {artifact}")
        digest = _sha256(artifact)
        expected = self.manifest.artifacts[kind].get("sha256")
        if self._verify and digest != expected:
            raise ArtifactError(
                f"{artifact}: sha256 {digest} does not match the manifest's {expected}; "
                "the artifact was modified or corrupted: re-export it"
            )
        self._sha[kind] = digest
        return artifact

    # ------------------------------------------------------------------ backends

    def _init_torchscript(self, artifact: Path) -> None:
        try:
            module = torch.jit.load(str(artifact), map_location=self.device)
        except Exception as exc:
            raise ArtifactError(f"{artifact}: cannot load TorchScript ({exc})") from exc
        module = module.eval()
        try:
            # Freezing folds BatchNorm into the convolutions; on the CPU, optimize_for_inference
            # also moves them to oneDNN. Measured 3x at batch 64 (BENCHMARKS.md, ts_frozen),
            # logits within 2e-5 of the plain artifact.
            module = torch.jit.freeze(module)
            if self.device.type == "cpu":
                module = torch.jit.optimize_for_inference(module)
        except Exception as exc:  # an artifact that cannot be frozen still serves, only slower
            logger.warning("serving TorchScript unfrozen (%s)", exc)
        self._module = module
        if self.device.type == "cuda":
            self._module = self._module.to(memory_format=torch.channels_last)

    def _init_onnxruntime(self, artifact: Path, threads: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads > 0:
            opts.intra_op_num_threads = threads
        if not self.spin_wait:
            # Idle pool threads sleep instead of spinning: CPU time that shared cores give back.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda":
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self._ort = ort.InferenceSession(str(artifact), opts, providers=providers)
        except Exception as exc:
            raise ArtifactError(f"{artifact}: cannot load ONNX model ({exc})") from exc
        if self.precision not in ("fp32", "int8"):
            raise ArtifactError(f"--backend onnxruntime serves fp32 or int8, not {self.precision}")

    # ------------------------------------------------------------------ inference

    def infer(self, images: np.ndarray) -> np.ndarray:
        """Logits for a uint8 ``[n,32,32,3]`` batch, ``1 <= n <= max_batch_size``."""
        if images.dtype != np.uint8 or images.shape[1:] != IMAGE_SHAPE:
            raise ValueError(f"expected uint8 [N,32,32,3], got {images.dtype} {images.shape}")
        n = len(images)
        run = self._by_size[n] if n < len(self._by_size) else self._by_size[-1]
        return run(images)

    def _run_onnxruntime(self, images: np.ndarray) -> np.ndarray:
        out = self._ort.run([self.manifest.output_name], {self.manifest.input_name: images})[0]
        return np.asarray(out, dtype=np.float32)

    def _run_torchscript(self, images: np.ndarray) -> np.ndarray:
        n = len(images)
        shape = self._shape_of[n] if n < len(self._shape_of) else n
        if shape > n:
            padded = np.zeros((shape, *IMAGE_SHAPE), dtype=np.uint8)
            padded[:n] = images
            images = padded
        slot = self._slots.get()
        try:
            return slot.run(self._module, images, self._autocast)[:n]
        finally:
            self._slots.put(slot)

    def route(self, n: int) -> str:
        """The runtime that runs a batch of ``n`` images: the winner of the smallest bucket >= n."""
        return self.routes[next((b for b in self.buckets if b >= n), self.buckets[-1])]

    def _route_sizes(self) -> None:
        self._by_size = [self._runners[self.route(max(n, 1))] for n in range(self.max_batch_size + 1)]

    @property
    def runtimes(self) -> tuple[str, ...]:
        """The loaded runtimes' names (two with ``backend="auto"`` on the CPU)."""
        return tuple(self._runners)

    def run_on(self, runtime: str, images: np.ndarray) -> np.ndarray:
        """Logits from the named runtime, whatever the routes say (to compare runtimes in-process)."""
        if images.dtype != np.uint8 or images.shape[1:] != IMAGE_SHAPE:
            raise ValueError(f"expected uint8 [N,32,32,3], got {images.dtype} {images.shape}")
        try:
            run = self._runners[runtime]
        except KeyError:
            raise ValueError(f"runtime {runtime!r} is not loaded here (loaded: {self.runtimes})") from None
        return run(images)

    def settle(self, runtime: str, images: np.ndarray) -> tuple[int, float]:
        """Run ``images`` on ``runtime`` until its time per batch settles (see SETTLE_*).

        Returns the runs it took and the best time, in ms.
        """
        run = self._runners[runtime]
        best = float("inf")
        quiet = runs = 0
        began = time.perf_counter()
        while runs < SETTLE_MAX_RUNS and (runs < SETTLE_MIN_RUNS or quiet < SETTLE_PATIENCE):
            started = time.perf_counter()
            run(images)
            ms = (time.perf_counter() - started) * 1000
            runs += 1
            quiet = 0 if ms < best * (1 - SETTLE_GAIN) else quiet + 1
            best = min(best, ms)
            if runs >= SETTLE_MIN_RUNS and time.perf_counter() - began > SETTLE_MAX_S:
                break
        return runs, best

    def calibrate(self, runs: int = CALIBRATION_RUNS) -> None:
        """Time every loaded runtime at every batch bucket at steady state; route each bucket to its
        fastest.

        At each bucket, each runtime first runs until its time has settled (:meth:`settle`). Where
        the settled times are within CALIBRATION_CLOSE of each other, the runtimes then take
        ``runs`` turns of TURN_RUNS runs each (fewer past CALIBRATION_BUCKET_S), in alternating
        order, so a burst of other work on the machine hits both alike. Each one's best run counts.
        """
        if len(self._runners) < 2:
            return
        rng = np.random.default_rng(0)
        began = time.perf_counter()
        settled: list[int] = []
        order = list(self._runners)
        turns = 0
        for b in self.buckets:
            x = rng.integers(0, 256, (b, *IMAGE_SHAPE), dtype=np.uint8)
            best: dict[str, float] = {}
            for name in order:
                count, best[name] = self.settle(name, x)
                settled.append(count)
            timing = time.perf_counter()
            for turn in range(runs if max(best.values()) <= CALIBRATION_CLOSE * min(best.values()) else 0):
                if turn >= 2 and time.perf_counter() - timing > CALIBRATION_BUCKET_S:
                    break
                turns += 1
                for name in order if turn % 2 == 0 else reversed(order):
                    run = self._runners[name]
                    for _ in range(TURN_RUNS):
                        started = time.perf_counter()
                        run(x)
                        best[name] = min(best[name], (time.perf_counter() - started) * 1000)
            self.timings[b] = best
            self.routes[b] = min(best, key=best.__getitem__)
        self._route_sizes()
        self.calibration_s = time.perf_counter() - began
        logger.info(
            "runtime per batch bucket (ms per batch, best run once settled after %d-%d runs, close calls "
            "timed again in %d alternating turns; * = serves it; timed in %.1f s):\n%s",
            min(settled),
            max(settled),
            turns,
            self.calibration_s,
            "\n".join(
                f"  {b:5d}: "
                + "  ".join(
                    f"{name} {ms:8.2f}{'*' if name == self.routes[b] else ' '}"
                    for name, ms in self.timings[b].items()
                )
                for b in self.buckets
            ),
        )

    def use_routes(self, routes: dict[int, str]) -> None:
        """Route as another runtime's measurement did (benchmarks compare like with like).

        Each of this runtime's buckets takes the route of the smallest given bucket >= it, or of
        the largest given one.
        """
        unknown = set(routes.values()) - set(self._runners)
        if unknown:
            raise ValueError(f"routes name runtimes not loaded here: {sorted(unknown)}")
        given = sorted(routes)
        for b in self.buckets:
            self.routes[b] = routes[next((g for g in given if g >= b), given[-1])]
        self._route_sizes()

    def runtime_table(self) -> list[dict[str, Any]]:
        """Per batch bucket: the runtime that serves it and, when timed, each runtime's ms per batch."""
        return [
            {"batch_size": b, "runtime": self.routes[b], "ms_per_batch": dict(self.timings.get(b, {}))}
            for b in self.buckets
        ]

    def warmup(self, batch_sizes: list[int] | None = None, *, calibrate: bool = True) -> None:
        """Bring every runtime that serves to steady state, then run every shape the batcher's
        batches can reach it in once, so no request pays for a first run.

        With two runtimes loaded and ``calibrate``, :meth:`calibrate` settles and times both at
        every bucket; otherwise each bucket's runtime is settled there. The shapes are each size
        ONNX Runtime serves, and the padded sizes (:func:`padded_shapes`) TorchScript serves. On
        CUDA with graphs, capturing the buckets' graphs comes first, and every size then runs
        through them.
        """
        began = time.perf_counter()
        if self.cuda_graphs:
            slots = [self._slots.get() for _ in range(self._slots.qsize())]
            for slot in slots:
                slot.capture(self._module, self._autocast)
                self._slots.put(slot)
            self.cuda_graphs = all(slot.graphs for slot in slots)
        rng = np.random.default_rng(0)
        if calibrate and len(self._runners) > 1:
            self.calibrate()
        else:
            for b in self.buckets:
                self.settle(self.routes[b], rng.integers(0, 256, (b, *IMAGE_SHAPE), dtype=np.uint8))
        sizes = batch_sizes or list(range(1, self.max_batch_size + 1))
        shapes = sorted(
            {
                n if self.route(n) != "torchscript" or n > self.max_batch_size else self._shape_of[n]
                for n in sizes
            }
        )
        for n in shapes:
            self.infer(rng.integers(0, 256, (n, *IMAGE_SHAPE), dtype=np.uint8))
        self.warmup_s = time.perf_counter() - began
        logger.info(
            "warmed up %d batch sizes (1..%d, %d shapes) in %.1f s",
            len(sizes),
            max(sizes),
            len(shapes),
            self.warmup_s,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "device": str(self.device),
            "backend": self.backend,
            "precision": self.precision,
            "cuda_graphs": self.cuda_graphs,
            "sha256": self.sha256,
            "runtime_table": self.runtime_table(),
        }


def _check_int8(manifest: Manifest, device: str, backend: str) -> None:
    """Refuse what ``--precision int8`` cannot serve, saying what to do instead."""
    if device != "auto" and torch.device(device).type != "cpu":
        raise ArtifactError(
            f"--precision int8 runs on the CPU only (ONNX Runtime's int8 kernels), not --device {device}: "
            "pass --device cpu (or auto), or serve --precision fp16/bf16/fp32 on the GPU"
        )
    if backend == "torchscript":
        raise ArtifactError(
            "--precision int8 is served by ONNX Runtime: pass --backend onnxruntime (or auto), "
            "or --precision fp32 for TorchScript"
        )
    if INT8_ARTIFACT not in manifest.artifacts:
        raise ArtifactError(
            f"{manifest.path.parent} has no int8 model (its manifest lists no {INT8_ARTIFACT!r}): re-export "
            f"it with `cifar-export --out {manifest.path.parent}` (without --no-int8), which writes "
            "model.int8.onnx, or serve --precision fp32"
        )


def padded_shapes(max_batch: int) -> list[int]:
    """The batch sizes TorchScript runs on the CPU (see SHAPES_*); every bucket is one of them."""
    sizes = list(range(1, min(max_batch, SHAPES_EXACT_UP_TO) + 1))
    octave = SHAPES_EXACT_UP_TO
    while octave < max_batch:
        step = octave // SHAPES_PER_OCTAVE
        sizes += [s for s in range(octave + step, 2 * octave + 1, step) if s < max_batch]
        octave *= 2
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


def graph_buckets(max_batch: int) -> list[int]:
    """Batch buckets (CUDA graphs, runtime routing): powers of two, and the maximum itself."""
    sizes = [1]
    while sizes[-1] * 2 < max_batch:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


class _Slot:
    """Per in-flight batch resources: pinned host buffers, a CUDA stream and CUDA graphs.

    Each slot owns its own graphs and static tensors, so two slots can run at once without
    sharing memory; a batch of n images replays the smallest bucket >= n (padded rows are
    computed and ignored: eval-mode BatchNorm treats every image independently).
    """

    def __init__(self, device: torch.device, max_batch: int) -> None:
        self.device = device
        self.max_batch = max_batch
        self.stream: Any = None
        self.pinned: torch.Tensor | None = None
        self.pinned_out: torch.Tensor | None = None
        self.graphs: dict[int, tuple[Any, torch.Tensor, torch.Tensor]] = {}
        if device.type == "cuda":
            self.stream = torch.cuda.Stream(device=device)
            self.pinned = torch.empty((max_batch, *IMAGE_SHAPE), dtype=torch.uint8).pin_memory()

    def capture(self, module: Any, autocast: torch.dtype | None) -> None:
        """Capture one CUDA graph per bucket; on any failure fall back to eager launches."""
        try:
            with torch.inference_mode():
                for b in graph_buckets(self.max_batch):
                    static_in = torch.zeros((b, *IMAGE_SHAPE), dtype=torch.uint8, device=self.device)
                    with torch.cuda.stream(self.stream):
                        for _ in range(3):  # let TorchScript's profiling executor settle first
                            with torch.autocast(
                                "cuda", dtype=autocast or torch.float16, enabled=autocast is not None
                            ):
                                module(static_in)
                    self.stream.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, stream=self.stream):
                        with torch.autocast(
                            "cuda", dtype=autocast or torch.float16, enabled=autocast is not None
                        ):
                            static_out = module(static_in).float()
                    self.graphs[b] = (graph, static_in, static_out)
            classes = next(iter(self.graphs.values()))[2].shape[1]
            self.pinned_out = torch.empty((self.max_batch, classes), dtype=torch.float32).pin_memory()
        except Exception as exc:
            logger.warning("CUDA graph capture failed (%s); running without graphs", exc)
            self.graphs.clear()

    def run(self, module: Any, images: np.ndarray, autocast: torch.dtype | None) -> np.ndarray:
        n = images.shape[0]
        with torch.inference_mode():
            if self.stream is None:
                # Request buffers arrive read-only (np.frombuffer); torch wants writable memory.
                x = torch.from_numpy(images if images.flags.writeable else images.copy())
                with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                    out = module(x)
                return out.float().numpy()
            assert self.pinned is not None
            host = self.pinned[:n]
            host.numpy()[...] = images
            if self.graphs:
                bucket = next(b for b in self.graphs if b >= n)
                graph, static_in, static_out = self.graphs[bucket]
                assert self.pinned_out is not None
                with torch.cuda.stream(self.stream):
                    static_in[:n].copy_(host, non_blocking=True)
                    graph.replay()
                    self.pinned_out[:n].copy_(static_out[:n], non_blocking=True)
                self.stream.synchronize()
                return self.pinned_out[:n].numpy().copy()
            with torch.cuda.stream(self.stream):
                x = host.to(self.device, non_blocking=True)
                with torch.autocast("cuda", dtype=autocast or torch.float16, enabled=autocast is not None):
                    out = module(x)
                result = out.float().to("cpu", non_blocking=True)
            self.stream.synchronize()
            return result.numpy()
