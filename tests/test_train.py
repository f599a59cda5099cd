"""Training: a tiny real run on real CIFAR-10 images, checkpoints, --resume, augmentation."""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_serve.export import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, ServingModel, load_model
from cifar_serve.export import train as train_mod
from cifar_serve.export.checkpoint import TrainConfig
from cifar_serve.export.data import load_cifar10
from cifar_serve.export.train import augment, evaluate, train

SAMPLE_ZIP = Path(__file__).resolve().parent / "fixtures" / "cifar10-test-sample.zip"
TRAIN_PER_CLASS = 20  # 200 training images
TEST_PER_CLASS = 10  # 100 test images

Run = tuple[TrainConfig, dict[str, Any]]  # the config and the payload train() returned


@pytest.fixture(scope="module", autouse=True)
def _one_intra_op_thread() -> Iterator[None]:
    """A 2-thread pool stalls at every operator's barrier when a small CI machine is busy with
    other work (several times slower measured); one thread keeps these runs predictable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/<class>/*.jpg and test/<class>/*.jpg copied byte for byte from the committed sample."""
    root = tmp_path_factory.mktemp("cifar-tree")
    with zipfile.ZipFile(SAMPLE_ZIP) as zf:
        names = sorted(zf.namelist())
        for cls in CIFAR10_CLASSES:
            members = [n for n in names if n.startswith(f"test/{cls}/") and n.endswith(".jpg")]
            assert len(members) >= TRAIN_PER_CLASS + TEST_PER_CLASS
            for i, name in enumerate(members[: TRAIN_PER_CLASS + TEST_PER_CLASS]):
                split = "train" if i < TRAIN_PER_CLASS else "test"
                dest = root / split / cls / name.rsplit("/", 1)[-1]
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(zf.read(name))
    return root


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIFAR_SERVE_CACHE", str(tmp_path_factory.getbasetemp() / "train-cache"))


def _config(data: Path, out: Path, epochs: int) -> TrainConfig:
    return TrainConfig(
        data=str(data), out=str(out), epochs=epochs, batch_size=64, lr=0.05, device="cpu", amp="off", seed=3
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- a real training run


@pytest.fixture(scope="module")
def one_epoch(data_tree: Path, tmp_path_factory: pytest.TempPathFactory, _one_intra_op_thread: None) -> Run:
    cfg = _config(data_tree, tmp_path_factory.mktemp("run") / "one", epochs=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CIFAR_SERVE_CACHE", str(tmp_path_factory.getbasetemp() / "train-cache"))
        payload = train(cfg)
    return cfg, payload


def test_one_epoch_writes_checkpoints(one_epoch: Run) -> None:
    cfg, payload = one_epoch
    out = Path(cfg.out)
    assert (out / "model.pt").is_file() and (out / "last.pt").is_file()
    assert not list(out.glob("*.tmp"))  # atomic writes leave nothing behind

    ckpt = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    assert ckpt["format_version"] == 1 and ckpt["arch"] == "ResNet18"
    assert isinstance(ckpt["config"], dict) and ckpt["config"] == asdict(cfg)
    assert TrainConfig.from_dict(ckpt["config"]) == cfg
    assert ckpt["labels"] == list(CIFAR10_CLASSES)
    assert ckpt["mean"] == pytest.approx(list(CIFAR10_MEAN))
    assert ckpt["std"] == pytest.approx(list(CIFAR10_STD))
    assert isinstance(ckpt["test_accuracy"], float) and 0.0 <= ckpt["test_accuracy"] <= 1.0
    assert ckpt["test_accuracy"] == payload["test_accuracy"]
    assert "optimizer" not in ckpt and "scheduler" not in ckpt  # the shipped file is weights + metadata
    assert all(v.dtype == torch.float32 for k, v in ckpt["model"].items() if "num_batches" not in k)
    (rec,) = ckpt["history"]
    assert rec["epoch"] == 1
    assert np.isfinite(rec["train_loss"]) and rec["train_loss"] > 0
    assert rec["images_per_s"] > 0
    # 200 images at batch 64: 4 optimizer steps, each counted by every BatchNorm.
    assert int(ckpt["model"]["conv1.1.num_batches_tracked"]) == 4


def test_resumable_state_loads_safely(one_epoch: Run) -> None:
    cfg, _ = one_epoch
    last = torch.load(Path(cfg.out) / "last.pt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 1
    assert {"model", "optimizer", "scheduler", "rng", "history", "config"} <= set(last)
    assert last["config"]["epochs"] == 1


def test_checkpoint_reproduces_its_accuracy(one_epoch: Run, data_tree: Path) -> None:
    cfg, payload = one_epoch
    net, meta = load_model(Path(cfg.out) / "model.pt")
    assert meta["test_accuracy"] == payload["test_accuracy"]
    test = load_cifar10(data_tree)["test"]
    assert len(test) == 100
    model = ServingModel(net, meta["mean"], meta["std"])
    acc = evaluate(model, test.images, test.labels, torch.device("cpu"))
    assert acc == payload["test_accuracy"]


# --------------------------------------------------------------------------- --resume


class _Killed(Exception):
    """Stands in for the process dying right after a checkpoint hit the disk."""


@pytest.fixture(scope="module")
def interrupted_run(
    data_tree: Path, tmp_path_factory: pytest.TempPathFactory, _one_intra_op_thread: None
) -> Path:
    """A 2-epoch run killed right after epoch 1's last.pt was written."""
    cfg = _config(data_tree, tmp_path_factory.mktemp("run") / "resumed", epochs=2)
    real_save = train_mod.save_checkpoint

    def save_then_die(path: Path, payload: dict[str, Any]) -> None:
        real_save(path, payload)
        if Path(path).name == "last.pt" and payload["epoch"] == 1:
            raise _Killed

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CIFAR_SERVE_CACHE", str(tmp_path_factory.getbasetemp() / "train-cache"))
        mp.setattr(train_mod, "save_checkpoint", save_then_die)
        with pytest.raises(_Killed):
            train(cfg)
    out = Path(cfg.out)
    assert (out / "last.pt").is_file() and not (out / "model.pt").exists()
    return out


def test_resume_continues_and_matches_an_uninterrupted_run(
    interrupted_run: Path, data_tree: Path, tmp_path: Path
) -> None:
    before = torch.load(interrupted_run / "last.pt", weights_only=True)
    assert before["epoch"] == 1 and len(before["history"]) == 1

    resumed = train(_config(data_tree, interrupted_run, epochs=2), resume=True)
    assert [r["epoch"] for r in resumed["history"]] == [1, 2]
    assert resumed["history"][0] == before["history"][0]  # epoch 1 is not redone
    assert torch.load(interrupted_run / "last.pt", weights_only=True)["epoch"] == 2
    assert (interrupted_run / "model.pt").is_file()

    # The same schedule without the interruption, through the command line (with --ship).
    shipped = tmp_path / "shipped.pt"
    rc = train_mod.main(
        [
            "--data",
            str(data_tree),
            "--out",
            str(tmp_path / "straight"),
            "--epochs",
            "2",
            "--batch-size",
            "64",
            "--lr",
            "0.05",
            "--device",
            "cpu",
            "--amp",
            "off",
            "--seed",
            "3",
            "--ship",
            str(shipped),
        ]
    )
    assert rc == 0
    straight = torch.load(shipped, weights_only=True)
    assert _sha256(shipped) == _sha256(tmp_path / "straight" / "model.pt")
    for key, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    for a, b in zip(resumed["history"], straight["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["lr"] == pytest.approx(b["lr"])


def test_resume_with_a_different_schedule_is_refused(
    interrupted_run: Path, data_tree: Path, caplog: pytest.LogCaptureFixture
) -> None:
    digest = _sha256(interrupted_run / "last.pt")
    rc = train_mod.main(
        [
            "--data",
            str(data_tree),
            "--out",
            str(interrupted_run),
            "--epochs",
            "5",
            "--batch-size",
            "64",
            "--device",
            "cpu",
            "--resume",
        ]
    )
    assert rc != 0
    assert "--resume needs the run's own schedule" in caplog.text
    assert _sha256(interrupted_run / "last.pt") == digest  # nothing was overwritten


_WHERE = (
    "--download",
    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "c58f30108f718f92721af3b95e74349a",
)


@pytest.mark.parametrize(
    ("data", "said"),
    [
        ("nothing", "no such file or directory"),
        ("empty-dir", "no CIFAR-10 found"),
        ("", "no CIFAR-10 location given"),
    ],
)
def test_missing_data_is_one_line_saying_where_to_get_cifar10(
    data: str, said: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "empty-dir").mkdir()
    monkeypatch.chdir(tmp_path)  # --data "" must not mean "the current folder"
    out = tmp_path / "runs" / "default"
    rc = train_mod.main(["--data", data, "--out", str(out), "--epochs", "1", "--device", "cpu"])
    assert rc == 2
    (record,) = [r for r in caplog.records if r.levelname == "ERROR"]
    message = record.getMessage()
    assert "\n" not in message and said in message
    assert all(part in message for part in _WHERE), message
    assert not (tmp_path / "runs").exists()  # no empty run folder left behind


def test_a_long_cpu_run_is_warned_about() -> None:
    warning = train_mod.cpu_time_warning(torch.device("cpu"), 120, 50_000)
    assert warning is not None and "expect roughly 5 hours" in warning
    assert train_mod.cpu_time_warning(torch.device("cuda"), 120, 50_000) is None
    assert train_mod.cpu_time_warning(torch.device("cpu"), 1, 200) is None


def test_ctrl_c_stops_with_one_line_and_the_checkpoint(data_tree: Path, tmp_path: Path) -> None:
    """A real SIGINT to a real cifar-train process, once its first checkpoint is on disk."""
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "run"
    env = dict(os.environ, CIFAR_SERVE_CACHE=str(tmp_path / "cache"))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cifar_serve.export.train",
            "--data",
            str(data_tree),
            "--out",
            str(out),
            "--epochs",
            "500",
            "--limit-train",
            "32",
            "--batch-size",
            "32",
            "--device",
            "cpu",
            "--amp",
            "off",
            "--threads",
            "1",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stderr is not None
    lines = []
    try:
        for line in proc.stderr:  # the log line of each epoch comes after its checkpoint
            lines.append(line)
            if " epoch 1/500 " in line:
                break
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        rc = proc.wait(timeout=120)
    finally:
        proc.kill()
    assert rc == 130
    assert "Traceback" not in rest and "KeyboardInterrupt" not in rest
    assert rest.strip().splitlines()[-1] == (
        f"interrupted; the last checkpoint is {out / 'last.pt'} (continue with --resume)"
    )
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] >= 1


def test_help_has_no_rst_and_every_option_explained() -> None:
    import argparse

    parser = train_mod.build_parser()
    text = parser.format_help()
    assert "``" not in text
    assert parser.formatter_class is argparse.ArgumentDefaultsHelpFormatter  # shows every default
    for action in parser._actions:
        assert action.help and action.help != argparse.SUPPRESS, f"{action.option_strings} has no help"


# --------------------------------------------------------------------------- augmentation


def _real_batch(n: int = 64) -> torch.Tensor:
    with zipfile.ZipFile(SAMPLE_ZIP) as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".jpg"))[:: 600 // n][:n]
        return torch.from_numpy(
            np.stack([np.asarray(Image.open(io.BytesIO(zf.read(name))).convert("RGB")) for name in names])
        )


def test_augment_keeps_shape_and_dtype() -> None:
    x = _real_batch()
    y = augment(x, 4, 8, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == torch.uint8
    assert not torch.equal(y, x)


def test_augment_is_deterministic_for_a_seeded_generator() -> None:
    x = _real_batch()
    a = augment(x, 4, 8, torch.Generator().manual_seed(42))
    b = augment(x, 4, 8, torch.Generator().manual_seed(42))
    c = augment(x, 4, 8, torch.Generator().manual_seed(43))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_augment_flip_only() -> None:
    x = _real_batch()
    y = augment(x, 0, 0, torch.Generator().manual_seed(1))
    flipped = 0
    for i in range(len(x)):
        if torch.equal(y[i], x[i].flip(1)):  # HWC: dim 1 of one image is the width
            flipped += 1
        else:
            assert torch.equal(y[i], x[i])
    assert 10 <= flipped <= 54  # about half of 64


def test_augment_crop_is_a_shifted_window_of_the_padded_image() -> None:
    x = _real_batch(32)
    pad = 4
    y = augment(x, pad, 0, torch.Generator().manual_seed(2))
    shifted = 0
    for i in range(len(x)):
        matches = []
        for base in (x[i], x[i].flip(1)):
            padded = torch.nn.functional.pad(base, (0, 0, pad, pad, pad, pad))
            for oy in range(2 * pad + 1):
                for ox in range(2 * pad + 1):
                    if torch.equal(padded[oy : oy + 32, ox : ox + 32], y[i]):
                        matches.append((oy, ox))
        assert matches, f"image {i} is not a crop of its zero-padded (possibly flipped) source"
        if (pad, pad) not in matches:
            shifted += 1
            assert (y[i] == 0).all(dim=-1).any()  # a zero border came in
    assert shifted >= len(x) // 2  # 80 of 81 offsets move the image


def test_augment_cutout_zeroes_one_small_square() -> None:
    x = _real_batch()
    size = 8
    y = augment(x, 0, size, torch.Generator().manual_seed(3))
    for i in range(len(x)):
        base = x[i] if torch.equal(y[i][y[i] != 0], x[i][y[i] != 0]) else x[i].flip(1)
        changed = (y[i] != base).any(dim=-1)
        assert (y[i][changed] == 0).all()  # every change is a pixel set to 0 (all channels)
        rows = changed.any(dim=1).nonzero().flatten()
        cols = changed.any(dim=0).nonzero().flatten()
        assert len(rows) > 0, f"image {i}: no cutout"
        assert rows.max() - rows.min() < size and cols.max() - cols.min() < size
    assert not torch.equal(y, x) and not torch.equal(y, x.flip(2))
