"""``cifar-train``: train the document's ResNet18 on CIFAR-10.

The whole data set lives in memory as uint8; augmentation (random crop with padding,
horizontal flip, cutout) runs as batched tensor operations on the training device, and the
model trained is :class:`ServingModel`, so training and serving share one preprocessing.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .checkpoint import TrainConfig, load_checkpoint, save_checkpoint, shipping_payload
from .data import load_cifar10
from .model import ResNet18, ServingModel

__all__ = ["augment", "evaluate", "main", "select_device", "train"]

logger = logging.getLogger(__name__)


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


def train(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Run training; returns the shipping checkpoint payload (also written to ``out``)."""
    device = select_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    splits = load_cifar10(cfg.data)
    train_x, train_y = splits["train"].images, splits["train"].labels
    if cfg.limit_train:
        # The arrays are grouped by class: a seeded random subset keeps all ten classes.
        pick = np.random.default_rng(cfg.seed).permutation(len(train_y))[: cfg.limit_train]
        train_x, train_y = train_x[pick], train_y[pick]
    test = splits["test"]
    logger.info("train %d images, test %d images, device %s", len(train_y), len(test), device)

    x_all = torch.from_numpy(train_x).to(device)
    y_all = torch.from_numpy(train_y).to(device)
    net = ResNet18()
    model = ServingModel(net).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True

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
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    amp_dtype = _autocast_dtype(cfg, device)
    gen = torch.Generator().manual_seed(cfg.seed)

    start_epoch = 0
    history: list[dict[str, float]] = []
    last = out / "last.pt"
    if resume and last.is_file():
        state = load_checkpoint(last)
        saved = TrainConfig.from_dict(state["config"])
        if (saved.epochs, saved.batch_size, saved.limit_train) != (
            cfg.epochs,
            cfg.batch_size,
            cfg.limit_train,
        ):
            raise ValueError(
                f"--resume needs the run's own schedule: {last} was started with epochs={saved.epochs}, "
                f"batch_size={saved.batch_size}, limit_train={saved.limit_train}"
            )
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["rng"])
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
                loss = loss_fn(logits.float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
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
        test_acc = evaluate(model, test.images, test.labels, device)
        rec = {
            "epoch": epoch + 1,
            "train_loss": float(loss_sum.item()) / seen,
            "train_acc": float(correct.item()) / seen,
            "test_acc": test_acc,
            "lr": float(sched.get_last_lr()[0]),
            "seconds": epoch_time,
            "images_per_s": seen / epoch_time,
        }
        history.append(rec)
        logger.info(
            "epoch %d/%d loss %.4f train_acc %.4f test_acc %.4f %.1fs (%.0f img/s)",
            epoch + 1,
            cfg.epochs,
            rec["train_loss"],
            rec["train_acc"],
            test_acc,
            epoch_time,
            rec["images_per_s"],
        )
        save_checkpoint(
            last,
            {
                "model": net.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "rng": gen.get_state(),
                "epoch": epoch + 1,
                "history": history,
                "config": asdict(cfg),
            },
        )

    model.eval()
    final_acc = evaluate(model, test.images, test.labels, device)
    logger.info(
        "final test accuracy on %d images: %.4f (%.0fs)", len(test), final_acc, time.monotonic() - t_start
    )
    payload = shipping_payload(net, cfg, final_acc, history)
    save_checkpoint(out / "model.pt", payload)
    return payload


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="cifar-train",
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--data",
        default=d.data,
        help="CIFAR-10 location (official python format, tarball, "
        "image tree or zips of one); env CIFAR_SERVE_DATA",
    )
    p.add_argument("--out", default=d.out, help="run directory: last.pt (resumable) and model.pt")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    p.add_argument("--pct-start", type=float, default=d.pct_start)
    p.add_argument("--crop-padding", type=int, default=d.crop_padding)
    p.add_argument("--cutout", type=int, default=d.cutout, help="cutout square side (0: off)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N")
    p.add_argument("--amp", default=d.amp, choices=["auto", "off", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (0: default)")
    p.add_argument(
        "--limit-train", type=int, default=d.limit_train, help="use only the first N training images"
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--ship", default=None, help="also copy the final model.pt here")
    return p


def main(argv: list[str] | None = None) -> int:
    import os
    import shutil

    from .data import DatasetError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.data == TrainConfig.data and os.environ.get("CIFAR_SERVE_DATA"):
        args.data = os.environ["CIFAR_SERVE_DATA"]
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k not in ("resume", "ship")})
    try:
        train(cfg, resume=args.resume)
    except (DatasetError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    if args.ship:
        shutil.copyfile(Path(cfg.out) / "model.pt", args.ship)
    return 0
