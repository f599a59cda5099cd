"""cifar-classify end to end: real image files from the CIFAR-10 sample, a real server, parsed output."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cifar_serve.client.cli import EXIT_FAILED, EXIT_OK, EXIT_SKIPPED, EXIT_USAGE, main

ATOL = 1e-4
Jpegs = list[tuple[str, bytes]]
LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("cifar-classify")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "cifar_serve.client.cli"]


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CIFAR_SERVE_")}
    environ.update(env)
    return subprocess.run([*_cli(), *args], capture_output=True, text=True, timeout=120, env=environ)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


class Tree:
    """A folder of real CIFAR-10 test images as files; ``index[path]`` is each file's sample index."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.index: dict[str, int] = {}

    def add(self, rel: str, data: bytes, i: int | None) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if i is not None:
            self.index[str(path)] = i

    def under(self, rel: str, recursive: bool = True) -> dict[str, int]:
        base = self.root / rel if rel else self.root
        return {
            p: i
            for p, i in self.index.items()
            if Path(p).is_relative_to(base) and (recursive or Path(p).parent == base)
        }


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory, sample: Any, sample_jpegs: Jpegs) -> Tree:
    """JPEGs as shipped (they decode to exactly the sample arrays), lossless PNGs, a nested folder,
    and files that must be skipped or ignored."""
    t = Tree(tmp_path_factory.mktemp("images"))

    def png(i: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(sample.images[i]).save(buf, format="PNG")
        return buf.getvalue()

    for i in range(3):
        t.add(f"top_{i}.png", png(100 + i), 100 + i)
    for i in range(40):
        t.add(f"jpg/{i:03d}.jpg", sample_jpegs[i][1], i)
    for i in range(40, 70):
        t.add(f"png/{i:03d}.png", png(i), i)
    for i in range(70, 80):
        t.add(f"nested/deeper/{i:03d}.JPEG", sample_jpegs[i][1], i)
    t.add("broken.jpg", b"this is not a JPEG at all", None)
    t.add("nested/truncated.png", png(90)[:100], None)
    t.add("notes.txt", b"not an image, and not named like one", None)
    return t


def _check_rows(
    rows: list[dict[str, Any]], expected: dict[str, int], offline_logits: np.ndarray, top_k: int, logits: bool
) -> None:
    assert sorted(r["path"] for r in rows) == sorted(expected)
    for row in rows:
        want = offline_logits[expected[row["path"]]]
        order = np.argsort(-want, kind="stable")[:top_k]
        probs = _softmax(want.astype(np.float64))
        assert int(row["class_index"]) == order[0]
        assert row["label"] == LABELS[order[0]]
        assert float(row["probability"]) == pytest.approx(probs[order[0]], abs=1e-4)
        assert [int(p["class_index"]) for p in row["predictions"]] == order.tolist()
        assert [p["label"] for p in row["predictions"]] == [LABELS[c] for c in order]
        if logits:
            np.testing.assert_allclose(np.asarray(row["logits"], np.float32), want, atol=ATOL, rtol=0)


def test_json_recursive_console_script(server: Any, tree: Tree, offline_logits: np.ndarray) -> None:
    proc = _run(
        [
            str(tree.root),
            "--recursive",
            "--format",
            "json",
            "--top-k",
            "3",
            "--logits",
            "--server",
            server.address,
            "--batch-size",
            "32",
        ]
    )
    # Two files could not be decoded: reported, skipped, the rest classified; exit status 1.
    assert proc.returncode == EXIT_SKIPPED, proc.stderr
    rows = json.loads(proc.stdout)
    _check_rows(rows, tree.under(""), offline_logits, top_k=3, logits=True)
    assert len(rows) == 83
    paths = [r["path"] for r in rows]
    assert paths.index(str(tree.root / "jpg" / "000.jpg")) < paths.index(str(tree.root / "jpg" / "001.jpg"))
    assert "broken.jpg" in proc.stderr and "truncated.png" in proc.stderr
    assert "notes.txt" not in proc.stderr and "notes.txt" not in proc.stdout
    assert "Traceback" not in proc.stderr
    assert "img/s" not in proc.stderr  # no progress bar when stderr is not a terminal


def test_shared_memory_and_socket_give_the_same_rows(
    server: Any, tree: Tree, offline_logits: np.ndarray
) -> None:
    """The same folder through /dev/shm (auto picks it on loopback, and on) and the socket (off)."""
    common = [
        str(tree.root),
        "-r",
        "-f",
        "json",
        "-k",
        "3",
        "--logits",
        "-v",
        "-s",
        server.address,
        "-b",
        "16",
    ]
    runs = {mode: _run([*common, *(["--shared-memory", mode] if mode else [])]) for mode in ("", "on", "off")}
    rows = {}
    for mode, proc in runs.items():
        assert proc.returncode == EXIT_SKIPPED, proc.stderr
        rows[mode] = json.loads(proc.stdout)
        _check_rows(rows[mode], tree.under(""), offline_logits, top_k=3, logits=True)
        used = "system shared memory with" in proc.stderr and "through shared memory" in proc.stderr
        assert used == (mode != "off"), proc.stderr
    for a, b in zip(rows["on"], rows["off"], strict=True):
        assert [a[k] for k in ("path", "label", "class_index")] == [
            b[k] for k in ("path", "label", "class_index")
        ]
        assert [p["class_index"] for p in a["predictions"]] == [p["class_index"] for p in b["predictions"]]
        np.testing.assert_allclose(a["logits"], b["logits"], atol=1e-4, rtol=0)
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-5)
    # Told to use it where it cannot be: a usage error, said plainly.
    proc = _run([str(tree.root / "png"), "--shared-memory", "on", "-s", "10.255.255.1:50051"])
    assert proc.returncode == EXIT_USAGE and "needs every server on this host" in proc.stderr


def test_csv_from_environment_address(server: Any, tree: Tree, offline_logits: np.ndarray) -> None:
    args = [str(tree.root / "png"), str(tree.root / "jpg"), "--format", "csv", "--top-k", "2", "--logits"]
    proc = _run(args, CIFAR_SERVE_ADDRESS=server.address)
    assert proc.returncode == EXIT_OK, proc.stderr
    table = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert list(table[0]) == [
        "path",
        "label",
        "class_index",
        "probability",
        "label_2",
        "class_index_2",
        "probability_2",
        *[f"logit_{i}" for i in range(10)],
    ]
    rows = [
        {
            **r,
            "predictions": [
                {"label": r["label"], "class_index": r["class_index"]},
                {"label": r["label_2"], "class_index": r["class_index_2"]},
            ],
            "logits": [float(r[f"logit_{i}"]) for i in range(10)],
        }
        for r in table
    ]
    _check_rows(rows, {**tree.under("png"), **tree.under("jpg")}, offline_logits, top_k=2, logits=True)
    # Arguments in the order given, each folder sorted.
    assert [r["path"] for r in rows] == sorted(tree.under("png")) + sorted(tree.under("jpg"))
    assert proc.stderr == ""


def test_not_recursive_skips_subfolders(
    server: Any, tree: Tree, offline_logits: np.ndarray, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([str(tree.root), "--format", "json", "--server", server.address, "--batch-size", "2"])
    out, err = capsys.readouterr()
    assert code == EXIT_SKIPPED  # broken.jpg sits at the top
    rows = json.loads(out)
    _check_rows(rows, tree.under("", recursive=False), offline_logits, top_k=1, logits=False)
    assert len(rows) == 3 and "logits" not in rows[0]
    assert "broken.jpg" in err and "truncated.png" not in err


def test_table_all_good_exit_0(
    server: Any, tree: Tree, offline_logits: np.ndarray, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tree.root / "nested" / "deeper"
    code = main([str(folder), "--server", server.address, "--top-k", "2"])
    out, err = capsys.readouterr()
    assert code == EXIT_OK, err
    lines = out.splitlines()
    assert lines[0].split() == ["PATH", "LABEL", "PROBABILITY", "TOP-K"]
    assert len(lines) == 11
    for line, (path, i) in zip(lines[1:], sorted(tree.under("nested/deeper").items()), strict=True):
        cells = line.split()
        assert cells[0] == path and cells[1] == LABELS[int(offline_logits[i].argmax())]
        assert 0 < float(cells[2]) <= 1
    assert err == ""


def test_explicit_files_missing_and_corrupt(
    server: Any, tree: Tree, offline_logits: np.ndarray, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tree.root / "jpg" / "005.jpg"
    others = [tree.root / "nope.png", tree.root / "broken.jpg", tree.root / "notes.txt"]
    args = [str(good), *map(str, others), "--format", "json", "--server", server.address]
    code = main(args)
    out, err = capsys.readouterr()
    assert code == EXIT_SKIPPED
    _check_rows(json.loads(out), {str(good): 5}, offline_logits, top_k=1, logits=False)
    for name in ("nope.png", "broken.jpg", "notes.txt"):  # an explicit file is tried whatever its suffix
        assert name in err
    assert "skipped 3" in err


def test_nothing_to_classify(
    server: Any, tree: Tree, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(tmp_path), "--server", server.address]) == EXIT_USAGE  # an empty folder
    assert main([str(tree.root / "broken.jpg"), "--server", server.address]) == EXIT_USAGE  # all skipped
    out, err = capsys.readouterr()
    assert out == "" and "no image files" in err and "nothing could be classified" in err


def test_unreachable_server(tree: Tree) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _run([str(tree.root / "png"), "--server", f"127.0.0.1:{port}", "--timeout", "5", "--retries", "1"])
    assert proc.returncode == EXIT_FAILED
    assert proc.stdout == ""
    assert "UNAVAILABLE" in proc.stderr or "DEADLINE_EXCEEDED" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for args in (
        ["x.png", "--top-k", "0"],
        ["x.png", "--top-k", "11"],
        ["x.png", "--batch-size", "0"],
        ["x.png", "--tls-cert", "c.pem"],
        [],
    ):
        with pytest.raises(SystemExit) as info:
            main(args)
        assert info.value.code == EXIT_USAGE
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    help_text = capsys.readouterr().out
    assert "exit status" in help_text and "CIFAR_SERVE_ADDRESS" in help_text
    for flag in (
        "--recursive",
        "--top-k",
        "--format",
        "--server",
        "--timeout",
        "--batch-size",
        "--tls-ca",
        "--tls-cert",
        "--tls-key",
        "--token",
        "--shared-memory",
    ):
        assert flag in help_text


def test_folder_of_subfolders_suggests_recursive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "cats").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "cats" / "a.png")
    assert main([str(tmp_path), "--server", "127.0.0.1:1"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "no image files to classify" in err and f"{tmp_path} has subfolders: add --recursive" in err
    # Where --recursive is given, or there are no subfolders, there is nothing to suggest.
    (tmp_path / "cats" / "a.png").unlink()
    assert main([str(tmp_path), "--recursive", "--server", "127.0.0.1:1"]) == EXIT_USAGE
    assert "--recursive" not in capsys.readouterr().err


def test_rows_are_written_as_they_arrive_and_kept_on_interrupt(
    server: Any, sample: Any, offline_logits: np.ndarray, tmp_path: Path
) -> None:
    for i in range(600):
        Image.fromarray(sample.images[i]).save(tmp_path / f"{i:03d}.png")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIFAR_SERVE_")}
    args = [str(tmp_path), "--format", "json", "--batch-size", "4", "--server", server.address, "-v"]
    with (tmp_path / "stderr").open("w") as stderr:
        proc = subprocess.Popen([*_cli(), *args], stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    assert proc.stdout is not None
    first = [proc.stdout.readline() for _ in range(3)]  # "[", "  {", '    "path": ...'
    # Rows come out while 150 requests are still to go: interrupt it as Ctrl-C would.
    assert first[0] == "[\n" and str(tmp_path / "000.png") in first[2]
    proc.send_signal(signal.SIGINT)
    rest = proc.stdout.read()  # what the pipe's buffer holds beyond those lines, then the rest
    assert proc.wait(timeout=120) == 130
    err = (tmp_path / "stderr").read_text()
    rows = json.loads("".join(first) + rest)  # the array was closed: valid JSON
    assert 1 <= len(rows) < 600
    assert "interrupted" in err and f"{len(rows)} of 600" in err and "Traceback" not in err
    # It ran through shared memory (the server is on loopback), and left no object behind.
    assert "through shared memory" in err
    assert not list(Path("/dev/shm").glob(f"cifar-serve-client-{proc.pid}-*"))
    assert "leaked" not in err  # the resource tracker found nothing to clean up either
    for row in rows:
        assert row["class_index"] == int(offline_logits[int(Path(row["path"]).stem)].argmax())


def test_token_from_the_servers_variable_or_the_old_one(
    fake_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    srv = fake_server(auth_token="s3cret")
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    args = [str(tmp_path), "--server", srv.address, "--shared-memory", "off"]
    for name in ("CIFAR_SERVE_AUTH_TOKEN", "CIFAR_SERVE_TOKEN"):  # the server's name, the old alias
        with monkeypatch.context() as env:
            env.setenv(name, "s3cret")
            assert main(args) == EXIT_OK, capsys.readouterr().err
    assert main(args) == EXIT_FAILED
    assert "UNAUTHENTICATED" in capsys.readouterr().err


def test_a_file_that_is_no_image_is_said_so_in_the_clients_words(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    assert main([str(notes), "--server", "127.0.0.1:1"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"skipped {notes}: not an image file (12 bytes in none of the formats read: PNG, JPEG" in err
    assert "send" not in err and "raw 32x32" not in err
