"""CIFAR-10 loading from the official python format or from image-folder trees (plain or zipped).

Everything is returned as uint8 NHWC arrays in the canonical class order. Decoding 60,000
JPEGs takes minutes on a small machine, so decoded arrays are cached in a ``.npz`` keyed by
the source's identity and loaded in seconds afterwards.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import tarfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

import numpy as np
from PIL import Image

__all__ = [
    "CIFAR10_CLASSES",
    "CifarSplit",
    "WHERE_TO_GET",
    "DatasetError",
    "DatasetNotFound",
    "cache_dir",
    "load_cifar10",
    "load_split",
    "split_validation",
]

logger = logging.getLogger(__name__)

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
_OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_OFFICIAL_MD5 = "c58f30108f718f92721af3b95e74349a"
_CACHE_VERSION = "1"


class DatasetError(RuntimeError):
    """The dataset is missing, unreadable or not CIFAR-10 shaped."""


class DatasetNotFound(DatasetError):
    """No CIFAR-10 at the given location (as opposed to a damaged copy)."""


WHERE_TO_GET = (
    f"get CIFAR-10 with --download (torchvision fetches the official {_OFFICIAL_URL.rsplit('/', 1)[-1]}), "
    f"or download {_OFFICIAL_URL} (md5 {_OFFICIAL_MD5}) yourself and pass its path to --data"
)


@dataclass(frozen=True)
class CifarSplit:
    """One split: ``images`` uint8 [N,32,32,3] RGB, ``labels`` int64 [N]."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def cache_dir() -> Path:
    """Where decoded arrays are cached (``CIFAR_SERVE_CACHE`` overrides)."""
    env = os.environ.get("CIFAR_SERVE_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cifar_serve"


# --------------------------------------------------------------------------- official format


class _RestrictedUnpickler(pickle.Unpickler):
    """The official batches are pickles; allow only what they contain (dicts of numpy data)."""

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from a CIFAR batch")


def _read_batch(data: bytes, origin: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
        raw = np.asarray(obj[b"data"], dtype=np.uint8)
        labels = np.asarray(obj[b"labels"], dtype=np.int64)
    except Exception as exc:  # any failure here means a corrupt batch file
        raise DatasetError(f"{origin}: not a CIFAR-10 python batch ({exc})") from exc
    if raw.ndim != 2 or raw.shape[1] != 3072 or raw.shape[0] != labels.shape[0]:
        raise DatasetError(f"{origin}: unexpected batch shape {raw.shape} / {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DatasetError(f"{origin}: labels outside 0..9")
    # Stored as N x (R plane, G plane, B plane) of 32x32 each.
    images = raw.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


_TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
_TEST_BATCHES = ["test_batch"]


def _load_official_dir(root: Path) -> dict[str, CifarSplit]:
    out: dict[str, CifarSplit] = {}
    for split, names in (("train", _TRAIN_BATCHES), ("test", _TEST_BATCHES)):
        xs, ys = [], []
        for name in names:
            path = root / name
            if not path.is_file():
                raise DatasetError(f"missing CIFAR-10 batch file {path}")
            x, y = _read_batch(path.read_bytes(), str(path))
            xs.append(x)
            ys.append(y)
        out[split] = CifarSplit(np.concatenate(xs), np.concatenate(ys))
    return out


def _load_official_tar(path: Path) -> dict[str, CifarSplit]:
    try:
        with tarfile.open(path, "r:*") as tar:
            members = {PurePosixPath(m.name).name: m for m in tar.getmembers() if m.isfile()}
            out: dict[str, CifarSplit] = {}
            for split, names in (("train", _TRAIN_BATCHES), ("test", _TEST_BATCHES)):
                xs, ys = [], []
                for name in names:
                    member = members.get(name)
                    if member is None:
                        raise DatasetError(f"{path}: archive has no {name}")
                    fh = tar.extractfile(member)
                    assert fh is not None
                    x, y = _read_batch(fh.read(), f"{path}:{name}")
                    xs.append(x)
                    ys.append(y)
                out[split] = CifarSplit(np.concatenate(xs), np.concatenate(ys))
            return out
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise DatasetError(f"{path}: unreadable archive ({exc})") from exc


# --------------------------------------------------------------------------- image folders


def _decode(data: bytes, origin: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as img:
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except Exception as exc:
        raise DatasetError(f"{origin}: cannot decode image ({exc})") from exc
    if arr.shape != (32, 32, 3):
        raise DatasetError(f"{origin}: expected a 32x32 image, got {arr.shape[1]}x{arr.shape[0]}")
    return arr


def _split_of(parts: tuple[str, ...]) -> tuple[str, str] | None:
    """``(split, class)`` for a path like ``.../test/cat/0001.jpg``."""
    if len(parts) < 3 or PurePosixPath(parts[-1]).suffix.lower() not in _IMAGE_SUFFIXES:
        return None
    split, cls = parts[-3], parts[-2]
    if split not in ("train", "test") or cls not in CIFAR10_CLASSES:
        return None
    return split, cls


def _collect(items: Iterable[tuple[str, str, str, bytes]]) -> dict[str, CifarSplit]:
    grouped: dict[str, tuple[list[np.ndarray], list[int]]] = {}
    for split, cls, origin, data in items:
        xs, ys = grouped.setdefault(split, ([], []))
        xs.append(_decode(data, origin))
        ys.append(CIFAR10_CLASSES.index(cls))
    return {
        split: CifarSplit(np.stack(xs), np.asarray(ys, dtype=np.int64)) for split, (xs, ys) in grouped.items()
    }


def _iter_zip(path: Path) -> Iterator[tuple[str, str, str, bytes]]:
    try:
        with zipfile.ZipFile(path) as zf:
            # Sorted so the array order (and therefore training) is reproducible.
            for name in sorted(zf.namelist()):
                key = _split_of(PurePosixPath(name).parts)
                if key is not None:
                    yield key[0], key[1], f"{path}:{name}", zf.read(name)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"{path}: unreadable zip ({exc})") from exc


def _iter_tree(root: Path) -> Iterator[tuple[str, str, str, bytes]]:
    for file in sorted(root.rglob("*")):
        if file.is_file():
            key = _split_of(file.relative_to(root).parts)
            if key is not None:
                yield key[0], key[1], str(file), file.read_bytes()


# --------------------------------------------------------------------------- entry points


def _fingerprint(source: Path) -> str:
    h = hashlib.sha256(_CACHE_VERSION.encode())
    h.update(str(source.resolve()).encode())
    if source.is_file():
        st = source.stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    else:
        for file in sorted(source.rglob("*")):
            if file.is_file():
                st = file.stat()
                h.update(f"{file}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def _load_uncached(source: Path, download: bool) -> dict[str, CifarSplit]:
    if source.is_dir():
        if (source / "cifar-10-batches-py").is_dir():
            return _load_official_dir(source / "cifar-10-batches-py")
        if (source / "data_batch_1").is_file():
            return _load_official_dir(source)
        if (source / "cifar-10-python.tar.gz").is_file():
            return _load_official_tar(source / "cifar-10-python.tar.gz")
        zips = sorted(source.glob("*.zip"))
        if zips:
            parts: dict[str, list[CifarSplit]] = {}
            for z in zips:
                for name, split in _collect(_iter_zip(z)).items():
                    parts.setdefault(name, []).append(split)
            return {
                name: CifarSplit(
                    np.concatenate([p.images for p in ps]), np.concatenate([p.labels for p in ps])
                )
                for name, ps in parts.items()
            }
        found = _collect(_iter_tree(source))
        if found:
            return found
        if download:
            _download(source)
            return _load_official_tar(source / "cifar-10-python.tar.gz")
        raise DatasetNotFound(
            f"{source}: no CIFAR-10 found (expected cifar-10-batches-py/, cifar-10-python.tar.gz, "
            "*.zip or train/<class>/*.jpg trees)"
        )
    if source.is_file():
        if zipfile.is_zipfile(source):
            return _collect(_iter_zip(source))
        return _load_official_tar(source)
    if download:
        source.mkdir(parents=True, exist_ok=True)
        _download(source)
        return _load_official_tar(source / "cifar-10-python.tar.gz")
    raise DatasetNotFound(f"{source}: no such file or directory")


def _download(root: Path) -> None:
    from torchvision.datasets.utils import download_url

    logger.info("downloading CIFAR-10 into %s", root)
    try:
        download_url(_OFFICIAL_URL, str(root), "cifar-10-python.tar.gz", _OFFICIAL_MD5)
    except Exception as exc:
        raise DatasetError(f"could not download CIFAR-10 ({exc})") from exc


def load_cifar10(
    source: str | os.PathLike[str], *, download: bool = False, use_cache: bool = True
) -> dict[str, CifarSplit]:
    """Load every split found at ``source`` as ``{"train": ..., "test": ...}``.

    ``source`` is a directory (official ``cifar-10-batches-py/``, ``cifar-10-python.tar.gz``,
    zips of image trees, or an image tree itself) or one file (tarball or zip).
    """
    if not str(source).strip():
        # Path("") is the current folder: an unset variable must not train on whatever is there.
        raise DatasetNotFound("no CIFAR-10 location given (--data or CIFAR_SERVE_DATA is empty)")
    src = Path(source).expanduser()
    cache_file = None
    if use_cache and src.exists():
        cache_file = cache_dir() / f"cifar10-{_fingerprint(src)}.npz"
        if cache_file.is_file():
            try:
                with np.load(cache_file) as npz:
                    names = [k[:-2] for k in npz.files if k.endswith("_x")]
                    return {s: CifarSplit(npz[f"{s}_x"], npz[f"{s}_y"]) for s in names}
            except Exception:  # a damaged cache is rebuilt, never trusted
                logger.warning("ignoring unreadable cache %s", cache_file)
    splits = _load_uncached(src, download)
    if not splits:
        raise DatasetError(f"{src}: no CIFAR-10 images found")
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp.npz")
        arrays: dict[str, np.ndarray] = {}
        for s, split in splits.items():
            arrays[f"{s}_x"] = split.images
            arrays[f"{s}_y"] = split.labels
        np.savez(tmp, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, cache_file)
    return splits


def load_split(source: str | os.PathLike[str], split: str, **kwargs: Any) -> CifarSplit:
    """One split of :func:`load_cifar10`, with a clear error when it is absent."""
    splits = load_cifar10(source, **kwargs)
    if split not in splits:
        raise DatasetError(f"{source}: has no {split!r} split (found {sorted(splits)})")
    return splits[split]


def split_validation(labels: np.ndarray, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(train_idx, val_idx)``: ``size`` indices held out for validation, the same number per class.

    Depends only on ``labels``, ``size`` and ``seed`` (never on the training seed), so every run
    of a comparison is tuned on the same images; both index arrays are sorted.
    """
    classes = np.unique(labels)
    if size <= 0 or size % len(classes):
        raise ValueError(f"validation split of {size}: must be a positive multiple of {len(classes)} classes")
    per_class = size // len(classes)
    rng = np.random.default_rng(seed)
    val: list[np.ndarray] = []
    for cls in classes:
        idx = np.flatnonzero(labels == cls)
        if len(idx) <= per_class:
            raise ValueError(f"validation split of {size} needs more than {per_class} images of class {cls}")
        val.append(rng.permutation(idx)[:per_class])
    val_idx = np.sort(np.concatenate(val))
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx, val_idx
