"""Write the committed int8 calibration sample: a seeded draw of CIFAR-10 TRAINING images.

    python tools/make_calibration_sample.py --data ../shared/data/cifar10/cifar10-train-jpeg.zip

The members are copied byte for byte (no re-encoding), in the order ``load_split`` reads them,
so the sample's pixels are exactly the images ``cifar-export --calibration-data <full training
set>`` draws with the same seed and count (see ``calibration_indices``): both give the same
``sample_sha256`` in the manifest.
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path, PurePosixPath

from cifar_serve.export.quantize import (
    CALIBRATION_IMAGES,
    CALIBRATION_SEED,
    DEFAULT_CALIBRATION_DATA,
    calibration_indices,
)

REPO = Path(__file__).resolve().parents[1]
_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="CIFAR-10 zip of train/<class>/*.jpg")
    p.add_argument("--out", default=str(REPO / DEFAULT_CALIBRATION_DATA))
    p.add_argument("--count", type=int, default=CALIBRATION_IMAGES)
    p.add_argument("--seed", type=int, default=CALIBRATION_SEED)
    args = p.parse_args()
    with zipfile.ZipFile(args.data) as src:
        # The order of export.data's zip reader: sorted names, training split only.
        names = [
            n
            for n in sorted(src.namelist())
            if PurePosixPath(n).suffix.lower() in _SUFFIXES and PurePosixPath(n).parts[-3:-2] == ("train",)
        ]
        chosen = [names[i] for i in calibration_indices(len(names), args.count, args.seed)]
        with zipfile.ZipFile(args.out, "w", compression=zipfile.ZIP_STORED) as dst:
            for name in chosen:
                # A fixed timestamp: the same draw always writes the same bytes.
                info = zipfile.ZipInfo(str(PurePosixPath("train", *PurePosixPath(name).parts[-2:])))
                info.date_time = (1980, 1, 1, 0, 0, 0)
                dst.writestr(info, src.read(name))
    sys.stdout.write(f"wrote {len(chosen)} of {len(names)} training images to {args.out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
