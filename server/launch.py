"""Run a server: ``cifar-serve``'s main loop (signals, one process or ``--workers N``), and
:class:`ServerThread`, a real server on its own event loop in a thread (tests, benchmarks,
embedding).

The one module that knows both the single-process server (:mod:`.app`) and the multi-process
one (:mod:`.workers`); neither imports this one or the other's runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

from .app import CifarServer, StartupError
from .core import Runtime
from .loops import new_event_loop
from .settings import Settings
from .workers import Supervisor, serve_workers

__all__ = ["ServerThread", "serve"]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _pid_file(path: str) -> Iterator[None]:
    """``path`` holds this process's id while it runs (``--pid-file``), removed at exit if still ours."""
    if not path:
        yield
        return
    pid_file, pid = Path(path), str(os.getpid())
    try:
        pid_file.write_text(pid + "\n")
    except OSError as exc:
        raise StartupError(f"cannot write --pid-file {path}: {exc.strerror or exc}") from None
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if pid_file.read_text().strip() == pid:  # not a later server's file
                pid_file.unlink()


async def serve(settings: Settings, server: CifarServer | None = None) -> int:
    """Run until SIGTERM or SIGINT (exit status 0) or a fatal failure (1), shutting down gracefully.

    A signal during warm-up stops the server at once: the warm-up is abandoned, not awaited.
    ``server``: one built already (tests pass one over a fake model).
    """
    # Once the pid file names this process, a SIGHUP must not end it (the default action)
    # before the reload handler is in place; both runners replace this one as they start.
    asyncio.get_running_loop().add_signal_handler(
        signal.SIGHUP, lambda: logger.warning("SIGHUP ignored: the server is starting")
    )
    with _pid_file(settings.pid_file):
        return await _serve(settings, server)


async def _serve(settings: Settings, server: CifarServer | None) -> int:
    if settings.workers > 1 and server is None:
        return await serve_workers(settings)
    server = server if server is not None else CifarServer(settings)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks: set[asyncio.Task[None]] = set()

    def background(task: asyncio.Task[None]) -> None:
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    loop.add_signal_handler(signal.SIGHUP, lambda: background(loop.create_task(server.reload())))
    await server.bind()
    warming = loop.create_task(server.warm_up())

    def warmed(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            logger.error("warm-up failed: %s: %s", type(exc).__name__, exc)
            server.fail(f"warm-up failed: {type(exc).__name__}: {exc}")

    warming.add_done_callback(warmed)
    background(warming)
    stopping = asyncio.ensure_future(stop.wait())
    failing = asyncio.ensure_future(server.failed.wait())
    await asyncio.wait({stopping, failing}, return_when=asyncio.FIRST_COMPLETED)
    for task in (stopping, failing, *tasks):  # reloads and a warm-up still running end here
        task.cancel()
    for task in list(tasks):
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    await server.stop()
    return server.exit_code


class ServerThread:
    """A real server on its own event loop in a background thread (tests, benchmarks, embedding)."""

    def __init__(self, settings: Settings, runtime: Runtime | None = None) -> None:
        self.settings = settings
        self._runtime = runtime
        self._loop = new_event_loop(settings.event_loop)
        self._thread = threading.Thread(target=self._loop.run_forever, name="cifar-serve", daemon=True)
        self.server: CifarServer | None = None
        self.supervisor: Supervisor | None = None

    def start(self, wait_ready: bool = True) -> ServerThread:
        """Start serving; with ``wait_ready=False``, return once the port is bound (still warming up)."""
        self._thread.start()
        if self.settings.workers > 1 and self._runtime is None:
            self.supervisor = Supervisor(self.settings)
            run = asyncio.run_coroutine_threadsafe(self.supervisor.start(wait_ready), self._loop)
            try:
                run.result()
            except BaseException:
                self.stop()
                raise
            return self

        async def boot() -> CifarServer:
            srv = CifarServer(self.settings, self._runtime)
            await srv.bind()
            return srv

        self.server = asyncio.run_coroutine_threadsafe(boot(), self._loop).result()
        warming = asyncio.run_coroutine_threadsafe(self.server.warm_up(), self._loop)
        if wait_ready:
            warming.result()
        return self

    @property
    def _running(self) -> CifarServer | Supervisor:
        running = self.supervisor or self.server
        assert running is not None, "not started"
        return running

    @property
    def port(self) -> int:
        return self._running.port

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    @property
    def metrics_port(self) -> int:
        return self._running.metrics_port

    @property
    def http_port(self) -> int:
        return self._running.http_port

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's current value over every process of the server (0 when absent)."""
        if self.supervisor is not None:
            registry = self.supervisor.registry()
        else:
            assert self.server is not None
            registry = self.server.metrics.registry
        return float(registry.get_sample_value(name, labels or {}) or 0.0)

    @property
    def http_address(self) -> str:
        return f"{self.settings.host}:{self.http_port}"

    def stop(self, grace: float | None = None) -> None:
        if self.supervisor is not None:
            asyncio.run_coroutine_threadsafe(self.supervisor.stop(grace), self._loop).result()
            self.supervisor = None
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
