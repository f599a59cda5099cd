"""Domain errors of the inference core, and their one mapping to gRPC status codes.

The core raises these without knowing about gRPC; servicers translate them with
:func:`status_for` and nothing else, so every API reports a failure the same way.
"""

from __future__ import annotations

import grpc

__all__ = [
    "AlreadyExists",
    "DeadlineExceeded",
    "InferenceError",
    "InternalError",
    "InvalidInput",
    "ModelLoadFailed",
    "ModelNotFound",
    "NotFound",
    "QueueFull",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "status_for",
]


class InferenceError(Exception):
    """Base of every error the core reports to callers."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(InferenceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(InferenceError):
    code = grpc.StatusCode.NOT_FOUND


class ModelLoadFailed(InferenceError):
    """A new model version failed to load or its checks; the serving version stays."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(InferenceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class QueueFull(ResourceExhausted):
    """The bounded queue is full: refused at once rather than left to time out."""


class DeadlineExceeded(InferenceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(InferenceError):
    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(InferenceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class InternalError(InferenceError):
    code = grpc.StatusCode.INTERNAL


# Shared memory extension (server/shm.py): a region registered twice, a status asked of an unknown one.
class AlreadyExists(InferenceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class NotFound(InferenceError):
    code = grpc.StatusCode.NOT_FOUND


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a caller sees for ``exc``."""
    if isinstance(exc, InferenceError):
        return exc.code, exc.message
    # Anything unexpected is a server bug: say so without leaking internals.
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"
