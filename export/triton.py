"""Write a Triton Inference Server model repository for an exported model.

When one machine is not enough, the same artifacts serve on Triton (and on KServe, which runs
Triton's runtimes): ``cifar-export --triton-repo DIR`` lays out

    DIR/<name>/config.pbtxt                  ONNX Runtime backend, dynamic batching
    DIR/<name>/labels.txt                    class labels, for the classification extension
    DIR/<name>/<version>/model.onnx
    DIR/<name>_torchscript/config.pbtxt      PyTorch (LibTorch) backend
    DIR/<name>_torchscript/labels.txt
    DIR/<name>_torchscript/<version>/model.pt

The ONNX model keeps cifar-serve's tensor names (``images`` in, ``logits`` out), so a client
written against cifar-serve's Open Inference Protocol API works against it unchanged. The
TorchScript model uses ``INPUT__0``/``OUTPUT__0``: TorchScript keeps no stable tensor names, and
Triton's PyTorch backend binds tensors by that ``<name>__<index>`` convention in every release.
Artifacts are copied, never linked, so the repository can be shipped on its own.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .exporter import MANIFEST_NAME, ExportError, sha256_file

__all__ = ["LABELS_FILE", "TORCHSCRIPT_SUFFIX", "write_triton_repo"]

logger = logging.getLogger(__name__)

LABELS_FILE = "labels.txt"
TORCHSCRIPT_SUFFIX = "_torchscript"
# Protocol datatype names (as in manifest.json) -> Triton model-config data types.
_CONFIG_TYPES = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "INT8": "TYPE_INT8",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FP16": "TYPE_FP16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
}


@dataclass(frozen=True)
class _Tensor:
    name: str
    config_type: str
    dims: list[int]  # without the batch dimension: Triton adds it when max_batch_size > 0


def _tensor(spec: dict[str, Any], name: str, what: str) -> _Tensor:
    datatype = spec["datatype"]
    if datatype not in _CONFIG_TYPES:
        raise ExportError(f"{what}: datatype {datatype!r} has no Triton model-config type")
    shape = [int(d) for d in spec["shape"]]
    if not shape or shape[0] != -1:
        raise ExportError(f"{what}: shape {shape} has no variable batch dimension; Triton cannot batch it")
    return _Tensor(name, _CONFIG_TYPES[datatype], shape[1:])


def _block(t: _Tensor, labels: bool) -> str:
    dims = ", ".join(str(d) for d in t.dims)
    body = [f'name: "{t.name}"', f"data_type: {t.config_type}", f"dims: [ {dims} ]"]
    if labels:
        # label_filename makes Triton answer the classification extension with class labels.
        body.append(f'label_filename: "{LABELS_FILE}"')
    return "  {\n" + "".join(f"    {line}\n" for line in body) + "  }"


def _config(
    name: str,
    platform: str,
    inputs: list[_Tensor],
    outputs: list[_Tensor],
    *,
    comment: str,
    max_batch_size: int,
    max_queue_delay_us: int,
) -> str:
    """config.pbtxt: Triton's ModelConfig in protobuf text format."""
    lines = [f"# {line}" for line in comment.splitlines()]
    lines += [f'name: "{name}"', f'platform: "{platform}"', f"max_batch_size: {max_batch_size}"]
    lines += ["input [", ",\n".join(_block(t, labels=False) for t in inputs), "]"]
    lines += ["output [", ",\n".join(_block(t, labels=True) for t in outputs), "]"]
    lines += ["dynamic_batching {", f"  max_queue_delay_microseconds: {max_queue_delay_us}", "}"]
    return "\n".join(lines) + "\n"


def _checked_artifact(model_dir: Path, manifest: dict[str, Any], kind: str) -> Path:
    entry = manifest.get("artifacts", {}).get(kind)
    if not entry:
        raise ExportError(f"{model_dir / MANIFEST_NAME}: lists no {kind!r} artifact")
    path = model_dir / str(entry["path"])
    if not path.is_file():
        raise ExportError(f"artifact missing: {path}")
    # Never ship a repository built from a modified or truncated artifact.
    if entry.get("sha256") and sha256_file(path) != entry["sha256"]:
        raise ExportError(f"{path}: sha256 does not match {MANIFEST_NAME}; re-export the model")
    return path


def _onnx_external_files(path: Path) -> list[str]:
    """Files an ONNX model keeps its weights in, besides itself (they must travel with it)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    found: set[str] = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            found.update(e.value for e in tensor.external_data if e.key == "location")
    return sorted(found)


def _write_model(
    repo: Path, name: str, version: str, config: str, labels: list[str], files: list[tuple[Path, str]]
) -> Path:
    """Build one model directory beside its target, then swap it in (a reader never sees half of it)."""
    target = repo / name
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=repo))
    try:
        (staging / "config.pbtxt").write_text(config)
        (staging / LABELS_FILE).write_text("".join(f"{label}\n" for label in labels))
        (staging / version).mkdir()
        for src, dest_name in files:
            shutil.copyfile(src, staging / version / dest_name)  # a copy: the repo must stand alone
        # mkdtemp makes 0700 folders: a Triton container running as another user could not read
        # them. The repository is meant to be shipped and read by others: 0755 / 0644.
        for path in [staging, *staging.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def write_triton_repo(
    model_dir: Path, repo: Path, *, max_batch_size: int = 256, max_queue_delay_us: int = 2000
) -> None:
    """Write (or refresh) the Triton model repository for the model exported in ``model_dir``.

    Other models already in ``repo`` are left alone; this model's two directories are replaced.
    """
    model_dir, repo = Path(model_dir), Path(repo)
    if max_batch_size < 1:
        raise ExportError(f"max_batch_size must be at least 1, got {max_batch_size}")
    try:
        manifest = json.loads((model_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read {model_dir / MANIFEST_NAME}: {exc}") from exc
    name = str(manifest["model"]["name"])
    version = str(manifest["model"]["version"])
    if not version.isdigit() or int(version) < 1:
        raise ExportError(f"model version {version!r}: Triton needs a positive integer version")
    labels = [str(label) for label in manifest["labels"]]
    inp, out = manifest["input"], manifest["output"]
    if int(out["shape"][-1]) != len(labels):
        raise ExportError(f"output shape {out['shape']} does not match the {len(labels)} labels")
    onnx_path = _checked_artifact(model_dir, manifest, "onnx")
    torchscript_path = _checked_artifact(model_dir, manifest, "torchscript")
    repo.mkdir(parents=True, exist_ok=True)
    limits = {"max_batch_size": max_batch_size, "max_queue_delay_us": max_queue_delay_us}

    onnx_config = _config(
        name,
        "onnxruntime_onnx",
        [_tensor(inp, inp["name"], "input")],
        [_tensor(out, out["name"], "output")],
        comment=f"{name} v{version} (ONNX), written by cifar-export from {MANIFEST_NAME}.",
        **limits,
    )
    files = [(onnx_path, "model.onnx")]
    files += [(onnx_path.parent / extra, extra) for extra in _onnx_external_files(onnx_path)]
    written = [_write_model(repo, name, version, onnx_config, labels, files)]

    ts_name = name + TORCHSCRIPT_SUFFIX
    ts_config = _config(
        ts_name,
        "pytorch_libtorch",
        [_tensor(inp, "INPUT__0", "input")],
        [_tensor(out, "OUTPUT__0", "output")],
        comment=(
            f"{name} v{version} (TorchScript), written by cifar-export from {MANIFEST_NAME}.\n"
            f"INPUT__0 is {inp['name']!r} and OUTPUT__0 is {out['name']!r} of the ONNX model: "
            "the PyTorch backend binds tensors by position."
        ),
        **limits,
    )
    written.append(_write_model(repo, ts_name, version, ts_config, labels, [(torchscript_path, "model.pt")]))
    logger.info("wrote Triton model repository %s: %s", repo, ", ".join(p.name for p in written))
