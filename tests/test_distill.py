"""Distillation, EMA, the validation split and the teacher: short real runs on tiny real data.

Every run trains on 64 real CIFAR-10 images (one epoch, one thread), enough to show the code
paths do what they claim; accuracy itself needs a GPU (benchmarks/gpu_train.sh).
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from cifar_serve.export import CIFAR10_CLASSES, load_model
from cifar_serve.export import cli as export_cli
from cifar_serve.export import train as train_mod
from cifar_serve.export.checkpoint import CheckpointError, TrainConfig
from cifar_serve.export.data import split_validation
from cifar_serve.export.teacher import TEACHER_ARCH, cifar_resnet18, load_teacher
from cifar_serve.export.train import distillation_loss, evaluate_checkpoint, train

SAMPLE_ZIP = Path(__file__).resolve().parent / "fixtures" / "cifar10-test-sample.zip"
PER_CLASS = 24  # 20 training + 4 test images of each class, from the committed sample


@pytest.fixture(scope="module", autouse=True)
def _one_intra_op_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIFAR_SERVE_CACHE", str(tmp_path_factory.getbasetemp() / "distill-cache"))


@pytest.fixture(scope="module")
def data_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/<class>/*.jpg (200 images) and test/<class>/*.jpg (40) copied from the committed sample."""
    root = tmp_path_factory.mktemp("tiny-cifar")
    with zipfile.ZipFile(SAMPLE_ZIP) as zf:
        names = sorted(zf.namelist())
        for cls in CIFAR10_CLASSES:
            members = [n for n in names if n.startswith(f"test/{cls}/") and n.endswith(".jpg")]
            for i, name in enumerate(members[:PER_CLASS]):
                dest = root / ("train" if i < 20 else "test") / cls / name.rsplit("/", 1)[-1]
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(zf.read(name))
    return root


def _cfg(data: Path, out: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        data=str(data),
        out=str(out),
        epochs=1,
        batch_size=16,
        lr=0.05,
        device="cpu",
        amp="off",
        seed=5,
        limit_train=64,
    )
    return TrainConfig(**{**base, **kw})


def _run(tmp_path_factory: pytest.TempPathFactory, name: str, data: Path, **kw: Any) -> dict[str, Any]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CIFAR_SERVE_CACHE", str(tmp_path_factory.getbasetemp() / "distill-cache"))
        return train(_cfg(data, tmp_path_factory.mktemp(name) / "run", **kw))


# --------------------------------------------------------------------------- validation split


def test_validation_split_is_disjoint_stratified_and_deterministic() -> None:
    labels = np.repeat(np.arange(10), 5000)  # CIFAR-10's training labels, grouped by class
    tr, va = split_validation(labels, 5000, seed=0)
    assert len(va) == 5000 and len(tr) == 45000
    assert not set(tr.tolist()) & set(va.tolist())
    np.testing.assert_array_equal(np.sort(np.concatenate([tr, va])), np.arange(50000))
    assert np.bincount(labels[va]).tolist() == [500] * 10
    tr2, va2 = split_validation(labels, 5000, seed=0)
    np.testing.assert_array_equal(va, va2)
    np.testing.assert_array_equal(tr, tr2)
    _, va3 = split_validation(labels, 5000, seed=1)
    assert not np.array_equal(va, va3)
    with pytest.raises(ValueError, match="multiple of 10"):
        split_validation(labels, 4995)


# --------------------------------------------------------------------------- the loss


def test_distillation_loss_mixes_hard_and_soft_targets() -> None:
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(8, 10, generator=gen)
    teacher = torch.randn(8, 10, generator=gen) * 3
    labels = torch.randint(0, 10, (8,), generator=gen)
    ce = F.cross_entropy(student, labels, label_smoothing=0.1)
    torch.testing.assert_close(distillation_loss(student, teacher, labels, 4.0, 0.0, 0.1), ce)
    kl = F.kl_div(F.log_softmax(student / 4, 1), F.softmax(teacher / 4, 1), reduction="batchmean")
    torch.testing.assert_close(distillation_loss(student, teacher, labels, 4.0, 1.0), 16 * kl)
    mixed = distillation_loss(student, teacher, labels, 4.0, 0.5, 0.1)
    torch.testing.assert_close(mixed, 0.5 * ce + 0.5 * 16 * kl)
    assert not torch.isclose(mixed, ce)
    # Identical logits leave only the hard-label part.
    torch.testing.assert_close(distillation_loss(teacher, teacher, labels, 4.0, 1.0), torch.tensor(0.0))


def test_minimising_the_soft_loss_moves_the_student_toward_the_teacher() -> None:
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(16, 10, generator=gen) * 2
    labels = torch.randint(0, 10, (16,), generator=gen)
    student = torch.zeros(16, 10, requires_grad=True)
    opt = torch.optim.SGD([student], lr=8.0)  # batchmean over 16 rows: large steps per row

    def gap() -> float:
        with torch.no_grad():
            return float(F.kl_div(F.log_softmax(student, 1), F.softmax(teacher, 1), reduction="batchmean"))

    before = gap()
    for _ in range(100):
        opt.zero_grad()
        distillation_loss(student, teacher, labels, 2.0, 1.0).backward()
        opt.step()
    assert gap() < before / 10
    assert (student.argmax(1) == teacher.argmax(1)).all()  # the teacher's answers, not the labels


# --------------------------------------------------------------------------- the teacher


def test_teacher_is_a_standard_cifar_resnet18() -> None:
    net = cifar_resnet18()
    assert sum(p.numel() for p in net.parameters()) == 11_173_962  # He et al.'s ResNet-18, 10 classes
    stem = net.conv1(torch.zeros(1, 3, 32, 32))
    assert stem.shape == (1, 64, 32, 32)  # stride-1 stem, no max-pool: full resolution
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@pytest.fixture(scope="module")
def teacher_ckpt(
    data_tree: Path, tmp_path_factory: pytest.TempPathFactory, _one_intra_op_thread: None
) -> Path:
    payload = _run(tmp_path_factory, "teacher", data_tree, arch="teacher", label_smoothing=0.0, val_split=50)
    assert payload["arch"] == TEACHER_ARCH
    out = Path(payload["config"]["out"]) / "model.pt"
    assert out.is_file()
    return out


def test_teacher_checkpoint_loads_as_a_frozen_teacher(teacher_ckpt: Path, data_tree: Path) -> None:
    teacher = load_teacher(teacher_ckpt)
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    x = torch.zeros(3, 32, 32, 3, dtype=torch.uint8)
    assert teacher(x).shape == (3, 10)
    ckpt = torch.load(teacher_ckpt, weights_only=True)
    reference = cifar_resnet18()
    reference.load_state_dict(ckpt["model"])
    torch.testing.assert_close(teacher.net.state_dict()["fc.weight"], reference.state_dict()["fc.weight"])


def test_a_teacher_is_never_exported(
    teacher_ckpt: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(CheckpointError, match="only the document's ResNet18 is exported and served"):
        load_model(teacher_ckpt)
    out = tmp_path / "out"
    rc = export_cli.main(["--checkpoint", str(teacher_ckpt), "--out", str(out), "--no-parity", "-q"])
    assert rc != 0 and "distillation teacher" in caplog.text
    assert not (out / "manifest.json").exists()


# --------------------------------------------------------------------------- distillation and EMA


@pytest.fixture(scope="module")
def runs(
    teacher_ckpt: Path, data_tree: Path, tmp_path_factory: pytest.TempPathFactory, _one_intra_op_thread: None
) -> dict[str, dict[str, Any]]:
    """The same student run (same seed, data, order, augmentation) five ways."""
    common: dict[str, Any] = dict(val_split=50)
    return {
        "plain": _run(tmp_path_factory, "plain", data_tree, **common),
        "plain_ema": _run(tmp_path_factory, "plain_ema", data_tree, ema=True, ema_decay=0.5, **common),
        "kd_alpha0": _run(
            tmp_path_factory, "kd0", data_tree, teacher=str(teacher_ckpt), kd_alpha=0.0, **common
        ),
        "kd": _run(tmp_path_factory, "kd", data_tree, teacher=str(teacher_ckpt), kd_alpha=0.9, **common),
        "kd_ema": _run(
            tmp_path_factory,
            "kd_ema",
            data_tree,
            teacher=str(teacher_ckpt),
            kd_alpha=0.9,
            ema=True,
            ema_decay=0.5,
            **common,
        ),
    }


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_the_kd_term_is_what_changes_the_student(runs: dict[str, dict[str, Any]]) -> None:
    # With alpha 0 the teacher is consulted but weightless: exactly the plain run.
    assert _same_weights(runs["kd_alpha0"]["model"], runs["plain"]["model"])
    assert runs["kd_alpha0"]["history"][0]["train_loss"] == pytest.approx(
        runs["plain"]["history"][0]["train_loss"]
    )
    # With alpha 0.9 the soft targets change the loss and the weights.
    assert not _same_weights(runs["kd"]["model"], runs["plain"]["model"])
    assert runs["kd"]["history"][0]["train_loss"] != pytest.approx(runs["plain"]["history"][0]["train_loss"])
    assert runs["kd"]["config"]["teacher"] and runs["kd"]["config"]["kd_alpha"] == 0.9


def test_ema_is_a_shadow_saved_beside_the_raw_weights(runs: dict[str, dict[str, Any]]) -> None:
    for with_ema, without in (("plain_ema", "plain"), ("kd_ema", "kd")):
        payload = runs[with_ema]
        # The EMA never feeds back: the raw weights are the run without --ema, bit for bit.
        assert _same_weights(payload["model"], runs[without]["model"])
        assert "ema_model" not in runs[without]
        ema = payload["ema_model"]
        assert set(ema) == set(payload["model"])
        assert not torch.equal(ema["outlay.weight"], payload["model"]["outlay.weight"])
        assert all(v.dtype == torch.float32 for k, v in ema.items() if "num_batches" not in k)
        rec = payload["history"][0]
        assert {"val_acc", "ema_val_acc"} <= set(rec) and "test_acc" not in rec
        assert set(payload["accuracy"]) == {"raw", "ema"}
        assert payload["val_accuracy"] == payload["accuracy"]["ema"]["val"] == rec["ema_val_acc"]


def test_export_loads_the_ema_weights(runs: dict[str, dict[str, Any]]) -> None:
    path = Path(runs["kd_ema"]["config"]["out"]) / "model.pt"
    net, meta = load_model(path)
    assert meta["weights"] == "ema"
    assert _same_weights(runs["kd_ema"]["ema_model"], {k: v for k, v in net.state_dict().items()})
    _, plain_meta = load_model(Path(runs["plain"]["config"]["out"]) / "model.pt")
    assert plain_meta["weights"] == "raw"


def test_last_checkpoint_keeps_the_ema_for_resume(runs: dict[str, dict[str, Any]]) -> None:
    last = torch.load(Path(runs["kd_ema"]["config"]["out"]) / "last.pt", weights_only=True)
    assert int(last["ema"]["n_averaged"]) == 4  # 64 images at batch 16: four updates
    assert torch.equal(last["ema"]["module.net.outlay.weight"], runs["kd_ema"]["ema_model"]["outlay.weight"])


def test_validation_runs_leave_the_test_set_alone_until_asked(
    runs: dict[str, dict[str, Any]], data_tree: Path
) -> None:
    payload = runs["kd_ema"]
    assert payload["test_accuracy"] is None
    assert all(acc["test"] is None for acc in payload["accuracy"].values())
    path = Path(payload["config"]["out"]) / "model.pt"
    result = evaluate_checkpoint(path, str(data_tree), "cpu")
    assert set(result) == {"raw", "ema"} and all(0.0 <= v <= 1.0 for v in result.values())
    stored = torch.load(path, weights_only=True)
    assert stored["test_accuracy"] == result["ema"]
    assert stored["accuracy"]["raw"]["test"] == result["raw"]
    _, meta = load_model(path)
    assert meta["test_accuracy"] == result["ema"]  # what the manifest will state


def test_cli_evaluate_prints_json(
    runs: dict[str, dict[str, Any]], data_tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = Path(runs["plain"]["config"]["out"]) / "model.pt"
    assert train_mod.main(["--evaluate", str(path), "--data", str(data_tree), "--device", "cpu"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"raw"}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--kd-alpha", "1.5"], "--kd-alpha must be within [0, 1]"),
        (["--kd-temperature", "0"], "--kd-temperature must be positive"),
        (["--ema", "--ema-decay", "1"], "--ema-decay must be within (0, 1)"),
        (["--arch", "teacher", "--teacher", "x.pt"], "a teacher is trained without one"),
        (["--val-split", "55"], "multiple of 10"),
        (["--teacher", "missing-teacher.pt"], "checkpoint not found"),
    ],
)
def test_bad_flags_are_one_line_errors(
    flags: list[str], message: str, data_tree: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rc = train_mod.main(["--data", str(data_tree), "--out", str(tmp_path / "run"), "--device", "cpu", *flags])
    assert rc == 2
    assert message in caplog.text
