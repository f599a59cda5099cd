"""System shared memory (Triton's extension) over gRPC and REST: real server, real regions, real images.

Regions are POSIX shared memory objects: files under /dev/shm, made here directly (as shm_open
does) for the bad-region cases, and by tritonclient.utils.shared_memory in a subprocess
(tests/http_client_check.py) for the end-to-end check with Triton's clients.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from cifar_serve.server.errors import AlreadyExists, InvalidInput, NotFound
from cifar_serve.server.shm import SharedMemoryRegistry
from cifar_serve.v1 import open_inference_pb2 as pb
from cifar_serve.v1 import open_inference_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]
CLIENT_CHECK = REPO / "tests" / "http_client_check.py"
SHM = Path("/dev/shm")
TIMEOUT_S = 60
IMAGE_BYTES = 32 * 32 * 3
INVALID = grpc.StatusCode.INVALID_ARGUMENT

pytestmark = pytest.mark.skipif(not SHM.is_dir(), reason="system shared memory needs /dev/shm (Linux)")

MakeRegion = Callable[..., tuple[str, Path]]


@pytest.fixture
def make_region() -> Iterator[MakeRegion]:
    """``make_region(size, data=b"")``: a fresh shared memory object; returns (key, path)."""
    made: list[Path] = []

    def make(size: int, data: bytes = b"") -> tuple[str, Path]:
        name = f"cifar-serve-test-{uuid.uuid4().hex[:12]}"
        path = SHM / name
        with open(path, "wb") as f:
            f.write(data)
            f.truncate(size)
        made.append(path)
        return "/" + name, path

    yield make
    for path in made:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- the registry itself


def test_registry_reads_and_writes_inside_the_registered_window(make_region: MakeRegion) -> None:
    key, path = make_region(100, bytes(range(100)))
    reg = SharedMemoryRegistry()
    reg.register("r", key, offset=10, byte_size=50)
    assert [(s.name, s.key, s.offset, s.byte_size) for s in reg.status()] == [("r", key, 10, 50)]
    assert reg.read("r", 5, 10, "in") == bytes(range(15, 25))  # offsets count from the region's start
    reg.write("r", 0, 4, b"abcd", "out")
    assert path.read_bytes()[8:16] == bytes([8, 9]) + b"abcd" + bytes([14, 15])
    with pytest.raises(InvalidInput, match="needs 5"):
        reg.write("r", 0, 4, b"abcde", "out")
    reg.unregister("r")
    assert reg.status() == [] and len(reg) == 0


def test_registry_refuses_bad_registrations(make_region: MakeRegion, tmp_path: Path) -> None:
    reg = SharedMemoryRegistry()
    key, _ = make_region(64)
    cases: list[tuple[Callable[[], None], type[Exception], str]] = [
        (
            lambda: reg.register("a", "/cifar-serve-test-missing", 0, 8),
            InvalidInput,
            "no shared memory object",
        ),
        (lambda: reg.register("a", key, 0, 65), InvalidInput, "holds 64 bytes, too small"),
        (lambda: reg.register("a", key, 60, 8), InvalidInput, "too small for offset 60"),
        (lambda: reg.register("a", key, 0, 0), InvalidInput, "byte_size >= 1"),
        (lambda: reg.register("a", "/../etc/passwd", 0, 8), InvalidInput, "not a POSIX shared memory name"),
        (lambda: reg.register("a", "", 0, 8), InvalidInput, "not a POSIX shared memory name"),
        (lambda: reg.register("", key, 0, 8), InvalidInput, "needs a name"),
        (lambda: reg.status("nothing"), NotFound, "'nothing' is not registered"),
    ]
    for call, kind, fragment in cases:
        with pytest.raises(kind, match=fragment):
            call()
    # A symbolic link in /dev/shm is not followed (it could point anywhere).
    target = tmp_path / "secret"
    target.write_bytes(b"x" * 64)
    link = SHM / f"cifar-serve-test-link-{uuid.uuid4().hex[:8]}"
    link.symlink_to(target)
    try:
        with pytest.raises(InvalidInput, match="symbolic link"):
            reg.register("a", "/" + link.name, 0, 8)
    finally:
        link.unlink()
    reg.register("a", key, 0, 64)
    with pytest.raises(AlreadyExists, match="already registered"):
        reg.register("a", key, 0, 64)
    reg.unregister("never-registered")  # as Triton: not an error
    reg.unregister()
    assert len(reg) == 0


def test_registry_checks_every_bound_and_a_region_that_changed(make_region: MakeRegion) -> None:
    reg = SharedMemoryRegistry()
    key, path = make_region(64)
    reg.register("r", key, 0, 64)
    for args, fragment in [
        (("nothing", 0, 8), "'nothing' is not registered"),
        (("r", 64, 1), "offset 64 is past the end"),
        (("r", 60, 8), "runs past the end"),
        (("r", 2**62, 2**62), "past the end"),
        (("r", -1, 8), "must be >= 0"),
    ]:
        with pytest.raises(InvalidInput, match=fragment):
            reg.read(*args, what="input 'images'")
    os.truncate(path, 32)  # the owner shrank its object: reading the old span would fault
    with pytest.raises(InvalidInput, match="shrank below the registered 64 bytes"):
        reg.read("r", 0, 64, "input 'images'")
    path.unlink()  # the owner removed it
    with pytest.raises(InvalidInput, match="is gone"):
        reg.read("r", 0, 8, "input 'images'")
    path.write_bytes(b"\0" * 64)  # and made a new one under the same key
    with pytest.raises(InvalidInput, match="now names another object"):
        reg.read("r", 0, 8, "input 'images'")
    reg.close()


# ---------------------------------------------------------------------------- over gRPC


@pytest.fixture(scope="module")
def oip(channel: grpc.Channel) -> Any:
    return pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def model(server: Any, served_model: Any) -> str:
    name: str = served_model(server)[0]
    return name


def _param(**kw: Any) -> pb.InferParameter:
    return pb.InferParameter(**kw)


def shm_request(
    model: str,
    n: int,
    region: str,
    byte_size: int | None = None,
    offset: int = 0,
    output: tuple[str, int, int] | None = None,
    **extra: pb.InferParameter,
) -> pb.ModelInferRequest:
    params = {
        "shared_memory_region": _param(string_param=region),
        "shared_memory_byte_size": _param(int64_param=n * IMAGE_BYTES if byte_size is None else byte_size),
        **extra,
    }
    if offset:
        params["shared_memory_offset"] = _param(int64_param=offset)
    req = pb.ModelInferRequest(
        model_name=model,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="images", datatype="UINT8", shape=[n, 32, 32, 3], parameters=params
            )
        ],
    )
    if output is not None:
        name, size, off = output
        out_params = {
            "shared_memory_region": _param(string_param=name),
            "shared_memory_byte_size": _param(int64_param=size),
        }
        if off:
            out_params["shared_memory_offset"] = _param(int64_param=off)
        req.outputs.add(name="logits", parameters=out_params)
    return req


def _register(oip: Any, name: str, key: str, size: int, offset: int = 0) -> None:
    oip.SystemSharedMemoryRegister(
        pb.SystemSharedMemoryRegisterRequest(name=name, key=key, offset=offset, byte_size=size),
        timeout=TIMEOUT_S,
    )


def test_grpc_reads_inputs_and_writes_outputs_at_offsets(
    oip: Any, model: str, sample: Any, offline_logits: np.ndarray, make_region: MakeRegion
) -> None:
    x = np.ascontiguousarray(sample.images[:5])
    # The images sit 3 bytes into a region that itself starts 7 bytes into the object.
    key_in, _ = make_region(7 + 3 + x.nbytes, b"\xff" * 10 + x.tobytes())
    key_out, out_path = make_region(200 + 5 * 40 + 8)
    _register(oip, "t_in", key_in, 3 + x.nbytes, offset=7)
    _register(oip, "t_out", key_out, 8 + 5 * 40, offset=200)
    try:
        status = oip.SystemSharedMemoryStatus(
            pb.SystemSharedMemoryStatusRequest(name="t_in"), timeout=TIMEOUT_S
        )
        assert (status.regions["t_in"].key, status.regions["t_in"].offset) == (key_in, 7)
        resp = oip.ModelInfer(
            shm_request(model, 5, "t_in", offset=3, output=("t_out", 5 * 40, 8)), timeout=TIMEOUT_S
        )
        out = resp.outputs[0]
        assert (out.name, out.datatype, list(out.shape)) == ("logits", "FP32", [5, 10])
        assert not out.HasField("contents")
        written = np.frombuffer(out_path.read_bytes()[208:408], "<f4").reshape(5, 10)
        np.testing.assert_allclose(written, offline_logits[:5], atol=1e-4, rtol=0)
        # Shared memory input, answer through the socket (raw, as Triton answers it).
        resp = oip.ModelInfer(shm_request(model, 5, "t_in", offset=3), timeout=TIMEOUT_S)
        got = np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(5, 10)
        np.testing.assert_allclose(got, offline_logits[:5], atol=1e-4, rtol=0)
    finally:
        oip.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(), timeout=TIMEOUT_S)
    assert not oip.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), timeout=TIMEOUT_S).regions


def test_grpc_bad_regions_are_invalid_argument_and_the_server_carries_on(
    oip: Any, model: str, sample: Any, offline_logits: np.ndarray, make_region: MakeRegion
) -> None:
    x = np.ascontiguousarray(sample.images[:2])
    key, path = make_region(x.nbytes, x.tobytes())
    key_out, _ = make_region(80)
    _register(oip, "b_in", key, x.nbytes)
    _register(oip, "b_out", key_out, 80)

    def expect(req: pb.ModelInferRequest, fragment: str, then_good: bool = True) -> None:
        with pytest.raises(grpc.RpcError) as err:
            oip.ModelInfer(req, timeout=TIMEOUT_S)
        assert err.value.code() == INVALID, err.value.details()
        assert fragment in (err.value.details() or ""), err.value.details()
        if then_good:  # the region itself still serves
            good = oip.ModelInfer(shm_request(model, 2, "b_in"), timeout=TIMEOUT_S)
            got = np.frombuffer(good.raw_output_contents[0], "<f4").reshape(2, 10)
            np.testing.assert_allclose(got, offline_logits[:2], atol=1e-4, rtol=0)

    try:
        expect(shm_request(model, 2, "nothing"), "region 'nothing' is not registered")
        expect(shm_request(model, 2, "b_in", offset=x.nbytes), f"offset {x.nbytes} is past the end")
        expect(shm_request(model, 2, "b_in", offset=8), "runs past the end of region 'b_in'")
        expect(shm_request(model, 2, "b_in", byte_size=100), "shared_memory_byte_size is 100")
        expect(shm_request(model, 1, "b_in", offset=2**40), "past the end")
        expect(shm_request(model, 2, "b_in", output=("b_out", 40, 0)), "need 80 bytes")
        expect(shm_request(model, 2, "b_in", output=("b_out", 80, 8)), "runs past the end of region 'b_out'")
        expect(
            shm_request(model, 2, "b_in", output=("nothing", 80, 0)), "output 'logits': shared memory region"
        )
        cls = shm_request(model, 2, "b_in", output=("b_out", 80, 0))
        cls.outputs[0].parameters["classification"].int64_param = 2
        expect(cls, "cannot hold a classification output")
        both = shm_request(model, 2, "b_in")
        both.raw_input_contents.append(x.tobytes())
        expect(both, "both in shared memory and in the request")
        no_size = shm_request(model, 2, "b_in")
        del no_size.inputs[0].parameters["shared_memory_byte_size"]
        expect(no_size, "needs shared_memory_byte_size")
        with pytest.raises(grpc.RpcError) as err:
            _register(oip, "b_in", key, 8)
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        for key_, size, fragment in [
            (key, x.nbytes + 1, "too small"),
            ("/nope-" + uuid.uuid4().hex, 8, "no shared"),
            ("/../../etc/passwd", 8, "not a POSIX"),
        ]:
            with pytest.raises(grpc.RpcError) as err:
                _register(oip, "c", key_, size)
            assert err.value.code() == INVALID and fragment in (err.value.details() or "")
        with pytest.raises(grpc.RpcError) as err:
            oip.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(name="c"), timeout=TIMEOUT_S)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        os.truncate(path, 100)  # the client shrank its region after registering it
        expect(shm_request(model, 2, "b_in"), "shrank below", then_good=False)
        path.unlink()  # ... and then removed it
        expect(shm_request(model, 2, "b_in"), "is gone", then_good=False)
    finally:
        oip.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(), timeout=TIMEOUT_S)
    # The server still answers over the socket.
    req = pb.ModelInferRequest(
        model_name=model,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="images", datatype="UINT8", shape=[2, 32, 32, 3])],
        raw_input_contents=[x.tobytes()],
    )
    got = np.frombuffer(oip.ModelInfer(req, timeout=TIMEOUT_S).raw_output_contents[0], "<f4").reshape(2, 10)
    np.testing.assert_allclose(got, offline_logits[:2], atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------- over REST


def _post(url: str, body: Any) -> tuple[int, Any]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_rest_registers_infers_and_refuses_bad_regions(
    server: Any, model: str, sample: Any, offline_logits: np.ndarray, make_region: MakeRegion
) -> None:
    base = f"http://{server.http_address}/v2"
    x = np.ascontiguousarray(sample.images[:3])
    key, _ = make_region(x.nbytes, x.tobytes())
    key_out, out_path = make_region(120)
    assert _post(
        f"{base}/systemsharedmemory/region/r_in/register", {"key": key, "offset": 0, "byte_size": x.nbytes}
    ) == (200, {})
    assert (
        _post(f"{base}/systemsharedmemory/region/r_out/register", {"key": key_out, "byte_size": 120})[0]
        == 200
    )
    try:
        with urllib.request.urlopen(f"{base}/systemsharedmemory/status", timeout=TIMEOUT_S) as resp:
            listed = {r["name"]: r for r in json.loads(resp.read())}
        assert listed["r_in"] == {"name": "r_in", "key": key, "offset": 0, "byte_size": x.nbytes}

        def infer(region: str, size: int, offset: int = 0, out: str = "r_out") -> tuple[int, Any]:
            params = {"shared_memory_region": region, "shared_memory_byte_size": size}
            if offset:
                params["shared_memory_offset"] = offset
            return _post(
                f"{base}/models/{model}/infer",
                {
                    "inputs": [
                        {"name": "images", "datatype": "UINT8", "shape": [3, 32, 32, 3], "parameters": params}
                    ],
                    "outputs": [
                        {
                            "name": "logits",
                            "parameters": {"shared_memory_region": out, "shared_memory_byte_size": 120},
                        }
                    ],
                },
            )

        status, doc = infer("r_in", x.nbytes)
        assert status == 200, doc
        assert doc["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [3, 10]}]
        written = np.frombuffer(out_path.read_bytes(), "<f4").reshape(3, 10)
        np.testing.assert_allclose(written, offline_logits[:3], atol=1e-4, rtol=0)
        for args, fragment in [
            (("nothing", x.nbytes), "not registered"),
            (("r_in", x.nbytes, x.nbytes), "past the end"),
            (("r_in", x.nbytes, 1), "runs past the end"),
            (("r_in", 10), "shared_memory_byte_size is 10"),
            (("r_in", x.nbytes, 0, "nothing"), "output 'logits'"),
        ]:
            status, doc = infer(*args)  # type: ignore[arg-type]
            assert status == 400 and fragment in doc["error"], doc
        status, doc = _post(f"{base}/systemsharedmemory/region/r_in/register", {"key": key, "byte_size": 8})
        assert status == 409 and "already registered" in doc["error"]
        status, doc = _post(
            f"{base}/systemsharedmemory/region/z/register", {"key": key, "byte_size": x.nbytes + 1}
        )
        assert status == 400 and "too small" in doc["error"]
        status, doc = _post(f"{base}/systemsharedmemory/region/z/register", {"byte_size": 8})
        assert status == 400 and "'key'" in doc["error"]
        try:
            urllib.request.urlopen(f"{base}/systemsharedmemory/region/z/status", timeout=TIMEOUT_S)
            raise AssertionError("status of an unknown region answered 200")
        except urllib.error.HTTPError as exc:
            assert exc.code == 404
    finally:
        assert _post(f"{base}/systemsharedmemory/unregister", {})[0] == 200
    with urllib.request.urlopen(f"{base}/systemsharedmemory/status", timeout=TIMEOUT_S) as resp:
        assert json.loads(resp.read()) == []


# ---------------------------------------------------------------------------- Triton's own clients


@pytest.fixture(scope="module")
def triton_shm_report(server: Any, model: str, sample: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = tmp_path_factory.mktemp("shm") / "images.npy"
    np.save(path, np.ascontiguousarray(sample.images[:256]))
    proc = subprocess.run(
        [sys.executable, str(CLIENT_CHECK), "shm", server.http_address, server.address, model, str(path)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("api", ["grpc", "http"])
def test_triton_client_256_images_through_shared_memory(
    triton_shm_report: Any, api: str, oip: Any, model: str, sample: Any, offline_logits: np.ndarray
) -> None:
    r = triton_shm_report[api]
    assert [s["name"] for s in r["status"]] == [f"{api}_in", f"{api}_out"]
    assert r["output_meta"] == {"datatype": "FP32", "shape": [256, 10]}
    shm_logits = np.array(r["logits"], np.float32)
    # The same images over the socket.
    x = np.ascontiguousarray(sample.images[:256])
    req = pb.ModelInferRequest(
        model_name=model,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="images", datatype="UINT8", shape=list(x.shape))],
        raw_input_contents=[x.tobytes()],
    )
    socket = np.frombuffer(oip.ModelInfer(req, timeout=TIMEOUT_S).raw_output_contents[0], "<f4").reshape(
        256, 10
    )
    np.testing.assert_allclose(shm_logits, socket, atol=1e-4, rtol=0)
    assert (shm_logits.argmax(1) == socket.argmax(1)).all()
    np.testing.assert_allclose(shm_logits, offline_logits[:256], atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.array(r["socket_logits"]), offline_logits[:256], atol=1e-4, rtol=0)
    assert "'never_registered' is not registered" in r["unregistered"]["message"]
    assert r["unregistered"]["status"] in ("400", "StatusCode.INVALID_ARGUMENT")
    assert r["status_after"] == 0
