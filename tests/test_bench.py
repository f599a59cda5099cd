"""The load generator, the echo server and the benchmark scripts (never their timings)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "benchmarks"


def _script(name: str) -> ModuleType:
    """Import a script from benchmarks/ by path (it is not part of the package)."""
    sys.path.insert(0, str(BENCH_DIR))
    try:
        spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH_DIR / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH_DIR))


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cifar_serve.client.bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _check_counts(result: dict[str, Any], requests: int, batch: int) -> None:
    assert result["verified"] is True, result["notes"]
    assert result["errors"] == {} and result["error_count"] == 0
    assert result["mode"] == "requests"
    assert result["requests"] == requests
    assert result["images"] == requests * batch
    lat = result["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert result["images_per_s"] > 0 and result["requests_per_s"] > 0
    assert result["window_s"] > 0


# --------------------------------------------------------------------------- payloads


def test_bench_does_not_import_torch() -> None:
    code = (
        "import sys, cifar_serve.client.bench as b; b.load_images(); "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_payloads_hold_real_images_in_both_apis(sample) -> None:  # type: ignore[no-untyped-def]
    from cifar_serve.client.bench import build_payloads, load_images
    from cifar_serve.v1 import classifier_pb2, open_inference_pb2

    images, labels = load_images()
    assert images.shape == (600, 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images, sample.images) and np.array_equal(labels, sample.labels)
    native = build_payloads("native", images, labels, 64)
    assert len(native) == 9  # 600 // 64 requests of exactly 64 images
    req = classifier_pb2.ClassifyRequest.FromString(native[1].body)
    assert req.packed.count == 64 and req.packed.data == images[64:128].tobytes()
    assert np.array_equal(native[1].labels, labels[64:128])
    v2 = build_payloads("v2", images[:5], labels[:5], 8, model_name="m")  # fewer images than a batch: repeat
    assert len(v2) == 1
    inf = open_inference_pb2.ModelInferRequest.FromString(v2[0].body)
    assert inf.model_name == "m" and list(inf.inputs[0].shape) == [8, 32, 32, 3]
    assert inf.inputs[0].datatype == "UINT8" and len(inf.raw_input_contents[0]) == 8 * 3072


# --------------------------------------------------------------------------- against the real server


@pytest.mark.parametrize("api", ["native", "v2"])
def test_cli_requests_json_against_real_server(server, api: str) -> None:  # type: ignore[no-untyped-def]
    proc = _cli(
        "--server",
        server.address,
        "--api",
        api,
        "--requests",
        "24",
        "--concurrency",
        "4",
        "--batch-size",
        "3",
        "--warmup",
        "0",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    _check_counts(result, 24, 3)
    assert result["api"] == api and result["concurrency"] == 4 and result["batch_size"] == 3


def test_every_answer_checked_matches_offline_accuracy(server, sample, offline_logits) -> None:  # type: ignore[no-untyped-def]
    from cifar_serve.client.bench import BenchConfig, run_bench

    # One worker walks the 200 three-image payloads in order: every sample image exactly once.
    r = run_bench(
        BenchConfig(address=server.address, requests=200, batch_size=3, concurrency=1, warmup=0, verify="all")
    )
    assert r.requests == 200 and r.error_count == 0
    expected = float((offline_logits.argmax(1) == sample.labels).mean())
    assert r.accuracy is not None and abs(r.accuracy - expected) <= 1 / 600


@pytest.mark.parametrize("mode", ["on", "off"])
def test_shared_memory_answers_as_the_socket(server, sample, offline_logits, mode: str) -> None:  # type: ignore[no-untyped-def]
    from cifar_serve.client.bench import BenchConfig, run_bench

    # Every answer read back (from the region, or the socket) and checked against the labels:
    # the same accuracy as offline, so the same top-1 for every one of the 600 images.
    before = set(Path("/dev/shm").glob("cifar-serve-client-*"))
    r = run_bench(
        BenchConfig(
            address=server.address,
            api="v2",
            requests=10,
            batch_size=60,
            concurrency=2,
            warmup=0,
            verify="all",
            shared_memory=mode,
        )
    )
    assert r.shared_memory is (mode == "on") and r.requests == 10 and r.error_count == 0 and r.verified
    expected = float((offline_logits.argmax(1) == sample.labels).mean())
    assert r.accuracy is not None and abs(r.accuracy - expected) <= 1 / 600
    assert set(Path("/dev/shm").glob("cifar-serve-client-*")) <= before  # regions removed


def test_cli_shared_memory_auto_on_loopback(server) -> None:  # type: ignore[no-untyped-def]
    proc = _cli("--server", server.address, "--api", "v2", "-n", "4", "-b", "8", "-w", "0", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    _check_counts(result, 4, 8)
    assert result["shared_memory"] is True  # auto: the server is on loopback and took the region
    proc = _cli("--server", server.address, "-n", "2", "-w", "0", "--shared-memory", "on")
    assert proc.returncode == 2 and "--api v2" in proc.stderr  # the native API has no shared memory
    proc = _cli("--server", "10.255.255.1:50051", "--api", "v2", "-n", "2", "--shared-memory", "on")
    assert proc.returncode == 2 and "on this host" in proc.stderr


def test_shm_bench_measures_both_transports(server) -> None:  # type: ignore[no-untyped-def]
    shm_bench = _script("shm_bench")
    rows = shm_bench.measure(server.address, [8], rounds=1, requests=2, concurrency=1)
    assert [(r["transport"], r["shared_memory"], r["requests"]) for r in rows] == [
        ("gRPC, socket", False, 2),
        ("gRPC, shared memory", True, 2),
    ]
    assert rows[1]["throughput_ratio"] > 0 and rows[1]["p50_ratio"] > 0
    assert "| 8 | gRPC, shared memory | 2 |" in shm_bench.markdown(rows)


def test_duration_mode_and_multiple_processes(server) -> None:  # type: ignore[no-untyped-def]
    proc = _cli(
        "--server",
        server.address,
        "--duration",
        "1",
        "--warmup",
        "0.3",
        "--concurrency",
        "4",
        "--processes",
        "2",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["mode"] == "duration" and result["processes"] == 2 and result["window_s"] == 1
    assert result["requests"] > 0 and result["error_count"] == 0 and result["verified"]


def test_errors_are_counted_by_status_code(model_dir, make_settings) -> None:  # type: ignore[no-untyped-def]
    from cifar_serve.client.bench import BenchConfig, run_bench
    from cifar_serve.server.launch import ServerThread

    # A queue that holds one 4-image request: concurrent callers beyond it are turned away.
    settings = make_settings(
        model_dir,
        metrics_port=-1,
        max_batch_size=4,
        max_queue_images=4,
        max_images_per_request=4,
        max_batch_delay_ms=20.0,
    )
    with ServerThread(settings) as srv:
        r = run_bench(BenchConfig(address=srv.address, requests=64, batch_size=4, concurrency=32, warmup=0))
    assert set(r.errors) <= {"RESOURCE_EXHAUSTED"}
    assert r.error_count > 0
    assert r.requests + r.error_count == 64  # every measured request is either answered or counted


def test_cli_reports_a_server_that_refuses_the_first_call(server) -> None:  # type: ignore[no-untyped-def]
    proc = _cli("--server", server.address, "--api", "v2", "--model-name", "no-such-model", "--requests", "2")
    assert proc.returncode == 2
    assert "cannot run against" in proc.stderr and "no-such-model" in proc.stderr


def test_cli_rejects_bad_options() -> None:
    proc = _cli("--concurrency", "0", "--requests", "1")
    assert proc.returncode == 2 and "at least 1" in proc.stderr


# --------------------------------------------------------------------------- echo server


@pytest.fixture(scope="module")
def echo_address() -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, str(BENCH_DIR / "echo_server.py"), "--port", "0"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("listening on "), line
        yield line.removeprefix("listening on ")
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.parametrize("api", ["native", "v2"])
def test_generator_against_echo_server(echo_address: str, api: str) -> None:
    proc = _cli(
        "--server",
        echo_address,
        "--api",
        api,
        "--requests",
        "50",
        "--concurrency",
        "8",
        "--batch-size",
        "5",
        "--warmup",
        "0",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    _check_counts(json.loads(proc.stdout), 50, 5)


def test_echo_answers_have_the_request_shape() -> None:
    from cifar_serve.client.bench import build_payloads, predicted_classes

    echo = _script("echo_server")
    answers = echo.EchoAnswers()
    images = np.zeros((7, 32, 32, 3), np.uint8)
    for api, fn in (("native", answers.native), ("v2", answers.v2)):
        body = build_payloads(api, images, None, 7)[0].body
        assert predicted_classes(api, fn(body), 7).shape == (7,)
        assert fn(body) is fn(body)  # built once per image count


# --------------------------------------------------------------------------- the benchmark scripts


def test_run_benchmark_quick_writes_its_outputs(tmp_path: Path, model_dir: Path) -> None:
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\nHand-written notes stay.\n")
    cmd = [
        sys.executable,
        str(BENCH_DIR / "run_benchmark.py"),
        "--quick",
        "--model-dir",
        str(model_dir),
        "--out-dir",
        str(tmp_path),
        "--markdown",
        str(md),
        "--concurrency",
        "1,2",
        "--batch-sizes",
        "1,4",
        "--max-batch-size",
        "4",
        "--duration",
        "0.5",
        "--warmup",
        "0.2",
        "--raw-seconds",
        "0.3",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["quick"] is True and results["raw"]["batch"] == 4
    served = results["served"]
    assert len(served) == 2 * 2 + 2  # batched: 2 sizes x 2 concurrencies; unbatched: 1 size x 2
    assert {r["server"] for r in served} == {"batched", "unbatched"}
    assert all(r["errors"] == {} and r["requests"] > 0 for r in served)
    assert {"saturation", "batching", "latency_overhead_ms"} <= set(results["ratios"])
    assert [e["batch_size"] for e in results["echo"]] == [1, 4]
    text = md.read_text()
    assert "Hand-written notes stay." in text and "| batched | 4 | 2 |" in text
    assert text.count("<!-- BEGIN generated:serving") == 1
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "serving.png").stat().st_size > 1000


def test_null_model_quick_measures_every_worker_count(tmp_path: Path, null_model_dir: Path) -> None:
    """benchmarks/null_model.py's plumbing with the project's load generator (perf_analyzer's
    shared libraries may be absent here): real servers over the null model, one per worker count."""
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\nHand-written notes stay.\n")
    cmd = [sys.executable, str(BENCH_DIR / "null_model.py"), "--quick", "--load-generator", "cifar-bench"]
    cmd += ["--model-dir", str(null_model_dir), "--out-dir", str(tmp_path), "--markdown", str(md)]
    cmd += ["--workers", "1,2", "--concurrency", "4,128", "--duration", "0.5", "--warmup", "0.2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "null_model-quick.json").read_text())
    assert results["load_generator"] == "cifar-bench"
    assert Path(results["model_dir"]).resolve() == null_model_dir.resolve()
    points = results["points"]
    assert [(p["workers"], p["concurrency"], p["streaming"]) for p in points] == [
        (1, 4, False),
        (1, 128, False),
        (2, 4, False),
        (2, 128, False),
    ]
    for p in points:
        # The server's own statistics: every image it batched was one request's (1-image requests).
        assert p["errors"] == {} and p["requests"] > 0 and p["images"] == p["requests"]
        # Batches ran every answered image, and perhaps some of a call cancelled after it was batched.
        batched = sum(int(size) * n for size, n in p["batches"].items())
        assert p["images"] <= batched <= p["images"] + p["failed"]
        assert p["server_cpu_ms_per_request"] > 0 and p["images_per_s"] > 0
        assert p["server_cpu_ms_per_request"] == pytest.approx(1000 * p["server_cpu_s"] / p["requests"])
    cpu = [p["server_cpu_ms_per_request"] for p in points]
    ratios = {"4": pytest.approx(cpu[2] / cpu[0]), "128": pytest.approx(cpu[3] / cpu[1])}
    assert results["workers_ratio"] == {"2": ratios}
    assert [g["value"] for g in results["goals"]] == [cpu[1], ratios["128"]]
    text = md.read_text()
    assert "Hand-written notes stay." in text and text.count("<!-- BEGIN generated:null-model ") == 1
    assert "| 2 | unary | 1 | 128 |" in text and "incomplete" not in text


def test_markdown_section_is_replaced_not_appended(tmp_path: Path) -> None:
    rb = _script("run_benchmark")
    md = tmp_path / "B.md"
    md.write_text("# B\n\nintro\n")
    rb.update_markdown(md, "first", "serving")
    rb.update_markdown(md, "other", "runtimes")
    rb.update_markdown(md, "second", "serving")
    text = md.read_text()
    assert "intro" in text and "second" in text and "other" in text and "first" not in text
    assert text.index("second") < text.index("other")  # replaced in place


def test_two_processes_splits_the_workers_cost_into_cores_and_hop() -> None:
    """The ratios come from each setup's median over the rounds (an even count: the middle two)."""
    tp = _script("two_processes")
    cpu = {"one process": [0.40, 0.36], "--workers 2": [0.60, 0.62, 0.58], "two replicas": [0.50, 0.54]}
    points = [
        {"setup": setup, "round": i + 1, "server_cpu_ms_per_request": v}
        for setup, values in cpu.items()
        for i, v in enumerate(values)
    ]
    s = tp.summary(points)
    assert s["median_ms"] == pytest.approx({"one process": 0.38, "--workers 2": 0.60, "two replicas": 0.52})
    assert s["workers_over_one"] == pytest.approx(0.60 / 0.38)
    assert s["workers_over_replicas"] == pytest.approx(0.60 / 0.52)


def test_runtimes_quick_compares_against_fp32(tmp_path: Path, model_dir: Path) -> None:
    out = tmp_path / "runtimes.json"
    cmd = [
        sys.executable,
        str(BENCH_DIR / "runtimes.py"),
        "--quick",
        "--model-dir",
        str(model_dir),
        "--variants",
        "ts_fp32,ort_fp32",
        "--batch-sizes",
        "1,2",
        "--warm-sizes",
        "2",
        "--seconds",
        "0.05",
        "--out",
        str(out),
        "--markdown",
        str(tmp_path / "B.md"),
        "--data",
        str(REPO / "tests" / "fixtures" / "cifar10-test-sample.zip"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    ort = results["variants"]["ort_fp32"]
    assert set(ort["by_threads"]["1"]["batch"]) == {"1", "2"}
    assert ort["agreement"]["top1_agreement"] == 1.0 and ort["agreement"]["max_abs_logit_diff"] < 1e-3
    assert results["variants"]["ts_fp32"]["agreement"]["max_abs_logit_diff"] == 0.0
    assert results["recommendation"]["fp32"]["variant"] in ("ts_fp32", "ort_fp32")
    assert "<!-- BEGIN generated:runtimes" in (tmp_path / "B.md").read_text()


def test_gpu_check_cpu_path(tmp_path: Path, model_dir: Path) -> None:
    gc = _script("gpu_check")
    rc = gc.main(["--device", "cpu", "--model-dir", str(model_dir), "--out", str(tmp_path), "--no-serve"])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 0 and report["ok"], report
    assert [c["check"].split()[0] for c in report["checks"]] == ["cpu", "runtime"]


def test_gpu_check_reexports_an_unreadable_artifact(tmp_path: Path, model_dir: Path) -> None:
    gc = _script("gpu_check")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text((model_dir / "manifest.json").read_text())
    (broken / "model.torchscript.pt").write_bytes(b"not a zip")
    fixed = gc.ensure_model_dir(broken, REPO / "models" / "resnet18_cifar10.pt", tmp_path / "scratch")
    assert fixed == tmp_path / "scratch"
    from cifar_serve.server.runtime import ModelRuntime

    rt = ModelRuntime(fixed, device="cpu", max_batch_size=2)
    assert rt.infer(np.zeros((2, 32, 32, 3), np.uint8)).shape == (2, 10)


def test_gpu_check_retraces_a_missing_null_model(tmp_path: Path, null_model_dir: Path) -> None:
    """Without onnx (the GPU machine may lack it) the null model is re-traced TorchScript-only,
    with a manifest the server accepts, check sample included."""
    gc = _script("gpu_check")
    fixed = gc.ensure_model_dir(tmp_path / "absent", None, tmp_path / "scratch")
    assert fixed == tmp_path / "scratch"
    from cifar_serve.server.core import check_sample
    from cifar_serve.server.runtime import ModelRuntime

    rt = ModelRuntime(fixed, device="cpu", max_batch_size=8)
    assert (rt.manifest.name, rt.manifest.raw["model"]["arch"]) == ("cifar10_null", "null")
    assert "match the manifest's logits" in check_sample(rt, 8)
    # The same model as cifar-export --null-model writes.
    exported = ModelRuntime(null_model_dir, device="cpu", backend="torchscript", max_batch_size=8)
    x = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(rt.infer(x), exported.infer(x), atol=1e-5, rtol=0)


def test_address_is_a_deprecated_alias_of_server(server) -> None:  # type: ignore[no-untyped-def]
    proc = _cli("--address", server.address, "--requests", "4", "--warmup", "0", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["address"] == server.address
    assert "--address is deprecated, use --server" in proc.stderr
    both = _cli("--address", server.address, "--server", server.address, "--requests", "4")
    assert both.returncode == 2 and "give one of them" in both.stderr
