"""The Open Inference Protocol (KServe v2) over HTTP/REST, as Triton's HTTP endpoint speaks it.

Starlette routes, uvicorn serves (both the maintained standard of Python ASGI; uvicorn runs in
the server's own event loop, so REST and gRPC calls share one core, one
batcher, one shared memory registry and one set of metrics). Starlette is used without
FastAPI's request models on purpose: the v2 JSON is decoded into the neutral
:class:`.protocol.InferRequest` and validated by :func:`.protocol.parse_request`, as gRPC's
requests are, so both APIs accept and refuse exactly the same requests, with the same messages.
Metadata, config and statistics come from :mod:`.describe`, as gRPC's do.

Endpoints: ``GET /v2/health/live``, ``/v2/health/ready``, ``/v2``, ``/v2/models/{m}[/versions/{v}]``
and its ``/ready``, ``/config``, ``/stats``; ``POST .../infer`` with JSON tensors or Triton's binary
tensor data extension (``Inference-Header-Content-Length``), the classification extension, and
Triton's system shared memory endpoints under ``/v2/systemsharedmemory``.

Errors answer ``{"error": "<message>"}`` with the HTTP status of the gRPC code (Google's
mapping: 400 invalid argument, 401 unauthenticated, 404 not found, 409 already exists, 413 body
too large, 429 resource exhausted, 503 unavailable, 504 deadline exceeded, 500 internal).
The request counter and latency histogram count REST calls as ``REST/<Method>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import describe
from .core import ServingCore
from .edge import ByteBudget
from .errors import (
    DeadlineExceeded,
    InferenceError,
    InvalidInput,
    ModelNotFound,
    ResourceExhausted,
    Unauthenticated,
    status_for,
)
from .protocol import (
    IMAGE_SHAPE,
    INLINE_STRINGS,
    InferPlan,
    InferRequest,
    InputTensor,
    OutputRequest,
    ParamValue,
    infer_outputs,
    parse_request,
    write_shm_outputs,
)
from .protocol import server_version as _server_version  # the name _Api.__init__ reads
from .settings import Settings
from .shm import SharedMemoryRegistry

__all__ = ["HTTP_STATUS", "RestServer", "build_app", "decode_infer", "encode_infer"]

logger = logging.getLogger(__name__)

HEADER_LENGTH = "inference-header-content-length"
_MIB = 1024 * 1024

# gRPC code -> HTTP status (google.rpc's published mapping; Triton's where it has one).
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class BodyTooLarge(ResourceExhausted):
    """The request body is over ``--max-receive-message-bytes``: HTTP 413."""


# ---------------------------------------------------------------------------- JSON <-> neutral


def _parameter(value: Any, what: str) -> ParamValue:
    """A JSON parameter value as the protocol carries it: a boolean, a 64-bit integer, a number or
    a string (the kinds of the protobuf's InferParameter, so both APIs accept the same)."""
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        raise InvalidInput(f"{what} is out of the 64-bit integer range")
    if isinstance(value, bool | int | float | str):
        return value
    raise InvalidInput(f"{what} must be a boolean, a number or a string, got {type(value).__name__}")


def _parameters(doc: Mapping[str, Any], what: str, skip: tuple[str, ...] = ()) -> dict[str, ParamValue]:
    params = doc.get("parameters", {})
    if not isinstance(params, dict):
        raise InvalidInput(f"{what}: 'parameters' must be an object")
    return {
        key: _parameter(value, f"{what}: parameter {key!r}")
        for key, value in params.items()
        if key not in skip
    }


def _object_list(doc: Mapping[str, Any], key: str, what: str) -> list[dict[str, Any]]:
    items = doc.get(key, [])
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise InvalidInput(f"{what}: {key!r} must be a list of objects")
    return items


def _shape(tensor: Mapping[str, Any], what: str) -> list[int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidInput(f"{what}: 'shape' must be a list of integers, got {json.dumps(shape)}")
    if any(not 0 <= d < 2**63 for d in shape):
        raise InvalidInput(f"{what}: shape {shape} has a dimension out of range")
    return shape


def _typed_uint8(data: Any, count: int | None, what: str) -> list[int]:
    """JSON ``data`` (flat or nested, row-major) as UINT8 values; counts and ranges checked."""
    try:
        values = np.asarray(data)
    except ValueError:  # ragged nesting
        raise InvalidInput(f"{what}: 'data' is not a regular (row-major) array") from None
    if values.dtype.kind not in "iu" or values.dtype == np.bool_:
        raise InvalidInput(f"{what}: 'data' must hold integers 0-255 for UINT8")
    if count is not None and values.size != count:
        raise InvalidInput(f"{what}: 'data' holds {values.size} values, the shape needs {count}")
    if values.size and (int(values.min()) < 0 or int(values.max()) > 255):
        raise InvalidInput(f"{what}: 'data' holds values outside 0-255, out of range for UINT8")
    out: list[int] = values.ravel().tolist()
    return out


@dataclass(frozen=True)
class _Decoded:
    request: InferRequest
    binary_outputs: tuple[bool, ...]  # per requested output (or one entry when none is named)
    deadline: float | None


def decode_infer(doc: Any, binary: memoryview, model: str, version: str, max_images: int) -> _Decoded:
    """A v2 JSON inference request (and its binary tail) as the neutral :class:`.protocol.InferRequest`.

    Binary input data stays a view of the request body, not a copy: the batcher copies the images
    into its batch anyway.
    """
    if not isinstance(doc, dict):
        raise InvalidInput("the inference request must be a JSON object")
    rid = doc.get("id", "")
    if not isinstance(rid, str):
        raise InvalidInput("'id' must be a string")
    params = doc.get("parameters", {})
    if not isinstance(params, dict):
        raise InvalidInput("'parameters' must be an object")
    deadline = None
    if "timeout" in params:
        timeout_us = params["timeout"]
        if not isinstance(timeout_us, int) or isinstance(timeout_us, bool) or timeout_us < 0:
            raise InvalidInput("parameter 'timeout' must be a non-negative integer (microseconds)")
        if timeout_us:
            deadline = time.monotonic() + timeout_us / 1e6
    binary_all = params.get("binary_data_output", False)
    if not isinstance(binary_all, bool):
        raise InvalidInput("parameter 'binary_data_output' must be a boolean")

    inputs: list[InputTensor] = []
    pos = 0
    for t in _object_list(doc, "inputs", "request"):
        name = t.get("name")
        what = f"input {name!r}"
        if not isinstance(name, str):
            raise InvalidInput(f"{what}: 'name' must be a string")
        datatype = t.get("datatype")
        if not isinstance(datatype, str):
            raise InvalidInput(f"{what}: 'datatype' must be a string")
        shape = _shape(t, what)
        tensor_params = _parameters(t, what, skip=("binary_data_size",))
        tparams = t.get("parameters", {})
        kinds = [
            k
            for k, has in (
                ("'data'", "data" in t),
                ("'binary_data_size'", "binary_data_size" in tparams),
                ("'shared_memory_region'", "shared_memory_region" in tparams),
            )
            if has
        ]
        if len(kinds) != 1:
            raise InvalidInput(
                f"{what}: set exactly one of 'data', 'binary_data_size' or 'shared_memory_region' "
                f"(in 'parameters'); got {', '.join(kinds) or 'none'}"
            )
        # Counts are checked here, in REST's words, only for a well-formed image shape within the
        # limit: otherwise parse_request's message about the shape or the limit is the useful one.
        image_shape = len(shape) == 4 and tuple(shape[1:]) == IMAGE_SHAPE and 1 <= shape[0] <= max_images
        count = int(np.prod(shape)) if image_shape else None
        data: memoryview | None = None
        values: list[int] | None = None
        if "binary_data_size" in tparams:
            size = tparams["binary_data_size"]
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidInput(f"{what}: 'binary_data_size' must be a non-negative integer")
            if pos + size > len(binary):
                raise InvalidInput(
                    f"{what}: binary_data_size {size} runs past the end of the body "
                    f"({len(binary) - pos} bytes of binary data left)"
                )
            if datatype == "UINT8" and count is not None and size != count:
                raise InvalidInput(f"{what}: binary_data_size is {size} bytes, shape {shape} needs {count}")
            data = binary[pos : pos + size]
            pos += size
        elif "data" in t and datatype == "UINT8":  # other datatypes: parse_request names the problem
            values = _typed_uint8(t["data"], count, what)
        inputs.append(InputTensor(name, datatype, tuple(shape), tensor_params, data, values))
    if pos != len(binary):
        raise InvalidInput(
            f"the body holds {len(binary) - pos} bytes of binary data beyond what the inputs' "
            "binary_data_size declare"
        )

    outputs: list[OutputRequest] = []
    flags: list[bool] = []
    for o in _object_list(doc, "outputs", "request"):
        name = o.get("name")
        if not isinstance(name, str):
            raise InvalidInput(f"output {name!r}: 'name' must be a string")
        outputs.append(OutputRequest(name, _parameters(o, f"output {name!r}")))
        flag = o.get("parameters", {}).get("binary_data", binary_all)
        if not isinstance(flag, bool):
            raise InvalidInput(f"output {name!r}: parameter 'binary_data' must be a boolean")
        flags.append(flag)
    # Request-level parameters the server reads (timeout, binary_data_output) are read above; the
    # rest pass through as they are, unchecked, as the server never reads them.
    request = InferRequest(
        model_name=model,
        model_version=version,
        id=rid,
        inputs=inputs,
        outputs=outputs,
        parameters={k: v for k, v in params.items() if isinstance(v, bool | int | float | str)},
    )
    return _Decoded(request, tuple(flags) or (binary_all,), deadline)


def encode_infer(
    core: ServingCore,
    request_id: str,
    plan: InferPlan,
    binary: tuple[bool, ...],
    logits: np.ndarray,
    version: str,
) -> Response:
    """The v2 JSON response; binary outputs follow the JSON, as Triton's binary data extension."""
    doc: dict[str, Any] = {"model_name": core.model_name, "model_version": version}
    if request_id:
        doc["id"] = request_id
    outputs: list[dict[str, Any]] = []
    tail: list[bytes] = []
    for tensor, as_binary in zip(infer_outputs(plan, logits, core.labels), binary, strict=True):
        out: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if tensor.logits is None and tensor.strings is None:
            pass  # already written into its shared memory region
        elif as_binary:
            tail.append(tensor.raw())
            out["parameters"] = {"binary_data_size": len(tail[-1])}
        elif tensor.strings is not None:
            out["data"] = [s.decode() for s in tensor.strings]
        elif tensor.logits is not None:
            out["data"] = tensor.logits.ravel().tolist()
        outputs.append(out)
    doc["outputs"] = outputs
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not tail:
        return Response(header, media_type="application/json")
    return Response(
        b"".join([header, *tail]),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(header))},
    )


# ---------------------------------------------------------------------------- the application


def _error(exc: BaseException) -> tuple[grpc.StatusCode, Response]:
    code, message = status_for(exc)
    status = 413 if isinstance(exc, BodyTooLarge) else HTTP_STATUS.get(code, 500)
    headers = {"WWW-Authenticate": "Bearer"} if code is grpc.StatusCode.UNAUTHENTICATED else None
    return code, JSONResponse({"error": message}, status_code=status, headers=headers)


Handler = Callable[[Request], Awaitable[Response]]


class _Api:
    def __init__(
        self, core: ServingCore, shm: SharedMemoryRegistry, budget: ByteBudget, settings: Settings
    ) -> None:
        self.core = core
        self.shm = shm
        self.budget = budget
        self.settings = settings
        self.version = _server_version()
        self._expected = f"Bearer {settings.auth_token}".encode() if settings.auth_token else b""

    def endpoint(self, method: str, handler: Handler, *, gated: bool = True, auth: bool = True) -> Handler:
        """One call's accounting, auth, readiness and error mapping (the REST twin of the gRPC edge)."""
        metrics = self.core.metrics
        label = f"REST/{method}"

        async def run(request: Request) -> Response:
            started = time.monotonic()
            code = grpc.StatusCode.OK
            metrics.begin()
            try:
                if auth and self._expected and not self._authorized(request):
                    raise Unauthenticated("missing or invalid bearer token")
                if gated:
                    self.core.readiness.check()
                return await handler(request)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:
                if not isinstance(exc, InferenceError):
                    logger.error("unexpected error in %s", label, exc_info=exc)
                code, response = _error(exc)
                return response
            finally:
                metrics.end()
                metrics.requests.labels(label, code.name).inc()
                metrics.latency.labels(label).observe(time.monotonic() - started)

        return run

    def _authorized(self, request: Request) -> bool:
        given = request.headers.get("authorization")
        return given is not None and hmac.compare_digest(given.encode(), self._expected)

    # ------------------------------------------------------------------ health and metadata

    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(self, request: Request) -> Response:
        readiness = self.core.readiness
        if readiness.serving:
            return JSONResponse({"ready": True})
        try:
            readiness.check()
        except InferenceError as exc:
            reason = exc.message
        # The v2 spec: 200 is true, a 4xx is false (Triton answers 400).
        return JSONResponse({"ready": False, "error": reason}, status_code=400)

    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse(describe.server_metadata(self.version))

    def _model(self, request: Request) -> None:
        p = request.path_params
        self.core.check_model(p["model"], p.get("version", ""))

    async def model_metadata(self, request: Request) -> Response:
        self._model(request)
        return JSONResponse(describe.model_metadata(self.core))

    async def model_ready(self, request: Request) -> Response:
        p = request.path_params
        core = self.core
        known = p["model"] == core.model_name and p.get("version", "") in ("", core.model_version)
        ready = known and core.readiness.serving and not core.unloaded
        return JSONResponse({"name": p["model"], "ready": ready}, status_code=200 if ready else 400)

    async def model_config(self, request: Request) -> Response:
        self._model(request)
        return JSONResponse(describe.model_config(self.core))

    async def model_stats(self, request: Request) -> Response:
        if "model" in request.path_params:
            self._model(request)
        return JSONResponse(describe.model_statistics(self.core, await self.core.statistics()))

    # ------------------------------------------------------------------ inference

    async def _body(self, request: Request) -> tuple[bytes, int]:
        """The body (bounded by --max-receive-message-bytes) and the bytes it holds against the budget."""
        limit = self.settings.max_receive_message_bytes
        declared = request.headers.get("content-length")
        too_large = f"request body exceeds --max-receive-message-bytes ({limit} bytes)"
        held = 0
        if declared is not None and declared.isdigit():
            if int(declared) > limit:
                raise BodyTooLarge(f"{too_large}: Content-Length is {declared}")
            held = int(declared)
            if not self.budget.try_acquire(held):
                raise ResourceExhausted(
                    f"server is holding {self.budget.held / _MIB:.1f} MiB of requests, limit "
                    f"{self.budget.limit / _MIB:.1f} MiB (--max-inflight-request-bytes); retry later"
                )
        try:
            chunks: list[bytes] = []
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:  # a chunked body without a Content-Length
                    raise BodyTooLarge(too_large)
                chunks.append(chunk)
        except BaseException:
            self.budget.release(held)
            raise
        return b"".join(chunks), held

    async def infer(self, request: Request) -> Response:
        body, held = await self._body(request)
        try:
            return await self._infer(request, body)
        finally:
            self.budget.release(held)

    async def _infer(self, request: Request, body: bytes) -> Response:
        core = self.core
        p = request.path_params
        core.check_model(p["model"], p.get("version", ""))
        view = memoryview(body)
        header = request.headers.get(HEADER_LENGTH)
        if header is None:
            split = len(body)
        else:
            if not header.strip().isdigit() or int(header) > len(body):
                raise InvalidInput(
                    f"Inference-Header-Content-Length {header!r} must be an integer between 0 and the "
                    f"body's {len(body)} bytes"
                )
            split = int(header)
        try:
            doc = json.loads(view[:split].tobytes())
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"malformed JSON in the request body: {exc}") from None
        max_images = self.settings.max_images_per_request
        decoded = decode_infer(doc, view[split:], p["model"], p.get("version", ""), max_images)
        plan = parse_request(decoded.request, core.num_classes, max_images, self.shm)
        if decoded.deadline is not None and time.monotonic() >= decoded.deadline:
            raise DeadlineExceeded("the request's timeout passed before it was queued")
        logits, version = await core.infer(plan.images, decoded.deadline)  # the version that computed them
        if plan.shm_outputs:
            write_shm_outputs(self.shm, plan, logits)
        binary = decoded.binary_outputs
        if len(binary) != len(plan.outputs):
            binary = (binary[0],) * len(plan.outputs)
        rid = decoded.request.id
        if len(logits) * sum(plan.outputs) > INLINE_STRINGS:
            # Thousands of classification strings take milliseconds: keep them off the event loop.
            return await asyncio.to_thread(encode_infer, core, rid, plan, binary, logits, version)
        return encode_infer(core, rid, plan, binary, logits, version)

    # ------------------------------------------------------------------ model repository

    async def _json_body(self, request: Request) -> dict[str, Any]:
        body, held = await self._body(request)
        self.budget.release(held)
        try:
            doc = json.loads(body or b"{}")
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"malformed JSON in the request body: {exc}") from None
        if not isinstance(doc, dict):
            raise InvalidInput("the request body must be a JSON object")
        return doc

    async def repository_index(self, request: Request) -> Response:
        doc = await self._json_body(request)
        return JSONResponse(describe.repository_index(self.core, ready_only=doc.get("ready") is True))

    def _repository_model(self, request: Request) -> None:
        name = request.path_params["model"]
        if name != self.core.model_name:
            raise ModelNotFound(f"unknown model {name!r}; this server serves {self.core.model_name!r}")

    async def repository_load(self, request: Request) -> Response:
        self._repository_model(request)
        params = (await self._json_body(request)).get("parameters", {})
        if not isinstance(params, dict):
            raise InvalidInput("'parameters' must be an object")
        for key in params:
            if key != "model_dir":
                raise InvalidInput(f"parameter {key!r}: unknown; load takes 'model_dir'")
        model_dir = params.get("model_dir", "")
        if not isinstance(model_dir, str):
            raise InvalidInput("parameter 'model_dir' must be a string")
        await self.core.load(model_dir)
        return JSONResponse({})

    async def repository_unload(self, request: Request) -> Response:
        self._repository_model(request)
        await self.core.unload()
        return JSONResponse({})

    # ------------------------------------------------------------------ system shared memory

    async def shm_status(self, request: Request) -> Response:
        regions = self.shm.status(request.path_params.get("region", ""))
        return JSONResponse(
            [{"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size} for r in regions]
        )

    async def shm_register(self, request: Request) -> Response:
        doc = await self._json_body(request)
        key, offset, size = doc.get("key"), doc.get("offset", 0), doc.get("byte_size")
        if not isinstance(key, str):
            raise InvalidInput("the register request needs 'key', a string")
        for field, value in (("offset", offset), ("byte_size", size)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidInput(f"the register request needs {field!r}, an integer")
        assert isinstance(size, int)
        self.shm.register(request.path_params["region"], key, offset, size)
        return JSONResponse({})

    async def shm_unregister(self, request: Request) -> Response:
        self.shm.unregister(request.path_params.get("region", ""))
        return JSONResponse({})


def build_app(
    core: ServingCore, shm: SharedMemoryRegistry, budget: ByteBudget, settings: Settings
) -> Starlette:
    api = _Api(core, shm, budget, settings)
    e = api.endpoint
    model = "/v2/models/{model}"
    versioned = "/v2/models/{model}/versions/{version}"
    routes = [
        Route("/v2/health/live", e("ServerLive", api.live, gated=False, auth=False), methods=["GET"]),
        Route("/v2/health/ready", e("ServerReady", api.ready, gated=False, auth=False), methods=["GET"]),
        Route("/v2", e("ServerMetadata", api.server_metadata, gated=False), methods=["GET"]),
        Route("/v2/models/stats", e("ModelStatistics", api.model_stats), methods=["GET"]),
        # The repository extension answers while not ready, as over gRPC (a load is how to recover).
        Route(
            "/v2/repository/index", e("RepositoryIndex", api.repository_index, gated=False), methods=["POST"]
        ),
        Route(
            "/v2/repository/models/{model}/load",
            e("RepositoryModelLoad", api.repository_load, gated=False),
            methods=["POST"],
        ),
        Route(
            "/v2/repository/models/{model}/unload",
            e("RepositoryModelUnload", api.repository_unload, gated=False),
            methods=["POST"],
        ),
        Route(
            "/v2/systemsharedmemory/status", e("SystemSharedMemoryStatus", api.shm_status), methods=["GET"]
        ),
        Route(
            "/v2/systemsharedmemory/region/{region}/status",
            e("SystemSharedMemoryStatus", api.shm_status),
            methods=["GET"],
        ),
        Route(
            "/v2/systemsharedmemory/region/{region}/register",
            e("SystemSharedMemoryRegister", api.shm_register),
            methods=["POST"],
        ),
        Route(
            "/v2/systemsharedmemory/unregister",
            e("SystemSharedMemoryUnregister", api.shm_unregister),
            methods=["POST"],
        ),
        Route(
            "/v2/systemsharedmemory/region/{region}/unregister",
            e("SystemSharedMemoryUnregister", api.shm_unregister),
            methods=["POST"],
        ),
    ]
    for base in (model, versioned):
        routes += [
            Route(base, e("ModelMetadata", api.model_metadata), methods=["GET"]),
            Route(base + "/ready", e("ModelReady", api.model_ready, gated=False), methods=["GET"]),
            Route(base + "/config", e("ModelConfig", api.model_config), methods=["GET"]),
            Route(base + "/stats", e("ModelStatistics", api.model_stats), methods=["GET"]),
            Route(base + "/infer", e("ModelInfer", api.infer), methods=["POST"]),
        ]

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return JSONResponse(
            {"error": f"{exc.detail}: {request.method} {request.url.path}"},
            status_code=exc.status_code,
            headers=exc.headers,
        )

    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # The application owns SIGTERM/SIGINT and drains gRPC and REST together.
        yield


class RestServer:
    """uvicorn serving :func:`build_app` in the running event loop, on its own port."""

    def __init__(
        self, core: ServingCore, shm: SharedMemoryRegistry, budget: ByteBudget, settings: Settings
    ) -> None:
        self._app = build_app(core, shm, budget, settings)
        self._settings = settings
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task[None] | None = None
        self.port = -1

    def start(self) -> int:
        """Bind and listen now (so the port is known and connections queue), serve from the loop."""
        s = self._settings
        family = socket.AF_INET6 if ":" in s.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if s.workers > 1:  # every worker process listens on the port; the kernel spreads connections
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            # Accepted connections inherit it: without it a keep-alive response's body waits for
            # the client's delayed ACK of its headers (Nagle), ~40 ms per request.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind((s.host, s.http_port))
            sock.listen(1024)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self.port = int(sock.getsockname()[1])
        ssl_kw: dict[str, Any] = {}
        if s.tls_cert:
            ssl_kw = {"ssl_certfile": s.tls_cert, "ssl_keyfile": s.tls_key}
            if s.tls_client_ca:
                ssl_kw.update(ssl_ca_certs=s.tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        config = uvicorn.Config(
            self._app,
            log_config=None,  # the application configures logging
            access_log=False,
            lifespan="off",
            server_header=False,
            timeout_keep_alive=75,  # batch clients pause between requests; 5 s (uvicorn's) drops them
            timeout_graceful_shutdown=max(1, round(s.grace_period_s)),
            **ssl_kw,
        )
        try:
            config.load()  # here, so a bad certificate fails the start-up, not a background task
        except BaseException:
            sock.close()
            raise
        self._server = _Uvicorn(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        return self.port

    async def stop(self) -> None:
        """Refuse new connections, let requests in flight finish (up to the grace period)."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        await self._task
        self._server = None
