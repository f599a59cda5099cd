"""The runtime's start-up measurement and the shapes it runs, on the real model (CPU).

The start-up table times both runtimes once each has settled, at every bucket up to the
largest batch; TorchScript on the CPU runs a batch padded to one of a few shapes, and every size
still gets the model's own answers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cifar_serve.server.runtime import ModelRuntime, graph_buckets, padded_shapes


def test_torchscript_runs_a_few_shapes_and_answers_every_size(
    model_dir: Path, sample: Any, offline_logits: np.ndarray
) -> None:
    rt = ModelRuntime(model_dir, device="cpu", backend="auto", max_batch_size=256)
    assert rt.shapes == padded_shapes(256)
    assert set(rt.buckets) <= set(rt.shapes)
    assert rt.shapes[:16] == list(range(1, 17))
    assert len(rt.shapes) <= 40  # oneDNN keeps 1024 kernels: a few dozen shapes' worth
    for n in range(1, 257):
        assert next(s for s in rt.shapes if s >= n) <= max(n, 16) * 1.25  # at most a quarter padding
    for n in (5, 17, 33, 100, 129, 255, 256):  # off the grid and on it, below and above each bucket
        out = rt.run_on("torchscript", sample.images[:n])
        assert out.shape == (n, 10)
        np.testing.assert_allclose(out, offline_logits[:n], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="tensorrt"):
        rt.run_on("tensorrt", sample.images[:1])


def test_without_the_grid_every_size_runs_as_it_comes(model_dir: Path) -> None:
    rt = ModelRuntime(model_dir, device="cpu", backend="torchscript", max_batch_size=24, shape_grid=False)
    assert rt.shapes == list(range(1, 25))
    assert padded_shapes(24) == [*range(1, 17), 20, 24]


def test_warm_up_times_both_runtimes_at_every_bucket_and_logs_the_table(
    model_dir: Path, sample: Any, offline_logits: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    rt = ModelRuntime(model_dir, device="cpu", backend="auto", max_batch_size=48)
    with caplog.at_level(logging.INFO, logger="cifar_serve.server.runtime"):
        rt.warmup()
    assert rt.buckets == graph_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    for row in rt.runtime_table():
        ms = row["ms_per_batch"]
        assert set(ms) == {"torchscript", "onnxruntime"} and all(v > 0 for v in ms.values())
        assert row["runtime"] == min(ms, key=ms.__getitem__)
    assert rt.calibration_s is not None and rt.warmup_s is not None and 0 < rt.calibration_s <= rt.warmup_s
    table = next(r.getMessage() for r in caplog.records if "runtime per batch bucket" in r.getMessage())
    assert all(f"\n  {b:5d}: torchscript" in table for b in rt.buckets), table
    assert any("warmed up 48 batch sizes" in r.getMessage() for r in caplog.records)
    # Whichever runtime each size went to, every size answers as the model does.
    for n in (1, 3, 9, 21, 47, 48):
        np.testing.assert_allclose(rt.infer(sample.images[:n]), offline_logits[:n], atol=1e-4, rtol=0)
