"""Assemble one server process: core, admission, servicers, health, reflection, metrics, TLS.

Running it (signals, ``--workers N``, a server in a thread) is :mod:`.launch`'s job; this module
imports nothing of the multi-process server, which builds its workers from :class:`CifarServer`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cifar_serve.v1 import classifier_pb2_grpc

from . import oip
from .admission import Admission
from .control import ModelControl
from .core import InferenceCore, Runtime, ServingCore
from .edge import Edge
from .errors import InferenceError
from .lifecycle import Lifecycle, State
from .loops import running_loop_name
from .metrics import Metrics
from .servicer import ClassifierServicer
from .settings import Settings
from .shm import SharedMemoryRegistry

__all__ = ["CifarServer", "StartupError", "format_answered", "warn_exposure"]

logger = logging.getLogger(__name__)


def format_answered(answered: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(answered.items())) if answered else "no calls"


class StartupError(RuntimeError):
    """The server cannot start (a port taken, a file unreadable): one line for the operator."""


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def warn_exposure(settings: Settings) -> None:
    """Say so at start when the server is reachable from other hosts with a group left open."""
    s = settings
    if _loopback(s.host):
        return
    if not s.auth_token:
        logger.warning(
            "listening on %s with no --auth-token: any host that reaches it may run inference%s",
            s.host,
            " and admin calls" if not s.admin_token else "",
        )
    if s.model_control_mode == "explicit" and not s.admin_token:
        logger.warning(
            "--model-control-mode explicit on %s without --admin-token: whoever holds the inference "
            "credentials can unload and load the model",
            s.host,
        )


def _bind_problem(host: str, port: int) -> str:
    """Why ``host:port`` cannot be bound, asked of the OS (grpc only says that it failed)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, port))
    except OSError as exc:
        return exc.strerror or str(exc)
    return "grpc could not bind it"


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
    """One server instance. ``start()`` binds, then warms the model up; ``stop()`` drains it.

    ``runtime`` replaces the model runtime (tests run the whole server on a fake model);
    by default the settings' artifacts are loaded, and checked, before any port is bound.
    """

    def __init__(
        self,
        settings: Settings,
        runtime: Runtime | None = None,
        core: ServingCore | None = None,
        shm: SharedMemoryRegistry | None = None,
    ) -> None:
        self.settings = settings
        # A worker process of --workers N passes the model process's core (server/remote.py).
        self.core: ServingCore = core if core is not None else InferenceCore(settings, Metrics(), runtime)
        self._worker = core is not None
        self.metrics = self.core.metrics
        self.lifecycle: Lifecycle = self.core.lifecycle
        self.admission = Admission(settings, self.lifecycle, self.metrics)
        self.control = ModelControl(self.core, settings)
        self.health = _Health()
        self._health_status = -1
        self.port = 0
        self.metrics_port = -1
        self.exit_code = 0
        self._server: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()
        self._failed = asyncio.Event()
        self.service_names: list[str] = []
        # HTTP/REST (server/rest.py) and the shared memory regions both APIs read and write.
        self.shm = shm if shm is not None else SharedMemoryRegistry()
        self.http_port = -1
        self._rest: Any = None

    def _add_services(self, server: grpc.aio.Server) -> None:
        edge = Edge(self.admission)
        names = [
            edge.add(
                server, classifier_pb2_grpc.add_ClassifierServicer_to_server, ClassifierServicer(self.core)
            ),
            edge.add(server, oip.add_servicer, oip.OipServicer(self.core, self.shm, self.control)),
        ]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names.append(health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
        reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], server)
        self.service_names = names

    async def _sync_health(self) -> None:
        """Make grpc.health.v1 (overall and per service) say what the lifecycle says."""
        serving = health_pb2.HealthCheckResponse.SERVING
        status = serving if self.lifecycle.ready else health_pb2.HealthCheckResponse.NOT_SERVING
        if status == self._health_status:
            return
        self._health_status = status
        for name in ["", *self.service_names]:
            result = self.health.set(name, status)
            if asyncio.iscoroutine(result):
                await result

    def _on_lifecycle(self, life: Lifecycle) -> None:
        self.metrics.ready.set(1 if life.ready else 0)
        if life.state is State.STOPPED:
            return  # nothing left to answer health checks
        # Tasks run in the order they were made: health ends at the latest state.
        asyncio.get_running_loop().create_task(self._sync_health())

    def _on_batcher_failure(self, exc: BaseException) -> None:
        # Waiting callers already have their error; say so everywhere and make the process exit
        # non-zero, so a supervisor restarts it rather than routing calls to a dead batcher.
        self.fail(f"batcher died: {type(exc).__name__}: {exc}")

    def fail(self, reason: str) -> None:
        """The server can no longer serve: NOT_SERVING, and :attr:`failed` set (exit status 1)."""
        self.lifecycle.to(State.FAILED, reason)
        self.exit_code = 1
        self._failed.set()

    @property
    def failed(self) -> asyncio.Event:
        """Set when the server can no longer serve (its batcher died)."""
        return self._failed

    def _credentials(self) -> grpc.ServerCredentials:
        s = self.settings

        def read(path: str, flag: str) -> bytes:
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise StartupError(f"cannot read {flag} {path}: {exc.strerror or exc}") from None

        return grpc.ssl_server_credentials(
            [(read(s.tls_key, "--tls-key"), read(s.tls_cert, "--tls-cert"))],
            root_certificates=read(s.tls_client_ca, "--tls-client-ca") if s.tls_client_ca else None,
            require_client_auth=bool(s.tls_client_ca),
        )

    async def start(self) -> None:
        await self.bind()
        await self.warm_up()

    async def bind(self) -> None:
        """Start the batcher and listen; calls get UNAVAILABLE ("warming up") until :meth:`warm_up`."""
        s = self.settings
        self.core.start(on_failure=self._on_batcher_failure)
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", s.max_receive_message_bytes),
                ("grpc.max_send_message_length", s.max_receive_message_bytes),
                # Worker processes of --workers N share the port; a lone server must not
                # silently share it with another process that happens to bind it too.
                ("grpc.so_reuseport", 1 if s.workers > 1 else 0),
            ],
        )
        self._add_services(server)
        address = f"[{s.host}]:{s.port}" if ":" in s.host else f"{s.host}:{s.port}"
        try:
            creds = self._credentials() if s.tls_cert else None
            try:
                if creds is not None:
                    self.port = server.add_secure_port(address, creds)
                else:
                    self.port = server.add_insecure_port(address)
            except RuntimeError:
                self.port = 0
            if self.port == 0:
                raise StartupError(
                    f"cannot listen on {address} (--host/--port): {_bind_problem(s.host, s.port)}"
                )
            if s.metrics_port >= 0:
                try:
                    self.metrics_port = self.metrics.serve_http(s.host, s.metrics_port)
                except OSError as exc:
                    raise StartupError(
                        f"cannot serve metrics on {s.host}:{s.metrics_port} (--metrics-port): "
                        f"{exc.strerror or exc}"
                    ) from None
            if s.http_port >= 0:
                await self._start_rest()
        except BaseException:
            await server.stop(None)
            await self.core.stop()
            self.metrics.close()
            raise
        self.lifecycle.subscribe(self._on_lifecycle)
        await self._sync_health()
        await server.start()
        self._server = server
        warn_exposure(s)
        # A worker of --workers N has no metrics port of its own (the supervisor serves them all).
        metrics = f" (metrics on {self.metrics_port})" if self.metrics_port >= 0 else ""
        logger.info(
            "listening on %s:%d%s on %s's event loop; warming up",
            s.host,
            self.port,
            metrics,
            running_loop_name(),
        )

    async def _start_rest(self) -> None:
        from .rest import RestServer  # Starlette and uvicorn load only when REST is on

        s = self.settings
        rest = RestServer(self.core, self.shm, self.admission, self.control, s)
        try:
            self.http_port = rest.start()
        except (OSError, ValueError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise StartupError(
                f"cannot serve HTTP on {s.host}:{s.http_port} (--http-port): {detail}"
            ) from None
        self._rest = rest
        logger.info("HTTP/REST on %s:%d", s.host, self.http_port)

    async def warm_up(self) -> None:
        """Warm the model up, then turn SERVING."""
        s = self.settings
        await self.core.warm_up()
        if self.lifecycle.state is State.STARTING:  # a worker's already follows the model's
            self.lifecycle.to(State.SERVING)
        if not self.lifecycle.ready:
            return  # failed or told to stop while warming up
        await self._sync_health()
        d = self.core.runtime.describe()
        # Scalars only: the runtime table has its own log line from the runtime.
        details = ", ".join(f"{k} {v}" for k, v in d.items() if isinstance(v, (str, int, float, bool)))
        name, version = self.core.model_name, self.core.model_version
        if self._worker:  # one "ready on" line per server: the supervisor's, once every worker is
            logger.info("worker serving %s v%s: %s", name, version, details)
            return
        logger.info(
            "ready on %s:%d (pid %d): serving %s v%s, %s",
            s.host,
            self.port,
            os.getpid(),
            name,
            version,
            details,
        )

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING first, refuse new calls, let accepted ones finish within the grace period."""
        if self._server is None:
            return
        grace = self.settings.grace_period_s if grace is None else grace
        logger.info("shutting down: draining for up to %.1fs", grace)
        if self.lifecycle.state is not State.FAILED:
            self.lifecycle.to(State.DRAINING)
        await self._sync_health()
        started = time.monotonic()
        # stop(grace) refuses new calls at once and waits for every accepted one, up to grace.
        stopping = asyncio.ensure_future(self._server.stop(grace))
        rest_stopping = asyncio.ensure_future(
            self._rest.stop() if self._rest is not None else asyncio.sleep(0)
        )
        # Health Watch streams never end by themselves: close them once they have had a
        # moment to deliver NOT_SERVING, so they do not hold the shutdown for the whole grace.
        await asyncio.sleep(0.1)
        self.health.close_watches()
        await stopping
        await rest_stopping
        self._rest = None
        if not self.metrics.idle:
            logger.warning(
                "grace period of %.1fs over: %d calls were cancelled", grace, self.metrics.inflight_count
            )
        await self.core.stop()
        self.shm.close()
        logger.info("drained in %.2fs", time.monotonic() - started)
        self.lifecycle.to(State.STOPPED)
        self.metrics.close()
        self._server = None
        self._stopped.set()
        # One line a supervisor (or a test) can read: what was answered, and how. A worker of
        # --workers N says what it answered; the supervisor then logs the server's total.
        logger.info(
            "%s; answered %s",
            "stopped" if self.settings.workers == 1 else "worker exiting",
            format_answered(self.metrics.answered()),
        )

    async def reload(self) -> None:
        """SIGHUP: load ``--model-dir`` again as a new version (a failure is logged; the old one stays)."""
        if self.lifecycle.state not in (State.SERVING, State.UNLOADED):
            logger.warning("SIGHUP ignored: the server is %s", self.lifecycle.state.value)
            return
        logger.info("SIGHUP: loading %s", self.settings.model_dir)
        try:
            await self.core.load()
        except InferenceError:
            pass  # already logged with its reason by the core

    async def wait(self) -> None:
        await self._stopped.wait()
