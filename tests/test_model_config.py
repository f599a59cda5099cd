"""Triton's model-configuration and statistics extensions, read by Triton's own client.

A server of its own (batches of 8), so the statistics hold exactly the requests this module sends.
tritonclient runs in a subprocess (tests/triton_stats_check.py), as in tests/test_oip.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from cifar_serve.server.stats import BatchTimes, ModelStats, RequestTimes
from cifar_serve.v1 import classifier_pb2, classifier_pb2_grpc
from cifar_serve.v1 import open_inference_pb2 as pb
from cifar_serve.v1 import open_inference_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]
CHECK = REPO / "tests" / "triton_stats_check.py"
TIMEOUT_S = 60
BATCH = 8
DELAY_MS = 5.0


@pytest.fixture(scope="module")
def stats_server(model_dir: Path, make_settings: Any) -> Iterator[Any]:
    from cifar_serve.server.launch import ServerThread

    with ServerThread(make_settings(model_dir, max_batch_size=BATCH, max_batch_delay_ms=DELAY_MS)) as srv:
        yield srv


@pytest.fixture(scope="module")
def report(
    stats_server: Any, sample: Any, tmp_path_factory: pytest.TempPathFactory, served_model: Any
) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("stats") / "images.npy"
    np.save(path, np.ascontiguousarray(sample.images[:64]))
    model = served_model(stats_server)[0]
    proc = subprocess.run(
        [sys.executable, str(CHECK), stats_server.address, model, str(path)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def _stats(entry: dict[str, Any]) -> dict[str, Any]:
    (model,) = entry["model_stats"]
    return dict(model)


def _n(d: dict[str, Any], *keys: str) -> int:
    """An integer from tritonclient's JSON (uint64 comes as a string; zero fields are left out)."""
    for k in keys:
        d = d.get(k, {}) if isinstance(d, dict) else {}
    return int(d) if not isinstance(d, dict) else 0


def test_triton_client_reads_the_config(report: dict[str, Any], stats_server: Any, served_model: Any) -> None:
    c = report["config"]["config"]
    assert c["name"] == served_model(stats_server)[0]
    assert c["platform"] in ("pytorch_libtorch", "onnxruntime_onnx")
    assert c["backend"] == {"pytorch_libtorch": "pytorch", "onnxruntime_onnx": "onnxruntime"}[c["platform"]]
    assert c["max_batch_size"] == stats_server.settings.max_images_per_request
    # Dims leave out the batch dimension, as Triton's do when max_batch_size > 0.
    assert c["input"] == [
        {"name": "images", "data_type": "TYPE_UINT8", "format": "FORMAT_NHWC", "dims": ["32", "32", "3"]}
    ]
    assert c["output"] == [{"name": "logits", "data_type": "TYPE_FP32", "dims": ["10"]}]
    batching = c["dynamic_batching"]
    assert batching["preferred_batch_size"] == [BATCH]
    assert int(batching["max_queue_delay_microseconds"]) == int(DELAY_MS * 1000)
    (group,) = c["instance_group"]
    assert group["kind"] == "KIND_CPU" and group["count"] == (stats_server.settings.max_inflight_batches or 1)
    extensions = report["server_metadata"]["extensions"]
    assert {"classification", "model_configuration", "statistics"} <= set(extensions)
    assert report["unknown_model_config"] == "StatusCode.NOT_FOUND"


def test_statistics_count_what_was_sent(report: dict[str, Any]) -> None:
    before, after = _stats(report["stats_before"]), _stats(report["stats_after"])
    requests: list[int] = report["requests"]
    # Nothing ran before the client's requests: warm-up runs the model directly, not through the queue.
    assert _n(before, "inference_count") == 0 and _n(before, "execution_count") == 0
    assert _n(after, "inference_count") == sum(requests)
    s = after["inference_stats"]
    assert _n(s, "success", "count") == len(requests)
    assert _n(s, "success", "ns") > 0
    # The malformed request was rejected before the model, so it is no failed inference.
    assert report["bad_request"] == "StatusCode.INVALID_ARGUMENT"
    assert _n(s, "fail", "count") == 0
    for phase in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert _n(s, phase, "count") == len(requests), phase
    assert _n(s, "compute_infer", "ns") > 0
    # Every image ran in exactly one forward pass, none larger than the batch limit.
    batches = {_n(b, "batch_size"): _n(b, "compute_infer", "count") for b in after["batch_stats"]}
    assert max(batches) <= BATCH
    assert sum(size * count for size, count in batches.items()) == sum(requests)
    assert sum(batches.values()) == _n(after, "execution_count")
    assert _n(after, "execution_count") >= -(-sum(requests) // BATCH)
    assert abs(_n(after, "last_inference") - time.time() * 1000) < 600_000
    assert _stats(report["stats_all"])["name"] == after["name"]
    assert report["unknown_model"] == "StatusCode.NOT_FOUND"


def test_native_requests_count_too(
    report: dict[str, Any], stats_server: Any, sample: Any, served_model: Any
) -> None:
    """Statistics belong to the model, not the API: a native Classify counts as well."""
    with grpc.insecure_channel(stats_server.address) as ch:
        oip = pb_grpc.GRPCInferenceServiceStub(ch)
        name = served_model(stats_server)[0]
        first = oip.ModelStatistics(pb.ModelStatisticsRequest(name=name), timeout=TIMEOUT_S).model_stats[0]
        x = np.ascontiguousarray(sample.images[100:103])
        classifier_pb2_grpc.ClassifierStub(ch).Classify(
            classifier_pb2.ClassifyRequest(packed=classifier_pb2.PackedImages(data=x.tobytes(), count=3)),
            timeout=TIMEOUT_S,
        )
        then = oip.ModelStatistics(pb.ModelStatisticsRequest(name=name), timeout=TIMEOUT_S).model_stats[0]
        assert then.inference_count == first.inference_count + 3
        assert then.inference_stats.success.count == first.inference_stats.success.count + 1
        with pytest.raises(grpc.RpcError) as err:
            oip.ModelStatistics(pb.ModelStatisticsRequest(version="1"), timeout=TIMEOUT_S)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "version" in (err.value.details() or "")


def test_statistics_per_model_version(
    model_dir: Path, make_settings: Any, sample: Any, tmp_path: Path, served_model: Any
) -> None:
    """After a new version is loaded, each version keeps its own counts; a version can be asked for."""
    import shutil

    from cifar_serve.server.launch import ServerThread

    v2 = tmp_path / "v2"
    shutil.copytree(model_dir, v2)
    manifest = json.loads((v2 / "manifest.json").read_text())
    old_version, manifest["model"]["version"] = manifest["model"]["version"], "2"
    (v2 / "manifest.json").write_text(json.dumps(manifest))
    x = np.ascontiguousarray(sample.images[:3])

    def infer(oip: Any, name: str, n: int) -> None:
        tensor = pb.ModelInferRequest.InferInputTensor(name="images", datatype="UINT8", shape=[n, 32, 32, 3])
        oip.ModelInfer(
            pb.ModelInferRequest(model_name=name, inputs=[tensor], raw_input_contents=[x[:n].tobytes()]),
            timeout=TIMEOUT_S,
        )

    with (
        ServerThread(
            make_settings(
                model_dir, max_batch_size=4, model_control_mode="explicit", model_repository=str(tmp_path)
            )
        ) as srv,
        grpc.insecure_channel(srv.address) as ch,
    ):
        oip = pb_grpc.GRPCInferenceServiceStub(ch)
        name = served_model(srv)[0]
        infer(oip, name, 1)
        infer(oip, name, 2)
        load = pb.ModelRepositoryParameter(string_param=str(v2))
        oip.RepositoryModelLoad(
            pb.RepositoryModelLoadRequest(model_name=name, parameters={"model_dir": load}), timeout=TIMEOUT_S
        )
        infer(oip, name, 3)
        every = oip.ModelStatistics(pb.ModelStatisticsRequest(name=name), timeout=TIMEOUT_S).model_stats
        counts = {s.version: (s.inference_stats.success.count, s.inference_count) for s in every}
        assert counts == {old_version: (2, 3), "2": (1, 3)}
        (only,) = oip.ModelStatistics(
            pb.ModelStatisticsRequest(name=name, version="2"), timeout=TIMEOUT_S
        ).model_stats
        assert (only.version, only.inference_count) == ("2", 3)
        with pytest.raises(grpc.RpcError) as err:
            oip.ModelStatistics(pb.ModelStatisticsRequest(name=name, version="9"), timeout=TIMEOUT_S)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_model_stats_accumulator() -> None:
    stats = ModelStats()
    times = RequestTimes(queue_ns=5)
    phases = BatchTimes(1, 20, 3)
    stats.batch_ran(4, phases)
    stats.batch_ran(4, phases)
    stats.batch_ran(1, BatchTimes(2, 7, 1))
    times.charge(phases)
    stats.request_succeeded(4, 100, times)
    stats.request_failed(30)
    snap = stats.snapshot()
    assert (snap.inference_count, snap.execution_count) == (4, 3)
    assert (snap.success.count, snap.success.ns, snap.fail.count, snap.fail.ns) == (1, 100, 1, 30)
    phases_ns = (snap.queue.ns, snap.compute_input.ns, snap.compute_infer.ns, snap.compute_output.ns)
    assert phases_ns == (5, 1, 20, 3)
    assert list(snap.batches) == [1, 4]
    assert [(d.count, d.ns) for d in snap.batches[4]] == [(2, 2), (2, 40), (2, 6)]
    # A snapshot is a copy: later recording leaves it alone.
    stats.batch_ran(4, phases)
    assert snap.batches[4][1].count == 2


def test_model_info_shows_the_measured_runtime_table(stats_server: Any, sample: Any) -> None:
    """backend auto on the CPU: both runtimes timed at every bucket, each bucket served by its faster."""
    with grpc.insecure_channel(stats_server.address) as ch:
        info = classifier_pb2_grpc.ClassifierStub(ch).GetModelInfo(
            classifier_pb2.GetModelInfoRequest(), timeout=TIMEOUT_S
        )
    assert info.backend == "auto"
    table = {b.batch_size: b for b in info.runtime_table}
    assert sorted(table) == [1, 2, 4, 8]  # powers of two up to the server's batch of 8
    for bucket in table.values():
        ms = dict(bucket.ms_per_batch)
        assert set(ms) == {"torchscript", "onnxruntime"}
        assert all(v > 0 for v in ms.values())
        assert bucket.runtime == min(ms, key=ms.__getitem__)
    if stats_server.server is None:
        return  # --workers: the runtime is in the model process; the table above is what it reported
    runtime = stats_server.server.core.runtime
    for size, bucket in table.items():
        assert runtime.route(size) == bucket.runtime
    # A batch between buckets goes to the next bucket's winner.
    assert runtime.route(3) == table[4].runtime and runtime.route(5) == table[8].runtime
    # Whichever runtime serves, the answers are the model's.
    x = np.ascontiguousarray(sample.images[:8])
    np.testing.assert_allclose(runtime.infer(x[:1]), runtime.infer(x)[:1], atol=1e-4, rtol=0)


def test_runtime_routes_given_by_another_measurement(
    model_dir: Path, sample: Any, offline_logits: np.ndarray
) -> None:
    """The benchmark's model-alone step routes as the server's warm-up decided."""
    from cifar_serve.server.runtime import ModelRuntime

    rt = ModelRuntime(model_dir, backend="auto", max_batch_size=16)
    assert rt.buckets == [1, 2, 4, 8, 16]
    rt.use_routes({2: "onnxruntime", 8: "torchscript"})
    assert [rt.route(n) for n in (1, 2, 3, 8, 9, 16)] == ["onnxruntime"] * 2 + ["torchscript"] * 4
    for n in (2, 9):  # one batch on each runtime: the model's answers either way
        np.testing.assert_allclose(rt.infer(sample.images[:n]), offline_logits[:n], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="tensorrt"):
        rt.use_routes({1: "tensorrt"})


# ---------------------------------------------------------------------------- benchmarks/perf_analyzer.py


def _perf_script() -> Any:
    import importlib.util

    bench_dir = REPO / "benchmarks"
    sys.path.insert(0, str(bench_dir))
    try:
        spec = importlib.util.spec_from_file_location("_bench_perf_analyzer", bench_dir / "perf_analyzer.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(bench_dir))


def test_perf_analyzer_model_share_interpolates_between_measured_sizes() -> None:
    pa = _perf_script()
    cpu = {1: 1.0, 2: 1.5, 4: 2.0, 8: 4.0}
    assert pa.model_cpu_ms(cpu, 4) == 2.0
    assert pa.model_cpu_ms(cpu, 3) == pytest.approx(1.75)
    assert pa.model_cpu_ms(cpu, 6) == pytest.approx(3.0)
    assert pa.model_cpu_ms(cpu, 16) == pytest.approx(8.0)  # beyond the largest: per image as there


def test_perf_analyzer_counts_the_cpu_of_child_processes() -> None:
    """Server CPU covers every process under the server's (the multi-process front end's workers)."""
    pa = _perf_script()
    burn = "import time\nwhile time.process_time() < 0.3: pass\nprint('done', flush=True)\ntime.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", burn], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "done"
        own = time.process_time()
        assert pa.process_tree_cpu_s(os.getpid()) >= own + 0.25
        assert pa.process_tree_cpu_s(child.pid) >= 0.25
    finally:
        child.kill()
        child.wait()


def test_perf_analyzer_csv_and_goals(tmp_path: Path) -> None:
    pa = _perf_script()
    path = tmp_path / "c32.csv"
    # perf_analyzer's -f layout: latencies in microseconds.
    path.write_text(
        "Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,"
        "Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,"
        "p50 latency,p90 latency,p95 latency,p99 latency\n"
        "32,812.5,8,1778,45,1,4924,51,4,4749,16079,16749,20686\n"
    )
    row = pa.parse_csv(path)
    assert row["Inferences/Second"] == 812.5 and row["p99 latency"] == 20686
    point = {"server_cpu_ms_per_request": 0.9, "overhead_cpu_ms_per_request": 0.3, "batch": 1}
    results = {
        "model": {"raw": {64: {"images_per_s": 4000.0}}},
        "points": [
            {**point, "concurrency": 1, "images_per_s": 500.0},
            {**point, "concurrency": 8, "images_per_s": 450.0},
            {**point, "concurrency": 32, "images_per_s": 800.0},
            {**point, "concurrency": 4, "batch": 64, "images_per_s": 3800.0},
        ],
    }
    met = {g["what"]: g["met"] for g in pa.goals(results)}
    assert met == {
        "server CPU per 1-image request, c=32": True,
        "of which above the model's own CPU, c=32": False,
        "throughput non-decreasing c=1 -> 8 -> 32 -> 128": False,
        "64-image requests / raw model at batch 64": True,
    }


@pytest.mark.in_process
def test_platform_names_the_runtime_that_serves_most_batch_sizes(server: Any) -> None:
    """--backend auto: the warm-up's runtime table routes each batch size; metadata follows it."""
    from collections import Counter

    import grpc

    from cifar_serve.v1 import open_inference_pb2 as oip_pb
    from cifar_serve.v1 import open_inference_pb2_grpc as oip_grpc

    assert server.settings.backend == "auto"
    table = server.server.core.runtime.describe()["runtime_table"]
    counts = Counter(row["runtime"] for row in table)
    most = max(counts, key=lambda name: (counts[name], name == "torchscript"))
    expected = {"torchscript": "pytorch_libtorch", "onnxruntime": "onnxruntime_onnx"}[most]
    with grpc.insecure_channel(server.address) as ch:
        stub = oip_grpc.GRPCInferenceServiceStub(ch)
        meta = stub.ModelMetadata(oip_pb.ModelMetadataRequest(name=server.server.core.model_name), timeout=30)
        config = stub.ModelConfig(oip_pb.ModelConfigRequest(name=server.server.core.model_name), timeout=30)
    assert meta.platform == expected == config.config.platform
