"""``--workers N``: N front-end processes on the same ports, one model process behind them.

The supervisor (the process ``cifar-serve`` starts as) binds nothing itself but placeholder
sockets that reserve the ports, serves ``/metrics`` for all processes (prometheus-client's
multiprocess mode), and starts the children with the ``spawn`` method, so no child inherits
a gRPC object, a thread or a loaded model:

* the **model process** loads and warms the model and runs the one batcher; workers reach it
  over a Unix socket and hand it uint8 images through shared memory (:mod:`.remote`);
* each **worker** runs the whole gRPC and REST edge (TLS, token, limits, health, reflection,
  decoding, both APIs and their streams) on ports shared with ``SO_REUSEPORT``, so the kernel
  spreads connections over the workers and every core parses and decodes.

Shutdown keeps every accepted call: SIGTERM (or SIGINT) makes every worker drain as a single
server does (NOT_SERVING, refuse new calls, finish accepted ones within the grace period), and
only when all have exited is the model process told to stop.

A child that dies on its own once the server has been ready is noticed at once (its sentinel)
and restarted; the others serve on:

* a dead **worker** is replaced by a new one with the same index, settings and ports, and a
  fresh socket pair whose other end the supervisor passes to the running model process over
  its pipe (``SCM_RIGHTS``); only the calls the dead worker held fail (their connections are gone);
* a dead **model process** is started again with a fresh link to every live worker, passed to
  each over its pipe. Meanwhile the workers answer UNAVAILABLE ("model process restarting") and
  are NOT_SERVING; they serve again once the new one is warm. Shared memory regions (records in
  the run folder) survive; statistics start again from zero in the new process.

More than ``--max-restarts`` restarts within ``--restart-window-s`` is a crash loop: the
supervisor then drains the others and exits 1, so the orchestrator takes over. A child that
dies before the server was first ready fails the start the same way: a model that cannot warm
up will not on a second try either.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from multiprocessing import reduction
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .loops import run
from .settings import Settings

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter


__all__ = ["Supervisor", "serve_workers"]

logger = logging.getLogger(__name__)

_CTX = multiprocessing.get_context("spawn")
_START_TIMEOUT_S = 600.0  # loading a model on a cold GPU host can take minutes


class StartupFailed(RuntimeError):
    """A child could not start; its one-line reason."""


_RUN_PREFIX = "cifar-serve-"


def _run_dir() -> Path:
    # /dev/shm is memory on Linux: the arenas live there. Elsewhere a temporary folder does.
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    _remove_stale(Path(base or tempfile.gettempdir()))
    path = Path(tempfile.mkdtemp(prefix=_RUN_PREFIX, dir=base))
    for sub in ("metrics", "regions"):
        (path / sub).mkdir()
    (path / "supervisor.pid").write_text(str(os.getpid()))
    return path


def _remove_stale(base: Path) -> None:
    """Remove run folders whose supervisor died without cleaning up (SIGKILL, OOM): they hold memory."""
    for old in base.glob(f"{_RUN_PREFIX}*"):
        pid = 0
        try:
            if old.stat().st_uid != os.getuid():
                continue
            pid = int((old / "supervisor.pid").read_text())
            os.kill(pid, 0)
        except ProcessLookupError:
            logger.info("removing %s, left by supervisor %d, which is gone", old, pid)
            shutil.rmtree(old, ignore_errors=True)
        except (OSError, ValueError):
            continue  # not ours, not finished starting, or alive


def _reserve(host: str, port: int, flag: str) -> socket.socket:
    """A bound, never listening SO_REUSEPORT socket: holds ``port`` (0: a free one) for the workers."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        from .app import StartupError

        raise StartupError(f"cannot listen on {host}:{port} ({flag}): {exc.strerror or exc}") from None
    return sock


def _child_setup(settings: Settings, run_dir: str, name: str) -> None:
    from .metrics import enter_multiprocess_mode

    # A worker changes its metrics on its event loop only; the model process's compute threads
    # change some too, so it writes each change at once.
    enter_multiprocess_mode(str(Path(run_dir) / "metrics"), deferred=name.startswith("worker"))
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s {name}:%(process)d %(name)s: %(message)s",
    )
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")


def _watch_parent(conn: Connection, on_message: Any) -> None:
    """Call ``on_message(msg)`` for each message from the supervisor, ``on_message(None)`` at its end.

    ``("link", socket)``: a socket to a restarted peer, which follows its message over the pipe.
    """
    loop = asyncio.get_running_loop()
    fd = conn.fileno()

    def readable() -> None:
        try:
            # uvloop's add_reader makes the descriptor non-blocking (libuv's uv_poll_init); a
            # "link" message's socket follows it in a second write, so a non-blocking read could
            # find it not there yet, and take the error for the supervisor's end.
            os.set_blocking(fd, True)
            message = conn.recv()
            if isinstance(message, tuple) and message[:1] == ("link",):
                message = ("link", socket.socket(fileno=reduction.recv_handle(conn)))
        except (EOFError, OSError):
            loop.remove_reader(fd)
            on_message(None)
            return
        on_message(message)

    loop.add_reader(fd, readable)


# ---------------------------------------------------------------------------- the model process


def model_main(settings: Settings, run_dir: str, links: list[socket.socket], conn: Connection) -> None:
    _child_setup(settings, run_dir, "model")
    # Ctrl-C reaches the whole process group: the model keeps serving while the workers drain,
    # and stops when the supervisor says so.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    raise SystemExit(run(_model(settings, run_dir, links, conn), settings.event_loop))


async def _model(settings: Settings, run_dir: str, links: list[socket.socket], conn: Connection) -> int:
    from .core import InferenceCore
    from .errors import InferenceError
    from .lifecycle import State
    from .metrics import Metrics
    from .remote import ModelHost

    try:
        core = InferenceCore(settings, Metrics())
    except Exception as exc:  # the artifact is missing, corrupt or fails its sha256
        conn.send(("failed", str(exc)))
        return 2
    host = ModelHost(core, links, run_dir)
    failed = asyncio.Event()
    stop = asyncio.Event()
    loads: set[asyncio.Task[None]] = set()

    core.lifecycle.subscribe(lambda life: core.metrics.ready.set(1 if life.ready else 0))

    def on_failure(exc: BaseException) -> None:
        core.lifecycle.to(State.FAILED, f"batcher died: {type(exc).__name__}: {exc}")
        failed.set()

    async def reload() -> None:
        if core.lifecycle.state not in (State.SERVING, State.UNLOADED):
            logger.warning("SIGHUP ignored: the model is %s", core.lifecycle.state.value)
            return
        logger.info("SIGHUP: loading %s", settings.model_dir)
        with contextlib.suppress(InferenceError):  # the core logs why; the old version serves on
            await core.load()

    def on_message(message: Any) -> None:
        if message == "reload":
            task = asyncio.get_running_loop().create_task(reload())
            loads.add(task)
            task.add_done_callback(loads.discard)
        elif isinstance(message, tuple) and message[0] == "link":  # a replacement worker
            host.add(message[1])
        else:  # "stop", or the supervisor is gone
            stop.set()

    core.start(on_failure=on_failure)
    await host.start()
    _watch_parent(conn, on_message)
    conn.send(("listening",))

    async def warm() -> None:
        await core.warm_up()
        if core.lifecycle.to(State.SERVING):
            d = core.runtime.describe()
            logger.info(
                "model %s v%s warm: %s",
                core.model_name,
                core.model_version,
                ", ".join(f"{k} {v}" for k, v in d.items() if isinstance(v, (str, int, float, bool))),
            )
            conn.send(("ready",))

    # Told to stop while warming up, the process stops at once: the warm-up is abandoned.
    warming = asyncio.ensure_future(warm())
    waits = [asyncio.ensure_future(e.wait()) for e in (stop, failed)]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in (*waits, warming, *loads):
        task.cancel()
    await core.stop()
    await host.close()
    return 1 if failed.is_set() else 0


# ---------------------------------------------------------------------------- a worker process


def worker_main(settings: Settings, run_dir: str, index: int, link: socket.socket, conn: Connection) -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # reloads go to the model process
    _child_setup(settings, run_dir, f"worker-{index}")
    raise SystemExit(run(_worker(settings, run_dir, index, link, conn), settings.event_loop))


async def _worker(settings: Settings, run_dir: str, index: int, link: socket.socket, conn: Connection) -> int:
    from .app import CifarServer, StartupError
    from .errors import InferenceError
    from .metrics import Metrics, flush_metrics
    from .remote import RemoteCore
    from .shm import SharedMemoryRegistry

    core = RemoteCore(settings, Metrics(), link, run_dir, index)
    try:
        await core.connect()
        server = CifarServer(settings, core=core, shm=SharedMemoryRegistry(Path(run_dir) / "regions"))
        await server.bind()
    except (OSError, StartupError, InferenceError) as exc:
        conn.send(("failed", str(exc)))
        await core.stop()
        return 2
    conn.send(("bound", server.port, server.http_port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def on_message(message: Any) -> None:
        if isinstance(message, tuple) and message[0] == "link":  # to a restarted model process
            core.relink(message[1])
        else:  # the supervisor is gone
            stop.set()

    _watch_parent(conn, on_message)

    async def warm() -> None:
        await server.warm_up()
        if server.lifecycle.ready:
            conn.send(("serving",))

    warming = asyncio.ensure_future(warm())  # a SIGTERM meanwhile stops the worker at once
    waits = [asyncio.ensure_future(e.wait()) for e in (stop, server.failed)]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in (*waits, warming):
        task.cancel()
    await server.stop()
    flush_metrics()
    return server.exit_code


# ---------------------------------------------------------------------------- the supervisor


def _exit_reason(code: int | None) -> str:
    """``killed by SIGKILL``, ``exited with status 1``: how a child ended, for the log."""
    if code is None:
        return "vanished"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


@dataclasses.dataclass
class _Child:
    name: str
    process: BaseProcess
    conn: Connection
    role: str = "model"  # or "worker"
    index: int = -1  # a worker's


class Supervisor:
    """Starts, watches, restarts and stops the model process and the workers (``--workers N``)."""

    def __init__(self, settings: Settings) -> None:
        from .metrics import process_restarts

        self.settings = settings
        self.port = 0
        self.http_port = -1
        self.metrics_port = -1
        self.exit_code = 0
        self.failed = asyncio.Event()
        self._model: _Child | None = None
        self._workers: list[_Child] = []
        self._child_settings = settings
        self._reserved: list[socket.socket] = []
        self._run_dir: Path | None = None
        self._metrics_http: Any = None
        self._ready = asyncio.Event()
        self._readying: asyncio.Task[None] | None = None
        self._stopping = False
        self._stopped = asyncio.Event()
        self._watch: asyncio.Task[None] | None = None
        self._ended: asyncio.Queue[_Child] = asyncio.Queue()
        self._restarts: collections.deque[tuple[float, str]] = collections.deque()  # (when, role)
        self._restarted: Counter = process_restarts()
        self._announcing: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    async def start(self, wait_ready: bool = True) -> None:
        s = self.settings
        self._run_dir = _run_dir()
        try:
            await self._start(s)
        except BaseException:
            await self._teardown()
            raise
        for c in self._children():
            self._watch_exit(c)
        self._watch = asyncio.get_running_loop().create_task(self._watch_children(), name="supervisor")
        # Read by one task only (the children's first messages), however many wait for it.
        self._readying = asyncio.get_running_loop().create_task(self._wait_ready(), name="supervisor-ready")
        self._readying.add_done_callback(lambda t: t.cancelled() or t.exception())
        if wait_ready:
            await self.wait_ready()

    async def _start(self, s: Settings) -> None:
        from .app import StartupError
        from .metrics import multiprocess_registry, serve_registry

        assert self._run_dir is not None
        grpc_sock = _reserve(s.host, s.port, "--host/--port")
        self._reserved.append(grpc_sock)
        self.port = int(grpc_sock.getsockname()[1])
        if s.http_port >= 0:
            http_sock = _reserve(s.host, s.http_port, "--http-port")
            self._reserved.append(http_sock)
            self.http_port = int(http_sock.getsockname()[1])
        if s.metrics_port >= 0:
            try:
                registry = multiprocess_registry(str(self._run_dir / "metrics"))
                registry.register(self._restarted)
                self._metrics_http = serve_registry(registry, s.host, s.metrics_port)
            except OSError as exc:
                raise StartupError(
                    f"cannot serve metrics on {s.host}:{s.metrics_port} (--metrics-port): "
                    f"{exc.strerror or exc}"
                ) from None
            self.metrics_port = int(self._metrics_http.server_address[1])
        # Replacements get these too: the ports the first children bound (a port of 0 was a free one).
        self._child_settings = dataclasses.replace(
            s, port=self.port, http_port=self.http_port, metrics_port=-1
        )
        # One socket pair per worker, made here: only the two processes at its ends hold it.
        pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(s.workers)]
        try:
            self._model = self._spawn_model([a for a, _ in pairs])
            for i, (_, b) in enumerate(pairs):
                self._workers.append(self._spawn_worker(i, b))
        finally:
            for a, b in pairs:  # the children have their own copies now
                a.close()
                b.close()
        await self._expect(self._model, "listening")
        for w in self._workers:
            await self._expect(w, "bound")
        logger.info(
            "listening on %s:%d (REST %d, metrics %d) with %d worker processes; warming up",
            s.host,
            self.port,
            self.http_port,
            self.metrics_port,
            s.workers,
        )

    def _spawn(self, name: str, target: Any, args: tuple[Any, ...]) -> _Child:
        parent, child = _CTX.Pipe()
        process = _CTX.Process(target=target, args=(*args, child), name=f"cifar-serve-{name}", daemon=False)
        process.start()
        child.close()
        return _Child(name, process, parent)

    def _spawn_model(self, links: list[socket.socket]) -> _Child:
        assert self._run_dir is not None
        return self._spawn("model", model_main, (self._child_settings, str(self._run_dir), links))

    def _spawn_worker(self, index: int, link: socket.socket) -> _Child:
        assert self._run_dir is not None
        name = f"worker-{index}"
        child = self._spawn(name, worker_main, (self._child_settings, str(self._run_dir), index, link))
        return dataclasses.replace(child, role="worker", index=index)

    def _children(self) -> list[_Child]:
        return [c for c in (self._model, *self._workers) if c is not None]

    async def _recv(self, child: _Child, timeout: float) -> Any:
        """The child's next message; StartupFailed if it exits first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not child.conn.poll():
            if not child.process.is_alive():
                raise StartupFailed(f"{child.name} exited with status {child.process.exitcode}")
            if loop.time() > deadline:
                raise StartupFailed(f"{child.name} did not start within {timeout:.0f}s")
            await asyncio.sleep(0.02)
        try:
            return child.conn.recv()
        except (EOFError, OSError):
            raise StartupFailed(f"{child.name} exited with status {child.process.exitcode}") from None

    async def _expect(self, child: _Child, what: str) -> Any:
        from .app import StartupError

        try:
            message = await self._recv(child, _START_TIMEOUT_S)
        except StartupFailed as exc:
            raise StartupError(str(exc)) from None
        if message[0] == "failed":
            raise StartupError(message[1])
        if message[0] != what:
            raise StartupError(f"{child.name}: unexpected {message!r}")
        return message

    def registry(self) -> CollectorRegistry:
        """Every process's metrics, as ``/metrics`` serves them."""
        from .metrics import multiprocess_registry

        assert self._run_dir is not None, "not started"
        registry = multiprocess_registry(str(self._run_dir / "metrics"))
        registry.register(self._restarted)
        return registry

    async def wait_ready(self) -> None:
        """Wait until the model process is warm and every worker has turned SERVING."""
        assert self._readying is not None, "not started"
        await asyncio.shield(self._readying)

    async def _wait_ready(self) -> None:
        assert self._model is not None
        await self._expect(self._model, "ready")
        for w in list(self._workers):
            await self._expect(w, "serving")
        self._ready.set()
        logger.info(
            "ready on %s:%d (pid %d): serving with %d workers",
            self.settings.host,
            self.port,
            os.getpid(),
            len(self._workers),
        )

    def reload(self) -> None:
        """SIGHUP: the model process loads ``--model-dir`` again as a new version."""
        if self._model is not None:
            with contextlib.suppress(OSError):
                self._model.conn.send("reload")

    # ------------------------------------------------------------------ watching and restarting

    def _watch_exit(self, child: _Child) -> None:
        """Queue ``child`` for the watcher the moment it exits (its sentinel turns readable)."""
        loop = asyncio.get_running_loop()

        def on_exit() -> None:
            loop.remove_reader(child.process.sentinel)
            self._ended.put_nowait(child)

        loop.add_reader(child.process.sentinel, on_exit)

    def _unwatch(self) -> None:
        loop = asyncio.get_running_loop()
        for c in self._children():
            loop.remove_reader(c.process.sentinel)

    async def _watch_children(self) -> None:
        while True:
            child = await self._ended.get()
            if self._stopping:
                return
            if not await self._heal(child):
                self.exit_code = 1
                self.failed.set()
                return

    async def _heal(self, child: _Child) -> bool:
        """Restart ``child``, which exited; False when the server is to exit instead."""
        if child is not self._model and not any(child is w for w in self._workers):
            return True  # already replaced (a worker restart found the model dead and did it first)
        noticed = time.monotonic()
        why = _exit_reason(self._bury(child))
        s = self.settings
        if not self._ready.is_set():
            logger.error("%s %s before the server was ready: shutting the server down", child.name, why)
            return False
        # Restarts within the window, this one included.
        while self._restarts and self._restarts[0][0] < noticed - s.restart_window_s:
            self._restarts.popleft()
        if len(self._restarts) >= s.max_restarts:
            logger.error(
                "%s %s; not restarting it (%s): shutting the server down",
                child.name,
                why,
                "--max-restarts 0"
                if s.max_restarts == 0
                else f"a crash loop: {len(self._restarts)} restarts within {s.restart_window_s:g}s already, "
                f"--max-restarts {s.max_restarts}",
            )
            return False
        self._restarts.append((noticed, child.role))
        self._restarted.labels(child.role).inc()
        delay = self._backoff(sum(1 for _, role in self._restarts if role == child.role))
        logger.error(
            "%s %s; restarting%s (%d of %d in %gs)",
            child.name,
            why,
            f" in {delay:.2f}s" if delay else "",
            len(self._restarts),
            s.max_restarts,
            s.restart_window_s,
        )
        if delay:
            await asyncio.sleep(delay)
        if child.role == "model":
            self._restart_model(noticed)
        else:
            model = self._model
            if model is not None and not model.process.is_alive():
                # It died too and its turn has not come: a worker needs a live model to link to,
                # and the model's restart links every live worker, this one included.
                if not await self._heal(model):
                    return False
            self._restart_worker(child.index, noticed)
        return True

    def _backoff(self, nth: int) -> float:
        """Seconds before the ``nth`` restart of one role within the window: none for the first,
        then doubling, the window over 2**(max_restarts - nth + 2): all together less than half of
        the window, so a process that dies at once still runs into --max-restarts within it."""
        s = self.settings
        if nth <= 1:
            return 0.0
        return float(s.restart_window_s / 2.0 ** (s.max_restarts - nth + 2))

    def _bury(self, child: _Child) -> int | None:
        """Reap a dead child and remove what it leaves behind; its exit code."""
        loop = asyncio.get_running_loop()
        loop.remove_reader(child.process.sentinel)
        child.process.join()
        if self._run_dir is not None and child.process.pid is not None:
            from prometheus_client import multiprocess

            # Its live gauges (in flight, queued, ready) no longer count; its counters still do.
            multiprocess.mark_process_dead(child.process.pid, str(self._run_dir / "metrics"))
        if self._run_dir is not None and child.role == "worker":
            # Its arena and request segments: the replacement creates its own under the same names.
            for path in self._run_dir.glob(f"worker-{child.index}[.-]*"):
                path.unlink(missing_ok=True)
        return child.process.exitcode

    def _give_link(self, child: _Child, sock: socket.socket) -> None:
        """Pass ``sock`` to a running child over its pipe (``SCM_RIGHTS``): a link to a new peer."""
        assert child.process.pid is not None
        try:
            child.conn.send(("link",))
            reduction.send_handle(child.conn, sock.fileno(), child.process.pid)
        except OSError as exc:  # it is dying too: the watcher restarts it, linked afresh
            logger.warning("could not pass a link to %s: %s", child.name, exc)

    def _restart_worker(self, index: int, noticed: float) -> None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            worker = self._spawn_worker(index, b)
            assert self._model is not None
            self._give_link(self._model, a)
        finally:
            a.close()
            b.close()
        self._workers[index] = worker
        self._watch_exit(worker)
        self._announce(worker, "serving", noticed)

    def _restart_model(self, noticed: float) -> None:
        live = [w for w in self._workers if w.process.is_alive()]  # a dead one is linked on its restart
        pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in live]
        try:
            model = self._spawn_model([a for a, _ in pairs])
            for w, (_, b) in zip(live, pairs, strict=True):
                self._give_link(w, b)
        finally:
            for a, b in pairs:
                a.close()
                b.close()
        self._model = model
        self._watch_exit(model)
        self._announce(model, "ready", noticed)

    def _announce(self, child: _Child, what: str, noticed: float) -> None:
        """Log when a restarted child is ready (or why it is not: its exit is the watcher's)."""

        async def announce() -> None:
            try:
                while (message := await self._recv(child, _START_TIMEOUT_S))[0] != what:
                    if message[0] == "failed":
                        logger.error("%s could not start again: %s", child.name, message[1])
                        return
            except StartupFailed:
                return
            logger.info("%s %s again %.2fs after it died", child.name, what, time.monotonic() - noticed)

        task = asyncio.get_running_loop().create_task(announce())
        self._announcing.add(task)
        task.add_done_callback(self._announcing.discard)

    # ------------------------------------------------------------------ stopping

    async def stop(self, grace: float | None = None) -> None:
        """Drain every worker (each within the grace period), then stop the model process."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        grace = self.settings.grace_period_s if grace is None else grace
        started = time.monotonic()
        for task in (self._watch, self._readying, *self._announcing):
            if task is not None:
                task.cancel()
        self._unwatch()
        for w in self._workers:
            if w.process.is_alive() and w.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace + 5.0  # one for all: they drain side by side
        for w in self._workers:
            await self._join(w, deadline)
            if w.process.exitcode not in (0, None) and self.exit_code == 0:
                self.exit_code = 1
        if self._model is not None:
            with contextlib.suppress(OSError):
                self._model.conn.send("stop")
            await self._join(self._model, time.monotonic() + 10.0)
        from .app import format_answered
        from .metrics import answered

        total = answered(self.registry())
        await self._teardown()
        logger.info(
            "%d workers and the model process exited in %.2fs", len(self._workers), time.monotonic() - started
        )
        logger.info("stopped; answered %s", format_answered(total))
        self._stopped.set()

    async def _join(self, child: _Child, deadline: float) -> None:
        while child.process.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if child.process.is_alive():
            logger.error("%s did not exit in time: killing it", child.name)
            child.process.kill()
        child.process.join()
        child.conn.close()
        if child.process.pid is not None and self._run_dir is not None:
            from prometheus_client import multiprocess

            # Its live gauges (in flight, queued, ready) no longer count.
            multiprocess.mark_process_dead(child.process.pid, str(self._run_dir / "metrics"))

    async def _teardown(self) -> None:
        for c in self._children():
            if c.process.is_alive():
                c.process.kill()
            c.process.join()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None
        for sock in self._reserved:
            sock.close()
        self._reserved.clear()
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
            self._run_dir = None


async def serve_workers(settings: Settings) -> int:
    """``cifar-serve --workers N``: run until SIGTERM/SIGINT (0) or a child's failure (1)."""
    supervisor = Supervisor(settings)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, supervisor.reload)
    # Each worker turns SERVING by itself once the model is warm. A signal during the start-up
    # (loading a model can take long) stops it: the start is cancelled and the children removed.
    starting = asyncio.ensure_future(supervisor.start(wait_ready=False))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        logger.info("stopped during start-up")
        return 0
    starting.result()  # a failed start raises its StartupError here
    # The supervisor logs "serving ... with N workers" once they are; a child's death is the watcher's.
    failing = asyncio.ensure_future(supervisor.failed.wait())
    await asyncio.wait({stopping, failing}, return_when=asyncio.FIRST_COMPLETED)
    for task in (stopping, failing):
        task.cancel()
    await supervisor.stop()
    return supervisor.exit_code
