"""CIFAR-10 loading: official python batches (dir and tarball), image trees, zips, cache, errors.

The official-format fixtures are generated here, in tmp, from real CIFAR-10 test images of the
committed sample zip. They are written the way the official ``cifar-10-python.tar.gz`` was: Python 2
``cPickle`` protocol 2, byte-string keys, ``numpy.core.multiarray._reconstruct`` arrays,
``data`` uint8 ``[N, 3072]`` as R plane, G plane, B plane of 32x32 each, ``labels`` a list of ints.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import tarfile
import zipfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from PIL import Image

from cifar_serve.export.data import CIFAR10_CLASSES, DatasetError, load_cifar10, load_split

SAMPLE_ZIP = Path(__file__).resolve().parent / "fixtures" / "cifar10-test-sample.zip"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("CIFAR_SERVE_CACHE", str(cache))
    return cache


# --------------------------------------------------------------------------- fixture helpers


class Sample:
    """One real image of the committed sample: its class, zip member name, JPEG bytes, pixels."""

    def __init__(self, cls: str, name: str, jpeg: bytes) -> None:
        self.cls = cls
        self.name = name
        self.jpeg = jpeg
        self.label = CIFAR10_CLASSES.index(cls)
        with Image.open(io.BytesIO(jpeg)) as img:
            self.pixels = np.asarray(img.convert("RGB"), dtype=np.uint8)


def _samples(per_class: int, offset: int = 0) -> list[Sample]:
    """``per_class`` real images of every class, in canonical class order."""
    out = []
    with zipfile.ZipFile(SAMPLE_ZIP) as zf:
        names = sorted(zf.namelist())
        for cls in CIFAR10_CLASSES:
            members = [n for n in names if n.startswith(f"test/{cls}/") and n.endswith(".jpg")]
            for name in members[offset : offset + per_class]:
                out.append(Sample(cls, name, zf.read(name)))
    return out


class _Py2Pickler(pickle._Pickler):
    """Protocol 2 with Python 2 ``str`` opcodes (SHORT_BINSTRING/BINSTRING) for bytes and str.

    Python 3's pickler would encode ``bytes`` at protocol 2 as a ``_codecs.encode`` call, which
    is not what the official files (written by Python 2's cPickle) contain.
    """

    dispatch: ClassVar[dict[type, Any]] = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes | str) -> None:
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)  # type: ignore[attr-defined]
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)  # type: ignore[attr-defined]
        self.memoize(obj)  # type: ignore[attr-defined]

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str


def _py2_pickle(obj: Any) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    # numpy 1.x (which wrote the official files) lived in ``numpy.core``.
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def _official_row(pixels: np.ndarray) -> np.ndarray:
    """HWC RGB -> the official 3072-byte row: all of R (row-major), then G, then B."""
    return np.concatenate([pixels[:, :, c].reshape(-1) for c in range(3)])


def _batch_bytes(samples: list[Sample], batch_label: str, *, python2: bool = True) -> bytes:
    obj = {
        b"batch_label": batch_label.encode(),
        b"labels": [s.label for s in samples],
        b"data": np.stack([_official_row(s.pixels) for s in samples]).astype(np.uint8),
        b"filenames": [s.name.rsplit("/", 1)[-1].encode() for s in samples],
    }
    return _py2_pickle(obj) if python2 else pickle.dumps(obj, protocol=4)


def _official_splits(per_batch: int = 3, test_count: int = 5) -> dict[str, list[Sample]]:
    """Real images for 5 train batches and 1 test batch, each batch spanning several classes."""
    pool = _samples(per_class=2)
    train = pool[: 5 * per_batch]
    test = pool[-test_count:]
    return {"train": train, "test": test}


def _official_files(per_batch: int = 3) -> tuple[dict[str, bytes], dict[str, list[Sample]]]:
    splits = _official_splits(per_batch)
    files = {}
    for i, name in enumerate(TRAIN_BATCHES):
        chunk = splits["train"][i * per_batch : (i + 1) * per_batch]
        # data_batch_5 as a Python 3 re-pickle (protocol 4), as some redistributed copies are.
        files[name] = _batch_bytes(chunk, f"training batch {i + 1} of 5", python2=(i != 4))
    files["test_batch"] = _batch_bytes(splits["test"], "testing batch 1 of 1")
    files["batches.meta"] = _py2_pickle(
        {b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_cases_per_batch": per_batch}
    )
    files["readme.html"] = b"<html>fixture</html>\n"
    return files, splits


def _write_official_dir(root: Path, files: dict[str, bytes]) -> Path:
    batches = root / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    for name, data in files.items():
        (batches / name).write_bytes(data)
    return batches


def _write_official_tar(path: Path, files: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _assert_split(split: Any, samples: list[Sample]) -> None:
    assert split.images.dtype == np.uint8
    assert split.images.shape == (len(samples), 32, 32, 3)
    assert split.labels.dtype == np.int64
    assert split.labels.tolist() == [s.label for s in samples]
    for got, s in zip(split.images, samples, strict=True):
        np.testing.assert_array_equal(got, s.pixels, err_msg=s.name)


def _write_tree(root: Path, train: list[Sample], test: list[Sample]) -> Path:
    """train/<class>/*.png (lossless copies of the pixels) and test/<class>/*.jpg (original bytes)."""
    for s in train:
        d = root / "train" / s.cls
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(s.pixels).save(d / (Path(s.name).stem + ".png"))
    for s in test:
        d = root / "test" / s.cls
        d.mkdir(parents=True, exist_ok=True)
        (d / Path(s.name).name).write_bytes(s.jpeg)
    return root


def _zip_tree(root: Path, path: Path, prefix: str = "", compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for file in sorted(root.rglob("*")):
            if file.is_file():
                zf.write(file, prefix + file.relative_to(root).as_posix())
    return path


# --------------------------------------------------------------------------- official python format


def test_py2_fixture_is_what_python2_wrote() -> None:
    """Guard the generator itself: protocol 2, byte strings, numpy.core globals, no _codecs."""
    import pickletools

    files, _ = _official_files()
    data = files["data_batch_1"]
    assert data[:2] == b"\x80\x02"
    ops = {op.name for op, _arg, _pos in pickletools.genops(data)}
    assert {"SHORT_BINSTRING", "BINSTRING", "GLOBAL"} <= ops
    assert "BINUNICODE" not in ops and "SHORT_BINBYTES" not in ops
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in data
    assert b"_codecs" not in data


@pytest.mark.parametrize("layout", ["parent", "batches-dir"])
def test_official_directory(tmp_path: Path, layout: str) -> None:
    files, splits = _official_files()
    batches = _write_official_dir(tmp_path / "cifar", files)
    source = tmp_path / "cifar" if layout == "parent" else batches
    loaded = load_cifar10(source)
    assert set(loaded) == {"train", "test"}
    _assert_split(loaded["train"], splits["train"])
    _assert_split(loaded["test"], splits["test"])


@pytest.mark.parametrize("layout", ["file", "parent-dir"])
def test_official_tarball(tmp_path: Path, layout: str) -> None:
    files, splits = _official_files()
    tar = _write_official_tar(tmp_path / "dl" / "cifar-10-python.tar.gz", files)
    loaded = load_cifar10(tar if layout == "file" else tar.parent)
    _assert_split(loaded["train"], splits["train"])
    _assert_split(loaded["test"], splits["test"])


def test_official_pixel_layout_is_planar_rgb(tmp_path: Path) -> None:
    """An asymmetric synthetic image pins the plane order and the row-major orientation."""
    img = np.zeros((32, 32, 3), dtype=np.uint8)
    img[:, :, 0] = np.arange(32, dtype=np.uint8)[:, None]  # R grows down the rows
    img[:, :, 1] = np.arange(32, dtype=np.uint8)[None, :] * 2  # G grows along the columns
    img[:, :, 2] = 200
    row = np.empty(3072, dtype=np.uint8)
    row[:1024] = img[:, :, 0].ravel()
    row[1024:2048] = img[:, :, 1].ravel()
    row[2048:] = img[:, :, 2].ravel()
    batch = _py2_pickle({b"data": row[None, :], b"labels": [7]})
    files = {name: batch for name in [*TRAIN_BATCHES, "test_batch"]}
    loaded = load_cifar10(_write_official_dir(tmp_path, files))
    got = loaded["test"].images[0]
    np.testing.assert_array_equal(got, img)
    assert got[5, 9].tolist() == [5, 18, 200]
    assert loaded["train"].labels.tolist() == [7] * 5


def test_official_missing_batch_file(tmp_path: Path) -> None:
    files, _ = _official_files()
    del files["data_batch_3"]
    batches = _write_official_dir(tmp_path, files)
    with pytest.raises(DatasetError, match=r"missing CIFAR-10 batch file .*data_batch_3"):
        load_cifar10(batches)


def test_official_tarball_missing_member(tmp_path: Path) -> None:
    files, _ = _official_files()
    del files["test_batch"]
    tar = _write_official_tar(tmp_path / "cifar-10-python.tar.gz", files)
    with pytest.raises(DatasetError, match="archive has no test_batch"):
        load_cifar10(tar)


@pytest.mark.parametrize("cut", [0.02, 0.5, 0.98])
def test_truncated_tarball(tmp_path: Path, cut: float) -> None:
    files, _ = _official_files()
    good = _write_official_tar(tmp_path / "good.tar.gz", files).read_bytes()
    bad = tmp_path / "cifar-10-python.tar.gz"
    bad.write_bytes(good[: int(len(good) * cut)])
    with pytest.raises(DatasetError, match="unreadable archive"):
        load_cifar10(bad)


@pytest.mark.parametrize("start", [0.3, 0.6])
def test_corrupted_gzip_tarball(tmp_path: Path, start: float) -> None:
    """Bit rot inside the deflate stream (not a truncation) is a DatasetError, not a zlib.error."""
    files, _ = _official_files()
    data = bytearray(_write_official_tar(tmp_path / "good.tar.gz", files).read_bytes())
    for i in range(int(len(data) * start), len(data) - 8):  # keep the gzip trailer
        data[i] ^= 0x5A
    bad = tmp_path / "cifar-10-python.tar.gz"
    bad.write_bytes(bytes(data))
    with pytest.raises(DatasetError):
        load_cifar10(bad)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"this is not a pickle at all", "not a CIFAR-10 python batch"),
        (b"\x80\x02}q\x00(U\x04dataq\x01", "not a CIFAR-10 python batch"),  # truncated pickle
        (pickle.dumps({b"labels": [1, 2]}, protocol=2), "not a CIFAR-10 python batch"),  # no b"data"
        (pickle.dumps([1, 2, 3], protocol=4), "not a CIFAR-10 python batch"),
        (
            pickle.dumps({b"data": np.zeros((2, 1024), np.uint8), b"labels": [1, 2]}, protocol=4),
            "unexpected batch shape",
        ),
        (
            pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}, protocol=4),
            "unexpected batch shape",
        ),
        (
            pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 10]}, protocol=4),
            r"labels outside 0\.\.9",
        ),
    ],
    ids=["garbage", "truncated", "no-data", "not-a-dict", "short-rows", "label-count", "label-range"],
)
def test_corrupt_batch(tmp_path: Path, payload: bytes, message: str) -> None:
    files, _ = _official_files()
    files["data_batch_2"] = payload
    batches = _write_official_dir(tmp_path, files)
    with pytest.raises(DatasetError, match=message) as info:
        load_cifar10(batches)
    assert "data_batch_2" in str(info.value)


class _Evil:
    """Unpickling this runs ``func(arg)``; a safe loader must refuse before calling anything."""

    def __init__(self, func: Any, arg: str) -> None:
        self.func = func
        self.arg = arg

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return self.func, (self.arg,)


def _evil_payloads(marker: Path) -> dict[str, bytes]:
    import builtins

    code = f"open({str(marker)!r}, 'w').write('pwned')"
    return {
        "os.system": pickle.dumps({b"data": _Evil(os.system, f"touch {marker}"), b"labels": []}, protocol=2),
        "builtins.exec": pickle.dumps({b"data": _Evil(builtins.exec, code), b"labels": []}, protocol=4),
        "builtins.eval": pickle.dumps({b"labels": [_Evil(builtins.eval, code)]}, protocol=4),
    }


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "builtins.eval"])
@pytest.mark.parametrize("container", ["dir", "tar"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, kind: str, container: str) -> None:
    marker = tmp_path / "pwned"
    payload = _evil_payloads(marker)[kind]
    files, _ = _official_files()
    files["test_batch"] = payload
    source = (
        _write_official_dir(tmp_path / "d", files)
        if container == "dir"
        else _write_official_tar(tmp_path / "cifar-10-python.tar.gz", files)
    )
    with pytest.raises(DatasetError, match="refusing to unpickle"):
        load_cifar10(source)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "builtins.eval"])
def test_evil_payload_is_live_without_the_guard(tmp_path: Path, kind: str) -> None:
    """Sanity check for the test above: the same bytes do execute under plain pickle."""
    marker = tmp_path / "pwned"
    pickle.loads(_evil_payloads(marker)[kind])
    assert marker.exists()


# --------------------------------------------------------------------------- image folders and zips


def test_image_tree(tmp_path: Path) -> None:
    train, test = _samples(2), _samples(1, offset=5)
    root = _write_tree(tmp_path / "tree", train, test)
    (root / "README.txt").write_text("not an image\n")
    (root / "train" / "unicorn").mkdir()
    Image.fromarray(train[0].pixels).save(root / "train" / "unicorn" / "x.png")  # not a CIFAR class
    loaded = load_cifar10(root)
    _assert_split(loaded["train"], train)  # PNG is lossless: the exact pixels come back
    _assert_split(loaded["test"], test)  # JPEG bytes copied unchanged: same decode


def test_zip_of_image_tree(tmp_path: Path) -> None:
    train, test = _samples(2), _samples(1, offset=5)
    root = _write_tree(tmp_path / "tree", train, test)
    archive = _zip_tree(root, tmp_path / "cifar.zip", prefix="cifar10/", compression=zipfile.ZIP_DEFLATED)
    loaded = load_cifar10(archive)
    _assert_split(loaded["train"], train)
    _assert_split(loaded["test"], test)


def test_directory_of_split_zips(tmp_path: Path) -> None:
    train, test = _samples(1), _samples(2, offset=3)
    _write_tree(tmp_path / "tr", train, [])
    _write_tree(tmp_path / "te", [], test)
    data = tmp_path / "data"
    data.mkdir()
    _zip_tree(tmp_path / "tr", data / "cifar10-train.zip")
    _zip_tree(tmp_path / "te", data / "cifar10-test.zip")
    loaded = load_cifar10(data)
    _assert_split(loaded["train"], train)
    _assert_split(loaded["test"], test)


def test_committed_sample_zip() -> None:
    split = load_split(SAMPLE_ZIP, "test")
    assert split.images.shape == (600, 32, 32, 3) and split.images.dtype == np.uint8
    assert np.bincount(split.labels, minlength=10).tolist() == [60] * 10
    assert split.labels.tolist() == sorted(split.labels.tolist())
    first = _samples(1)
    np.testing.assert_array_equal(split.images[0], first[0].pixels)
    np.testing.assert_array_equal(split.images[60 * 9], first[9].pixels)
    with pytest.raises(DatasetError, match="has no 'train' split"):
        load_split(SAMPLE_ZIP, "train")


def test_canonical_class_order(tmp_path: Path) -> None:
    assert CIFAR10_CLASSES == (
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
    by_class = {s.cls: s for s in _samples(1)}
    picked = [by_class[c] for c in ("truck", "airplane", "frog", "cat")]
    loaded = load_cifar10(_write_tree(tmp_path / "t", [], picked))
    labels = loaded["test"].labels.tolist()
    assert sorted(labels) == [0, 3, 6, 9]
    for img, label in zip(loaded["test"].images, labels, strict=True):
        np.testing.assert_array_equal(img, by_class[CIFAR10_CLASSES[label]].pixels)


def test_wrong_image_size(tmp_path: Path) -> None:
    root = _write_tree(tmp_path / "t", [], _samples(1))
    small = Image.fromarray(_samples(1)[3].pixels).resize((16, 16))
    small.save(root / "test" / "cat" / "small.png")
    with pytest.raises(DatasetError, match="expected a 32x32 image, got 16x16") as info:
        load_cifar10(root)
    assert "small.png" in str(info.value)


def test_undecodable_image(tmp_path: Path) -> None:
    root = _write_tree(tmp_path / "t", [], _samples(1))
    (root / "test" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(DatasetError, match="cannot decode image"):
        load_cifar10(root)


def test_grayscale_image_becomes_rgb(tmp_path: Path) -> None:
    s = _samples(1)[0]
    root = tmp_path / "t"
    (root / "test" / "airplane").mkdir(parents=True)
    Image.fromarray(s.pixels).convert("L").save(root / "test" / "airplane" / "g.png")
    img = load_cifar10(root)["test"].images[0]
    assert img.shape == (32, 32, 3)
    assert (img[:, :, 0] == img[:, :, 1]).all() and (img[:, :, 1] == img[:, :, 2]).all()


# --------------------------------------------------------------------------- archive damage


def test_zip_with_corrupt_deflate_stream(tmp_path: Path) -> None:
    root = _write_tree(tmp_path / "t", [], _samples(1))
    data = bytearray(_zip_tree(root, tmp_path / "good.zip", compression=zipfile.ZIP_DEFLATED).read_bytes())
    for i in range(200, 1500):  # inside the first members' compressed data
        data[i] ^= 0x5A
    bad = tmp_path / "bad.zip"
    bad.write_bytes(bytes(data))
    assert zipfile.is_zipfile(bad)  # the directory at the end is intact
    with pytest.raises(DatasetError, match=r"bad\.zip"):
        load_cifar10(bad)


def test_zip_with_bad_crc(tmp_path: Path) -> None:
    root = _write_tree(tmp_path / "t", [], _samples(1))
    data = bytearray(_zip_tree(root, tmp_path / "good.zip").read_bytes())
    for i in range(200, 300):
        data[i] ^= 0x5A
    bad = tmp_path / "bad.zip"
    bad.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="unreadable zip"):
        load_cifar10(bad)


def test_truncated_zip(tmp_path: Path) -> None:
    bad = tmp_path / "cut.zip"
    bad.write_bytes(SAMPLE_ZIP.read_bytes()[:20_000])
    with pytest.raises(DatasetError, match=r"cut\.zip"):
        load_cifar10(bad)


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "cifar10"
    with pytest.raises(DatasetError, match="no such file or directory") as info:
        load_cifar10(missing)
    assert str(missing) in str(info.value)
    assert not missing.exists()  # download=False never creates it


def test_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no CIFAR-10 found"):
        load_cifar10(tmp_path)


# --------------------------------------------------------------------------- cache


def test_cache_roundtrip_and_use(tmp_path: Path, _private_cache: Path) -> None:
    train, test = _samples(1), _samples(1, offset=1)
    root = _write_tree(tmp_path / "t", train, test)
    first = load_cifar10(root)
    cached = sorted(_private_cache.glob("cifar10-*.npz"))
    assert len(cached) == 1

    second = load_cifar10(root)
    for split in ("train", "test"):
        np.testing.assert_array_equal(second[split].images, first[split].images)
        np.testing.assert_array_equal(second[split].labels, first[split].labels)
        assert second[split].images.dtype == np.uint8 and second[split].labels.dtype == np.int64

    # Damage a source image without changing its size or mtime: only the cache can still
    # answer, which proves the second load reads the .npz and not the images.
    victim = root / "test" / test[0].cls / Path(test[0].name).name
    st = victim.stat()
    victim.write_bytes(b"\0" * st.st_size)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(DatasetError):
        load_cifar10(root, use_cache=False)
    third = load_cifar10(root)
    np.testing.assert_array_equal(third["test"].images, first["test"].images)
    assert sorted(_private_cache.glob("cifar10-*.npz")) == cached


def test_cache_invalidated_when_source_changes(tmp_path: Path, _private_cache: Path) -> None:
    test = _samples(1)
    root = _write_tree(tmp_path / "t", [], test[:5])
    assert len(load_cifar10(root)["test"]) == 5
    _write_tree(root, [], test[5:])
    reloaded = load_cifar10(root)
    _assert_split(reloaded["test"], test)
    assert len(list(_private_cache.glob("cifar10-*.npz"))) == 2


def test_damaged_cache_is_rebuilt(tmp_path: Path, _private_cache: Path) -> None:
    files, splits = _official_files()
    tar = _write_official_tar(tmp_path / "cifar-10-python.tar.gz", files)
    load_cifar10(tar)
    (npz,) = _private_cache.glob("cifar10-*.npz")
    npz.write_bytes(b"garbage")
    loaded = load_cifar10(tar)
    _assert_split(loaded["train"], splits["train"])
    _assert_split(loaded["test"], splits["test"])
    with np.load(npz) as rebuilt:
        assert sorted(rebuilt.files) == ["test_x", "test_y", "train_x", "train_y"]


def test_no_cache_written_when_disabled(tmp_path: Path, _private_cache: Path) -> None:
    root = _write_tree(tmp_path / "t", [], _samples(1)[:2])
    load_cifar10(root, use_cache=False)
    assert not _private_cache.exists() or not list(_private_cache.iterdir())
