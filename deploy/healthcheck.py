"""Container health check: exit 0 when cifar-serve's gRPC health service answers SERVING.

The Dockerfile's HEALTHCHECK and docker-compose.yml's healthcheck both run
``python /app/deploy/healthcheck.py``. It asks the standard ``grpc.health.v1.Health/Check``
(the overall status, service ""), so no grpc_health_probe binary is needed.

Which address: the one the running server really listens on. A health check runs inside the
server's container, so it finds the ``cifar-serve`` process in ``/proc`` and parses that
process's own command line and environment with the server's own settings parser: ``docker run
IMAGE --port 50061`` or ``-e CIFAR_SERVE_PORT=...`` are both honoured. Without such a process
(the check run elsewhere) it falls back to this process's ``CIFAR_SERVE_HOST``/``CIFAR_SERVE_PORT``.
A wildcard bind address is checked on loopback. ``CIFAR_SERVE_HEALTHCHECK_PROC`` replaces
``/proc`` (tests on a host running other servers point it at a folder holding only theirs).

Exit codes: 0 SERVING; 1 reachable but not serving (starting, draining); 2 unreachable or error.
Health stays open under ``--auth-token``; a server serving TLS is checked over TLS, trusting
``CIFAR_SERVE_HEALTHCHECK_TLS_CA`` (default: the server's own certificate, right for a
self-signed one) with the certificate's name given by ``CIFAR_SERVE_HEALTHCHECK_TLS_NAME``
(default: the address). Under mutual TLS the check presents ``CIFAR_SERVE_HEALTHCHECK_TLS_CERT``
and ``CIFAR_SERVE_HEALTHCHECK_TLS_KEY``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

_WILDCARDS = ("", "0.0.0.0", "::", "[::]")
_SCRIPT = "cifar-serve"
_MODULE = "cifar_serve.server"


@dataclass(frozen=True)
class Target:
    address: str
    tls_cert: str = ""
    source: str = "environment"


def _server_args(cmdline: Sequence[str]) -> list[str] | None:
    """The server's own arguments if ``cmdline`` runs cifar-serve (script or ``-m``), else None."""
    for i, arg in enumerate(cmdline):
        if Path(arg).name == _SCRIPT:
            return list(cmdline[i + 1 :])
        if arg == "-m" and i + 1 < len(cmdline) and cmdline[i + 1] in (_MODULE, f"{_MODULE}.__main__"):
            return list(cmdline[i + 2 :])
    return None


def _split_nul(data: bytes) -> list[str]:
    return [part.decode(errors="replace") for part in data.split(b"\0") if part]


def server_processes(proc: Path = Path("/proc")) -> Iterator[tuple[int, list[str], dict[str, str]]]:
    """(pid, server arguments, environment) of every readable cifar-serve process, lowest pid first."""
    try:
        pids = sorted(int(p.name) for p in proc.iterdir() if p.name.isdigit())
    except OSError:  # no /proc (not Linux), or CIFAR_SERVE_HEALTHCHECK_PROC names nothing
        return
    for pid in pids:
        if pid == os.getpid():
            continue
        try:
            args = _server_args(_split_nul((proc / str(pid) / "cmdline").read_bytes()))
            if args is None:
                continue
            environ = _split_nul((proc / str(pid) / "environ").read_bytes())
            env = dict(item.split("=", 1) for item in environ if "=" in item)
        except OSError:  # gone meanwhile, or another user's
            continue
        yield pid, args, env


def _address(host: str, port: int | str) -> str:
    if host in _WILDCARDS:
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def _from_environment(environ: Mapping[str, str]) -> Target:
    return Target(
        _address(environ.get("CIFAR_SERVE_HOST", ""), environ.get("CIFAR_SERVE_PORT", "50051")),
        environ.get("CIFAR_SERVE_TLS_CERT", ""),
    )


def find_target(proc: Path | None = None, environ: Mapping[str, str] | None = None) -> Target:
    """Where the running server listens, read from its own command line and environment."""
    environ = os.environ if environ is None else environ
    if proc is None:
        # Tests outside a container point this at a folder holding only their own server.
        proc = Path(environ.get("CIFAR_SERVE_HEALTHCHECK_PROC", "/proc"))
    for pid, args, env in server_processes(proc):
        try:
            from cifar_serve.server.settings import settings_from_args

            settings = settings_from_args(args, env)
        except ImportError:  # not the server's environment: read the flags by hand
            return _from_flags(pid, args, env)
        except SystemExit:  # the server itself refuses these settings and is exiting
            continue
        return Target(_address(settings.host, settings.port), settings.tls_cert, f"pid {pid}")
    return _from_environment(environ)


def _from_flags(pid: int, args: list[str], env: Mapping[str, str]) -> Target:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--host", default=env.get("CIFAR_SERVE_HOST", ""))
    p.add_argument("--port", default=env.get("CIFAR_SERVE_PORT", "50051"))
    p.add_argument("--tls-cert", default=env.get("CIFAR_SERVE_TLS_CERT", ""))
    known, _ = p.parse_known_args(args)
    return Target(_address(known.host, known.port), known.tls_cert, f"pid {pid}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="healthcheck", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--address", default="", help="host:port of the gRPC server (default: found, see above)")
    p.add_argument("--service", default="", help="service to ask about ('' = the whole server)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    args = p.parse_args(argv)
    target = Target(args.address, source="--address") if args.address else find_target()
    try:
        with _channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
    except (grpc.RpcError, OSError) as exc:
        detail = f"{exc.code().name} {exc.details()}" if isinstance(exc, grpc.RpcError) else str(exc)
        sys.stderr.write(f"unhealthy: {target.address} ({target.source}): {detail}\n")
        return 2
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        sys.stderr.write(f"unhealthy: {target.address} ({target.source}): {status}\n")
        return 1
    sys.stdout.write(f"{target.address}: {status}\n")
    return 0


def _channel(target: Target) -> grpc.Channel:
    if not target.tls_cert:
        return grpc.insecure_channel(target.address)
    ca = os.environ.get("CIFAR_SERVE_HEALTHCHECK_TLS_CA") or target.tls_cert
    name = os.environ.get("CIFAR_SERVE_HEALTHCHECK_TLS_NAME", "")
    options = [("grpc.ssl_target_name_override", name)] if name else []
    cert = os.environ.get("CIFAR_SERVE_HEALTHCHECK_TLS_CERT", "")
    key = os.environ.get("CIFAR_SERVE_HEALTHCHECK_TLS_KEY", "")
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes(),
        private_key=Path(key).read_bytes() if key else None,
        certificate_chain=Path(cert).read_bytes() if cert else None,
    )
    return grpc.secure_channel(target.address, creds, options=options)


if __name__ == "__main__":
    sys.exit(main())
