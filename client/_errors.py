"""The client's own exceptions: every failure carries a ``grpc.StatusCode``; no raw ``grpc.RpcError`` leaks.

Modelled on tritonclient's ``InferenceServerException`` (the gRPC error is wrapped, its status and
details kept), with one subclass per status code a caller is likely to handle, so both
``except UnavailableError`` and ``except CifarServeError as e: if e.code is ...`` work.
"""

from __future__ import annotations

import re

import grpc

__all__ = [
    "CifarServeError",
    "DeadlineExceededError",
    "InvalidArgumentError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "error_from_rpc",
    "error_for",
    "invalid_argument",
    "readable_message",
]

# Pillow names the in-memory file it was handed ("cannot identify image file <_io.BytesIO object
# at 0x7f...>"): noise to a reader, since the message already names the file or input index.
_BYTESIO_DETAIL = re.compile(r"\s*\(cannot identify image file <_io\.BytesIO object at 0x[0-9a-fA-F]+>\)")
_BYTESIO = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def readable_message(message: str) -> str:
    """``message`` without Pillow's ``<_io.BytesIO object at 0x...>`` detail."""
    return _BYTESIO.sub("the image data", _BYTESIO_DETAIL.sub("", message))


class CifarServeError(Exception):
    """A call failed. ``code`` is the gRPC status code, ``message`` the server's (or client's) explanation."""

    code: grpc.StatusCode

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.message!r})"

    def __reduce__(self) -> tuple[object, tuple[grpc.StatusCode, str]]:
        return error_for, (self.code, self.message)


class InvalidArgumentError(CifarServeError, ValueError):
    """INVALID_ARGUMENT: a bad request (undecodable image, top_k out of range, too many images...).

    Also raised before any request is sent when an input cannot be turned into an image locally.
    """


class DeadlineExceededError(CifarServeError, TimeoutError):
    """DEADLINE_EXCEEDED: the call's timeout ran out."""


class UnavailableError(CifarServeError, ConnectionError):
    """UNAVAILABLE: the server could not be reached (raised after the retries are spent)."""


class ResourceExhaustedError(CifarServeError):
    """RESOURCE_EXHAUSTED: the server's queue is full or a message is too large."""


class UnauthenticatedError(CifarServeError):
    """UNAUTHENTICATED: missing or wrong bearer token."""


class PermissionDeniedError(CifarServeError):
    """PERMISSION_DENIED."""


_BY_CODE: dict[grpc.StatusCode, type[CifarServeError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
}


def error_for(code: grpc.StatusCode, message: str) -> CifarServeError:
    """The most specific exception for ``code``."""
    return _BY_CODE.get(code, CifarServeError)(code, message)


def invalid_argument(message: str) -> InvalidArgumentError:
    """The error for an input that cannot be sent, raised before any request."""
    return InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT, message)


def error_from_rpc(exc: grpc.RpcError) -> CifarServeError:
    """Wrap a ``grpc.RpcError`` (sync or aio) in the library's own exception."""
    code_fn = getattr(exc, "code", None)
    details_fn = getattr(exc, "details", None)
    code = code_fn() if callable(code_fn) else None
    details = details_fn() if callable(details_fn) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    return error_for(code, readable_message(details or str(exc) or code.name))
