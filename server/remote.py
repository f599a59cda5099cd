"""The link between front-end worker processes and the one model process (``--workers N``).

Each worker keeps its own arena: a file in the server's run folder (on ``/dev/shm`` where the
host has it, so it is memory) that the worker maps and the model process reads and writes by
offset. A request's uint8 images go into a slot of the arena, only ``(slot, offset, count)``
crosses the Unix socket, the model process batches the images of every worker together and
writes the logits back into the same slot. Requests too large for a slot, or arriving when
every slot is taken, get a segment file of their own for their lifetime.

Small requests (up to half a slot) travel in groups: a worker puts their images one after
another in one slot and sends them as one request, held (at most ``--max-batch-delay-ms``) while
the callers of the last answer come back and while the model process is busy with the worker's
previous group. Per message, the model process pays a read, a task, a queue entry and a write;
at c=128 a group carries ~9 requests (BENCHMARKS.md, issue 20's sixth pass).

:class:`RemoteCore` is the worker's stand-in for :class:`~.core.InferenceCore`: the servicers
and the edge cannot tell them apart. :class:`ModelHost` serves the model process's core to
the workers. Control calls (statistics, load, unload) travel over the same socket; the model
process pushes its state (phase, version, model description) whenever it changes.

The model process reads and writes arenas with ``pread``/``pwrite``, never a mapping, so a
worker that dies or truncates its file cannot crash the process every worker depends on.

Either end may be replaced while the other lives on (the supervisor restarts dead processes,
:mod:`.workers`): the model process serves a new worker's link alongside the others
(:meth:`ModelHost.add`), and a worker whose model process died fails its waiting calls with
UNAVAILABLE, refuses new ones ("model process restarting") and serves again once the link the
supervisor hands it reaches a warm replacement (:meth:`RemoteCore.relink`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import mmap
import os
import pickle
import socket
import struct
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from .core import InferenceCore, RequestChecks
from .errors import DeadlineExceeded, InferenceError, InternalError, Unavailable, exhausted
from .lifecycle import Lifecycle, State
from .metrics import Metrics
from .settings import Settings
from .stats import StatsSnapshot

__all__ = ["ModelHost", "RemoteCore"]

logger = logging.getLogger(__name__)

IMAGE_BYTES = 32 * 32 * 3
SLOT_BYTES = 64 * 1024  # 20 single images with their logits: every small request fits one slot
ARENA_SLOTS = 256  # slots per worker (16 MiB); more requests at once spill into segment files
_HEADER = struct.Struct("!I")
_RESTARTING = "model process restarting"


# ---------------------------------------------------------------------------- framing


def _frame(message: object) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


class _Outbox:
    """One link's outgoing frames, written together once per event-loop iteration.

    Under load a link carries a message per request each way, and asyncio writes each at once:
    a system call per message. Joined, all the messages of an iteration go in one write.
    """

    __slots__ = ("_frames", "_writer")

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._frames: list[bytes] = []

    def put(self, message: object) -> None:
        if not self._frames:
            asyncio.get_running_loop().call_soon(self._flush)
        self._frames.append(_frame(message))

    def _flush(self) -> None:
        frames, self._frames = self._frames, []
        if frames and not self._writer.is_closing():
            self._writer.write(b"".join(frames))

    def flush(self) -> None:
        """Write what is waiting now (before the writer closes)."""
        self._flush()


async def _read(reader: asyncio.StreamReader) -> Any:
    """The next message, or None at end of stream."""
    try:
        head = await reader.readexactly(_HEADER.size)
        (size,) = _HEADER.unpack(head)
        body = await reader.readexactly(size)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    # Only processes of this server, started by its supervisor, can reach the socket (its folder
    # is private to the user running the server): these messages are our own.
    return pickle.loads(body)


def _pad(n: int) -> int:
    return (n + 63) // 64 * 64


def _layout(n: int, num_classes: int) -> tuple[int, int]:
    """Bytes of ``n`` images (padded), and the total with their float32 logits after them."""
    images = _pad(n * IMAGE_BYTES)
    return images, images + _pad(n * num_classes * 4)


@functools.lru_cache(maxsize=8)
def _group_layout(num_classes: int) -> tuple[int, int]:
    """Images a group's slot holds, and where in the slot its logits go (fixed, whatever it holds)."""
    n = SLOT_BYTES // IMAGE_BYTES
    while n > 1 and _pad(n * IMAGE_BYTES) + _pad(n * num_classes * 4) > SLOT_BYTES:
        n -= 1
    return n, _pad(n * IMAGE_BYTES)


# ---------------------------------------------------------------------------- worker side


@dataclass
class _Pending:
    future: asyncio.Future[tuple[np.ndarray, str]]
    n: int
    out_offset: int
    slot: int | None  # arena slot, or None for a segment of its own
    segment: tuple[Path, int] | None = None  # (path, fd)
    group: _Group | None = None


@dataclass(eq=False)
class _Group:
    """Small requests sent to the model process as one, under their earliest deadline.

    Their images lie one after another in one arena slot, so the model process reads, queues,
    batches and answers them as a single request: one message each way, one read, one write.
    """

    rid: int
    slot: int
    future: asyncio.Future[tuple[np.ndarray, str]]  # the whole group's logits
    started: float  # time.monotonic() of its first member
    deadline: float | None = None  # its members' earliest
    members: list[tuple[asyncio.Future[tuple[np.ndarray, str]], int, int]] = field(default_factory=list)
    n: int = 0  # images held
    live: int = 0  # members whose callers still wait
    sent: bool = False


@dataclass
class _RuntimeView:
    """What the servicers read of the runtime, as the model process last described it."""

    backend: str = ""
    sha256: str = ""
    device: Any = field(default_factory=lambda: SimpleNamespace(type="cpu", index=None))
    description: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return dict(self.description)


class RemoteCore(RequestChecks):
    """A worker's view of the core in the model process (same surface as ``InferenceCore``)."""

    def __init__(self, settings: Settings, metrics: Metrics, link: socket.socket, run_dir: str, index: int):
        self.settings = settings
        self.metrics = metrics
        # Mirrors the model process's lifecycle (pushed with its state), and this worker's drain.
        self.lifecycle = Lifecycle()
        self._link = link
        self._dir = Path(run_dir)
        self._index = index
        self._state: dict[str, Any] = {}
        self._runtime = _RuntimeView()
        self._changed = asyncio.Event()
        self._pending: dict[int, _Pending] = {}
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._free = list(range(ARENA_SLOTS - 1, -1, -1))
        self._arena_path = self._dir / f"worker-{index}.arena"
        self._arena: mmap.mmap | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._outbox: _Outbox | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._on_failure: Callable[[BaseException], None] | None = None
        self._closing = False
        self.lost: BaseException | None = None  # a fault of this process's own: fatal
        # The model process went away (False) or its replacement is warm (True); the worker
        # turns its health with it.
        self._link_up = False
        self._restarting = False
        self._generation = 0  # of the link now in use: a replaced link's reader ends quietly
        self._relinks: set[asyncio.Task[None]] = set()
        # Grouping (see _grouped): the group filling now, and the groups the model process has
        # not answered yet. While as many groups are out as it computes batches at once, the
        # next one fills (up to the batch delay): it could only queue there meanwhile.
        self._group: _Group | None = None
        self._group_timer: asyncio.Handle | None = None
        self._group_due = 0.0
        self._seal_soon = False
        self._groups_out = 0
        self._delay = settings.max_batch_delay_ms / 1000.0
        # After the model process answers n grouped requests at once, the next group waits
        # for n (those callers coming back) until the batch delay, as the batcher's regroup
        # does: the model process waits for them too, so sending fewer saves nothing.
        self._regroup = settings.batch_regroup and settings.idle_dispatch
        self._held = 0
        self._expect = 0
        self._expect_until = 0.0
        self._burst = 0

    # ------------------------------------------------------------------ life cycle

    async def connect(self) -> None:
        """Create the arena, connect to the model process and read its first state."""
        fd = os.open(self._arena_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            # Allocated now: a full /dev/shm (a container's is 64 MiB by default) fails the
            # start-up with ENOSPC instead of a SIGBUS on some later write to the mapping.
            os.posix_fallocate(fd, 0, ARENA_SLOTS * SLOT_BYTES)
            self._arena = mmap.mmap(fd, ARENA_SLOTS * SLOT_BYTES)
        finally:
            os.close(fd)
        reader = await self._open(self._link)
        first = await _read(reader)
        if first is None or first[0] != "state":
            raise Unavailable("the model process closed the connection at start-up")
        self._apply(first[1])
        self._read_from(reader)

    async def _open(self, sock: socket.socket) -> asyncio.StreamReader:
        """Make ``sock`` the link to the model process and name this worker's arena to it."""
        reader, self._writer = await asyncio.open_unix_connection(sock=sock)
        self._generation += 1
        self._link_up = True
        self._writer.write(_frame(("hello", self._index, str(self._arena_path))))
        self._outbox = _Outbox(self._writer)
        return reader

    def _read_from(self, reader: asyncio.StreamReader) -> None:
        self._reader_task = asyncio.get_running_loop().create_task(
            self._read_loop(reader, self._generation), name="model-link"
        )

    def relink(self, sock: socket.socket) -> None:
        """Serve through ``sock``, a link to the model process's replacement (from the supervisor)."""
        task = asyncio.get_running_loop().create_task(self._relink(sock), name="model-relink")
        self._relinks.add(task)
        task.add_done_callback(self._relinks.discard)

    async def _relink(self, sock: socket.socket) -> None:
        if self._closing:
            sock.close()
            return
        # The supervisor hands a new link only once the old model process has exited, so
        # nothing writes into the space of calls still pending on the old one: free it. (Its
        # reader may not have seen the end yet: the pipe and the link are read in either order.)
        self._link_lost("the model process exited")
        self._drop_pending()
        if self._reader_task is not None:
            self._reader_task.cancel()
        if self._writer is not None:
            self._writer.close()
        reader = await self._open(sock)
        logger.info("worker %d: linked to the new model process; waiting for it to warm up", self._index)
        self._read_from(reader)

    def start(self, on_failure: Callable[[BaseException], None] | None = None) -> None:
        self._on_failure = on_failure

    async def warm_up(self) -> None:
        """Wait until the model process is warm (or has failed: readiness then says so).

        A model process that fails or dies meanwhile is waited for in its replacement.
        """
        while (self._state.get("phase") == State.STARTING.value or self._restarting) and self.lost is None:
            self._changed.clear()
            await self._changed.wait()

    async def stop(self) -> None:
        self._closing = True
        for task in list(self._relinks):
            task.cancel()
        if self._outbox is not None:
            self._outbox.flush()
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        self._drop_group(Unavailable("server is shutting down"))
        for p in list(self._pending.values()):
            self._release(p)
        self._pending.clear()
        if self._arena is not None:
            with contextlib.suppress(BufferError):
                self._arena.close()
        with contextlib.suppress(FileNotFoundError):
            self._arena_path.unlink()

    # ------------------------------------------------------------------ state pushed by the model

    def _apply(self, state: dict[str, Any]) -> None:
        self._state = state
        rt = state["runtime"]
        self._runtime = _RuntimeView(
            rt["backend"],
            rt["sha256"],
            SimpleNamespace(type=rt["device_type"], index=rt["device_index"]),
            rt["describe"],
        )
        phase = State(state["phase"])
        if phase is State.FAILED:
            # Its batcher died: it exits, and the supervisor starts another.
            self._link_lost(f"the model process failed ({state['reason'] or 'no reason given'})")
        else:
            if self._restarting and phase is not State.STARTING:
                self._restarting = False
                logger.info("worker %d: the new model process is warm; serving again", self._index)
            if not self._restarting:
                self.lifecycle.mirror(phase, state["reason"], bool(state["answers_while_loading"]))
        self._changed.set()

    def _link_lost(self, why: str) -> None:
        """The model process is gone or going: fail what waits on it, refuse new work until relinked."""
        if not self._link_up:
            return
        self._link_up = False
        self._restarting = True
        logger.warning("worker %d: %s; answering UNAVAILABLE until it is back", self._index, why)
        if self.lifecycle.state is not State.FAILED:  # health goes NOT_SERVING meanwhile
            self.lifecycle.mirror(State.STARTING, f"{_RESTARTING}; retry shortly", False)
        error = Unavailable(f"{_RESTARTING}: {why}; retry shortly")
        self._drop_group(error)
        # Their space stays reserved until the process is known to be gone (_drop_pending).
        for p in self._pending.values():
            if not p.future.done():
                p.future.set_exception(error)
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(error)
        self._calls.clear()
        self._changed.set()

    def _drop_pending(self) -> None:
        """Give back the space of every call sent to a model process that has exited."""
        for p in self._pending.values():
            if not p.future.done():
                p.future.set_exception(Unavailable(f"{_RESTARTING}; retry shortly"))
            self._release(p)
        self._pending.clear()

    def _fail(self, exc: BaseException) -> None:
        self.lost = exc
        self.lifecycle.to(State.FAILED, str(exc))
        self._drop_group(Unavailable(f"model process lost: {exc}"))
        for p in list(self._pending.values()):
            if not p.future.done():
                p.future.set_exception(Unavailable(f"model process lost: {exc}"))
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(Unavailable(f"model process lost: {exc}"))
        self._calls.clear()
        self._changed.set()
        if self._on_failure is not None:
            self._on_failure(exc)

    async def _read_loop(self, reader: asyncio.StreamReader, generation: int) -> None:
        try:
            while await self._read_one(reader):
                pass
        except Exception as exc:  # never leave callers waiting on a link nobody reads
            logger.exception("worker %d: reading the model process's answers failed", self._index)
            self._fail(exc)
            return
        if generation == self._generation and not self._closing:
            # The model process exited (or was killed): the supervisor restarts it and hands
            # this worker a link to the new one.
            self._link_lost("the model process exited")
            self._drop_pending()

    async def _read_one(self, reader: asyncio.StreamReader) -> bool:
        message = await _read(reader)
        if message is None:
            return False
        kind = message[0]
        if kind == "state":
            self._apply(message[1])
        elif kind in ("done", "error"):
            self._answered(message)
        elif kind in ("result", "raise"):
            fut = self._calls.pop(message[1], None)
            if fut is not None and not fut.done():
                if kind == "result":
                    fut.set_result(message[2])
                else:
                    fut.set_exception(message[2])
        return True

    def _answered(self, message: tuple[Any, ...]) -> None:
        p = self._pending.pop(message[1], None)
        if p is None:
            return
        if p.group is not None and self._regroup:
            # The answers of one batch arrive together, read in one go: their callers are the
            # ones expected back (counted once the read is done).
            if not self._burst:
                asyncio.get_running_loop().call_soon(self._burst_end)
            self._burst += len(p.group.members)
        try:
            if p.future.done():  # cancelled by its caller: only the space is given back
                return
            if message[0] == "error":
                p.future.set_exception(message[2])
                return
            shape = (p.n, self.num_classes)
            if p.slot is not None:
                assert self._arena is not None
                start = p.slot * SLOT_BYTES + p.out_offset
                logits = np.frombuffer(self._arena, np.float32, p.n * self.num_classes, start).reshape(shape)
                p.future.set_result((logits.copy(), message[2]))
            else:
                assert p.segment is not None
                raw = os.pread(p.segment[1], p.n * self.num_classes * 4, p.out_offset)
                p.future.set_result((np.frombuffer(raw, np.float32).reshape(shape), message[2]))
        finally:
            self._release(p)

    def _burst_end(self) -> None:
        # Those held already go with the callers coming back, in one group.
        self._expect, self._burst = self._burst + self._held, 0
        self._expect_until = time.monotonic() + self._delay
        if self._group is not None:
            self._decide(self._group)

    def _release(self, p: _Pending) -> None:
        if p.group is not None:
            self._groups_out -= 1
            if self._group is not None and not self._burst:  # else _burst_end decides
                self._decide(self._group)
        if p.slot is not None:
            self._free.append(p.slot)
        elif p.segment is not None:
            path, fd = p.segment
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # ------------------------------------------------------------------ what the servicers read

    @property
    def model_name(self) -> str:
        return str(self._state["model_name"])

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self._state["labels"])

    @property
    def num_classes(self) -> int:
        return len(self._state["labels"])

    @property
    def model_version(self) -> str:
        return str(self._state["version"])

    @property
    def max_inflight(self) -> int:
        return int(self._state["max_inflight"])

    @property
    def last_load_error(self) -> str:
        return str(self._state["last_load_error"])

    @property
    def runtime(self) -> _RuntimeView:
        return self._runtime

    def info(self) -> dict[str, Any]:
        return dict(self._state["info"])

    # ------------------------------------------------------------------ calls

    def _check_link(self) -> _Outbox:
        if self.lost is not None:
            raise Unavailable("the model process is gone; this server is exiting")
        if not self._link_up or self._outbox is None or self._writer is None or self._writer.is_closing():
            raise Unavailable(f"{_RESTARTING}; retry shortly")
        return self._outbox

    def _send(self, message: object) -> None:
        self._check_link().put(message)

    async def infer(self, images: np.ndarray, deadline: float | None = None) -> tuple[np.ndarray, str]:
        """Logits for uint8 ``[n,32,32,3]`` images from the model process, and their version."""
        n = int(images.shape[0])
        self.check_count(n)
        life = self.lifecycle
        # As InferenceCore.infer: only a missing model refuses a call the edge admitted.
        if life.state is State.UNLOADED or (life.state is State.LOADING and not life.answers_while_loading):
            life.check()
        if self._arena is not None:
            grouped = self._grouped(images, n, deadline)
            if grouped is not None:
                return await self._member(*grouped, images, deadline)
        images_bytes, total = _layout(n, self.num_classes)
        rid = next(self._ids)
        future: asyncio.Future[tuple[np.ndarray, str]] = asyncio.get_running_loop().create_future()
        if total <= SLOT_BYTES and self._free and self._arena is not None:
            slot = self._free.pop()
            base = slot * SLOT_BYTES
            np.frombuffer(self._arena, np.uint8, n * IMAGE_BYTES, base).reshape(images.shape)[...] = images
            pending = _Pending(future, n, images_bytes, slot)
            message: tuple[Any, ...] = ("infer", rid, -1, base, n, base + images_bytes, deadline, 1)
        else:
            path = self._dir / f"worker-{self._index}-{rid}.segment"
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise exhausted(exc, "cannot hold the request's images") or exc from None
            pending = _Pending(future, n, images_bytes, None, (path, fd))
            try:
                os.ftruncate(fd, total)
                os.pwrite(fd, np.ascontiguousarray(images, np.uint8).data, 0)
            except OSError as exc:
                self._release(pending)
                raise exhausted(exc, "cannot hold the request's images") or exc from None
            except BaseException:
                self._release(pending)
                raise
            message = ("infer", rid, str(path), 0, n, images_bytes, deadline, 1)
        try:
            self._send(message)
        except BaseException:
            self._release(pending)
            raise
        self._pending[rid] = pending
        try:
            return await future
        except asyncio.CancelledError:
            # The model process may be computing it: its space is given back when it answers.
            if rid in self._pending and self.lost is None and self._link_up and self._outbox is not None:
                self._outbox.put(("cancel", rid))
            raise

    # ------------------------------------------------------------------ grouping

    def _grouped(
        self, images: np.ndarray, n: int, deadline: float | None
    ) -> tuple[_Group, asyncio.Future[tuple[np.ndarray, str]]] | None:
        """Put ``images`` in the group filling now; None when they must go on their own.

        A group is queued, computed or dropped as one, under its members' earliest deadline:
        the members whose own deadline is later go again when that one runs out (_member).
        """
        capacity, _ = _group_layout(self.num_classes)
        if n > capacity // 2:
            return None
        self._check_link()
        group = self._group
        if group is not None and group.n + n > capacity:
            self._seal()  # full: it goes now, and a new one starts
            group = None
        loop = asyncio.get_running_loop()
        if group is None:
            if not self._free:
                return None
            group = _Group(next(self._ids), self._free.pop(), loop.create_future(), time.monotonic())
            group.future.add_done_callback(functools.partial(self._hand_out, group))
            self._group = group
        assert self._arena is not None
        start = group.slot * SLOT_BYTES + group.n * IMAGE_BYTES
        np.frombuffer(self._arena, np.uint8, n * IMAGE_BYTES, start).reshape(images.shape)[...] = images
        future: asyncio.Future[tuple[np.ndarray, str]] = loop.create_future()
        group.members.append((future, group.n, n))
        if deadline is not None and (group.deadline is None or deadline < group.deadline):
            group.deadline = deadline
        group.n += n
        group.live += 1
        self._held += 1
        self._decide(group)
        return group, future

    def _decide(self, group: _Group) -> None:
        """Send the group filling now at the end of this iteration, or set when it goes.

        It waits (at most the batch delay) for the callers of the last answer to come back,
        and, those back, while as many groups are out as the model process computes batches
        at once: it could only queue there meanwhile, and one message carries more.
        """
        if self._seal_soon or not self._regroup or self._delay <= 0:
            # Without idle dispatch the model process gathers by the delay itself.
            self._seal_later()
            return
        now = time.monotonic()
        if self._expect and now < self._expect_until:
            if self._held < self._expect:
                self._seal_at(self._expect_until)
                return
            self._expect = 0
        elif self._groups_out >= self.max_inflight:
            self._seal_at(group.started + self._delay)
            return
        self._seal_later()

    def _seal_at(self, when: float) -> None:
        timer = self._group_timer
        if timer is None or self._group_due > when:
            if timer is not None:
                timer.cancel()
            self._group_due = when
            self._group_timer = asyncio.get_running_loop().call_at(when, self._seal)

    async def _member(
        self,
        group: _Group,
        future: asyncio.Future[tuple[np.ndarray, str]],
        images: np.ndarray,
        deadline: float | None,
    ) -> tuple[np.ndarray, str]:
        try:
            return await future
        except DeadlineExceeded:
            if deadline is not None and time.monotonic() >= deadline:
                raise
            # Dropped uncomputed under another member's earlier deadline: this one's is later.
            return await self.infer(images, deadline)
        except asyncio.CancelledError:
            group.live -= 1
            # Every caller of a group sent is gone: the model process need not compute it.
            if group.live == 0 and group.sent and group.rid in self._pending and self._outbox is not None:
                if self.lost is None and self._link_up:
                    self._outbox.put(("cancel", group.rid))
            raise

    def _seal_later(self) -> None:
        """Send the group at the end of this loop iteration (requests parsed meanwhile join it)."""
        if not self._seal_soon:
            self._seal_soon = True
            asyncio.get_running_loop().call_soon(self._seal)

    def _seal(self) -> None:
        """Send the group filling now to the model process."""
        self._seal_soon = False
        if self._group_timer is not None:
            self._group_timer.cancel()
            self._group_timer = None
        group, self._group = self._group, None
        self._held = 0
        if group is None:
            return
        if group.live == 0:  # every caller left before it went
            self._free.append(group.slot)
            group.future.cancel()
            return
        _, out = _group_layout(self.num_classes)
        base = group.slot * SLOT_BYTES
        try:
            requests = len(group.members)
            self._send(("infer", group.rid, -1, base, group.n, base + out, group.deadline, requests))
        except InferenceError as exc:
            self._free.append(group.slot)
            group.future.set_exception(exc)
            return
        self._pending[group.rid] = _Pending(group.future, group.n, out, group.slot, group=group)
        self._groups_out += 1
        group.sent = True

    def _drop_group(self, error: InferenceError) -> None:
        """Fail the group not yet sent (the link is gone, or the worker stops) and free its slot."""
        if self._group_timer is not None:
            self._group_timer.cancel()
            self._group_timer = None
        group, self._group = self._group, None
        self._held = 0
        if group is not None:
            self._free.append(group.slot)
            group.future.set_exception(error)

    @staticmethod
    def _hand_out(group: _Group, done: asyncio.Future[tuple[np.ndarray, str]]) -> None:
        """Give each member of a group its rows of the answer (or the group's error)."""
        if done.cancelled():
            error: BaseException | None = Unavailable("cancelled")
        else:
            error = done.exception()
        if error is not None:
            for future, _start, _n in group.members:
                if not future.done():
                    future.set_exception(error)
            return
        logits, version = done.result()
        for future, start, n in group.members:
            if not future.done():
                future.set_result((logits[start : start + n], version))

    async def _call(self, name: str, *args: Any) -> Any:
        rid = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._send(("call", rid, name, args))
        self._calls[rid] = future
        return await future

    async def statistics(self) -> dict[str, StatsSnapshot]:
        result: dict[str, StatsSnapshot] = await self._call("statistics")
        return result

    async def load(self, model_dir: str = "") -> str:
        return str(await self._call("load", model_dir))

    async def unload(self) -> None:
        await self._call("unload")


# ---------------------------------------------------------------------------- model side


class _Link:
    """One worker's connection, and the files it named."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self._outbox = _Outbox(writer)
        self.arena_fd = -1
        self.tasks: dict[int, asyncio.Task[None]] = {}

    def start(self, rid: int, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self.tasks[rid] = task

        def done(t: asyncio.Task[None]) -> None:
            self.tasks.pop(rid, None)
            if t.cancelled():  # cancelled before it ran: the worker still waits to free its space
                self.send(("error", rid, Unavailable("cancelled")))

        task.add_done_callback(done)

    def cancel(self, rid: int) -> None:
        task = self.tasks.get(rid)
        if task is not None:
            task.cancel()

    def send(self, message: object) -> None:
        if not self.writer.is_closing():
            self._outbox.put(message)

    def close(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        if self.arena_fd >= 0:
            os.close(self.arena_fd)
            self.arena_fd = -1
        self._outbox.flush()
        self.writer.close()


class ModelHost:
    """Serves an :class:`InferenceCore` to the worker processes, one socket pair each.

    The supervisor made the pairs and handed one end to each worker: no other process can
    reach the model process (no socket in the file system to connect to), so the pickled frames
    and the file names in them come from this server's own workers only.
    """

    def __init__(self, core: InferenceCore, links: list[socket.socket], run_dir: str) -> None:
        self.core = core
        self._socks = links
        self._dir = os.path.realpath(run_dir)
        self._links: set[_Link] = set()
        self._serving: set[asyncio.Task[None]] = set()
        self._calls: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        # Every change of the model's lifecycle (warm, loading, unloaded, failed) reaches every
        # worker, whose health and readiness follow it.
        self.core.lifecycle.subscribe(lambda _life: self.publish())
        for sock in self._socks:
            reader, writer = await asyncio.open_unix_connection(sock=sock)
            self._serve(self._serve_link(reader, writer))

    def add(self, sock: socket.socket) -> None:
        """Serve one more worker: a replacement of a dead one, linked by the supervisor."""

        async def serve() -> None:
            reader, writer = await asyncio.open_unix_connection(sock=sock)
            await self._serve_link(reader, writer)

        self._serve(serve())

    def _serve(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._serving.add(task)
        task.add_done_callback(self._serving.discard)

    async def close(self) -> None:
        for link in list(self._links):
            link.close()
        self._links.clear()
        for task in list(self._serving):
            task.cancel()

    def state(self) -> dict[str, Any]:
        core = self.core
        rt = core.runtime
        device = rt.device
        return {
            "phase": core.lifecycle.state.value,
            "reason": core.lifecycle.reason,
            "answers_while_loading": core.lifecycle.answers_while_loading,
            "model_name": core.model_name,
            "labels": list(core.labels),
            "version": core.model_version,
            "max_inflight": core.max_inflight,
            "last_load_error": core.last_load_error,
            "info": core.info(),
            "runtime": {
                "backend": rt.backend,
                "sha256": rt.sha256,
                "device_type": device.type,
                "device_index": getattr(device, "index", None),
                "describe": rt.describe(),
            },
        }

    def publish(self) -> None:
        """Tell every worker the current state (after warm-up, a load, an unload, a failure)."""
        state = self.state()
        for link in self._links:
            link.send(("state", state))

    async def _serve_link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link(writer)
        self._links.add(link)
        try:
            hello = await _read(reader)
            if hello is None or hello[0] != "hello":
                return
            link.arena_fd = os.open(self._own(hello[2]), os.O_RDWR | os.O_CLOEXEC)
            link.send(("state", self.state()))
            while (message := await _read(reader)) is not None:
                kind = message[0]
                if kind == "infer":
                    link.start(message[1], self._infer(link, *message[1:]))
                elif kind == "cancel":
                    link.cancel(message[1])
                elif kind == "call":
                    call = asyncio.get_running_loop().create_task(self._call(link, *message[1:]))
                    self._calls.add(call)
                    call.add_done_callback(self._calls.discard)
        except Exception:
            logger.exception("model process: a worker's connection failed")
        finally:
            self._links.discard(link)
            link.close()

    async def _infer(
        self,
        link: _Link,
        rid: int,
        segment: str | int,
        in_offset: int,
        n: int,
        out_offset: int,
        deadline: float | None,
        requests: int,
    ) -> None:
        own = isinstance(segment, str)
        fd = -1
        try:
            fd = (
                os.open(self._own(segment), os.O_RDWR | os.O_CLOEXEC)
                if isinstance(segment, str)
                else link.arena_fd
            )
            images = np.empty((n, 32, 32, 3), np.uint8)
            if os.preadv(fd, [images.data], in_offset) != images.nbytes:
                raise InternalError("a worker's request vanished from shared memory before it was read")
            logits, version = await self.core.infer(images, deadline, requests=requests)
            data = np.ascontiguousarray(logits, np.float32).data
            if os.pwrite(fd, data, out_offset) != data.nbytes:
                raise InternalError("could not write logits back to the worker's shared memory")
            link.send(("done", rid, version))
        except asyncio.CancelledError:
            link.send(("error", rid, Unavailable("cancelled")))
        except OSError as exc:
            full: InferenceError | None = exhausted(exc, "cannot read the request's images")
            if full is None:
                logger.exception("model process: inference failed")
                full = InternalError(f"inference failed: {type(exc).__name__}")
            link.send(("error", rid, full))
        except InferenceError as exc:
            link.send(("error", rid, exc))
        except Exception as exc:
            logger.exception("model process: inference failed")
            link.send(("error", rid, InternalError(f"inference failed: {type(exc).__name__}")))
        finally:
            if own and fd >= 0:
                os.close(fd)

    def _own(self, path: str) -> str:
        """``path`` if it lies in the server's run folder (the only files workers may name)."""
        real = os.path.realpath(path)
        if os.path.dirname(real) != self._dir:
            raise InternalError(f"a worker named a file outside the run folder: {path}")
        return real

    async def _call(self, link: _Link, rid: int, name: str, args: tuple[Any, ...]) -> None:
        core = self.core
        try:
            if name == "statistics":
                result: Any = await core.statistics()
            elif name == "load":  # the lifecycle's listener tells the workers of every step
                result = await core.load(*args)
            elif name == "unload":
                await core.unload()
                result = None
            else:
                raise InternalError(f"unknown call {name!r}")
            link.send(("result", rid, result))
        except InferenceError as exc:
            link.send(("raise", rid, exc))
        except Exception as exc:
            logger.exception("model process: %s failed", name)
            link.send(("raise", rid, InternalError(f"{name} failed: {type(exc).__name__}: {exc}")))
