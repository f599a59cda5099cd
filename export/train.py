"""``cifar-train``: train the document's ResNet18 on CIFAR-10.

The whole data set lives in memory as uint8; augmentation (random crop with padding,
horizontal flip, cutout) runs as batched tensor operations on the training device, and the
model trained is :class:`ServingModel`, so training and serving share one preprocessing.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from .checkpoint import CheckpointError, TrainConfig, load_checkpoint, save_checkpoint, shipping_payload
from .data import WHERE_TO_GET, CifarSplit, DatasetError, DatasetNotFound, load_cifar10, split_validation
from .model import CIFAR10_MEAN, CIFAR10_STD, ServingModel
from .teacher import STUDENT_ARCH, TEACHER_ARCH, build_net, load_teacher

__all__ = ["ARCHS", "augment", "distillation_loss", "evaluate", "main", "select_device", "train"]

logger = logging.getLogger(__name__)

# --arch: the checkpoint architecture each choice trains.
ARCHS = {"student": STUDENT_ARCH, "teacher": TEACHER_ARCH}


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def augment(x: torch.Tensor, pad: int, cutout: int, gen: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding), horizontal flip and cutout on a uint8 NHWC batch."""
    n, h, w, _ = x.shape
    dev = x.device
    if pad:
        padded = torch.nn.functional.pad(x, (0, 0, pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device="cpu").to(dev)
        ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device="cpu").to(dev)
        rows = (oy[:, None] + torch.arange(h, device=dev)[None, :])[:, :, None]
        cols = (ox[:, None] + torch.arange(w, device=dev)[None, :])[:, None, :]
        x = padded[torch.arange(n, device=dev)[:, None, None], rows, cols]
    flip = (torch.rand(n, generator=gen) < 0.5).to(dev)
    x = torch.where(flip[:, None, None, None], x.flip(2), x)
    if cutout:
        cy = torch.randint(0, h, (n,), generator=gen).to(dev)
        cx = torch.randint(0, w, (n,), generator=gen).to(dev)
        ys = torch.arange(h, device=dev)[None, :]
        xs = torch.arange(w, device=dev)[None, :]
        half = cutout // 2
        my = (ys >= (cy[:, None] - half)) & (ys < (cy[:, None] + cutout - half))
        mx = (xs >= (cx[:, None] - half)) & (xs < (cx[:, None] + cutout - half))
        hole = my[:, :, None] & mx[:, None, :]
        x = x.masked_fill(hole[..., None], 0)
    return x


@torch.no_grad()
def predict_logits(
    model: nn.Module, images: np.ndarray, device: torch.device, batch_size: int = 1000
) -> np.ndarray:
    """Logits of ``model`` (uint8 NHWC in) for every image, in float32."""
    model.eval()
    outs = []
    for i in range(0, len(images), batch_size):
        xb = torch.from_numpy(images[i : i + batch_size]).to(device)
        outs.append(model(xb).float().cpu())
    return torch.cat(outs).numpy()


def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, device: torch.device) -> float:
    logits = predict_logits(model, images, device)
    return float((logits.argmax(1) == labels).mean())


def _autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.amp == "off":
        return None
    if cfg.amp == "bf16":
        return torch.bfloat16
    if cfg.amp == "fp16":
        return torch.float16
    # auto: bf16 autocast on CUDA (the shipped model trained at ~25k img/s on an H200 with
    # it); fp32 on the CPU, where a training step at batch 256 measured 346 img/s in fp32 and
    # 275 img/s under bf16 autocast on this AMX Xeon (the maps are too small for AMX to pay).
    return torch.bfloat16 if device.type == "cuda" else None


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Hinton et al.'s loss: ``(1-alpha)`` hard-label cross-entropy plus ``alpha`` soft-target KL.

    The KL term is scaled by ``T**2`` so its gradients keep the cross-entropy's magnitude
    whatever the temperature.
    """
    hard = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.log_softmax(teacher_logits / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return (1.0 - alpha) * hard + alpha * temperature**2 * soft


def _check_config(cfg: TrainConfig) -> None:
    if cfg.arch not in ARCHS:
        raise ValueError(f"--arch {cfg.arch!r}: choose one of {', '.join(ARCHS)}")
    if cfg.teacher and cfg.arch != "student":
        raise ValueError("--teacher distils into the student; a teacher is trained without one")
    if cfg.kd_temperature <= 0:
        raise ValueError(f"--kd-temperature must be positive, got {cfg.kd_temperature}")
    if not 0.0 <= cfg.kd_alpha <= 1.0:
        raise ValueError(f"--kd-alpha must be within [0, 1], got {cfg.kd_alpha}")
    if not 0.0 < cfg.ema_decay < 1.0:
        raise ValueError(f"--ema-decay must be within (0, 1), got {cfg.ema_decay}")
    if cfg.val_split < 0:
        raise ValueError(f"--val-split must be 0 (none) or positive, got {cfg.val_split}")


# The fields a resumed run must share with the run that wrote last.pt.
_SCHEDULE_FIELDS = ("arch", "epochs", "batch_size", "limit_train", "val_split", "val_seed", "ema", "teacher")


# A training step of the student at batch 256 on a 2-core Xeon (MODEL_CARD.md, fp32); the
# teacher is several times slower still.
CPU_IMAGES_PER_S = 346


def cpu_time_warning(device: torch.device, epochs: int, images: int) -> str | None:
    """The warning for a CPU run expected to take an hour or more, else None."""
    if device.type != "cpu":
        return None
    hours = epochs * images / CPU_IMAGES_PER_S / 3600
    if hours < 1:
        return None
    return (
        f"training {epochs} epochs of {images} images on the CPU: expect roughly {hours:.0f} hours "
        f"(about {CPU_IMAGES_PER_S} images/s measured on 2 cores); a GPU takes minutes"
    )


def train(cfg: TrainConfig, resume: bool = False, *, download: bool = False) -> dict[str, Any]:
    """Run training; returns the shipping checkpoint payload (also written to ``out``).

    ``out`` is created only once the data has loaded, so a bad ``--data`` leaves nothing behind.
    """
    _check_config(cfg)
    device = select_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    out = Path(cfg.out)

    splits = load_cifar10(cfg.data, download=download)
    if "train" not in splits:
        raise DatasetError(f"{cfg.data}: has no training split (found {sorted(splits)})")
    train_x, train_y = splits["train"].images, splits["train"].labels
    val: CifarSplit | None = None
    if cfg.val_split:
        train_idx, val_idx = split_validation(train_y, cfg.val_split, cfg.val_seed)
        val = CifarSplit(train_x[val_idx], train_y[val_idx])
        train_x, train_y = train_x[train_idx], train_y[train_idx]
    if cfg.limit_train:
        # The arrays are grouped by class: a seeded random subset keeps all ten classes.
        pick = np.random.default_rng(cfg.seed).permutation(len(train_y))[: cfg.limit_train]
        train_x, train_y = train_x[pick], train_y[pick]
    test = splits.get("test")
    if test is None and val is None:
        raise DatasetError(f"{cfg.data}: has no test split to evaluate on; hold out one with --val-split")
    # Without a validation split the test set is the per-epoch monitor (as for the shipped model);
    # with one, the test set is touched once at the end, and only when asked.
    monitor_name, monitor = ("val", val) if val is not None else ("test", test)
    assert monitor is not None
    logger.info(
        "%s: train %d images, %s %d images, device %s",
        cfg.arch,
        len(train_y),
        monitor_name,
        len(monitor),
        device,
    )
    out.mkdir(parents=True, exist_ok=True)

    x_all = torch.from_numpy(train_x).to(device)
    y_all = torch.from_numpy(train_y).to(device)
    arch = ARCHS[cfg.arch]
    net = build_net(arch)
    model = ServingModel(net).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    teacher = load_teacher(cfg.teacher, device) if cfg.teacher else None
    if teacher is not None and device.type == "cuda":
        teacher = teacher.to(memory_format=torch.channels_last)
    # The EMA is a read-only shadow: it consumes no randomness and never feeds back into
    # training, so the raw weights of an --ema run are those of the same run without it.
    ema = (
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
        if cfg.ema
        else None
    )

    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=True,
    )
    steps_per_epoch = math.ceil(len(train_y) / cfg.batch_size)
    if warning := cpu_time_warning(device, cfg.epochs, len(train_y)):
        logger.warning("%s", warning)
    # OneCycleLR divides by the warm-up length in steps (pct_start * total - 1), so it must be
    # positive: a tiny run (e.g. 4 steps at pct_start 0.25) would raise ZeroDivisionError.
    # Long runs are unaffected (1.5 / total_steps is far below any sensible pct_start).
    total_steps = max(2, cfg.epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=cfg.lr,
        total_steps=total_steps,
        pct_start=max(cfg.pct_start, 1.5 / total_steps),
        div_factor=10.0,
        final_div_factor=100.0,
    )
    amp_dtype = _autocast_dtype(cfg, device)
    gen = torch.Generator().manual_seed(cfg.seed)

    start_epoch = 0
    history: list[dict[str, float]] = []
    last = out / "last.pt"
    if resume and last.is_file():
        state = load_checkpoint(last)
        saved = asdict(TrainConfig.from_dict(state["config"]))
        mine = asdict(cfg)
        if any(saved[f] != mine[f] for f in _SCHEDULE_FIELDS):
            raise ValueError(
                f"--resume needs the run's own schedule: {last} was started with "
                + ", ".join(f"{f}={saved[f]}" for f in _SCHEDULE_FIELDS)
            )
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["rng"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start_epoch = int(state["epoch"])
        history = list(state["history"])
        logger.info("resumed from %s at epoch %d", last, start_epoch)

    t_start = time.monotonic()
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t0 = time.monotonic()
        perm = torch.randperm(len(train_y), generator=gen).to(device)
        seen = 0
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            leave=False,
            mininterval=2.0,
            disable=None,
        )
        for step in bar:
            idx = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            xb = augment(x_all[idx], cfg.crop_padding, cfg.cutout, gen)
            yb = y_all[idx]
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = model(xb)
                if teacher is None:
                    loss = F.cross_entropy(logits.float(), yb, label_smoothing=cfg.label_smoothing)
                else:
                    # The teacher sees the very batch the student sees, augmentation included.
                    with torch.no_grad():
                        soft = teacher(xb).float()
                    loss = distillation_loss(
                        logits.float(), soft, yb, cfg.kd_temperature, cfg.kd_alpha, cfg.label_smoothing
                    )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(model)
            seen += len(idx)
            loss_sum += loss.detach() * len(idx)
            correct += (logits.argmax(1) == yb).sum()
            if step % 20 == 0 or step == steps_per_epoch - 1:
                elapsed = time.monotonic() - t0
                bar.set_postfix(
                    loss=f"{loss_sum.item() / seen:.3f}",
                    acc=f"{correct.item() / seen:.3f}",
                    img_s=f"{seen / max(elapsed, 1e-9):.0f}",
                )
        epoch_time = time.monotonic() - t0
        monitor_acc = evaluate(model, monitor.images, monitor.labels, device)
        rec = {
            "epoch": epoch + 1,
            "train_loss": float(loss_sum.item()) / seen,
            "train_acc": float(correct.item()) / seen,
            f"{monitor_name}_acc": monitor_acc,
            "lr": float(sched.get_last_lr()[0]),
            "seconds": epoch_time,
            "images_per_s": seen / epoch_time,
        }
        ema_note = ""
        if ema is not None:
            rec[f"ema_{monitor_name}_acc"] = evaluate(ema.module, monitor.images, monitor.labels, device)
            ema_note = f" ema_{monitor_name}_acc {rec[f'ema_{monitor_name}_acc']:.4f}"
        history.append(rec)
        state = {
            "model": net.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "rng": gen.get_state(),
            "epoch": epoch + 1,
            "history": history,
            "config": asdict(cfg),
            "arch": arch,
        }
        if ema is not None:
            state["ema"] = ema.state_dict()
        save_checkpoint(last, state)
        # Logged once the checkpoint is on disk (Ctrl-C after this line keeps the epoch).
        # The line format, up to the img/s figure, is what export/report.py parses.
        logger.info(
            "epoch %d/%d loss %.4f train_acc %.4f %s_acc %.4f %.1fs (%.0f img/s)%s",
            epoch + 1,
            cfg.epochs,
            rec["train_loss"],
            rec["train_acc"],
            monitor_name,
            monitor_acc,
            epoch_time,
            rec["images_per_s"],
            ema_note,
        )

    model.eval()
    accuracy: dict[str, dict[str, float | None]] = {}
    candidates: list[tuple[str, nn.Module]] = [("raw", model)]
    if ema is not None:
        candidates.append(("ema", ema.module))
    for name, m in candidates:
        accuracy[name] = {
            "val": evaluate(m, val.images, val.labels, device) if val is not None else None,
            "test": (
                evaluate(m, test.images, test.labels, device)
                if test is not None and (val is None or cfg.final_test)
                else None
            ),
        }
        logger.info(
            "final accuracy of the %s weights: %s (%.0fs)",
            name,
            ", ".join(f"{k} {v:.4f}" for k, v in accuracy[name].items() if v is not None) or "not measured",
            time.monotonic() - t_start,
        )
    shipped = accuracy["ema" if ema is not None else "raw"]
    if shipped["test"] is not None and test is not None:
        # export/report.py parses this line for the shipped weights' figure.
        logger.info(
            "final test accuracy on %d images: %.4f (%.0fs)",
            len(test),
            shipped["test"],
            time.monotonic() - t_start,
        )
    payload = shipping_payload(
        net,
        cfg,
        shipped["test"],
        history,
        arch=arch,
        ema_model=cast(ServingModel, ema.module).net if ema is not None else None,
        val_accuracy=shipped["val"],
        accuracy=accuracy,
    )
    save_checkpoint(out / "model.pt", payload)
    return payload


def evaluate_checkpoint(
    path: str | Path, data: str, device: str = "auto", *, record: bool = True
) -> dict[str, float]:
    """Test accuracy of a checkpoint's raw and EMA weights; ``record`` writes it into the file.

    This is the one look at the test set that a run tuned on a validation split gets, for the
    run chosen on validation only.
    """
    ckpt = load_checkpoint(path)
    dev = select_device(device)
    test = load_cifar10(data).get("test")
    if test is None:
        raise DatasetError(f"{data}: has no test split")
    arch = str(ckpt.get("arch", STUDENT_ARCH))
    result: dict[str, float] = {}
    for name, key in (("raw", "model"), ("ema", "ema_model")):
        if key not in ckpt:
            continue
        net = build_net(arch)
        net.load_state_dict(ckpt[key], strict=True)
        model = ServingModel(net, ckpt.get("mean", CIFAR10_MEAN), ckpt.get("std", CIFAR10_STD)).to(dev)
        result[name] = evaluate(model, test.images, test.labels, dev)
        logger.info(
            "test accuracy of the %s weights of %s on %d images: %.4f", name, path, len(test), result[name]
        )
    if record:
        accuracy = ckpt.setdefault("accuracy", {})
        for name, acc in result.items():
            accuracy.setdefault(name, {})["test"] = acc
        ckpt["test_accuracy"] = result["ema" if "ema" in result else "raw"]
        save_checkpoint(path, ckpt)
    return result


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="cifar-train",
        description=__doc__.splitlines()[0].replace("``", "") if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--data",
        default=d.data,
        help="CIFAR-10 location (official python format, tarball, "
        "image tree or zips of one); env CIFAR_SERVE_DATA",
    )
    p.add_argument("--out", default=d.out, help="run directory: last.pt (resumable) and model.pt")
    p.add_argument(
        "--arch",
        default=d.arch,
        choices=list(ARCHS),
        help="student: the document's ResNet18 (the model that ships); teacher: a standard CIFAR "
        "ResNet-18 to distil from (never exported)",
    )
    p.add_argument("--epochs", type=int, default=d.epochs, help="epochs of the one-cycle schedule")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per optimizer step")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--momentum", type=float, default=d.momentum, help="SGD (Nesterov) momentum")
    p.add_argument(
        "--weight-decay", type=float, default=d.weight_decay, help="on weights only, not on BN or biases"
    )
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing, help="of the hard-label loss")
    p.add_argument("--pct-start", type=float, default=d.pct_start, help="warm-up fraction of the schedule")
    p.add_argument(
        "--crop-padding", type=int, default=d.crop_padding, help="random-crop zero padding (pixels)"
    )
    p.add_argument("--cutout", type=int, default=d.cutout, help="cutout square side (0: off)")
    p.add_argument(
        "--teacher",
        default=d.teacher,
        help="distil from this checkpoint, e.g. an --arch teacher run (empty: plain training)",
    )
    p.add_argument(
        "--kd-temperature",
        type=float,
        default=d.kd_temperature,
        help="softmax temperature of the soft targets",
    )
    p.add_argument(
        "--kd-alpha",
        type=float,
        default=d.kd_alpha,
        help="weight of the soft-target loss (the hard-label loss gets 1 - alpha)",
    )
    p.add_argument(
        "--ema", action="store_true", help="keep an EMA of the weights; evaluated, saved, and used by export"
    )
    p.add_argument("--ema-decay", type=float, default=d.ema_decay, help="EMA decay per optimizer step")
    p.add_argument(
        "--val-split",
        type=int,
        default=d.val_split,
        help="hold out this many training images (e.g. 5000) for validation; then the test set is "
        "not evaluated unless --final-test",
    )
    p.add_argument("--val-seed", type=int, default=d.val_seed, help="seed of the validation split")
    p.add_argument(
        "--final-test", action="store_true", help="with --val-split: evaluate the test set at the end"
    )
    p.add_argument("--seed", type=int, default=d.seed, help="seed of initialisation, order and augmentation")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N")
    p.add_argument(
        "--amp",
        default=d.amp,
        choices=["auto", "off", "bf16", "fp16"],
        help="autocast precision (auto: bf16 on CUDA, fp32 on CPU)",
    )
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (0: default)")
    p.add_argument(
        "--limit-train", type=int, default=d.limit_train, help="use only N training images (0: all)"
    )
    p.add_argument(
        "--download",
        action="store_true",
        help="if --data holds no CIFAR-10, download the official tarball into it (torchvision, md5-checked)",
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--ship", default=None, help="also copy the final model.pt here")
    p.add_argument(
        "--evaluate",
        metavar="CHECKPOINT",
        default=None,
        help="do not train: measure CHECKPOINT's test accuracy (raw and EMA weights) on --data "
        "and record it in the file",
    )
    return p


_NOT_CONFIG = ("resume", "ship", "evaluate", "download")


def main(argv: list[str] | None = None) -> int:
    import os
    import shutil

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.data == TrainConfig.data and os.environ.get("CIFAR_SERVE_DATA"):
        args.data = os.environ["CIFAR_SERVE_DATA"]
    last = Path(args.out) / "last.pt"
    try:
        if args.evaluate:
            result = evaluate_checkpoint(args.evaluate, args.data, args.device)
            sys.stdout.write(json.dumps(result) + "\n")
            return 0
        cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k not in _NOT_CONFIG})
        train(cfg, resume=args.resume, download=args.download)
    except DatasetNotFound as exc:
        logger.error("%s; %s", exc, WHERE_TO_GET)
        return 2
    except (DatasetError, CheckpointError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        # One line, no traceback: what survives and how to go on.
        if last.is_file() and not args.evaluate:
            sys.stderr.write(f"\ninterrupted; the last checkpoint is {last} (continue with --resume)\n")
        else:
            sys.stderr.write("\ninterrupted before the first epoch ended; no checkpoint written\n")
        return 130
    if args.ship:
        shutil.copyfile(Path(cfg.out) / "model.pt", args.ship)
    return 0


if __name__ == "__main__":
    sys.exit(main())
