"""System shared memory for a client on the server's own host (Triton's system shared memory extension).

Instead of sending the pixels through the socket, the client writes them into a POSIX shared
memory object, registers it with the server once (``SystemSharedMemoryRegister``), and sends an
Open Inference Protocol ``ModelInfer`` whose input and output name the region, an offset and a
byte size: the server reads the images from the region and writes the logits back into it, so
only a few hundred bytes cross the socket.

The objects are made with the standard library's :class:`multiprocessing.shared_memory.SharedMemory`
(``shm_open`` + ``mmap``; no native helper library, nothing beyond Python to install). Its resource
tracker also unlinks an object the process leaked, even when the process was killed.

Each request in flight holds one *slot*: one object of ``capacity`` images in and their logits
out, registered under one name on every server. A slot whose request failed is never reused: a
server still working on it could otherwise write stale logits into the next request's answer,
so it is unregistered (a late write then finds no region and is refused) and unlinked.

Whether a server is on this host is decided in two steps: every address must be loopback (or a
unix socket), and registering a first region must succeed. The second catches a server in a
container behind a loopback port, whose ``/dev/shm`` is not ours: it answers that it has no such
object, and the caller falls back to the socket.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any, Literal

import grpc
import numpy as np

from cifar_serve.v1 import open_inference_pb2 as oip
from cifar_serve.v1 import open_inference_pb2_grpc as oip_grpc

from ._errors import CifarServeError, error_from_rpc, invalid_argument
from ._targets import _DNS, Target, _scheme, join_host_port, split_host_port
from ._types import Classification, Prediction

__all__ = [
    "SHARED_MEMORY_MODES",
    "SharedMemoryMode",
    "SharedMemorySession",
    "check_mode",
    "classifications",
    "local_servers",
]

logger = logging.getLogger("cifar_serve.client")

SharedMemoryMode = Literal["auto", "on", "off"]
SHARED_MEMORY_MODES: tuple[SharedMemoryMode, ...] = ("auto", "on", "off")
IMAGE_BYTES = 32 * 32 * 3
KEY_PREFIX = "cifar-serve-client-"
_CONTROL_TIMEOUT_S = 10.0  # register/unregister: small, local calls


def check_mode(mode: str) -> SharedMemoryMode:
    for m in SHARED_MEMORY_MODES:
        if mode == m:
            return m
    raise ValueError(f"shared_memory must be one of {', '.join(SHARED_MEMORY_MODES)}, got {mode!r}")


# --------------------------------------------------------------------------- same host?


def _loopback_addresses(host: str, port: int) -> list[str] | None:
    """Every address ``host`` resolves to, when all are loopback; None otherwise (or unresolvable)."""
    try:
        return [host] if ipaddress.ip_address(host).is_loopback else None
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return None
    addresses = sorted({str(info[4][0]) for info in infos})
    if not addresses or not all(ipaddress.ip_address(a.partition("%")[0]).is_loopback for a in addresses):
        return None
    return addresses


def local_servers(target: Target) -> list[str] | None:
    """A channel target for each server of ``target`` when all of them are on this host, else None.

    On this host means a unix socket, or an address that is (or a name that resolves only to)
    loopback. Each server needs the region registered, since gRPC's round robin may send any
    request to any of them.
    """
    out: list[str] = []
    for entry in target.servers:
        scheme = _scheme(entry)
        if scheme in ("unix", "unix-abstract"):
            out.append(entry)
        elif scheme == "dns":
            m = _DNS.match(entry)
            if m is None:
                return None
            host, port = split_host_port(m["name"])
            addresses = _loopback_addresses(host, port)
            if addresses is None:
                return None
            # One server behind however many loopback addresses the name has (127.0.0.1 and ::1).
            out.append(join_host_port(addresses[0], port))
        elif scheme is not None:  # ipv4:/ipv6: lists, vsock, xds: not worth guessing
            return None
        else:
            host, port = split_host_port(entry)
            if _loopback_addresses(host, port) is None:
                return None
            out.append(entry)
    return out


# --------------------------------------------------------------------------- answers


def classifications(
    logits: np.ndarray, top_k: int, labels: Sequence[str], include_logits: bool
) -> list[Classification]:
    """What the server's ``Classify`` answers for these logits, computed the same way.

    Softmax in float64, a stable sort (ties keep class order) and float32 probabilities, as
    ``cifar_serve.server.core.rank`` does, so both paths give the same rows.
    """
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    probs = e / e.sum(axis=1, keepdims=True)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
    ranked = np.take_along_axis(probs, order, axis=1).astype(np.float32).tolist()
    out = []
    for i, (idx, p) in enumerate(zip(order.tolist(), ranked, strict=True)):
        preds = tuple(Prediction(labels[c], c, prob) for c, prob in zip(idx, p, strict=True))
        row: np.ndarray | None = None
        if include_logits:
            row = logits[i].astype(np.float32, copy=True)
            row.setflags(write=False)
        out.append(Classification(preds[0].label, preds[0].class_index, preds[0].probability, preds, row))
    return out


# --------------------------------------------------------------------------- regions


@dataclass
class _Slot:
    name: str  # the region's name on every server, and the object's name in /dev/shm
    memory: shared_memory.SharedMemory
    capacity: int  # images

    @property
    def out_offset(self) -> int:
        return self.capacity * IMAGE_BYTES

    @property
    def buf(self) -> memoryview:
        buf = self.memory.buf
        if buf is None:
            raise CifarServeError(grpc.StatusCode.CANCELLED, f"shared memory region {self.name} is closed")
        return buf


class SharedMemorySession:
    """The regions one client registered with its server(s); thread-safe. Close it to release them."""

    def __init__(
        self,
        stubs: Sequence[Any],
        *,
        model_name: str,
        labels: Sequence[str],
        capacity: int,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        self._stubs = list(stubs)  # one GRPCInferenceServiceStub per server
        self.model_name = model_name
        self.labels = tuple(labels)
        self.capacity = capacity
        self._metadata = tuple(metadata)
        self._lock = threading.Lock()
        self._free: list[_Slot] = []
        self._all: dict[str, _Slot] = {}
        self._closed = False

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def _new_slot(self) -> _Slot:
        name = f"{KEY_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
        size = self.capacity * (IMAGE_BYTES + 4 * self.num_classes)
        memory = shared_memory.SharedMemory(name=name, create=True, size=size)
        slot = _Slot(name, memory, self.capacity)
        registered = []
        register = oip.SystemSharedMemoryRegisterRequest(name=name, key=f"/{name}", offset=0, byte_size=size)
        try:
            for stub in self._stubs:
                stub.SystemSharedMemoryRegister(
                    register,
                    timeout=_CONTROL_TIMEOUT_S,
                    metadata=self._metadata,
                )
                registered.append(stub)
        except grpc.RpcError as exc:
            self._destroy(slot, registered)
            raise error_from_rpc(exc) from None
        except BaseException:
            self._destroy(slot, registered)
            raise
        logger.debug("registered shared memory region %s (%d bytes)", name, size)
        return slot

    def acquire(self) -> _Slot:
        with self._lock:
            if self._closed:
                raise CifarServeError(grpc.StatusCode.CANCELLED, "the client is closed")
            if self._free:
                return self._free.pop()
        slot = self._new_slot()  # registering takes a round trip: not under the lock
        with self._lock:
            self._all[slot.name] = slot
            if not self._closed:
                return slot
        self._discard(slot)
        raise CifarServeError(grpc.StatusCode.CANCELLED, "the client is closed")

    def release(self, slot: _Slot, reusable: bool) -> None:
        """Hand ``slot`` back; one whose request failed is unregistered and removed instead."""
        with self._lock:
            if reusable and not self._closed:
                self._free.append(slot)
                return
        self._discard(slot)

    @staticmethod
    def write_images(slot: _Slot, images: np.ndarray) -> None:
        """Put uint8 ``[n,32,32,3]`` ``images`` at the start of ``slot``."""
        if len(images) > slot.capacity:
            raise ValueError(f"{len(images)} images do not fit a slot of {slot.capacity}")
        data = np.ascontiguousarray(images, dtype=np.uint8)
        # Straight into the mapping; the view is dropped at once, or closing the object would fail.
        view = np.ndarray((data.nbytes,), np.uint8, buffer=slot.buf)
        view[:] = data.reshape(-1)
        del view

    def request(self, slot: _Slot, images: np.ndarray) -> oip.ModelInferRequest:
        """Write ``images`` into ``slot`` and build the ``ModelInfer`` that points the server at them."""
        self.write_images(slot, images)
        n = len(images)
        req = oip.ModelInferRequest(model_name=self.model_name)
        inp = req.inputs.add(name="images", datatype="UINT8", shape=[n, 32, 32, 3])
        inp.parameters["shared_memory_region"].string_param = slot.name
        inp.parameters["shared_memory_byte_size"].int64_param = n * IMAGE_BYTES
        out = req.outputs.add(name="logits")
        out.parameters["shared_memory_region"].string_param = slot.name
        out.parameters["shared_memory_offset"].int64_param = slot.out_offset
        out.parameters["shared_memory_byte_size"].int64_param = n * self.num_classes * 4
        return req

    def logits(self, slot: _Slot, resp: oip.ModelInferResponse, n: int) -> np.ndarray:
        """The ``[n, classes]`` logits the server wrote into ``slot`` for the answer ``resp``."""
        shapes = [list(o.shape) for o in resp.outputs]
        if shapes != [[n, self.num_classes]]:
            raise CifarServeError(
                grpc.StatusCode.INTERNAL,
                f"server answered outputs of shape {shapes} for {n} images in shared memory",
            )
        start = slot.out_offset
        raw = bytes(slot.buf[start : start + n * self.num_classes * 4])
        return np.frombuffer(raw, "<f4").reshape(n, self.num_classes)

    def check_top_k(self, top_k: int) -> None:
        # The server checks this for Classify; ModelInfer carries no top_k, so check it here, alike.
        if not 1 <= top_k <= self.num_classes:
            raise invalid_argument(f"top_k must be between 1 and {self.num_classes}, got {top_k}")

    def regions(self) -> list[str]:
        with self._lock:
            return sorted(self._all)

    def _destroy(self, slot: _Slot, stubs: Sequence[Any]) -> None:
        for stub in stubs:
            try:
                stub.SystemSharedMemoryUnregister(
                    oip.SystemSharedMemoryUnregisterRequest(name=slot.name),
                    timeout=_CONTROL_TIMEOUT_S,
                    metadata=self._metadata,
                )
            except grpc.RpcError as exc:  # the server may be gone; the object goes anyway
                logger.debug("unregistering %s: %s", slot.name, error_from_rpc(exc))
        try:
            slot.memory.close()
        except BufferError:  # a request of another thread still holds a view: the unlink still frees it
            logger.debug("closing %s while in use", slot.name)
        try:
            slot.memory.unlink()
        except FileNotFoundError:
            pass

    def _discard(self, slot: _Slot) -> None:
        with self._lock:
            self._all.pop(slot.name, None)
            if slot in self._free:
                self._free.remove(slot)
        self._destroy(slot, self._stubs)

    def close(self) -> None:
        """Unregister every region from every server and remove the objects (idempotent)."""
        with self._lock:
            self._closed = True
            slots = list(self._all.values())
            self._all.clear()
            self._free.clear()
        for slot in slots:
            self._destroy(slot, self._stubs)


def open_session(
    channels: Sequence[grpc.Channel],
    *,
    model_name: str,
    labels: Sequence[str],
    capacity: int,
    metadata: Sequence[tuple[str, str]] = (),
) -> SharedMemorySession:
    """A session with one region already registered on every server: raises if any refuses it."""
    session = SharedMemorySession(
        [oip_grpc.GRPCInferenceServiceStub(ch) for ch in channels],
        model_name=model_name,
        labels=labels,
        capacity=capacity,
        metadata=metadata,
    )
    try:
        session.release(session.acquire(), True)
    except BaseException:
        session.close()
        raise
    return session
