"""The Triton model repository written by ``cifar-export --triton-repo``: layout, config, and model agree."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cifar_serve.export.exporter import ExportError
from cifar_serve.export.triton import write_triton_repo

# ONNX element types -> Triton config types, for the types this model uses (onnx.TensorProto values).
ONNX_TO_CONFIG = {2: "TYPE_UINT8", 1: "TYPE_FP32"}
CONFIG_TO_NUMPY = {"TYPE_UINT8": np.uint8, "TYPE_FP32": np.float32}
IDX = np.arange(3, 600, 50)  # 12 real test images over every class

Message = dict[str, list[Any]]


# ---------------------------------------------------------------------------- a small pbtxt reader

_TOKEN = re.compile(r'\s+|#[^\n]*|("(?:[^"\\]|\\.)*")|([{}\[\]:,])|([^\s{}\[\]:,"#]+)')


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        assert m, f"cannot read config at {text[pos : pos + 30]!r}"
        pos = m.end()
        tok = m.group(1) or m.group(2) or m.group(3)
        if tok:
            out.append(tok)
    return out


def _scalar(tok: str) -> Any:
    if tok.startswith('"'):
        return json.loads(tok)
    if re.fullmatch(r"-?\d+", tok):
        return int(tok)
    return tok  # an enum name or true/false


def parse_pbtxt(text: str) -> Message:
    """Protobuf text format (the subset config.pbtxt uses) as {field: [values]}: every field repeatable."""
    toks = _tokens(text)
    pos = 0

    def message(end: str | None) -> Message:
        nonlocal pos
        msg: Message = {}
        while pos < len(toks) and toks[pos] != end:
            name = toks[pos]
            pos += 1
            if toks[pos] == ":":
                pos += 1
            msg.setdefault(name, []).extend(values())
        if end:
            pos += 1  # the closing brace
        return msg

    def values() -> list[Any]:
        nonlocal pos
        tok = toks[pos]
        pos += 1
        if tok == "{":
            return [message("}")]
        if tok != "[":
            return [_scalar(tok)]
        items: list[Any] = []
        while toks[pos] != "]":
            if toks[pos] == ",":
                pos += 1
                continue
            items.extend(values())
        pos += 1
        return items

    return message(None)


def one(msg: Message, field: str) -> Any:
    vals = msg.get(field, [])
    assert len(vals) == 1, f"{field}: {vals}"
    return vals[0]


def test_pbtxt_reader() -> None:
    text = '# c\nname: "a b"\nn: 3\ninput [ { dims: [ 1, -2 ] k: TYPE_X }, { dims: [] } ]\nd { x: 1 }\n'
    assert parse_pbtxt(text) == {
        "name": ["a b"],
        "n": [3],
        "d": [{"x": [1]}],
        "input": [{"dims": [1, -2], "k": ["TYPE_X"]}, {"dims": []}],
    }


# ---------------------------------------------------------------------------- the repository


@pytest.fixture(scope="module")
def manifest(model_dir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((model_dir / "manifest.json").read_text())
    return data


@pytest.fixture(scope="module")
def repo(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("triton") / "models"
    write_triton_repo(model_dir, out)
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_layout_and_copies(repo: Path, model_dir: Path, manifest: dict[str, Any]) -> None:
    name, version = manifest["model"]["name"], manifest["model"]["version"]
    ts = f"{name}_torchscript"
    files = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
    assert files == sorted(
        [
            f"{name}/config.pbtxt",
            f"{name}/labels.txt",
            f"{name}/{version}/model.onnx",
            f"{ts}/config.pbtxt",
            f"{ts}/labels.txt",
            f"{ts}/{version}/model.pt",
        ]
    )
    assert not any(p.is_symlink() for p in repo.rglob("*"))
    assert _sha256(repo / name / version / "model.onnx") == manifest["artifacts"]["onnx"]["sha256"]
    assert _sha256(repo / ts / version / "model.pt") == manifest["artifacts"]["torchscript"]["sha256"]
    for model in (name, ts):
        assert (repo / model / "labels.txt").read_text().splitlines() == manifest["labels"]


def _config(repo: Path, model: str) -> Message:
    return parse_pbtxt((repo / model / "config.pbtxt").read_text())


def _tensor(t: Message) -> tuple[str, str, list[int]]:
    return one(t, "name"), one(t, "data_type"), list(t.get("dims", []))


def test_onnx_config_agrees_with_the_onnx_graph(repo: Path, manifest: dict[str, Any]) -> None:
    import onnx

    name, version = manifest["model"]["name"], manifest["model"]["version"]
    cfg = _config(repo, name)
    assert one(cfg, "name") == name  # Triton requires the directory name
    assert one(cfg, "platform") == "onnxruntime_onnx"
    assert one(cfg, "max_batch_size") >= 1
    assert one(cfg, "dynamic_batching").get("max_queue_delay_microseconds", [0])[0] >= 0
    graph = onnx.load(str(repo / name / version / "model.onnx"), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}

    def from_graph(values: Any) -> list[tuple[str, str, list[int]]]:
        out = []
        for v in values:
            if v.name in initializers:
                continue
            dims = v.type.tensor_type.shape.dim
            assert dims[0].dim_param or dims[0].dim_value == 0, f"{v.name}: batch dimension is not dynamic"
            config_type = ONNX_TO_CONFIG[v.type.tensor_type.elem_type]
            out.append((v.name, config_type, [d.dim_value for d in dims[1:]]))
        return out

    assert [_tensor(t) for t in cfg["input"]] == from_graph(graph.input)
    assert [_tensor(t) for t in cfg["output"]] == from_graph(graph.output)
    assert [_tensor(t)[0] for t in cfg["input"]] == [manifest["input"]["name"]]
    assert [one(t, "label_filename") for t in cfg["output"]] == ["labels.txt"]
    assert len(manifest["labels"]) == cfg["output"][0]["dims"][-1]


def test_onnx_model_runs_as_configured(
    repo: Path, manifest: dict[str, Any], sample: Any, offline_logits: np.ndarray
) -> None:
    import onnxruntime as ort

    name, version = manifest["model"]["name"], manifest["model"]["version"]
    cfg = _config(repo, name)
    in_name, in_type, _ = _tensor(cfg["input"][0])
    out_name, out_type, out_dims = _tensor(cfg["output"][0])
    sess = ort.InferenceSession(str(repo / name / version / "model.onnx"), providers=["CPUExecutionProvider"])
    x = sample.images[IDX].astype(CONFIG_TO_NUMPY[in_type])
    (got,) = sess.run([out_name], {in_name: x})
    assert got.dtype == CONFIG_TO_NUMPY[out_type] and got.shape == (len(IDX), *out_dims)
    np.testing.assert_allclose(got, offline_logits[IDX], atol=1e-4, rtol=0)


def test_torchscript_config_and_model_agree(
    repo: Path, manifest: dict[str, Any], sample: Any, offline_logits: np.ndarray
) -> None:
    import torch

    name, version = manifest["model"]["name"], manifest["model"]["version"]
    ts = f"{name}_torchscript"
    cfg = _config(repo, ts)
    assert one(cfg, "name") == ts
    assert one(cfg, "platform") == "pytorch_libtorch"
    assert one(cfg, "max_batch_size") >= 1 and "dynamic_batching" in cfg
    inputs, outputs = [_tensor(t) for t in cfg["input"]], [_tensor(t) for t in cfg["output"]]
    # The PyTorch backend's naming convention <name>__<index>, numbered in forward() order.
    assert [t[0] for t in inputs] == ["INPUT__0"] and [t[0] for t in outputs] == ["OUTPUT__0"]
    assert inputs[0][1:] == ("TYPE_UINT8", manifest["input"]["shape"][1:])
    assert outputs[0][1:] == ("TYPE_FP32", manifest["output"]["shape"][1:])
    assert [one(t, "label_filename") for t in cfg["output"]] == ["labels.txt"]

    module = torch.jit.load(str(repo / ts / version / "model.pt"), map_location="cpu").eval()
    forward_args = [a.name for a in module.forward.schema.arguments][1:]  # past `self`
    assert len(forward_args) == len(inputs)
    x = torch.from_numpy(np.ascontiguousarray(sample.images[IDX]))
    with torch.inference_mode():
        out = module(x)
    assert isinstance(out, torch.Tensor)  # one output tensor, OUTPUT__0
    assert out.dtype == torch.float32 and tuple(out.shape) == (len(IDX), *outputs[0][2])
    np.testing.assert_allclose(out.numpy(), offline_logits[IDX], atol=1e-4, rtol=0)


def test_rewrite_replaces_only_this_model(repo: Path, model_dir: Path, manifest: dict[str, Any]) -> None:
    name = manifest["model"]["name"]
    other = repo / "someone_elses_model" / "1"
    other.mkdir(parents=True)
    (other / "model.onnx").write_bytes(b"not ours")
    (repo / name / "stale.txt").write_text("left over")
    write_triton_repo(model_dir, repo)
    assert (other / "model.onnx").read_bytes() == b"not ours"
    assert not (repo / name / "stale.txt").exists()
    assert (repo / name / "config.pbtxt").is_file()
    assert not [p for p in repo.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_refuses_a_modified_artifact(model_dir: Path, manifest: dict[str, Any], tmp_path: Path) -> None:
    src = tmp_path / "artifacts"
    src.mkdir()
    for entry in manifest["artifacts"].values():
        (src / entry["path"]).symlink_to((model_dir / entry["path"]).resolve())
    bad = json.loads(json.dumps(manifest))
    bad["artifacts"]["onnx"]["sha256"] = "0" * 64
    (src / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(ExportError, match="sha256"):
        write_triton_repo(src, tmp_path / "repo")
    assert not (tmp_path / "repo" / manifest["model"]["name"]).exists()


def test_missing_manifest_is_an_export_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="manifest"):
        write_triton_repo(tmp_path, tmp_path / "repo")
