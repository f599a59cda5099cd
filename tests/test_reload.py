"""A new model version without downtime: load, check, swap under load; refuse broken ones."""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from cifar_serve.v1 import classifier_pb2 as pb
from cifar_serve.v1 import classifier_pb2_grpc as pb_grpc
from cifar_serve.v1 import open_inference_pb2 as oip
from cifar_serve.v1 import open_inference_pb2_grpc as oip_grpc

MODEL = "cifar10_resnet18"


def _copy(model_dir: Path, dest: Path, version: str) -> Path:
    shutil.copytree(model_dir, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest.get("check_sample"), "artifacts exported before check samples existed: re-export"
    manifest["model"]["version"] = version
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def _load_request(model_dir: Path) -> oip.RepositoryModelLoadRequest:
    req = oip.RepositoryModelLoadRequest(model_name=MODEL)
    req.parameters["model_dir"].string_param = str(model_dir)
    return req


def test_new_version_swapped_in_under_load_and_broken_ones_refused(
    model_dir: Path,
    make_settings: Any,
    sample: Any,
    offline_logits: np.ndarray,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from cifar_serve.server.launch import ServerThread

    v2 = _copy(model_dir, tmp_path / "v2", "2")
    tampered = _copy(model_dir, tmp_path / "tampered", "3")
    with open(tampered / "model.onnx", "r+b") as fh:  # the artifact no longer matches its sha256
        fh.seek(2000)
        byte = fh.read(1)
        fh.seek(2000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    wrong = _copy(model_dir, tmp_path / "wrong", "4")
    manifest = json.loads((wrong / "manifest.json").read_text())
    manifest["check_sample"]["logits"][0][0] += 1.0  # what the exporter saw is not what this runs
    (wrong / "manifest.json").write_text(json.dumps(manifest))

    caplog.set_level(logging.INFO, logger="cifar_serve.server.core")
    x = sample.images[:4]
    request = pb.ClassifyRequest(packed=pb.PackedImages(data=x.tobytes(), count=4), include_logits=True)
    settings = make_settings(
        model_dir,
        max_batch_size=16,
        metrics_port=-1,
        model_control_mode="explicit",
        model_repository=str(tmp_path),
    )
    with ServerThread(settings) as srv:
        channel = grpc.insecure_channel(srv.address)
        stub = pb_grpc.ClassifierStub(channel)
        v2_stub = oip_grpc.GRPCInferenceServiceStub(channel)
        stop = threading.Event()
        seen: list[list[str]] = [[] for _ in range(16)]
        failures: list[str] = []
        wrong_answers: list[int] = []

        def caller(i: int) -> None:
            # A connection each: with --workers N the callers spread over the workers.
            own = grpc.insecure_channel(srv.address, options=[("grpc.use_local_subchannel_pool", 1)])
            try:
                call(i, pb_grpc.ClassifierStub(own))
            finally:
                own.close()

        def call(i: int, stub: Any) -> None:
            while not stop.is_set():
                try:
                    resp = stub.Classify(request, timeout=60)
                except grpc.RpcError as exc:
                    failures.append(f"{exc.code()}: {exc.details()}")
                    continue
                got = np.array([list(r.logits) for r in resp.results], np.float32)
                if not np.allclose(got, offline_logits[:4], atol=1e-4):
                    wrong_answers.append(i)
                seen[i].append(resp.model_version)

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        try:
            time.sleep(1.0)
            for broken, why in ((tampered, "sha256"), (wrong, "check sample")):
                with pytest.raises(grpc.RpcError) as info:
                    v2_stub.RepositoryModelLoad(_load_request(broken), timeout=120)
                assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert why in (info.value.details() or ""), info.value.details()
            v2_stub.RepositoryModelLoad(_load_request(v2), timeout=120)
            time.sleep(1.0)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert not failures, failures[:5]
        assert not wrong_answers
        for versions in seen:
            assert versions, "a caller got no answer"
            changes = sum(1 for a, b in itertools.pairwise(versions) if a != b)
            assert changes <= 1 and versions[-1] == "2", versions  # each caller: 1...1 2...2
        assert any(v == "1" for versions in seen for v in versions)
        if srv.server is not None:  # one process: its log is this test's (with --workers, the model's)
            swaps = [r for r in caplog.records if "now serving version" in r.getMessage()]
            assert len(swaps) == 1 and "version 2" in swaps[0].getMessage(), [r.getMessage() for r in swaps]
        assert v2_stub.ModelMetadata(oip.ModelMetadataRequest(name=MODEL), timeout=10).versions == ["2"]
        index = v2_stub.RepositoryIndex(oip.RepositoryIndexRequest(), timeout=10)
        assert [(m.name, m.version, m.state) for m in index.models] == [(MODEL, "2", "READY")]
        assert srv.metric("cifar_serve_model_version", {"model": MODEL, "version": "2"}) == 1
        assert srv.metric("cifar_serve_model_version", {"model": MODEL, "version": "1"}) == 0

        # Unload: inference is UNAVAILABLE and the model not ready, until it is loaded again.
        v2_stub.RepositoryModelUnload(oip.RepositoryModelUnloadRequest(model_name=MODEL), timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            stub.Classify(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert not v2_stub.ModelReady(oip.ModelReadyRequest(name=MODEL), timeout=10).ready
        v2_stub.RepositoryModelLoad(oip.RepositoryModelLoadRequest(model_name=MODEL), timeout=120)
        assert stub.Classify(request, timeout=30).model_version == "1"  # --model-dir again
        with pytest.raises(grpc.RpcError) as info:
            v2_stub.RepositoryModelLoad(oip.RepositoryModelLoadRequest(model_name="other"), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        channel.close()


def test_sighup_reloads_the_model_dir(
    model_dir: Path, tmp_path: Path, free_port: Any, wait_serving: Any
) -> None:
    served = _copy(model_dir, tmp_path / "served", "1")
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cifar_serve.server",
            "--model-dir",
            str(served),
            "--port",
            str(port),
            "--metrics-port",
            "-1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    address = f"127.0.0.1:{port}"
    try:
        wait_serving(address, proc)
        end = time.monotonic() + 120
        with grpc.insecure_channel(address) as ch:
            manifest = json.loads((served / "manifest.json").read_text())
            manifest["model"]["version"] = "7"
            tmp = served / "manifest.json.new"
            tmp.write_text(json.dumps(manifest))
            os.replace(tmp, served / "manifest.json")
            proc.send_signal(signal.SIGHUP)
            info = pb_grpc.ClassifierStub(ch)
            while info.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).version != "7":
                assert time.monotonic() < end, "SIGHUP did not load the new version"
                time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "now serving version 7" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_readme_sighup_story(tmp_path: Path, free_port: Any) -> None:
    """README's SIGHUP block, copy-paste, on a free port beside this session's other servers:
    export v1, serve it with a pid file, export v2 over it, kill -HUP "$(cat FILE)", see v2."""
    repo = Path(__file__).resolve().parents[1]
    readme = (repo / "README.md").read_text()
    found = re.search(
        r"readme-test: skip \(starts a server of its own;[^)]*\) -->\n```sh\n(.*?)```", readme, re.S
    )
    assert found, "README's SIGHUP block is gone"
    port = free_port()
    body = found[1].replace("50052", str(port))
    # The parity check is tests/test_export.py's business; here it would only add minutes.
    body = re.sub(r"^(cifar-export .*)$", r"\1 --no-parity", body, flags=re.M)
    for name in ("examples", "models"):
        (tmp_path / name).symlink_to(repo / name)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", body],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    # One ready line (with CIFAR_SERVE_WORKERS=2, the supervisor's), naming the pid file's process.
    ready = re.findall(rf"ready on 127\.0\.0\.1:{port} \(pid (\d+)\): serving", log)
    assert len(ready) == 1, log
    assert "SIGHUP: loading" in log and "now serving version 2" in log and "(was version 1" in log, log
    assert '"version": "2"' in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["examples", "models"]  # nothing left here


def test_export_version_is_a_positive_integer(capsys: pytest.CaptureFixture[str]) -> None:
    from cifar_serve.export.cli import build_parser

    assert build_parser().parse_args(["--version", "02"]).version == "2"
    assert build_parser().parse_args([]).version == "1"
    for bad in ("0", "v2", "-1", "1.5"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--version", bad])
    assert "must be a positive integer" in capsys.readouterr().err
