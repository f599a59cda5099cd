"""Transport benchmark: the same v2 inference over gRPC, REST (binary and JSON) and shared memory.

    .venv/bin/python benchmarks/transport_bench.py                       # 64 and 256 images
    .venv/bin/python benchmarks/transport_bench.py --sizes 64 --requests 5   # a quick look

One ``python -m cifar_serve.server`` process (gRPC, REST, metrics off), one client process (this
one), requests one at a time so each figure is the latency of a whole request, server compute
included. The transports alternate request by request (round robin), so a noisy neighbour on a
shared machine slows all of them alike instead of one. Per size it prints median and p90
latency and images/s, and the per-request cost of each stack with a model-free call (liveness).

Shared memory: the client writes the images into a POSIX shared memory object once per request
(as a real client would) and reads the logits from another; only region names travel over the
socket.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import mmap
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from cifar_serve.v1 import open_inference_pb2 as pb
from cifar_serve.v1 import open_inference_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]
MODEL = "cifar10_resnet18"
SHM = Path("/dev/shm")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server(model_dir: str) -> Iterator[tuple[str, str]]:
    """The server with its default batching (64 images a batch: a 256-image request runs as four)."""
    grpc_port, http_port = _free_port(), _free_port()
    cmd = [
        sys.executable,
        "-m",
        "cifar_serve.server",
        "--port",
        str(grpc_port),
        "--http-port",
        str(http_port),
        "--metrics-port",
        "-1",
        "--model-dir",
        model_dir,
        "--log-level",
        "WARNING",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO)
    try:
        address = f"127.0.0.1:{grpc_port}"
        with grpc.insecure_channel(address) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            deadline = time.monotonic() + 600
            while True:
                try:
                    if stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready:
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("server did not become ready")
                time.sleep(0.2)
        yield address, f"127.0.0.1:{http_port}"
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Region:
    """A POSIX shared memory object of ``size`` bytes, mapped in this (client) process."""

    def __init__(self, size: int) -> None:
        self.key = f"/cifar-bench-{uuid.uuid4().hex[:10]}"
        self.path = SHM / self.key[1:]
        with open(self.path, "wb") as f:
            f.truncate(size)
        self._file = open(self.path, "r+b")  # closed in close()
        self.map = mmap.mmap(self._file.fileno(), size)

    def close(self) -> None:
        self.map.close()
        self._file.close()
        self.path.unlink(missing_ok=True)


def _p(**kw: Any) -> pb.InferParameter:
    return pb.InferParameter(**kw)


class Transports:
    def __init__(self, grpc_address: str, http_address: str, n: int) -> None:
        self.n = n
        self.channel = grpc.insecure_channel(grpc_address, options=[("grpc.max_receive_message_length", -1)])
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        host, port = http_address.rsplit(":", 1)
        self.http = http.client.HTTPConnection(host, int(port), timeout=120)
        self.in_bytes, self.out_bytes = n * 3072, n * 40
        self.regions = {"in": Region(self.in_bytes), "out": Region(self.out_bytes)}
        for name, region in self.regions.items():
            size = self.in_bytes if name == "in" else self.out_bytes
            self.stub.SystemSharedMemoryRegister(
                pb.SystemSharedMemoryRegisterRequest(
                    name=f"bench_{name}_{n}", key=region.key, byte_size=size
                ),
                timeout=60,
            )

    def close(self) -> None:
        self.stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(), timeout=60)
        for region in self.regions.values():
            region.close()
        self.http.close()
        self.channel.close()

    def _post(self, body: bytes, headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
        try:
            self.http.request("POST", f"/v2/models/{MODEL}/infer", body=body, headers=headers)
            resp = self.http.getresponse()
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
            self.http.close()  # the server closed an idle keep-alive connection: reconnect once
            self.http.request("POST", f"/v2/models/{MODEL}/infer", body=body, headers=headers)
            resp = self.http.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {data[:300]!r}")
        return data, {k.lower(): v for k, v in resp.getheaders()}

    def grpc_raw(self, x: np.ndarray) -> np.ndarray:
        req = pb.ModelInferRequest(
            model_name=MODEL,
            inputs=[
                pb.ModelInferRequest.InferInputTensor(name="images", datatype="UINT8", shape=list(x.shape))
            ],
            raw_input_contents=[x.tobytes()],
        )
        resp = self.stub.ModelInfer(req, timeout=120)
        return np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(len(x), 10)

    def rest_binary(self, x: np.ndarray) -> np.ndarray:
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": "images",
                        "datatype": "UINT8",
                        "shape": list(x.shape),
                        "parameters": {"binary_data_size": x.nbytes},
                    }
                ],
                "parameters": {"binary_data_output": True},
            }
        ).encode()
        data, headers = self._post(
            header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))}
        )
        split = int(headers["inference-header-content-length"])
        return np.frombuffer(data[split:], "<f4").reshape(len(x), 10)

    def rest_json(self, x: np.ndarray) -> np.ndarray:
        body = json.dumps(
            {
                "inputs": [
                    {
                        "name": "images",
                        "datatype": "UINT8",
                        "shape": list(x.shape),
                        "data": x.ravel().tolist(),
                    }
                ]
            }
        ).encode()
        data, _ = self._post(body, {"Content-Type": "application/json"})
        return np.array(json.loads(data)["outputs"][0]["data"], np.float32).reshape(len(x), 10)

    def _write_input(self, x: np.ndarray) -> None:
        self.regions["in"].map[: x.nbytes] = x.tobytes()

    def _read_output(self, n: int) -> np.ndarray:
        return np.frombuffer(self.regions["out"].map[: n * 40], "<f4").reshape(n, 10).copy()

    def _shm_params(self, which: str, size: int) -> dict[str, pb.InferParameter]:
        return {
            "shared_memory_region": _p(string_param=f"bench_{which}_{self.n}"),
            "shared_memory_byte_size": _p(int64_param=size),
        }

    def grpc_shm(self, x: np.ndarray) -> np.ndarray:
        self._write_input(x)
        req = pb.ModelInferRequest(model_name=MODEL)
        req.inputs.add(
            name="images", datatype="UINT8", shape=list(x.shape), parameters=self._shm_params("in", x.nbytes)
        )
        req.outputs.add(name="logits", parameters=self._shm_params("out", len(x) * 40))
        self.stub.ModelInfer(req, timeout=120)
        return self._read_output(len(x))

    def rest_shm(self, x: np.ndarray) -> np.ndarray:
        self._write_input(x)
        doc = {
            "inputs": [
                {
                    "name": "images",
                    "datatype": "UINT8",
                    "shape": list(x.shape),
                    "parameters": {
                        "shared_memory_region": f"bench_in_{self.n}",
                        "shared_memory_byte_size": x.nbytes,
                    },
                }
            ],
            "outputs": [
                {
                    "name": "logits",
                    "parameters": {
                        "shared_memory_region": f"bench_out_{self.n}",
                        "shared_memory_byte_size": len(x) * 40,
                    },
                }
            ],
        }
        self._post(json.dumps(doc).encode(), {"Content-Type": "application/json"})
        return self._read_output(len(x))

    def grpc_live(self, x: np.ndarray) -> np.ndarray:
        self.stub.ServerLive(pb.ServerLiveRequest(), timeout=60)
        return np.empty(0)

    def rest_live(self, x: np.ndarray) -> np.ndarray:
        self.http.request("GET", "/v2/health/live")
        self.http.getresponse().read()
        return np.empty(0)


def measure(
    calls: dict[str, Callable[[np.ndarray], np.ndarray]],
    x: np.ndarray,
    requests: int,
    reference: np.ndarray | None,
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in calls}
    for name, fn in calls.items():  # warm-up, and every transport answers the same logits
        got = fn(x)
        if reference is not None and got.size:
            np.testing.assert_allclose(got, reference, atol=1e-3, rtol=0, err_msg=name)
    for _ in range(requests):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn(x)
            times[name].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", default=str(REPO / "artifacts"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--requests", type=int, default=20, help="timed requests per transport and size")
    ap.add_argument("--overhead-requests", type=int, default=300, help="timed liveness calls per API")
    ap.add_argument("--json", type=Path, help="also write the raw figures here")
    args = ap.parse_args(argv)

    from cifar_serve.export.data import load_split

    sample = load_split(REPO / "tests" / "fixtures" / "cifar10-test-sample.zip", "test")
    results: dict[str, Any] = {"sizes": {}, "overhead_ms": {}}
    with server(args.model_dir) as (grpc_address, http_address):
        for n in args.sizes:
            x = np.ascontiguousarray(sample.images[np.arange(n) % len(sample.images)])
            t = Transports(grpc_address, http_address, n)
            try:
                reference = t.grpc_raw(x)
                calls = {
                    "gRPC raw": t.grpc_raw,
                    "gRPC shm": t.grpc_shm,
                    "REST binary": t.rest_binary,
                    "REST shm": t.rest_shm,
                    "REST JSON": t.rest_json,
                }
                times = measure(calls, x, args.requests, reference)
                if n == args.sizes[0]:
                    live = measure(
                        {"gRPC": t.grpc_live, "REST": t.rest_live}, x, args.overhead_requests, None
                    )
                    results["overhead_ms"] = {k: statistics.median(v) * 1e3 for k, v in live.items()}
            finally:
                t.close()
            results["sizes"][n] = {
                k: {
                    "median_ms": statistics.median(v) * 1e3,
                    "p90_ms": float(np.percentile(v, 90)) * 1e3,
                    "images_per_s": n / statistics.median(v),
                }
                for k, v in times.items()
            }
    sys.stdout.write(f"{'images':>6}  {'transport':<12} {'median ms':>10} {'p90 ms':>8} {'images/s':>9}\n")
    for n, rows in results["sizes"].items():
        base = rows["gRPC raw"]["median_ms"]
        for k, r in rows.items():
            sys.stdout.write(
                f"{n:>6}  {k:<12} {r['median_ms']:>10.1f} {r['p90_ms']:>8.1f} "
                f"{r['images_per_s']:>9.0f}  ({r['median_ms'] - base:+.1f} ms vs gRPC raw)\n"
            )
    sys.stdout.write(
        "model-free call (liveness), median ms: "
        + ", ".join(f"{k} {v:.3f}" for k, v in results["overhead_ms"].items())
        + "\n"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
