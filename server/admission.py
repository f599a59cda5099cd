"""The one admission layer every transport passes: gRPC (:mod:`.edge`), REST (:mod:`.rest`) and,
through them, every worker process of ``--workers N``.

One policy table names each endpoint's group, by its Open Inference Protocol (or native) method
name, which REST routes share:

* **open**: liveness, readiness, server metadata (load balancers and probes carry no token);
* **inference**: predictions, model metadata, configuration, statistics;
* **admin**: the model repository (index, load, unload) and shared-memory registration.

and one implementation each of:

* auth: ``authorization: Bearer <token>``, compared in constant time. ``--auth-token`` guards
  *inference* (and *admin* unless it has its own); ``--admin-token`` guards *admin* alone: the
  inference token does not grant it (Triton's restricted protocol groups);
* readiness: calls of gated endpoints get ``UNAVAILABLE`` with the lifecycle's reason;
* the byte budget (:class:`ByteBudget`): request bytes held at once, across transports;
* call accounting: in-flight count, request counter, latency histogram, once per call;
* status mapping: domain error → :class:`.errors.Code` → gRPC status and HTTP status, and a
  logged traceback for anything unexpected.
"""

from __future__ import annotations

import asyncio
import enum
import hmac
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from .errors import (
    BodyTimeout,
    BodyTooLarge,
    Code,
    InferenceError,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    status_for,
)
from .lifecycle import Lifecycle
from .metrics import Metrics
from .settings import Settings

__all__ = [
    "POLICIES",
    "Admission",
    "ByteBudget",
    "Call",
    "Group",
    "Policy",
    "grpc_status",
    "http_status",
]

logger = logging.getLogger(__name__)

_MIB = 1024 * 1024


class Group(enum.Enum):
    OPEN = "open"
    INFERENCE = "inference"
    ADMIN = "admin"


@dataclass(frozen=True)
class Policy:
    group: Group
    # Refused with UNAVAILABLE while the lifecycle says not ready. Probes answer "not ready"
    # instead, and the repository answers while unloaded: a load is how to recover.
    gated: bool


_OPEN = Policy(Group.OPEN, gated=False)
_INFER = Policy(Group.INFERENCE, gated=True)
_ADMIN = Policy(Group.ADMIN, gated=False)
_ADMIN_GATED = Policy(Group.ADMIN, gated=True)

POLICIES: Mapping[str, Policy] = {
    # cifar_serve.v1.Classifier
    "Classify": _INFER,
    "ClassifyStream": _INFER,
    "GetModelInfo": _INFER,
    # inference.GRPCInferenceService and its REST routes
    "ServerLive": _OPEN,
    "ServerReady": _OPEN,
    "ModelReady": _OPEN,
    "ServerMetadata": _OPEN,
    "ModelMetadata": _INFER,
    "ModelConfig": _INFER,
    # perf_analyzer and model_analyzer read statistics with the inference credentials.
    "ModelStatistics": _INFER,
    "ModelInfer": _INFER,
    "ModelStreamInfer": _INFER,
    "RepositoryIndex": _ADMIN,
    "RepositoryModelLoad": _ADMIN,
    "RepositoryModelUnload": _ADMIN,
    # A registered region is one the server reads inputs from and writes logits into.
    "SystemSharedMemoryStatus": _ADMIN_GATED,
    "SystemSharedMemoryRegister": _ADMIN_GATED,
    "SystemSharedMemoryUnregister": _ADMIN_GATED,
}
# An endpoint missing from the table is treated as inference: closed, never open by omission.
_DEFAULT = _INFER


# gRPC's code -> HTTP status (google.rpc's published mapping; Triton's where it has one).
_HTTP: Mapping[Code, int] = {
    Code.OK: 200,
    Code.INVALID_ARGUMENT: 400,
    Code.FAILED_PRECONDITION: 400,
    Code.OUT_OF_RANGE: 400,
    Code.UNAUTHENTICATED: 401,
    Code.PERMISSION_DENIED: 403,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.ABORTED: 409,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.CANCELLED: 499,
    Code.UNIMPLEMENTED: 501,
    Code.UNAVAILABLE: 503,
    Code.DEADLINE_EXCEEDED: 504,
}


def grpc_status(code: Code) -> grpc.StatusCode:
    return grpc.StatusCode[code.name]


def http_status(exc: BaseException | None, code: Code) -> int:
    """The HTTP status of an outcome; HTTP has finer words than gRPC for two body failures."""
    if isinstance(exc, BodyTooLarge):
        return 413
    if isinstance(exc, BodyTimeout):
        return 408
    return _HTTP.get(code, 500)


class ByteBudget:
    """Request bytes held at once, by every transport of the process. Only the event loop touches
    it (grpc.aio parses there; REST reads bodies there)."""

    def __init__(self, limit: int, metrics: Metrics | None = None) -> None:
        self.limit = limit
        self.held = 0
        self._metrics = metrics

    def try_acquire(self, n: int) -> bool:
        if self.held + n > self.limit:
            return False
        self.held += n
        self._gauge()
        return True

    def acquire(self, n: int) -> None:
        """Take ``n`` bytes or raise RESOURCE_EXHAUSTED saying how full the budget is."""
        if not self.try_acquire(n):
            raise ResourceExhausted(
                f"server is holding {self.held / _MIB:.1f} MiB of requests, limit "
                f"{self.limit / _MIB:.1f} MiB (--max-inflight-request-bytes); retry later"
            )

    def release(self, n: int) -> None:
        self.held -= n
        self._gauge()

    def _gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.held_bytes.set(self.held)


class _Series:
    """The request counter's and latency histogram's children, bound once per (method, code):
    ``.labels()`` on every call costs more than the rest of a call's accounting."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._counts: dict[tuple[str, Code], Any] = {}
        self._latency: dict[str, Any] = {}

    def count(self, label: str, code: Code) -> Any:
        child = self._counts.get((label, code))
        if child is None:
            child = self._counts[(label, code)] = self.metrics.requests.labels(label, code.name)
        return child

    def latency(self, label: str) -> Any:
        child = self._latency.get(label)
        if child is None:
            child = self._latency[label] = self.metrics.latency.labels(label)
        return child


class Call:
    """One call's accounting: in flight from creation to :meth:`finish`, counted once."""

    __slots__ = ("_label", "_series", "_started", "code")

    def __init__(self, series: _Series, label: str) -> None:
        self._series = series
        self._label = label
        self._started = time.monotonic()
        self.code = Code.OK
        series.metrics.begin()

    def outcome(self, exc: BaseException) -> tuple[Code, str]:
        """The status and message ``exc`` answers with (recorded for :meth:`finish`)."""
        if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            code, message = Code.CANCELLED, "cancelled"
        elif isinstance(exc, InferenceError):
            code, message = status_for(exc)
        elif isinstance(exc, Exception):
            logger.error("unexpected error in %s", self._label, exc_info=exc)
            code, message = status_for(exc)
        else:
            code, message = Code.UNKNOWN, type(exc).__name__
        self.code = code
        return code, message

    def finish(self, code: Code | None = None) -> None:
        if code is not None:
            self.code = code
        series = self._series
        series.metrics.end()
        series.count(self._label, self.code).inc()
        series.latency(self._label).observe(time.monotonic() - self._started)


class Admission:
    """The policy table enforced: who may call what, when, holding how many bytes."""

    def __init__(self, settings: Settings, lifecycle: Lifecycle, metrics: Metrics) -> None:
        self.settings = settings
        self.lifecycle = lifecycle
        self.metrics = metrics
        self.budget = ByteBudget(settings.max_inflight_request_bytes, metrics)
        self._series = _Series(metrics)
        self._inference = _bearer(settings.auth_token)
        self._admin = _bearer(settings.admin_token)

    @staticmethod
    def policy(method: str) -> Policy:
        return POLICIES.get(method, _DEFAULT)

    def call(self, label: str) -> Call:
        return Call(self._series, label)

    def needs_credentials(self, policy: Policy) -> bool:
        """Whether a call of ``policy`` is checked against a token (so its header is worth reading)."""
        if policy.group is Group.OPEN:
            return False
        if policy.group is Group.ADMIN and self._admin:
            return True
        return bool(self._inference)

    def admit(self, policy: Policy, authorization: str | bytes | None) -> None:
        """Raise unless a call of ``policy`` with this ``authorization`` header may run now."""
        self.authorize(policy.group, authorization)
        if policy.gated:
            self.lifecycle.check()

    def authorize(self, group: Group, authorization: str | bytes | None) -> None:
        if group is Group.OPEN:
            return
        given = authorization.encode() if isinstance(authorization, str) else authorization
        if group is Group.ADMIN and self._admin:
            if given is not None and hmac.compare_digest(given, self._admin):
                return
            if given is not None and self._inference and hmac.compare_digest(given, self._inference):
                raise PermissionDenied(
                    "this call is in the admin group: the inference token does not grant it; "
                    "send the admin token (--admin-token)"
                )
            raise Unauthenticated("missing or invalid bearer token for an admin call (--admin-token)")
        if not self._inference:
            return
        if given is not None and hmac.compare_digest(given, self._inference):
            return
        # The admin credential is the stronger one: it grants inference too.
        if given is not None and self._admin and hmac.compare_digest(given, self._admin):
            return
        raise Unauthenticated("missing or invalid bearer token")


def _bearer(token: str) -> bytes:
    return f"Bearer {token}".encode() if token else b""
