"""Regenerate examples/images/<class>.png from the committed CIFAR-10 test sample.

The rule (stated in the README): for each class, the image of the committed sample
(tests/fixtures/cifar10-test-sample.zip, 60 real test images a class) that the shipped model
(models/resnet18_cifar10.pt) classifies correctly with the highest probability; ties go to the
first file name. The examples therefore show the service answering right, not the model's
accuracy (83.2% on the 10,000 test images). PNG keeps the decoded pixels exactly, so a client
sending the PNG sends what the model was checked on.

    python examples/make_examples.py [--sample ZIP] [--checkpoint PT] [--out DIR]
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cifar_serve.export import CIFAR10_CLASSES, ServingModel, load_model

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger(__name__)


def pick_examples(sample: Path, checkpoint: Path) -> dict[str, tuple[str, np.ndarray, float]]:
    """``{class: (zip member, uint8 HWC pixels, probability)}`` chosen by the rule above."""
    names: list[str] = []
    images: list[np.ndarray] = []
    with zipfile.ZipFile(sample) as zf:
        for name in sorted(zf.namelist()):
            if name.endswith(".jpg"):
                with Image.open(io.BytesIO(zf.read(name))) as img:
                    images.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
                names.append(name)
    net, meta = load_model(checkpoint)
    model = ServingModel(net, meta["mean"], meta["std"]).eval()
    with torch.inference_mode():
        probs = torch.softmax(model(torch.from_numpy(np.stack(images))), dim=1).numpy()
    chosen: dict[str, tuple[str, np.ndarray, float]] = {}
    for i, name in enumerate(names):
        cls = name.split("/")[-2]
        label = CIFAR10_CLASSES.index(cls)
        p = float(probs[i, label])
        # Strictly greater: among equals the first (sorted) name stays.
        if probs[i].argmax() == label and (cls not in chosen or p > chosen[cls][2]):
            chosen[cls] = (name, images[i], p)
    missing = [c for c in CIFAR10_CLASSES if c not in chosen]
    if missing:
        raise SystemExit(f"no correctly classified image of {missing} in {sample}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument(
        "--sample",
        type=Path,
        default=ROOT / "tests" / "fixtures" / "cifar10-test-sample.zip",
        help="CIFAR-10 image zip to choose from",
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=ROOT / "models" / "resnet18_cifar10.pt",
        help="the model whose answers choose the images",
    )
    p.add_argument("--out", type=Path, default=ROOT / "examples" / "images", help="where the PNGs go")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for cls, (name, pixels, prob) in pick_examples(args.sample, args.checkpoint).items():
        Image.fromarray(pixels).save(args.out / f"{cls}.png")
        sys.stdout.write(f"{cls:<11} {name}  p={prob:.3f}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
