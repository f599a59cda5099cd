"""The README's example images: chosen by the stated rule, and all classified right offline."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from PIL import Image

from cifar_serve.export import CIFAR10_CLASSES, ServingModel, load_model

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "images"
CHECKPOINT = ROOT / "models" / "resnet18_cifar10.pt"


def _make_examples() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_examples", ROOT / "examples" / "make_examples.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _example_pixels() -> dict[str, np.ndarray]:
    out = {}
    for cls in CIFAR10_CLASSES:
        with Image.open(EXAMPLES / f"{cls}.png") as img:
            assert img.size == (32, 32) and img.mode == "RGB"
            out[cls] = np.asarray(img, dtype=np.uint8)
    return out


def test_one_example_per_class_and_nothing_else() -> None:
    assert sorted(p.name for p in EXAMPLES.iterdir()) == sorted(f"{c}.png" for c in CIFAR10_CLASSES)


def test_the_shipped_model_classifies_every_example_correctly() -> None:
    pixels = _example_pixels()
    net, meta = load_model(CHECKPOINT)
    model = ServingModel(net, meta["mean"], meta["std"]).eval()
    with torch.inference_mode():
        probs = torch.softmax(model(torch.from_numpy(np.stack(list(pixels.values())))), dim=1)
    for (cls, _), p in zip(pixels.items(), probs, strict=True):
        assert CIFAR10_CLASSES[int(p.argmax())] == cls, (
            f"{cls}.png is classified as {CIFAR10_CLASSES[int(p.argmax())]}"
        )
        assert float(p.max()) > 0.9  # the most confident right answer of 60 for its class


def test_the_examples_are_what_the_stated_rule_picks(tmp_path: Path) -> None:
    """Regenerating with examples/make_examples.py gives the committed pixels exactly."""
    assert _make_examples().main(["--out", str(tmp_path)]) == 0
    committed = _example_pixels()
    for cls in CIFAR10_CLASSES:
        with Image.open(tmp_path / f"{cls}.png") as img:
            np.testing.assert_array_equal(np.asarray(img), committed[cls], err_msg=cls)
