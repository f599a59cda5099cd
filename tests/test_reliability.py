"""Bad input, size limits, fuzzing, overload, shutdown, tampered artifacts, TLS and auth."""

from __future__ import annotations

import concurrent.futures as cf
import datetime as dt
import io
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cifar_serve.v1 import classifier_pb2 as pb
from cifar_serve.v1 import classifier_pb2_grpc as pb_grpc

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height``: a decompression bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def _code(fn, *args, **kw) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    try:
        fn(*args, **kw)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def _good(stub: pb_grpc.ClassifierStub, sample) -> None:  # type: ignore[no-untyped-def]
    r = stub.Classify(pb.ClassifyRequest(images=[pb.Image(raw_rgb=sample.images[0].tobytes())]), timeout=30)
    assert len(r.results) == 1


BAD_REQUESTS = {
    "empty request": (pb.ClassifyRequest(), "no images"),
    "zero packed images": (pb.ClassifyRequest(packed=pb.PackedImages(count=0, data=b"")), "no images"),
    "empty image": (pb.ClassifyRequest(images=[pb.Image()]), "images[0]"),
    "raw wrong length": (pb.ClassifyRequest(images=[pb.Image(raw_rgb=b"\0" * 3071)]), "3072"),
    "packed wrong length": (pb.ClassifyRequest(packed=pb.PackedImages(count=2, data=b"\0" * 3072)), "6144"),
    "undecodable": (
        pb.ClassifyRequest(images=[pb.Image(encoded=b"this is not an image")]),
        "not a decodable",
    ),
    "both images and packed": (
        pb.ClassifyRequest(
            images=[pb.Image(raw_rgb=b"\0" * 3072)], packed=pb.PackedImages(count=1, data=b"\0" * 3072)
        ),
        "not both",
    ),
    "top_k 0": (pb.ClassifyRequest(images=[pb.Image(raw_rgb=b"\0" * 3072)], top_k=0), "top_k"),
    "top_k 11": (pb.ClassifyRequest(images=[pb.Image(raw_rgb=b"\0" * 3072)], top_k=11), "top_k"),
    "decompression bomb": (
        pb.ClassifyRequest(images=[pb.Image(encoded=_png_declaring(100_000, 100_000))]),
        "over the limit",
    ),
    "declared size over our limit": (
        pb.ClassifyRequest(images=[pb.Image(encoded=_png_declaring(5000, 5000))]),
        "5000x5000 = 25000000 pixels, over the limit",
    ),
    "too many images": (
        pb.ClassifyRequest(packed=pb.PackedImages(count=1025, data=b"\0" * 3072 * 1025)),
        "limit of 1024",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_gets_invalid_argument_and_server_carries_on(case, channel, sample) -> None:  # type: ignore[no-untyped-def]
    request, words = BAD_REQUESTS[case]
    stub = pb_grpc.ClassifierStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.Classify(request, timeout=30)
    assert err.value.code() == INVALID, err.value.details()
    assert words in err.value.details()
    _good(stub, sample)


def test_truncated_jpeg(channel, sample) -> None:  # type: ignore[no-untyped-def]
    data = _jpeg(sample.images[3])
    stub = pb_grpc.ClassifierStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.Classify(pb.ClassifyRequest(images=[pb.Image(encoded=data[: len(data) // 2])]), timeout=30)
    assert err.value.code() == INVALID and "images[0]" in err.value.details()
    _good(stub, sample)


def test_unknown_method_and_garbage_bytes(channel, sample) -> None:  # type: ignore[no-untyped-def]
    garbage = channel.unary_unary("/cifar_serve.v1.Classifier/Classify")
    code = _code(garbage, b"\xff\xff\xff\xff\x0f", timeout=10)
    assert code == INVALID
    assert (
        _code(channel.unary_unary("/cifar_serve.v1.Classifier/Nope"), b"", timeout=10)
        == grpc.StatusCode.UNIMPLEMENTED
    )
    _good(pb_grpc.ClassifierStub(channel), sample)


image_msgs = st.one_of(
    st.builds(lambda b: pb.Image(encoded=b), st.binary(max_size=300)),
    st.builds(lambda b: pb.Image(raw_rgb=b), st.binary(max_size=3100)),
    st.just(pb.Image()),
)
requests = st.builds(
    lambda imgs, count, data, k, logits, use_packed: pb.ClassifyRequest(
        images=imgs,
        top_k=k,
        include_logits=logits,
        **({"packed": pb.PackedImages(count=count, data=data)} if use_packed else {}),
    ),
    st.lists(image_msgs, max_size=4),
    st.integers(0, 5),
    st.binary(max_size=3100),
    st.integers(0, 12),
    st.booleans(),
    st.booleans(),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(req=requests)
def test_fuzz_well_formed_but_wrong_messages(req, channel) -> None:  # type: ignore[no-untyped-def]
    code = _code(pb_grpc.ClassifierStub(channel).Classify, req, timeout=20)
    assert code in (grpc.StatusCode.OK, INVALID)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400))
def test_fuzz_random_bytes(data, channel) -> None:  # type: ignore[no-untyped-def]
    code = _code(channel.unary_unary("/cifar_serve.v1.Classifier/Classify"), data, timeout=20)
    assert code in (grpc.StatusCode.OK, INVALID)


@pytest.fixture(scope="module")
def small_server(model_dir, make_settings):  # type: ignore[no-untyped-def]
    from cifar_serve.server.launch import ServerThread

    s = make_settings(
        model_dir,
        max_receive_message_bytes=64 * 1024,
        max_queue_images=64,
        max_images_per_request=64,
        max_batch_size=8,
        max_batch_delay_ms=0.0,
        metrics_port=-1,
    )
    with ServerThread(s) as srv:
        yield srv


def test_message_over_receive_limit(small_server, sample) -> None:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(small_server.address) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        x = sample.images[:30]  # 92 KB > 64 KB
        code = _code(
            stub.Classify, pb.ClassifyRequest(packed=pb.PackedImages(data=x.tobytes(), count=30)), timeout=30
        )
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        _good(stub, sample)


def test_overload_refused_with_resource_exhausted(small_server, sample, offline_logits) -> None:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(small_server.address) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        x = sample.images[:16]
        req = pb.ClassifyRequest(packed=pb.PackedImages(data=x.tobytes(), count=16), include_logits=True)

        def call(_: int) -> tuple[grpc.StatusCode, pb.ClassifyResponse | None]:
            try:
                return grpc.StatusCode.OK, stub.Classify(req, timeout=60)
            except grpc.RpcError as exc:
                return exc.code(), None

        with cf.ThreadPoolExecutor(48) as pool:
            results = list(pool.map(call, range(96)))
        codes = [c for c, _ in results]
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) > 0, "a 64-image queue must overflow"
        for _c, r in results:
            if r is not None:
                got = np.array([list(x.logits) for x in r.results])
                np.testing.assert_allclose(got, offline_logits[:16], atol=1e-4)
        _good(stub, sample)


# --------------------------------------------------------------------------- real processes


def _serve_cmd(model_dir: Path, port: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cifar_serve.server",
        "--port",
        str(port),
        "--metrics-port",
        "-1",
        "--model-dir",
        str(model_dir),
        "--max-batch-size",
        "16",
        *extra,
    ]


def test_sigterm_under_load_loses_no_accepted_request(
    model_dir, sample, offline_logits, free_port, wait_serving
) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    address = f"127.0.0.1:{port}"
    proc = subprocess.Popen(
        _serve_cmd(model_dir, port, "--grace-period-s", "20", "--max-batch-delay-ms", "5"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_serving(address, proc)
        ch = grpc.insecure_channel(address)
        stub = pb_grpc.ClassifierStub(ch)
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        x = sample.images[:8]
        req = pb.ClassifyRequest(packed=pb.PackedImages(data=x.tobytes(), count=8), include_logits=True)
        outcomes: list[grpc.StatusCode] = []
        wrong = []
        stop_at = time.monotonic() + 3.0

        def client() -> None:
            while time.monotonic() < stop_at:
                try:
                    r = stub.Classify(req, timeout=30)
                    got = np.array([list(c.logits) for c in r.results])
                    if not np.allclose(got, offline_logits[:8], atol=1e-4):
                        wrong.append(got)
                    outcomes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    outcomes.append(exc.code())

        with cf.ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(client) for _ in range(12)]
            time.sleep(1.0)
            sent_signal = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            for f in futures:
                f.result()
        rc = proc.wait(timeout=30)
        exit_time = time.monotonic() - sent_signal
        stderr = proc.communicate()[1]
        assert rc == 0, stderr
        assert exit_time < 20
        ok = outcomes.count(grpc.StatusCode.OK)
        # The server's own count of the calls its handlers accepted, and how each ended.
        answered = dict(kv.split("=") for kv in stderr.split("stopped; answered ")[1].split("\n")[0].split())
        accepted = {k: int(v) for k, v in answered.items() if k.startswith("Classify/")}
        # Every call a handler took succeeded; the edge refuses new ones from the moment the
        # drain starts (UNAVAILABLE, which clients retry elsewhere).
        assert accepted.pop("Classify/OK") == ok, (accepted, ok)
        assert set(accepted) <= {"Classify/UNAVAILABLE"}, accepted
        # Calls grpc refused during the stop never reached a handler: UNAVAILABLE, or CANCELLED
        # when they raced the listener's close inside grpc's core.
        refused = [c for c in outcomes if c != grpc.StatusCode.OK]
        assert set(refused) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, refused
        assert ok > 10 and not wrong
        ch.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _tamper(model_dir: Path, tmp_path: Path) -> Path:
    bad = tmp_path / "tampered"
    shutil.copytree(model_dir, bad)
    with open(bad / "model.torchscript.pt", "r+b") as fh:
        fh.seek(1000)
        byte = fh.read(1)
        fh.seek(1000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    return bad


@pytest.mark.parametrize("problem", ["tampered", "missing", "corrupt-unverified"])
def test_bad_artifact_stops_startup_before_binding(problem, model_dir, tmp_path, free_port) -> None:  # type: ignore[no-untyped-def]
    extra: list[str] = []
    if problem == "tampered":
        target, expect = _tamper(model_dir, tmp_path), "sha256"
    elif problem == "missing":
        target, expect = tmp_path / "nothing-here", "no manifest"
    else:
        target = tmp_path / "corrupt"
        shutil.copytree(model_dir, target)
        (target / "model.torchscript.pt").write_bytes(b"not a model")
        extra, expect = ["--verify-sha256", "false"], "cannot load TorchScript"
    port = free_port()
    proc = subprocess.run(_serve_cmd(target, port, *extra), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert expect in proc.stderr, proc.stderr
    with socket.socket() as s:  # the port was never bound
        s.bind(("127.0.0.1", port))


# --------------------------------------------------------------------------- TLS and auth


def _cert(cn: str, issuer_key=None, issuer_name=None, ca: bool = False):  # type: ignore[no-untyped-def]
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    return key, cert


def _pem(key, cert) -> tuple[bytes, bytes]:  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives import serialization

    return (
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        cert.public_bytes(serialization.Encoding.PEM),
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory):  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert = _cert("test-ca", ca=True)
    files = {}
    for role in ("server", "client"):
        key, cert = _cert(role, ca_key, ca_cert.subject)
        k, c = _pem(key, cert)
        (d / f"{role}.key").write_bytes(k)
        (d / f"{role}.crt").write_bytes(c)
        files[role] = (d / f"{role}.key", d / f"{role}.crt")
    (d / "ca.crt").write_bytes(_pem(ca_key, ca_cert)[1])
    files["ca"] = d / "ca.crt"
    return files


def test_mutual_tls(pki, model_dir, sample, make_settings) -> None:  # type: ignore[no-untyped-def]
    from cifar_serve.server.launch import ServerThread

    skey, scrt = pki["server"]
    s = make_settings(
        model_dir,
        host="localhost",
        tls_cert=str(scrt),
        tls_key=str(skey),
        tls_client_ca=str(pki["ca"]),
        metrics_port=-1,
        max_batch_size=4,
    )
    with ServerThread(s) as srv:
        ckey, ccrt = pki["client"]
        creds = grpc.ssl_channel_credentials(pki["ca"].read_bytes(), ckey.read_bytes(), ccrt.read_bytes())
        with grpc.secure_channel(f"localhost:{srv.port}", creds) as ch:
            _good(pb_grpc.ClassifierStub(ch), sample)
        no_cert = grpc.ssl_channel_credentials(pki["ca"].read_bytes())
        with grpc.secure_channel(f"localhost:{srv.port}", no_cert) as ch:
            assert (
                _code(pb_grpc.ClassifierStub(ch).Classify, pb.ClassifyRequest(), timeout=10)
                == grpc.StatusCode.UNAVAILABLE
            )
        with grpc.insecure_channel(f"localhost:{srv.port}") as ch:
            assert (
                _code(pb_grpc.ClassifierStub(ch).Classify, pb.ClassifyRequest(), timeout=10)
                == grpc.StatusCode.UNAVAILABLE
            )


def test_bearer_token(model_dir, sample, make_settings) -> None:  # type: ignore[no-untyped-def]
    from cifar_serve.server.launch import ServerThread

    s = make_settings(model_dir, auth_token="s3cret", metrics_port=-1, max_batch_size=4)
    with ServerThread(s) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        req = pb.ClassifyRequest(images=[pb.Image(raw_rgb=sample.images[0].tobytes())])
        with pytest.raises(grpc.RpcError) as err:
            stub.Classify(req, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            stub.Classify(req, timeout=10, metadata=[("authorization", "Bearer wrong")])
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        r = stub.Classify(req, timeout=10, metadata=[("authorization", "Bearer s3cret")])
        assert len(r.results) == 1
        stream = stub.ClassifyStream(iter([pb.ClassifyStreamRequest(id="a", request=req)]), timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            list(stream)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


# --------------------------------------------------------------------------- soak


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_soak_mixed_good_and_bad(
    model_dir, sample, sample_jpegs, offline_logits, free_port, wait_serving
) -> None:  # type: ignore[no-untyped-def]
    seconds = float(os.environ.get("CIFAR_SERVE_SOAK_SECONDS", "12"))
    port = free_port()
    address = f"127.0.0.1:{port}"
    proc = subprocess.Popen(
        _serve_cmd(model_dir, port), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_serving(address, proc)
        ch = grpc.insecure_channel(address)
        stub = pb_grpc.ClassifierStub(ch)
        bad = [BAD_REQUESTS[k][0] for k in sorted(BAD_REQUESTS) if k != "too many images"]
        problems: list[str] = []
        counts = {"good": 0, "bad": 0}

        def worker(seed: int, until: float) -> None:
            rng = np.random.default_rng(seed)
            while time.monotonic() < until:
                if rng.random() < 0.3:
                    code = _code(stub.Classify, bad[int(rng.integers(len(bad)))], timeout=30)
                    if code != INVALID:
                        problems.append(f"bad request got {code}")
                    counts["bad"] += 1
                    continue
                idx = rng.choice(len(sample), size=int(rng.integers(1, 6)), replace=False)
                if rng.random() < 0.5:
                    req = pb.ClassifyRequest(
                        images=[pb.Image(encoded=sample_jpegs[i][1]) for i in idx], include_logits=True
                    )
                else:
                    x = sample.images[idx]
                    req = pb.ClassifyRequest(
                        packed=pb.PackedImages(data=x.tobytes(), count=len(idx)), include_logits=True
                    )
                r = stub.Classify(req, timeout=30)
                got = np.array([list(c.logits) for c in r.results])
                if not np.allclose(got, offline_logits[idx], atol=1e-4):
                    problems.append("wrong answer")
                counts["good"] += 1

        with cf.ThreadPoolExecutor(8) as pool:  # warm-up round, then measure memory over the soak
            list(pool.map(lambda i: worker(i, time.monotonic() + 2), range(8)))
            rss_before = _rss_kib(proc.pid)
            list(pool.map(lambda i: worker(100 + i, time.monotonic() + seconds), range(8)))
        rss_after = _rss_kib(proc.pid)
        ch.close()
        assert not problems, problems[:5]
        assert counts["good"] > 50 and counts["bad"] > 10
        growth_mib = (rss_after - rss_before) / 1024
        assert growth_mib < 64, f"server RSS grew {growth_mib:.1f} MiB during the soak"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
