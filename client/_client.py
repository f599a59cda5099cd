"""``Client`` (blocking) and ``AsyncClient`` (asyncio, ``grpc.aio``): the same surface, two channels."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cifar_serve.v1 import classifier_pb2 as pb
from cifar_serve.v1 import classifier_pb2_grpc as pb_grpc
from cifar_serve.v1 import open_inference_pb2_grpc as oip_grpc

from . import _stream
from ._errors import CifarServeError, DeadlineExceededError, UnavailableError, error_from_rpc
from ._inputs import DEFAULT_MAX_REQUEST_BYTES, Inputs, Part, build_request, chunk_parts, to_parts
from ._shm import SharedMemorySession, check_mode, classifications, local_servers, open_session
from ._stream import StreamLane, SyncStreamLane
from ._targets import HEALTH_SERVICE, Servers, channel_options, resolve_target
from ._types import Classification, ModelInfo

__all__ = ["DEFAULT_ADDRESS", "AsyncClient", "Client", "Credential"]

logger = logging.getLogger("cifar_serve.client")
logger.addHandler(logging.NullHandler())  # a library: the application decides where logs go

DEFAULT_ADDRESS = "localhost:50051"
_MAX_BACKOFF_S = 10.0
_RECEIVE_LIMIT = 64 * 1024 * 1024

Credential = str | bytes | os.PathLike[str]
"""PEM material: bytes, a PEM string (``-----BEGIN ...``), or a path to a PEM file."""

Req = TypeVar("Req")
Resp = TypeVar("Resp")

_SERVING = health_pb2.HealthCheckResponse.SERVING
_WATCH = health_pb2.HealthCheckRequest(service=HEALTH_SERVICE)
# How the server words a refusal (server/lifecycle.py): anything else on UNAVAILABLE is the transport's.
_NOT_SERVING_WORDS = ("retry shortly", "unloaded", "server failed", "another replica")


# UNAVAILABLE: the request was not run. CANCELLED: a server shutting down cancels the calls it had
# received but not started (grpc "zombifies" them); a blocking call of this client is never
# cancelled by the client itself, and a classification is safe to run again.
_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})


def why_not_serving(err: CifarServeError) -> str:
    """In words, why a call was refused with UNAVAILABLE: warming up, draining, not serving, unreachable."""
    message = err.message
    if "warming up" in message:
        return f"it is warming up ({message})"
    if "shutting down" in message:
        return f"it is draining ({message})"
    if any(word in message for word in _NOT_SERVING_WORDS):
        return f"it is not serving ({message})"
    return f"it is unreachable ({message})"


def _watch_status(status: int, reason: str) -> str:
    """The reason once a health Watch has heard a server say ``status`` (not SERVING)."""
    if reason.startswith("it is unreachable"):
        return "it is reachable but reports NOT_SERVING (warming up or draining)"
    return reason


class _ServingWait:
    """One wait for a server to report SERVING, as plain state: what to ask, what was heard, when
    to stop. :class:`Client` and :class:`AsyncClient` make the calls (blocking or awaited).

    First the request itself, once (:attr:`probe`), over a connection that reaches a NOT_SERVING
    server: the server's refusal says why in its own words; no answer at all says it is
    unreachable. Then its health Watch stream, no polling, until SERVING or the deadline.
    """

    __slots__ = ("probe", "reason")

    def __init__(self, channel: Any, method: str) -> None:
        stub = pb_grpc.ClassifierStub(channel)  # the same stub class serves both kinds of channel
        probes = {
            "Classify": stub.Classify,
            "ClassifyStream": stub.Classify,  # the same request, unary
            "GetModelInfo": stub.GetModelInfo,
        }
        self.probe: Any = probes.get(method)
        self.reason = "it does not report SERVING"

    def refused(self, exc: grpc.RpcError) -> None:
        """The probe's failure: an UNAVAILABLE answer says why the server does not serve."""
        err = error_from_rpc(exc)
        if err.code is grpc.StatusCode.UNAVAILABLE:
            self.reason = why_not_serving(err)

    def heard(self, status: int) -> bool:
        """Whether a Watch answer of ``status`` ends the wait (SERVING)."""
        if status == _SERVING:
            return True
        self.reason = _watch_status(status, self.reason)
        return False

    def watch_failed(self, exc: grpc.RpcError) -> str | None:
        """The wait's answer after a failed Watch, or None to watch again after :func:`pause`."""
        code = error_from_rpc(exc).code
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return self.reason
        if code is not grpc.StatusCode.UNAVAILABLE:
            return ""  # no health service to watch (UNIMPLEMENTED...): the retries decide
        return None

    @staticmethod
    def pause(backoff: float, left: float) -> float:
        """Seconds before watching again: a server ends its watches as it shuts down, the next
        Watch waits for a connection, and this pause keeps a flapping one from spinning."""
        return min(max(backoff, 0.05), max(left, 0.0))


def _pixels(chunk: Sequence[Part]) -> np.ndarray | None:
    """The chunk's images as one uint8 ``[n,32,32,3]`` block, or None when it holds encoded files."""
    blocks = [p for p in chunk if isinstance(p, np.ndarray)]
    if len(blocks) != len(chunk):
        return None
    return blocks[0] if len(blocks) == 1 else np.concatenate(blocks)


def _pem(value: Credential | None) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    return Path(value).read_bytes()


class _Config:
    """Settings and helpers both clients share."""

    def __init__(
        self,
        address: Servers,
        *,
        timeout: float | None,
        retries: int,
        backoff: float,
        tls: bool,
        root_certificates: Credential | None,
        client_cert: Credential | None,
        client_key: Credential | None,
        server_name: str | None,
        token: str | None,
        max_images_per_request: int,
        max_concurrent_requests: int,
        options: Sequence[tuple[str, Any]],
    ) -> None:
        if retries < 0:
            raise ValueError("retries must not be negative")
        if backoff < 0:
            raise ValueError("backoff must not be negative")
        if max_images_per_request < 1:
            raise ValueError("max_images_per_request must be at least 1")
        if max_concurrent_requests < 1:
            raise ValueError("max_concurrent_requests must be at least 1")
        if (client_cert is None) != (client_key is None):
            raise ValueError("client_cert and client_key go together")
        self.target = resolve_target(address)
        self.address = str(self.target)
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_images_per_request = max_images_per_request
        self.max_concurrent_requests = max_concurrent_requests
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self.credentials: grpc.ChannelCredentials | None = None
        if tls or root_certificates is not None or client_cert is not None:
            self.credentials = grpc.ssl_channel_credentials(
                root_certificates=_pem(root_certificates),
                private_key=_pem(client_key),
                certificate_chain=_pem(client_cert),
            )
        opts: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", _RECEIVE_LIMIT),
            # Reconnect on the scale of our own backoff, so a retry can find a server that just came up.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 5000),
        ]
        if server_name:
            opts.append(("grpc.ssl_target_name_override", server_name))
        opts.extend(channel_options(self.target))
        self.options = [*opts, *options]
        # The probe channel has no client-side health checking, so its calls reach a server that
        # reports NOT_SERVING: the server says why it refuses, and its health can be watched.
        self.probe_options = [
            *(o for o in self.options if o[0] != "grpc.service_config"),
            ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),
            ("grpc.use_local_subchannel_pool", 1),
        ]

    def deadline(self, timeout: float | None) -> float | None:
        timeout = self.timeout if timeout is None else timeout
        return None if timeout is None else time.monotonic() + timeout

    def plan(self, inputs: Inputs, top_k: int, include_logits: bool) -> list[pb.ClassifyRequest]:
        parts: list[Part] = to_parts(inputs)
        return [
            build_request(chunk, top_k, include_logits)
            for chunk in chunk_parts(parts, self.max_images_per_request, DEFAULT_MAX_REQUEST_BYTES)
        ]

    def next_attempt(self, err: CifarServeError, attempt: int, deadline: float | None, method: str) -> float:
        """Seconds to wait before retrying ``err``; raises ``err`` when it is not to be retried."""
        if err.code not in _RETRYABLE or attempt >= self.retries:
            raise err
        delay = min(self.backoff * 2.0**attempt, _MAX_BACKOFF_S)
        if deadline is not None and time.monotonic() + delay >= deadline:
            raise err
        logger.warning(
            "%s on %s: %s; retry %d of %d in %.2fs",
            method,
            self.address,
            err.message,
            attempt + 1,
            self.retries,
            delay,
        )
        return delay

    def plainly(self, err: CifarServeError) -> CifarServeError:
        """``err``, an UNAVAILABLE one reworded to say why, naming the server."""
        if err.code is not grpc.StatusCode.UNAVAILABLE or err.message.startswith(self.address):
            return err
        return UnavailableError(err.code, f"{self.address}: {why_not_serving(err)}")

    def retry(self, method: str, deadline: float | None) -> Retry:
        return Retry(self, method, deadline)

    def gave_up(self, reason: str, deadline: float, started: float) -> UnavailableError:
        waited = deadline - started
        return UnavailableError(
            grpc.StatusCode.UNAVAILABLE,
            f"{self.address} did not report SERVING within {waited:.3g}s: {reason}",
        )

    @staticmethod
    def remaining(deadline: float | None, method: str) -> float | None:
        if deadline is None:
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceededError(grpc.StatusCode.DEADLINE_EXCEEDED, f"{method}: deadline exceeded")
        return left

    @staticmethod
    def results(
        responses: Sequence[pb.ClassifyResponse], requests: Sequence[pb.ClassifyRequest]
    ) -> list[Classification]:
        out: list[Classification] = []
        for req, resp in zip(requests, responses, strict=True):
            expected = req.packed.count if req.HasField("packed") else len(req.images)
            if len(resp.results) != expected:
                raise CifarServeError(
                    grpc.StatusCode.INTERNAL,
                    f"server answered {len(resp.results)} results for {expected} images",
                )
            out.extend(Classification.from_proto(r) for r in resp.results)
        return out


class Retry:
    """One call's way through the retry policy, as plain state: each calling loop (threads or
    asyncio, unary or stream) does only the waiting and the calls it is told to.

    The loop makes an attempt and, on an error, asks :meth:`wait_first` whether to wait for the
    server to report SERVING (handing the outcome to :meth:`waited_for`), then sleeps
    :meth:`delay` before the next attempt; both raise when the call is to fail instead.
    """

    __slots__ = ("_cfg", "_deadline", "_method", "attempt", "started", "waited")

    def __init__(self, cfg: _Config, method: str, deadline: float | None) -> None:
        self._cfg = cfg
        self._method = method
        self._deadline = deadline
        self.attempt = 0
        self.started = time.monotonic()
        # Once a server has reported SERVING, the channel's own health check may lag it by a
        # moment: the next attempt then waits for a connection (wait_for_ready) instead of failing.
        self.waited = False

    def wait_first(self, err: CifarServeError) -> bool:
        """Whether to wait for the server to report SERVING before retrying ``err``: an
        unavailable server usually comes back (warming up, restarting), and its health says when."""
        return (
            err.code is grpc.StatusCode.UNAVAILABLE
            and self._deadline is not None
            and self.attempt < self._cfg.retries
        )

    def waited_for(self, reason: str) -> None:
        """The outcome of waiting for SERVING: "" when it came; else why not, and the call fails."""
        if reason:
            assert self._deadline is not None  # wait_first asks for a wait only with a deadline
            raise self._cfg.gave_up(reason, self._deadline, self.started) from None
        self.waited = True

    def delay(self, err: CifarServeError) -> float:
        """Seconds to wait before the next attempt; raises the error the call fails with instead."""
        try:
            delay = self._cfg.next_attempt(err, self.attempt, self._deadline, self._method)
        except CifarServeError as final:
            raise self._cfg.plainly(final) from None
        self.attempt += 1
        return delay


STREAM_MODES = (False, True, "auto")


def check_stream_mode(stream: object) -> bool | str:
    """``stream`` when it is False, True or "auto"; ValueError otherwise."""
    if not any(stream is m or (isinstance(m, str) and stream == m) for m in STREAM_MODES):
        raise ValueError(f"stream must be False, True or 'auto', got {stream!r}")
    return stream  # type: ignore[return-value]


class Client:
    """A blocking client of one cifar-serve server or several replicas.

    ``address`` is one server (``host[:port]``, port 50051 when left out), several (a list, or
    comma-separated: ``"10.0.0.1:50051,10.0.0.2:50051"``), or a ``dns:///name[:port]`` that
    resolves to several. Requests are spread over the healthy servers by gRPC itself
    (``round_robin`` with client-side health checking: a server reporting NOT_SERVING, or not
    reachable, gets no new requests until it is back); see :mod:`cifar_serve.client._targets`.

    ``timeout`` is the default deadline, in seconds, of each method call (every request and retry
    it makes); ``retries`` is how many times a request that failed with UNAVAILABLE (or was
    cancelled by a server shutting down) is tried again,
    waiting ``backoff * 2**n`` seconds before retry ``n``. UNAVAILABLE means the request was not
    answered: the server was unreachable, went away mid-call (killed, connection reset) or was
    refusing work (warming up, draining); the retry goes to the next healthy replica. Retrying is
    safe because classification is idempotent: it changes nothing on the server, so a request
    that a vanished replica may have computed but never answered can be computed again elsewhere.
    Any other failure is raised at once as a :class:`CifarServeError`.

    With a deadline, a call refused with UNAVAILABLE (the server warming up, draining, or not
    reachable yet) waits for a server to report SERVING, on the standard health service's Watch
    stream, then is sent again; at the deadline it raises :class:`UnavailableError` saying why
    ("did not report SERVING within 60s: it is warming up (…)"), naming the server.

    TLS is on when ``tls`` is true or any certificate is given; ``token`` is sent as
    ``authorization: Bearer <token>``. Inputs larger than ``max_images_per_request`` are sent as
    several requests, up to ``max_concurrent_requests`` at a time. Thread-safe; use as a context
    manager, or call :meth:`close`.

    ``shared_memory`` ("off", the default, "auto" or "on") passes the pixels and logits through
    system shared memory (Triton's extension, over the Open Inference Protocol's ``ModelInfer``)
    instead of the socket; see :mod:`cifar_serve.client._shm`. "auto" uses it when every server is
    on this host (loopback or a unix socket) and registering a region with each of them succeeds,
    and the socket otherwise (a debug log says why); "on" raises instead of falling back. Answers
    are the same either way; the server counts the requests as ``ModelInfer``, not ``Classify``.
    :meth:`close` unregisters and removes the regions. Off by default in the library, since it
    creates objects in ``/dev/shm`` for the life of the client; ``cifar-classify`` defaults to auto.
    Requests that go through shared memory do not take the stream lane below.

    ``stream`` picks how requests travel. Many concurrent small calls from one application are
    cheapest over one long-lived ``ClassifyStream`` (the server spends a little over half the CPU
    per request it spends on a unary ``Classify``; BENCHMARKS.md): the *stream lane*.

    - ``"auto"`` (the default): a request goes over the lane while other ``classify()`` calls of
      this client are under way (other threads' or tasks'), and only when the client has one
      server: a stream is pinned to one server, so with several (a list, or ``dns:///``)
      per-call round robin spreads the load better. A lone caller's requests, those of one
      large call split in several included, stay unary calls.
    - ``True``: every request goes over the lane (with several servers, to the one its stream
      landed on). ``False``: every request is a unary ``Classify`` call.

    Over the lane, a call behaves as a unary call would: ``timeout`` is its own deadline (kept by
    the client: the stream itself has none; the server may still compute an answer the caller
    no longer waits for), an error answer raises the same exception, and a request the stream
    broke on (server restarted, unavailable, cancelled by a draining server) is retried with the
    same ``retries`` and ``backoff``, on a fresh stream. A new stream replaces one before the
    server's ``max_stream_requests`` (asked once with ``GetModelInfo``). At most 64 requests are in
    flight on the lane (the server's window per stream); more wait in the client. Answers come
    back in request order, so one slow request (a large encoded file) delays those behind it.
    The server counts these requests as ``ClassifyStream`` messages, not ``Classify`` calls.
    """

    def __init__(
        self,
        address: Servers = DEFAULT_ADDRESS,
        *,
        timeout: float | None = None,
        retries: int = 3,
        backoff: float = 0.1,
        tls: bool = False,
        root_certificates: Credential | None = None,
        client_cert: Credential | None = None,
        client_key: Credential | None = None,
        server_name: str | None = None,
        token: str | None = None,
        max_images_per_request: int = 256,
        max_concurrent_requests: int = 4,
        options: Sequence[tuple[str, Any]] = (),
        shared_memory: str = "off",
        stream: bool | str = "auto",
    ) -> None:
        self._shm_mode = check_mode(shared_memory)
        self._stream_mode = check_stream_mode(stream)
        self._cfg = _Config(
            address,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            tls=tls,
            root_certificates=root_certificates,
            client_cert=client_cert,
            client_key=client_key,
            server_name=server_name,
            token=token,
            max_images_per_request=max_images_per_request,
            max_concurrent_requests=max_concurrent_requests,
            options=options,
        )
        if self._cfg.credentials is not None:
            self._channel = grpc.secure_channel(
                self._cfg.target.target, self._cfg.credentials, options=self._cfg.options
            )
        else:
            self._channel = grpc.insecure_channel(self._cfg.target.target, options=self._cfg.options)
        self._stub = pb_grpc.ClassifierStub(self._channel)
        self._oip = oip_grpc.GRPCInferenceServiceStub(self._channel)
        self._shm_servers = local_servers(self._cfg.target) if self._shm_mode != "off" else None
        if self._shm_mode == "on" and self._shm_servers is None:
            raise ValueError(
                f"shared_memory='on' needs every server on this host (a loopback address or a unix "
                f"socket); {self._cfg.address} is not"
            )
        self._shm_lock = threading.Lock()
        self._shm: SharedMemorySession | None = None
        self._shm_decided = self._shm_servers is None
        self._shm_channels: list[grpc.Channel] = []
        self._probe_lock = threading.Lock()
        self._probe_channel: grpc.Channel | None = None
        self._lane: SyncStreamLane | None = None
        self._lane_lock = threading.Lock()
        # "auto" carries requests over the lane only to one server (a stream is pinned to one).
        target = self._cfg.target
        self._one_server = len(target.servers) == 1 and not target.target.startswith("dns:")
        self._calls = 0  # classify() calls of this client under way, over all threads
        self._streams_closed = 0  # streams opened by lanes that close() has ended

    @property
    def address(self) -> str:
        return self._cfg.address

    def __repr__(self) -> str:
        return f"Client({self._cfg.address!r})"

    def _open_channel(self, target: str, options: Sequence[tuple[str, Any]] | None = None) -> grpc.Channel:
        options = self._cfg.options if options is None else options
        if self._cfg.credentials is not None:
            return grpc.secure_channel(target, self._cfg.credentials, options=options)
        return grpc.insecure_channel(target, options=options)

    def _probe(self) -> grpc.Channel:
        with self._probe_lock:
            if self._probe_channel is None:
                self._probe_channel = self._open_channel(self._cfg.target.target, self._cfg.probe_options)
            return self._probe_channel

    def _wait_serving(self, method: str, request: Any, deadline: float) -> str:
        """Block until a server reports SERVING (see :class:`_ServingWait`): "" then; at the
        deadline, why it never did (warming up, draining, unreachable)."""
        channel = self._probe()
        wait = _ServingWait(channel, method)
        left = deadline - time.monotonic()
        if wait.probe is not None and left > 0:
            try:
                wait.probe(request, timeout=left, metadata=self._cfg.metadata)
            except grpc.RpcError as exc:
                wait.refused(exc)
        logger.info("%s: %s; waiting up to %.3gs for SERVING", self.address, wait.reason, max(left, 0.0))
        health = health_pb2_grpc.HealthStub(channel)
        while (left := deadline - time.monotonic()) > 0:
            try:
                for answer in health.Watch(
                    _WATCH, timeout=left, wait_for_ready=True, metadata=self._cfg.metadata
                ):
                    if wait.heard(answer.status):
                        return ""
            except grpc.RpcError as exc:
                ended = wait.watch_failed(exc)
                if ended is not None:
                    return ended
            time.sleep(wait.pause(self._cfg.backoff, left))
        return wait.reason

    def _shared_memory(self) -> SharedMemorySession | None:
        """The shared memory session, set up on first use; None when requests go through the socket."""
        with self._shm_lock:
            if self._shm_decided:
                return self._shm
            servers = self._shm_servers or []
            if servers == [self._cfg.target.target]:
                channels = [self._channel]  # one server: register over the channel requests use
            else:
                self._shm_channels = [self._open_channel(t) for t in servers]
                channels = self._shm_channels
            # A server that cannot answer this fails the caller's own request the same way: raise it.
            info = self.model_info()
            try:
                self._shm = open_session(
                    channels,
                    model_name=info.name,
                    labels=info.labels,
                    capacity=self._cfg.max_images_per_request,
                    metadata=self._cfg.metadata,
                )
            except CifarServeError as exc:
                if self._shm_mode == "on":
                    message = f"system shared memory with {self.address}: {exc.message}"
                    raise type(exc)(exc.code, message) from None
                logger.debug("system shared memory not used with %s (%s): the socket is", self.address, exc)
            else:
                logger.debug(
                    "system shared memory with %s: images and logits pass through /dev/shm", self.address
                )
            self._shm_decided = True
            return self._shm

    def uses_shared_memory(self) -> bool:
        """Whether pixel requests go through system shared memory (decides it now if not yet decided)."""
        return self._shared_memory() is not None

    def _drop_shared_memory(self, reason: CifarServeError) -> None:
        with self._shm_lock:
            shm, self._shm = self._shm, None
        if shm is not None:
            logger.warning(
                "system shared memory with %s failed (%s); using the socket from now on", self.address, reason
            )
            shm.close()

    def _classify_shm(
        self,
        shm: SharedMemorySession,
        images: np.ndarray,
        top_k: int,
        include_logits: bool,
        deadline: float | None,
    ) -> list[Classification]:
        shm.check_top_k(top_k)
        slot = shm.acquire()
        ok = False
        try:
            req = shm.request(slot, images)
            resp = self._call("ModelInfer", self._oip.ModelInfer, req, deadline)
            logits = shm.logits(slot, resp, len(images))
            ok = True
        finally:
            shm.release(slot, ok)
        return classifications(logits, top_k, shm.labels, include_logits)

    def _call(self, method: str, fn: Callable[..., Resp], request: Any, deadline: float | None) -> Resp:
        retry = self._cfg.retry(method, deadline)
        while True:
            try:
                left = _Config.remaining(deadline, method)
                return fn(
                    request, timeout=left, metadata=self._cfg.metadata, wait_for_ready=retry.waited or None
                )
            except grpc.RpcError as exc:
                err = error_from_rpc(exc)
            if retry.wait_first(err):
                assert deadline is not None
                retry.waited_for(self._wait_serving(method, request, deadline))
            time.sleep(retry.delay(err))

    def classify(
        self,
        inputs: Inputs,
        *,
        top_k: int = 1,
        include_logits: bool = False,
        timeout: float | None = None,
    ) -> list[Classification]:
        """Classify one input or a list of them; one :class:`Classification` per image, in input order.

        An input is a file path (decoded here), encoded file bytes (decoded by the server), a PIL
        image, or a uint8 numpy array: one HWC image or an NHWC batch (one result per image).
        Images that are not 32x32 RGB are converted with the server's own preprocessing.
        ``timeout`` (seconds) overrides the client's default for this call.
        """
        chunks = list(
            chunk_parts(to_parts(inputs), self._cfg.max_images_per_request, DEFAULT_MAX_REQUEST_BYTES)
        )
        if not chunks:
            return []
        deadline = self._cfg.deadline(timeout)
        has_pixels = any(all(isinstance(p, np.ndarray) for p in c) for c in chunks)
        shm = self._shared_memory() if has_pixels else None
        via = " through shared memory" if shm else ""
        logger.debug("classify: %d request(s) to %s%s", len(chunks), self._cfg.address, via)

        def send(chunk: list[Part]) -> list[Classification]:
            pixels = _pixels(chunk) if shm is not None else None
            if shm is not None and pixels is not None:
                try:
                    return self._classify_shm(shm, pixels, top_k, include_logits, deadline)
                except CifarServeError as exc:
                    # A region the server no longer knows (it restarted, or another process
                    # unregistered it): in auto mode, carry on through the socket.
                    if self._shm_mode == "on" or "shared memory" not in exc.message:
                        raise
                    self._drop_shared_memory(exc)
            req = build_request(chunk, top_k, include_logits)
            with self._lane_lock:
                lane = self._lane_for_next()
            if lane is not None:
                resp = lane.classify(req, deadline)
            else:
                resp = self._call("Classify", self._stub.Classify, req, deadline)
            return _Config.results([resp], [req])

        with self._lane_lock:
            self._calls += 1
        try:
            workers = min(len(chunks), self._cfg.max_concurrent_requests)
            if workers == 1:
                answers = [send(c) for c in chunks]
            else:
                pool = ThreadPoolExecutor(workers, thread_name_prefix="cifar-classify")
                try:
                    answers = list(pool.map(send, chunks))
                finally:  # on a failure, drop the requests not yet sent
                    pool.shutdown(wait=True, cancel_futures=True)
        finally:
            with self._lane_lock:
                self._calls -= 1
        return [c for answer in answers for c in answer]

    def _lane_for_next(self) -> SyncStreamLane | None:
        """The stream lane, when the next request is to go over it (see the class docstring);
        called holding ``_lane_lock``."""
        mode = self._stream_mode
        if mode is False or (mode == "auto" and (self._calls < 2 or not self._one_server)):
            return None
        if self._lane is None:
            self._lane = SyncStreamLane(
                self._cfg,
                self._open_stream,
                self._stream_limit,
                self._wait_serving,
                window=_stream.STREAM_WINDOW,
            )
        return self._lane

    def _open_stream(self, requests: Iterator[pb.ClassifyStreamRequest], wait_for_ready: bool) -> Any:
        # No timeout: the stream outlives any one request; each request's deadline is the lane's.
        return self._stub.ClassifyStream(
            requests, metadata=self._cfg.metadata, wait_for_ready=wait_for_ready or None
        )

    def _stream_limit(self, deadline: float | None) -> int:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        return self.model_info(timeout=left).limits.max_stream_requests

    @property
    def streams_opened(self) -> int:
        """How many ``ClassifyStream`` calls the stream lane has opened (0: not used), closed ones too."""
        lane = self._lane
        return self._streams_closed + (0 if lane is None else lane.streams_opened)

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """What the server serves: name, version, labels, input spec, device, batching and limits."""
        msg = self._call(
            "GetModelInfo", self._stub.GetModelInfo, pb.GetModelInfoRequest(), self._cfg.deadline(timeout)
        )
        return ModelInfo.from_proto(msg)

    def close(self) -> None:
        """End the stream lane's streams, unregister and remove the shared memory regions (if any),
        then close the channel."""
        with self._lane_lock:
            lane, self._lane = self._lane, None
            self._stream_mode = False  # a call still running after close() gets no new lane
        if lane is not None:
            self._streams_closed += lane.streams_opened
            lane.close()
        with self._shm_lock:
            shm, self._shm, self._shm_decided = self._shm, None, True
        try:
            if shm is not None:
                shm.close()
        finally:
            for ch in self._shm_channels:
                ch.close()
            if self._probe_channel is not None:
                self._probe_channel.close()
            self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncClient:
    """The asyncio twin of :class:`Client` (``grpc.aio``): same arguments, awaitable methods.

    The channel is opened on first use, inside the running event loop; use ``async with`` or
    ``await client.close()``. Requests of one large call run concurrently, up to
    ``max_concurrent_requests`` at a time.

    ``stream`` (``"auto"`` by default, ``True`` or ``False``): concurrent calls share one
    long-lived ``ClassifyStream``, exactly as for :class:`Client` (see there).
    """

    def __init__(
        self,
        address: Servers = DEFAULT_ADDRESS,
        *,
        timeout: float | None = None,
        retries: int = 3,
        backoff: float = 0.1,
        tls: bool = False,
        root_certificates: Credential | None = None,
        client_cert: Credential | None = None,
        client_key: Credential | None = None,
        server_name: str | None = None,
        token: str | None = None,
        max_images_per_request: int = 256,
        max_concurrent_requests: int = 4,
        options: Sequence[tuple[str, Any]] = (),
        stream: bool | str = "auto",
    ) -> None:
        self._stream_mode = check_stream_mode(stream)
        self._cfg = _Config(
            address,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            tls=tls,
            root_certificates=root_certificates,
            client_cert=client_cert,
            client_key=client_key,
            server_name=server_name,
            token=token,
            max_images_per_request=max_images_per_request,
            max_concurrent_requests=max_concurrent_requests,
            options=options,
        )
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.ClassifierStub | None = None
        self._probe_channel: grpc.aio.Channel | None = None
        self._lane: StreamLane | None = None
        # "auto" carries requests over the lane only to one server (a stream is pinned to one).
        target = self._cfg.target
        self._one_server = len(target.servers) == 1 and not target.target.startswith("dns:")
        self._calls = 0  # classify() calls of this client under way
        self._streams_closed = 0  # streams opened by lanes that close() has ended

    @property
    def address(self) -> str:
        return self._cfg.address

    def __repr__(self) -> str:
        return f"AsyncClient({self._cfg.address!r})"

    def _open_channel(self, options: Sequence[tuple[str, Any]]) -> grpc.aio.Channel:
        if self._cfg.credentials is not None:
            return grpc.aio.secure_channel(self._cfg.target.target, self._cfg.credentials, options=options)
        return grpc.aio.insecure_channel(self._cfg.target.target, options=options)

    def _get_stub(self) -> pb_grpc.ClassifierStub:
        if self._stub is None:
            self._channel = self._open_channel(self._cfg.options)
            self._stub = pb_grpc.ClassifierStub(self._channel)
        return self._stub

    async def _wait_serving(self, method: str, request: Any, deadline: float) -> str:
        """See :meth:`Client._wait_serving`."""
        if self._probe_channel is None:
            self._probe_channel = self._open_channel(self._cfg.probe_options)
        channel = self._probe_channel
        wait = _ServingWait(channel, method)
        left = deadline - time.monotonic()
        if wait.probe is not None and left > 0:
            try:
                await wait.probe(request, timeout=left, metadata=self._cfg.metadata)
            except grpc.RpcError as exc:
                wait.refused(exc)
        logger.info("%s: %s; waiting up to %.3gs for SERVING", self.address, wait.reason, max(left, 0.0))
        health = health_pb2_grpc.HealthStub(channel)
        while (left := deadline - time.monotonic()) > 0:
            try:
                watch = health.Watch(_WATCH, timeout=left, wait_for_ready=True, metadata=self._cfg.metadata)
                async for answer in watch:
                    if wait.heard(answer.status):
                        watch.cancel()
                        return ""
            except grpc.RpcError as exc:
                ended = wait.watch_failed(exc)
                if ended is not None:
                    return ended
            await asyncio.sleep(wait.pause(self._cfg.backoff, left))
        return wait.reason

    async def _call(
        self, method: str, fn: Callable[..., Awaitable[Resp]], request: Any, deadline: float | None
    ) -> Resp:
        retry = self._cfg.retry(method, deadline)
        while True:
            try:
                left = _Config.remaining(deadline, method)
                return await fn(
                    request, timeout=left, metadata=self._cfg.metadata, wait_for_ready=retry.waited or None
                )
            except grpc.RpcError as exc:  # grpc.aio.AioRpcError is one
                err = error_from_rpc(exc)
            if retry.wait_first(err):
                assert deadline is not None
                retry.waited_for(await self._wait_serving(method, request, deadline))
            await asyncio.sleep(retry.delay(err))

    async def classify(
        self,
        inputs: Inputs,
        *,
        top_k: int = 1,
        include_logits: bool = False,
        timeout: float | None = None,
    ) -> list[Classification]:
        """Classify one input or a list of them; see :meth:`Client.classify`."""
        requests = self._cfg.plan(inputs, top_k, include_logits)
        if not requests:
            return []
        deadline = self._cfg.deadline(timeout)
        stub = self._get_stub()
        gate = asyncio.Semaphore(self._cfg.max_concurrent_requests)
        logger.debug("classify: %d request(s) to %s", len(requests), self._cfg.address)

        async def send(req: pb.ClassifyRequest) -> pb.ClassifyResponse:
            async with gate:
                lane = self._lane_for_next()
                if lane is not None:
                    return await lane.classify(req, deadline)
                return await self._call("Classify", stub.Classify, req, deadline)

        self._calls += 1
        try:
            if len(requests) == 1:
                responses = [await send(requests[0])]
            else:
                tasks = [asyncio.ensure_future(send(r)) for r in requests]
                try:
                    responses = await asyncio.gather(*tasks)
                finally:
                    for t in tasks:
                        t.cancel()
        finally:
            self._calls -= 1
        return _Config.results(responses, requests)

    def _lane_for_next(self) -> StreamLane | None:
        """The stream lane, when the next request is to go over it (see the class docstring)."""
        mode = self._stream_mode
        if mode is False or (mode == "auto" and (self._calls < 2 or not self._one_server)):
            return None
        if self._lane is None:
            self._lane = StreamLane(
                self._cfg,
                self._open_stream,
                self._stream_limit,
                self._wait_serving,
                window=_stream.STREAM_WINDOW,
            )
        return self._lane

    def _open_stream(
        self, wait_for_ready: bool
    ) -> grpc.aio.StreamStreamCall[pb.ClassifyStreamRequest, pb.ClassifyStreamResponse]:
        # No timeout: the stream outlives any one request; each request's deadline is the lane's.
        call: grpc.aio.StreamStreamCall[pb.ClassifyStreamRequest, pb.ClassifyStreamResponse]
        call = self._get_stub().ClassifyStream(
            metadata=self._cfg.metadata, wait_for_ready=wait_for_ready or None
        )
        return call

    async def _stream_limit(self, deadline: float | None) -> int:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        return (await self.model_info(timeout=left)).limits.max_stream_requests

    @property
    def streams_opened(self) -> int:
        """How many ``ClassifyStream`` calls the stream lane has opened (0: not used), closed ones too."""
        return self._streams_closed + (0 if self._lane is None else self._lane.streams_opened)

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """What the server serves; see :meth:`Client.model_info`."""
        stub = self._get_stub()
        msg = await self._call(
            "GetModelInfo", stub.GetModelInfo, pb.GetModelInfoRequest(), self._cfg.deadline(timeout)
        )
        return ModelInfo.from_proto(msg)

    async def close(self) -> None:
        """End the stream lane's streams (half-closed: the server ends them cleanly), then the channels."""
        lane, self._lane = self._lane, None
        if lane is not None:
            self._streams_closed += lane.streams_opened
            await lane.close()
        if self._probe_channel is not None:
            await self._probe_channel.close()
        if self._channel is not None:
            await self._channel.close()
        self._channel = None
        self._probe_channel = None
        self._stub = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
