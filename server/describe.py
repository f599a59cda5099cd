"""What the server says about itself, rendered once for both APIs.

Server metadata, model metadata, model configuration, statistics and the repository index, as
plain dicts in the shape of Triton's JSON. REST answers them as they are; gRPC
(:mod:`.oip`) parses the same dicts into its protobufs, so the two cannot drift apart.

No grpc or protobuf import here.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .lifecycle import State
from .protocol import (
    EXTENSIONS,
    IMAGE_SHAPE,
    INPUT_NAME,
    OUTPUT_NAME,
    SERVER_NAME,
    backend_name,
    platform_name,
)
from .stats import Duration, StatsSnapshot

if TYPE_CHECKING:
    from .core import ServingCore

__all__ = [
    "delay_microseconds",
    "model_config",
    "model_metadata",
    "model_ready",
    "model_statistics",
    "repository_index",
    "repository_state",
    "server_metadata",
    "serving_platform",
]

logger = logging.getLogger(__name__)


def delay_microseconds(delay_ms: float) -> int:
    """The batching delay in whole microseconds: rounded, not truncated (2.01 ms is 2010 µs)."""
    return round(delay_ms * 1000)


def server_metadata(version: str) -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": version, "extensions": list(EXTENSIONS)}


def serving_platform(core: ServingCore) -> str:
    """Triton's platform name for the runtime that serves most batch sizes.

    With ``--backend auto`` the warm-up times both runtimes and each batch size goes to the
    faster (the runtime table), so the name follows the table rather than naming a fixed one.
    """
    backend = core.runtime.backend
    if backend == "auto":
        table = core.runtime.describe().get("runtime_table") or ()
        counts = Counter(str(row.get("runtime")) for row in table)
        if counts:  # a tie goes to TorchScript, the primary artifact
            backend = max(counts, key=lambda name: (counts[name], name == "torchscript"))
    return platform_name(backend)


def model_metadata(core: ServingCore) -> dict[str, Any]:
    return {
        "name": core.model_name,
        "versions": [core.model_version],
        "platform": serving_platform(core),
        "inputs": [{"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, *IMAGE_SHAPE]}],
        "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, core.num_classes]}],
    }


def model_config(core: ServingCore) -> dict[str, Any]:
    """The model's configuration in the shape of Triton's ``model_config`` JSON (the fields that apply)."""
    s = core.settings
    platform = serving_platform(core)
    device = core.runtime.device
    gpu = device.type == "cuda"
    return {
        "name": core.model_name,
        "platform": platform,
        "backend": backend_name(platform),
        # What one request may hold; batches the server forms are capped by
        # preferred_batch_size instead.
        "max_batch_size": s.max_images_per_request,
        # Dims leave out the batch dimension, as Triton's do when max_batch_size > 0.
        "input": [
            {
                "name": INPUT_NAME,
                "data_type": "TYPE_UINT8",
                "format": "FORMAT_NHWC",
                "dims": list(IMAGE_SHAPE),
            }
        ],
        "output": [{"name": OUTPUT_NAME, "data_type": "TYPE_FP32", "dims": [core.num_classes]}],
        "instance_group": [
            {
                "name": f"{core.model_name}_0",
                # One instance per batch the server computes at once.
                "count": core.max_inflight,
                "kind": "KIND_GPU" if gpu else "KIND_CPU",
                "gpus": [device.index or 0] if gpu else [],
            }
        ],
        "dynamic_batching": {
            "preferred_batch_size": [s.max_batch_size],
            "max_queue_delay_microseconds": delay_microseconds(s.max_batch_delay_ms),
            # Answers leave in request order per stream, as Triton's non-decoupled models.
            "preserve_ordering": True,
        },
        "version_policy": {"specific": {"versions": [core.model_version]}},
        "parameters": {
            "labels": {"string_value": ",".join(core.labels)},
            # int8 (model.int8.onnx) or a reduced-precision TorchScript answers as fp32 does not.
            "precision": {"string_value": str(core.runtime.describe().get("precision", "fp32"))},
        },
    }


def _duration(d: Duration) -> dict[str, int]:
    return {"count": d.count, "ns": d.ns}


def model_statistics(core: ServingCore, snaps: Mapping[str, StatsSnapshot]) -> dict[str, Any]:
    """Triton's statistics JSON: one entry per version in ``snaps``, batch sizes in order."""
    return {
        "model_stats": [
            {
                "name": core.model_name,
                "version": version,
                "last_inference": snap.last_inference_ms,
                "inference_count": snap.inference_count,
                "execution_count": snap.execution_count,
                "inference_stats": {
                    "success": _duration(snap.success),
                    "fail": _duration(snap.fail),
                    "queue": _duration(snap.queue),
                    "compute_input": _duration(snap.compute_input),
                    "compute_infer": _duration(snap.compute_infer),
                    "compute_output": _duration(snap.compute_output),
                },
                "batch_stats": [
                    {
                        "batch_size": size,
                        "compute_input": _duration(phases[0]),
                        "compute_infer": _duration(phases[1]),
                        "compute_output": _duration(phases[2]),
                    }
                    for size, phases in sorted(snap.batches.items())
                ],
            }
            for version, snap in snaps.items()
        ]
    }


def repository_state(core: ServingCore) -> tuple[str, str]:
    """The model's state in the repository extension (READY, UNAVAILABLE, LOADING) and why."""
    life = core.lifecycle
    if life.state is State.LOADING:
        if life.answers_while_loading:
            return "LOADING", "a new version is loading beside the serving one"
        return "LOADING", "loading after an unload"
    if life.state is State.UNLOADED:
        return "UNAVAILABLE", "unloaded"
    return ("READY", core.last_load_error) if life.ready else ("UNAVAILABLE", "not ready")


def model_ready(core: ServingCore, name: str, version: str) -> bool:
    """v2 ModelReady: an unknown model or version is "not ready", not an error (as Triton)."""
    known = name == core.model_name and version in ("", core.model_version)
    return known and core.lifecycle.ready


def repository_index(core: ServingCore, ready_only: bool = False) -> list[dict[str, Any]]:
    """The repository index: this server's one model, or nothing when ``ready_only`` and not READY."""
    state, reason = repository_state(core)
    if ready_only and state != "READY":
        return []
    return [{"name": core.model_name, "version": core.model_version, "state": state, "reason": reason}]
