"""Assemble and run the server: core, servicers, health, reflection, metrics, TLS, auth, signals."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cifar_serve.v1 import classifier_pb2, classifier_pb2_grpc

from .core import InferenceCore
from .metrics import Metrics
from .servicer import ClassifierServicer
from .settings import Settings

__all__ = ["CifarServer", "MalformedMessage", "ServerThread", "serve"]

logger = logging.getLogger(__name__)

_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class _BearerAuth(grpc.aio.ServerInterceptor):
    """Requires ``authorization: Bearer <token>``; health and reflection stay open."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_OPEN_PREFIXES):
            return handler
        metadata = dict(details.invocation_metadata or ())
        if metadata.get("authorization") == self._expected:
            return handler
        return _denying(handler)


class MalformedMessage:
    """Stands in for a request whose bytes did not parse, so the call can say so."""

    def __init__(self, error: str) -> None:
        self.error = error


class _DecodeGuard(grpc.aio.ServerInterceptor):
    """Turns unparseable request bytes into INVALID_ARGUMENT (grpc's default is UNKNOWN + a traceback).

    It also counts unary calls from the moment they arrive, so a graceful shutdown waits for
    calls that were accepted but whose handler has not started yet.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer

        def safe_parse(data: bytes) -> Any:
            try:
                return parse(data)
            except Exception as exc:
                return MalformedMessage(f"{type(exc).__name__}: {exc}")

        if not handler.unary_unary:
            # Our streaming methods take client streams, where grpc reports bad bytes itself.
            return handler
        inner = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            self._metrics.begin()
            try:
                if isinstance(request, MalformedMessage):
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, f"malformed request message ({request.error})"
                    )
                return await inner(request, context)
            finally:
                self._metrics.end()

        return grpc.unary_unary_rpc_method_handler(
            unary, request_deserializer=safe_parse, response_serializer=handler.response_serializer
        )


def _denying(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

    async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
        yield  # pragma: no cover

    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny, **kw)
    return grpc.stream_stream_rpc_method_handler(deny_stream, **kw)


class _Health(health.aio.HealthServicer):
    """The standard health service, whose Watch streams end when the server shuts down."""

    def __init__(self) -> None:
        super().__init__()
        self._closing = asyncio.Event()

    async def Watch(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        watch = asyncio.ensure_future(super().Watch(request, context))
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({watch, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (watch, closing):
                task.cancel()

    def close_watches(self) -> None:
        self._closing.set()


class CifarServer:
    """One server instance. ``start()`` loads and warms the model; ``stop()`` drains it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        # Loading checks the artifact before any port is bound: a bad artifact never serves.
        self.core = InferenceCore(settings, self.metrics)
        self.health = _Health()
        self.port = 0
        self.metrics_port = -1
        self._server: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()
        self.service_names: list[str] = []

    def _add_services(self, server: grpc.aio.Server) -> None:
        classifier_pb2_grpc.add_ClassifierServicer_to_server(ClassifierServicer(self.core), server)
        names = [classifier_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name]
        try:
            from .oip import add_oip_to_server
        except ImportError:  # the Open Inference Protocol module is optional at build time
            pass
        else:
            names.append(add_oip_to_server(server, self.core))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names.append(health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
        reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], server)
        self.service_names = names

    async def _set_health(self, status: int) -> None:
        for name in ["", *self.service_names]:
            result = self.health.set(name, status)
            if asyncio.iscoroutine(result):
                await result

    async def start(self) -> None:
        s = self.settings
        interceptors: list[grpc.aio.ServerInterceptor] = [_DecodeGuard(self.metrics)]
        if s.auth_token:
            interceptors.insert(0, _BearerAuth(s.auth_token))
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", s.max_receive_message_bytes),
                ("grpc.max_send_message_length", s.max_receive_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        self._add_services(server)
        address = f"{s.host}:{s.port}"
        if s.tls_cert:
            creds = grpc.ssl_server_credentials(
                [(Path(s.tls_key).read_bytes(), Path(s.tls_cert).read_bytes())],
                root_certificates=Path(s.tls_client_ca).read_bytes() if s.tls_client_ca else None,
                require_client_auth=bool(s.tls_client_ca),
            )
            self.port = server.add_secure_port(address, creds)
        else:
            self.port = server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot bind {address}")
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self._server = server
        if s.metrics_port >= 0:
            self.metrics_port = self.metrics.serve_http(s.host, s.metrics_port)
        logger.info("listening on %s:%d (metrics on %d), warming up", s.host, self.port, self.metrics_port)
        await asyncio.to_thread(self.core.warmup)
        self.core.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        logger.info(
            "serving %s v%s on %s:%d (%s)",
            self.core.model_name,
            self.core.model_version,
            s.host,
            self.port,
            self.core.runtime.describe(),
        )

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING first, refuse new calls, let accepted ones finish within the grace period."""
        if self._server is None:
            return
        grace = self.settings.grace_period_s if grace is None else grace
        logger.info("shutting down: draining for up to %.1fs", grace)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        started = time.monotonic()
        # stop(grace) refuses new calls at once and waits for every accepted one, up to grace.
        stopping = asyncio.ensure_future(self._server.stop(grace))
        # Health Watch streams never end by themselves: close them once they have had a
        # moment to deliver NOT_SERVING, so they do not hold the shutdown for the whole grace.
        await asyncio.sleep(0.1)
        self.health.close_watches()
        await stopping
        if not self.metrics.idle:
            logger.warning(
                "grace period of %.1fs over: %d calls were cancelled", grace, self.metrics.inflight_count
            )
        await self.core.stop()
        logger.info("drained in %.2fs", time.monotonic() - started)
        self.metrics.close()
        self._server = None
        self._stopped.set()
        # One line a supervisor (or a test) can read: what was answered, and how.
        logger.info(
            "stopped; answered %s", " ".join(f"{k}={v}" for k, v in sorted(self.metrics.answered().items()))
        )

    async def wait(self) -> None:
        await self._stopped.wait()


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    server = CifarServer(settings)
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


class ServerThread:
    """A real server on its own event loop in a background thread (tests, benchmarks, embedding)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cifar-serve", daemon=True)
        self.server: CifarServer | None = None

    def start(self) -> ServerThread:
        self._thread.start()

        async def boot() -> CifarServer:
            srv = CifarServer(self.settings)
            await srv.start()
            return srv

        self.server = asyncio.run_coroutine_threadsafe(boot(), self._loop).result()
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    @property
    def metrics_port(self) -> int:
        assert self.server is not None
        return self.server.metrics_port

    def stop(self, grace: float | None = None) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.stop(grace), self._loop).result()
            self.server = None
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
