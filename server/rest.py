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

Every route passes the one admission layer (:mod:`.admission`) under the Open Inference
Protocol method name it shares with gRPC: the same policy group, token, readiness gate, byte
budget, accounting (``REST/<Method>`` in the request counter and latency histogram) and
status mapping. Errors answer ``{"error": "<message>"}`` with the HTTP status of the code (400
invalid argument, 401 unauthenticated, 403 permission denied, 404 not found, 408 a stalled body,
409 already exists, 413 body too large, 429 resource exhausted, 499 client gone, 503 unavailable,
504 deadline exceeded, 500 internal).

HTTP is bounded like gRPC: body bytes count against the shared budget as they arrive (chunked
bodies too, never from a declared ``Content-Length``), a client that leaves its headers or body
unfinished for ``--http-read-timeout-s`` is cut off (408 for a body) and its bytes freed, and a
large JSON document is decoded off the event loop with its decoded size held in the budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from . import describe
from .admission import Admission, ByteBudget, http_status
from .control import ModelControl
from .core import ServingCore
from .errors import (
    BodyTimeout,
    BodyTooLarge,
    Code,
    InvalidInput,
    Unavailable,
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
    request_deadline,
    server_version,
    timeout_us_of,
    write_shm_outputs,
)
from .settings import Settings
from .shm import SharedMemoryRegistry

__all__ = ["RestServer", "build_app", "decode_infer", "encode_infer"]

logger = logging.getLogger(__name__)

HEADER_LENGTH = "inference-header-content-length"
# A JSON document decoded into Python lists of ints takes several times its text (measured:
# ~5x for a UINT8 image tensor); that much is held against the byte budget while it lives.
JSON_MEMORY_FACTOR = 8
# Smaller JSON documents decode on the event loop: a thread hop costs more than they do.
JSON_INLINE_BYTES = 64 * 1024


class _Held:
    """Bytes one REST call holds against the shared budget; given back once, at the call's end."""

    __slots__ = ("_budget", "n")

    def __init__(self, budget: ByteBudget) -> None:
        self._budget = budget
        self.n = 0

    def take(self, n: int) -> None:
        self._budget.acquire(n)
        self.n += n

    def release(self) -> None:
        if self.n:
            self._budget.release(self.n)
            self.n = 0


async def _next_within(chunks: Any, timeout: float) -> bytes:
    """The next body chunk, or :class:`TimeoutError` when none comes within ``timeout``."""
    timeout_cm = getattr(asyncio, "timeout", None)  # Python 3.11+: no task per chunk
    if timeout_cm is None:
        chunk: bytes = await asyncio.wait_for(anext(chunks), timeout)
        return chunk
    async with timeout_cm(timeout):
        chunk = await anext(chunks)
    return chunk


# ---------------------------------------------------------------------------- JSON <-> neutral


def _parameter(value: Any, what: str) -> ParamValue:
    """A JSON parameter value as the protocol carries it: a boolean, a 64-bit integer, a number or
    a string (the kinds of the protobuf's InferParameter, so both APIs accept the same)."""
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        raise InvalidInput(f"{what} is out of the 64-bit integer range")
    if isinstance(value, bool | int | float | str):
        return value
    raise InvalidInput(f"{what} must be a boolean, a number or a string, got {type(value).__name__}")


def _loads(text: memoryview | bytes) -> Any:
    try:
        return json.loads(bytes(text))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"malformed JSON in the request body: {exc}") from None


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
    if "timeout" in params:  # here too: a null, list or object would not reach the neutral request
        timeout_us_of(params["timeout"])
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
    # binary_data_output is read above and timeout by request_deadline; the other request-level
    # parameters pass through as they are, unchecked, as the server never reads them.
    request = InferRequest(
        model_name=model,
        model_version=version,
        id=rid,
        inputs=inputs,
        outputs=outputs,
        parameters={k: v for k, v in params.items() if isinstance(v, bool | int | float | str)},
    )
    return _Decoded(request, tuple(flags) or (binary_all,))


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


def _error(exc: BaseException, code: Code, message: str) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if code is Code.UNAUTHENTICATED else {}
    if isinstance(exc, BodyTimeout):
        headers["Connection"] = "close"  # the rest of its body is not worth waiting for
    return JSONResponse({"error": message}, status_code=http_status(exc, code), headers=headers or None)


Handler = Callable[[Request], Awaitable[Response]]


class _Api:
    def __init__(
        self,
        core: ServingCore,
        shm: SharedMemoryRegistry,
        admission: Admission,
        control: ModelControl,
        settings: Settings,
    ) -> None:
        self.core = core
        self.shm = shm
        self.admission = admission
        self.budget = admission.budget
        self.control = control
        self.settings = settings
        self.version = server_version()

    def endpoint(self, method: str, handler: Handler) -> Handler:
        """The route under the admission layer, as the gRPC method ``method`` is."""
        admission = self.admission
        policy = admission.policy(method)
        label = f"REST/{method}"

        async def run(request: Request) -> Response:
            call = admission.call(label)
            try:
                admission.admit(policy, request.headers.get("authorization"))
                response = await handler(request)
            except ClientDisconnect:
                # The client went away mid-upload: its business, not a server fault.
                logger.debug("%s: the client disconnected before its request was read", label)
                call.finish(Code.CANCELLED)
                return Response(status_code=499)
            except asyncio.CancelledError:
                call.finish(Code.CANCELLED)
                raise
            except Exception as exc:
                code, message = call.outcome(exc)
                call.finish()
                return _error(exc, code, message)
            call.finish(Code.OK)
            return response

        return run

    # ------------------------------------------------------------------ health and metadata

    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(self, request: Request) -> Response:
        life = self.core.lifecycle
        if life.ready:
            return JSONResponse({"ready": True})
        try:
            life.check()
            reason = ""
        except Unavailable as exc:
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
        ready = describe.model_ready(self.core, p["model"], p.get("version", ""))
        return JSONResponse({"name": p["model"], "ready": ready}, status_code=200 if ready else 400)

    async def model_config(self, request: Request) -> Response:
        self._model(request)
        return JSONResponse(describe.model_config(self.core))

    async def model_stats(self, request: Request) -> Response:
        if "model" in request.path_params:
            self._model(request)
        return JSONResponse(describe.model_statistics(self.core, await self.core.statistics()))

    # ------------------------------------------------------------------ inference

    async def _body(self, request: Request, held: _Held) -> bytes:
        """The body, bounded by --max-receive-message-bytes, each chunk held in the budget as it
        arrives (a declared Content-Length reserves nothing: a client may never send it)."""
        limit = self.settings.max_receive_message_bytes
        declared = request.headers.get("content-length")
        too_large = f"request body exceeds --max-receive-message-bytes ({limit} bytes)"
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise BodyTooLarge(f"{too_large}: Content-Length is {declared}")
        timeout = self.settings.http_read_timeout_s
        chunks: list[bytes] = []
        size = 0
        stream = aiter(request.stream())
        while True:
            try:
                chunk = await _next_within(stream, timeout)
            except StopAsyncIteration:
                break
            except (asyncio.TimeoutError, TimeoutError):
                raise BodyTimeout(
                    f"the request body stalled: no byte for {timeout:g}s after {size} bytes "
                    "(--http-read-timeout-s)"
                ) from None
            if not chunk:
                continue
            size += len(chunk)
            if size > limit:  # a chunked body, or one longer than it declared
                raise BodyTooLarge(too_large)
            held.take(len(chunk))
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _json(self, text: memoryview | bytes, held: _Held) -> Any:
        """``text`` as JSON; a large document is decoded on a thread, its decoded size held."""
        if len(text) <= JSON_INLINE_BYTES:
            return _loads(text)
        held.take(JSON_MEMORY_FACTOR * len(text))
        return await asyncio.to_thread(_loads, text)

    async def infer(self, request: Request) -> Response:
        held = _Held(self.budget)
        try:
            body = await self._body(request, held)
            return await self._infer(request, body, held)
        finally:
            held.release()

    async def _infer(self, request: Request, body: bytes, held: _Held) -> Response:
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
        max_images = self.settings.max_images_per_request

        received = time.monotonic()  # a 'timeout' parameter counts from here

        def decode() -> _Decoded:
            doc = _loads(view[:split])
            return decode_infer(doc, view[split:], p["model"], p.get("version", ""), max_images)

        if split <= JSON_INLINE_BYTES:
            decoded = decode()
        else:  # parsing and converting a large JSON tensor takes long: not on the event loop
            held.take(JSON_MEMORY_FACTOR * split)
            decoded = await asyncio.to_thread(decode)
        plan = parse_request(decoded.request, core.num_classes, max_images, self.shm)
        deadline = request_deadline(decoded.request.parameters, None, received)
        logits, version = await core.infer(plan.images, deadline)  # the version that computed them
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
        held = _Held(self.budget)
        try:
            body = await self._body(request, held)
            doc = await self._json(body or b"{}", held)
        finally:
            held.release()
        if not isinstance(doc, dict):
            raise InvalidInput("the request body must be a JSON object")
        return doc

    async def repository_index(self, request: Request) -> Response:
        doc = await self._json_body(request)
        return JSONResponse(describe.repository_index(self.core, ready_only=doc.get("ready") is True))

    async def repository_load(self, request: Request) -> Response:
        params = (await self._json_body(request)).get("parameters", {})
        if not isinstance(params, dict):
            raise InvalidInput("'parameters' must be an object")
        await self.control.load(request.path_params["model"], params)
        return JSONResponse({})

    async def repository_unload(self, request: Request) -> Response:
        await self.control.unload(request.path_params["model"])
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
    core: ServingCore,
    shm: SharedMemoryRegistry,
    admission: Admission,
    control: ModelControl,
    settings: Settings,
) -> Starlette:
    """The v2 routes, each under the admission policy of the gRPC method it shares a name with."""
    api = _Api(core, shm, admission, control, settings)
    e = api.endpoint
    model = "/v2/models/{model}"
    versioned = "/v2/models/{model}/versions/{version}"
    region = "/v2/systemsharedmemory/region/{region}"
    routes = [
        Route("/v2/health/live", e("ServerLive", api.live), methods=["GET"]),
        Route("/v2/health/ready", e("ServerReady", api.ready), methods=["GET"]),
        Route("/v2", e("ServerMetadata", api.server_metadata), methods=["GET"]),
        Route("/v2/models/stats", e("ModelStatistics", api.model_stats), methods=["GET"]),
        Route("/v2/repository/index", e("RepositoryIndex", api.repository_index), methods=["POST"]),
        Route(
            "/v2/repository/models/{model}/load",
            e("RepositoryModelLoad", api.repository_load),
            methods=["POST"],
        ),
        Route(
            "/v2/repository/models/{model}/unload",
            e("RepositoryModelUnload", api.repository_unload),
            methods=["POST"],
        ),
        Route(f"{region}/register", e("SystemSharedMemoryRegister", api.shm_register), methods=["POST"]),
    ]
    # Status and unregister take every region, or the one named.
    for base in ("/v2/systemsharedmemory", region):
        routes += [
            Route(base + "/status", e("SystemSharedMemoryStatus", api.shm_status), methods=["GET"]),
            Route(
                base + "/unregister",
                e("SystemSharedMemoryUnregister", api.shm_unregister),
                methods=["POST"],
            ),
        ]
    for base in (model, versioned):
        routes += [
            Route(base, e("ModelMetadata", api.model_metadata), methods=["GET"]),
            Route(base + "/ready", e("ModelReady", api.model_ready), methods=["GET"]),
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


def _protocol(header_timeout: float) -> type[HttpToolsProtocol]:
    """uvicorn's HTTP protocol, closing a connection whose request headers stall.

    uvicorn times out idle keep-alive connections but not a request whose headers never end;
    such sockets hold a connection each, forever.
    """

    class Protocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout, self._stalled)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _stalled(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                logger.debug("closing a connection whose request headers stalled for %gs", header_timeout)
                self.transport.close()

    return Protocol


class RestServer:
    """uvicorn serving :func:`build_app` in the running event loop, on its own port."""

    def __init__(
        self,
        core: ServingCore,
        shm: SharedMemoryRegistry,
        admission: Admission,
        control: ModelControl,
        settings: Settings,
    ) -> None:
        self._app = build_app(core, shm, admission, control, settings)
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
            http=_protocol(s.http_read_timeout_s),
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
