"""Long cifar-classify runs: --output FILE, --resume after a kill, archives as inputs.

The kill is deterministic: the server's runtime holds its forward passes once half the images
have come in, so the client is killed while it waits on a request, with rows already in FILE.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cifar_serve.client.cli import EXIT_OK, EXIT_SKIPPED, EXIT_USAGE

N_IMAGES = 2000
LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("cifar-classify")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "cifar_serve.client.cli"]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CIFAR_SERVE_")}


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*_cli(), *args], capture_output=True, text=True, timeout=600, env=_env())


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """FILE's rows as dicts (CSV or JSON Lines), each with path, class_index, probability."""
    text = path.read_text()
    if path.suffix == ".csv":
        return list(csv.DictReader(io.StringIO(text)))
    return [json.loads(line) for line in text.splitlines()]


@dataclass
class Corpus:
    """2,000 real CIFAR-10 test JPEGs (the 600 of the sample, repeated under new names): a folder and
    a .tar of it. ``names[kind]`` are the row names in order; ``index[name]`` the sample index."""

    folder: Path
    tar: Path
    names: dict[str, list[str]]
    index: dict[str, int]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, sample_jpegs: list[tuple[str, bytes]]) -> Corpus:
    root = tmp_path_factory.mktemp("corpus")
    folder = root / "images"
    folder.mkdir()
    tar = root / "images.tar"
    names: dict[str, list[str]] = {"folder": [], "tar": []}
    index: dict[str, int] = {}
    with tarfile.open(tar, "w") as tf:
        for j in range(N_IMAGES):
            i = j % len(sample_jpegs)
            path = folder / f"{j:05d}.jpg"
            path.write_bytes(sample_jpegs[i][1])
            tf.add(path, arcname=f"test/{path.name}")
            names["folder"].append(str(path))
            names["tar"].append(f"{tar}/test/{path.name}")
            index[names["folder"][-1]] = index[names["tar"][-1]] = i
    return Corpus(folder, tar, names, index)


@pytest.fixture(scope="module")
def held_server(model_dir: Path, make_settings: Any) -> Iterator[Any]:
    """A real server on the real model whose forward passes can be held after ``arm(n)`` images."""
    from cifar_serve.server.launch import ServerThread
    from cifar_serve.server.runtime import ModelRuntime

    class HeldRuntime(ModelRuntime):
        def __init__(self) -> None:
            super().__init__(model_dir, backend="torchscript", max_batch_size=32)
            self.hold_after: int | None = None
            self.seen = 0
            self.holding = threading.Event()
            self.release = threading.Event()

        def arm(self, images: int) -> None:
            self.seen, self.hold_after = 0, images
            self.holding.clear()
            self.release.clear()

        def disarm(self) -> None:
            self.hold_after = None
            self.release.set()

        def infer(self, images: np.ndarray) -> np.ndarray:
            if self.hold_after is not None:
                self.seen += len(images)
                if self.seen >= self.hold_after:
                    self.holding.set()
                    assert self.release.wait(300), "the test never released the runtime"
            return super().infer(images)

    runtime = HeldRuntime()
    srv = ServerThread(make_settings(model_dir, workers=1), runtime=runtime).start()
    srv.runtime = runtime
    try:
        yield srv
    finally:
        runtime.disarm()
        srv.stop()


@pytest.mark.parametrize(("kind", "suffix"), [("folder", ".csv"), ("tar", ".jsonl")])
def test_killed_run_resumes_with_every_image_exactly_once(
    kind: str, suffix: str, held_server: Any, corpus: Corpus, offline_logits: np.ndarray, tmp_path: Path
) -> None:
    target = corpus.folder if kind == "folder" else corpus.tar
    args = [str(target), "--server", held_server.address, "--batch-size", "16", "--top-k", "3"]
    whole = tmp_path / f"whole{suffix}"
    proc = _run([*args, "--output", str(whole)])
    assert proc.returncode == EXIT_OK, proc.stderr
    reference = _read_rows(whole)

    # Killed (SIGKILL: no handler runs) while it waits on the request that holds image 1,000.
    out = tmp_path / f"rows{suffix}"
    held_server.runtime.arm(N_IMAGES // 2)
    with (tmp_path / "stderr").open("w") as stderr:
        killed = subprocess.Popen(
            [*_cli(), *args, "--output", str(out)], stdout=subprocess.DEVNULL, stderr=stderr, env=_env()
        )
    try:
        assert held_server.runtime.holding.wait(300), (tmp_path / "stderr").read_text()
    finally:
        killed.kill()
        killed.wait()
        held_server.runtime.disarm()
    before = _read_rows(out)
    assert 0 < len(before) < N_IMAGES
    assert [r["path"] for r in before] == corpus.names[kind][: len(before)]

    proc = _run([*args, "--output", str(out), "--resume"])
    assert proc.returncode == EXIT_OK, proc.stderr
    assert f"{len(before)} of {N_IMAGES} image(s) done, {N_IMAGES - len(before)} to go" in proc.stderr
    rows = _read_rows(out)
    # Every image exactly once, in the order an uninterrupted run writes them, with its rows.
    assert [r["path"] for r in rows] == corpus.names[kind] == [r["path"] for r in reference]
    for row, ref in zip(rows, reference, strict=True):
        want = offline_logits[corpus.index[row["path"]]]
        assert int(row["class_index"]) == int(ref["class_index"]) == int(want.argmax())
        assert row["label"] == ref["label"] == LABELS[int(want.argmax())]
        assert float(row["probability"]) == pytest.approx(float(ref["probability"]), abs=1e-5)
    if suffix == ".csv":
        assert list(rows[0]) == list(reference[0])  # one header, the same columns
    else:
        assert [[p["class_index"] for p in r["predictions"]] for r in rows] == [
            [p["class_index"] for p in r["predictions"]] for r in reference
        ]

    # Resumed once more, there is nothing left to do and FILE is unchanged.
    text = out.read_text()
    proc = _run([*args, "--output", str(out), "--resume"])
    assert proc.returncode == EXIT_OK, proc.stderr
    assert f"{N_IMAGES} of {N_IMAGES} image(s) done, 0 to go" in proc.stderr
    assert out.read_text() == text


def test_half_written_last_row_is_redone(server: Any, corpus: Corpus, tmp_path: Path) -> None:
    files = [str(corpus.folder / f"{j:05d}.jpg") for j in range(40)]
    args = [*files, "--server", server.address, "--logits"]
    whole = tmp_path / "whole.jsonl"
    assert _run([*args, "-o", str(whole)]).returncode == EXIT_OK
    lines = whole.read_text().splitlines(keepends=True)
    out = tmp_path / "rows.jsonl"
    out.write_text("".join(lines[:25]) + lines[25][:40])  # killed in the middle of row 26
    proc = _run([*args, "-o", str(out), "--resume"])
    assert proc.returncode == EXIT_OK, proc.stderr
    assert "25 of 40 image(s) done, 15 to go" in proc.stderr
    assert [r["path"] for r in _read_rows(out)] == files
    assert [r["class_index"] for r in _read_rows(out)] == [r["class_index"] for r in _read_rows(whole)]


def test_output_file_is_never_clobbered_or_mixed(server: Any, corpus: Corpus, tmp_path: Path) -> None:
    files = [str(corpus.folder / f"{j:05d}.jpg") for j in range(5)]
    base = [*files, "--server", server.address]
    out = tmp_path / "rows.csv"
    assert _run([*base, "-o", str(out), "--top-k", "2"]).returncode == EXIT_OK
    text = out.read_text()
    refused = {
        "already holds rows: add --resume": [*base, "-o", str(out), "--top-k", "2"],
        "written with other columns": [*base, "-o", str(out), "--resume"],
        "name it .csv or .jsonl": [*base, "-o", str(tmp_path / "rows.txt")],
        "is written as csv, not --format json": [*base, "-o", str(out), "--format", "json"],
        "--resume continues an --output FILE": [*base, "--resume"],
    }
    for message, args in refused.items():
        proc = _run(args)
        assert proc.returncode == EXIT_USAGE and message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert out.read_text() == text


def test_zip_members_and_files_together(
    server: Any, sample_jpegs: list[tuple[str, bytes]], offline_logits: np.ndarray, tmp_path: Path
) -> None:
    archive = tmp_path / "batch.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(30):
            zf.writestr(f"deep/er/{i:03d}.jpg", sample_jpegs[i][1])
        zf.writestr("deep/broken.png", b"not a PNG")
        zf.writestr("__MACOSX/deep/._000.jpg", b"a resource fork")
        zf.writestr("readme.txt", b"not named like an image: not listed")
    loose = tmp_path / "loose.jpg"
    loose.write_bytes(sample_jpegs[40][1])
    proc = _run([str(archive), str(loose), "--server", server.address, "--format", "jsonl"])
    assert proc.returncode == EXIT_SKIPPED, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    expected = [(f"{archive}/deep/er/{i:03d}.jpg", i) for i in range(30)] + [(str(loose), 40)]
    assert [r["path"] for r in rows] == [name for name, _ in expected]
    for row, (_, i) in zip(rows, expected, strict=True):
        assert row["class_index"] == int(offline_logits[i].argmax())
    assert f"skipped {archive}/deep/broken.png" in proc.stderr
    assert "MACOSX" not in proc.stderr and "readme" not in proc.stderr
    # A damaged archive is reported and skipped, like a missing file.
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"\0" * 100)
    proc = _run([str(bad), str(loose), "--server", server.address])
    assert proc.returncode == EXIT_SKIPPED and f"skipped {bad}: not a readable archive" in proc.stderr
