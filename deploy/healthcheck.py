"""Container health check: exit 0 when cifar-serve's gRPC health service answers SERVING.

The Dockerfile's HEALTHCHECK and docker-compose.yml's healthcheck both run
``python /app/deploy/healthcheck.py``. It asks the standard ``grpc.health.v1.Health/Check``
(the overall status, service ""), so no grpc_health_probe binary is needed. The server's
address comes from the same environment the server reads: ``CIFAR_SERVE_PORT`` (default 50051)
and ``CIFAR_SERVE_HOST`` (a wildcard address is checked on loopback).

Exit codes: 0 SERVING; 1 reachable but not serving (starting, draining); 2 unreachable or error.
A server started with TLS or a bearer token is outside what this check speaks: health stays
open under a token, but TLS needs a check of its own.
"""

from __future__ import annotations

import argparse
import os
import sys

_WILDCARDS = ("", "0.0.0.0", "::", "[::]")


def _default_address() -> str:
    host = os.environ.get("CIFAR_SERVE_HOST", "")
    port = os.environ.get("CIFAR_SERVE_PORT", "50051")
    if host in _WILDCARDS:
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="healthcheck", description=__doc__.splitlines()[0])
    p.add_argument("--address", default=_default_address(), help="host:port of the gRPC server")
    p.add_argument("--service", default="", help="service to ask about ('' = the whole server)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    args = p.parse_args(argv)

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(args.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
    except grpc.RpcError as exc:
        sys.stderr.write(f"unhealthy: {args.address}: {exc.code().name} {exc.details()}\n")
        return 2
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        sys.stderr.write(f"unhealthy: {args.address}: {status}\n")
        return 1
    sys.stdout.write(f"{args.address}: {status}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
