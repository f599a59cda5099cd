"""Domain errors of the inference core, each with a transport-neutral status :class:`Code`.

The core raises these without knowing about gRPC or HTTP; the admission layer
(:mod:`.admission`) alone maps a :class:`Code` to a gRPC status and an HTTP status, so every
API reports a failure the same way.
"""

from __future__ import annotations

import enum
import errno

__all__ = [
    "AlreadyExists",
    "BodyTimeout",
    "BodyTooLarge",
    "Code",
    "DeadlineExceeded",
    "InferenceError",
    "InternalError",
    "InvalidInput",
    "ModelLoadFailed",
    "ModelNotFound",
    "NotFound",
    "PermissionDenied",
    "QueueFull",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "exhausted",
    "status_for",
]


class Code(enum.Enum):
    """A call's outcome. The names are gRPC's, so the mapping to ``grpc.StatusCode`` is by name."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class InferenceError(Exception):
    """Base of every error the core reports to callers."""

    code: Code = Code.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(InferenceError):
    code = Code.INVALID_ARGUMENT


class ModelNotFound(InferenceError):
    code = Code.NOT_FOUND


class ModelLoadFailed(InferenceError):
    """A new model version failed to load or its checks; the serving version stays."""

    code = Code.FAILED_PRECONDITION


class ResourceExhausted(InferenceError):
    code = Code.RESOURCE_EXHAUSTED


class QueueFull(ResourceExhausted):
    """The bounded queue is full: refused at once rather than left to time out."""


class BodyTooLarge(ResourceExhausted):
    """An HTTP body over ``--max-receive-message-bytes`` (HTTP 413)."""


class DeadlineExceeded(InferenceError):
    code = Code.DEADLINE_EXCEEDED


class BodyTimeout(DeadlineExceeded):
    """An HTTP client stalled while sending its body (HTTP 408)."""


class Unavailable(InferenceError):
    code = Code.UNAVAILABLE


class Unauthenticated(InferenceError):
    code = Code.UNAUTHENTICATED


class PermissionDenied(InferenceError):
    """Authenticated, but the call's group needs another credential or is switched off."""

    code = Code.PERMISSION_DENIED


class InternalError(InferenceError):
    code = Code.INTERNAL


# Shared memory extension (server/shm.py): a region registered twice, a status asked of an unknown one.
class AlreadyExists(InferenceError):
    code = Code.ALREADY_EXISTS


class NotFound(InferenceError):
    code = Code.NOT_FOUND


def status_for(exc: BaseException) -> tuple[Code, str]:
    """The status code and message a caller sees for ``exc``."""
    if isinstance(exc, InferenceError):
        return exc.code, exc.message
    # Anything unexpected is a server bug: say so without leaking internals.
    return Code.INTERNAL, f"internal error: {type(exc).__name__}"


# The host ran out of something every request shares: memory-backed files or descriptors.
_EXHAUSTION = frozenset({errno.ENOSPC, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EDQUOT})


def exhausted(exc: OSError, what: str) -> ResourceExhausted | None:
    """RESOURCE_EXHAUSTED for an OSError that says the host is out of room, else None."""
    if exc.errno not in _EXHAUSTION:
        return None
    return ResourceExhausted(f"{what}: the server host is out of {_room(exc.errno)}; retry later")


def _room(code: int | None) -> str:
    if code in (errno.EMFILE, errno.ENFILE):
        return "file descriptors"
    if code == errno.ENOMEM:
        return "memory"
    return "shared memory (/dev/shm is full)"
