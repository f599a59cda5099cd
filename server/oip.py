"""The Open Inference Protocol (KServe v2) API, ``inference.GRPCInferenceService``.

A thin translation layer like :mod:`.servicer`: protocol tensors in, one core
call, protocol tensors out. v2 requests join the same dynamic batcher as the native API and count
in the same metrics, under their own method names. Triton's and KServe's clients work unchanged.

The model, under the core's name and version, takes ``images`` UINT8 ``[-1,32,32,3]`` (raw or in
``uint_contents``) and answers ``logits`` FP32 ``[-1,classes]``. Triton's classification
extension is supported: an output requested with the ``classification`` parameter (N) comes back
as BYTES ``"<score>:<index>:<label>"``, top-N per image, shape ``[batch, N]``; the score is the
logit printed with ``%f`` (Triton formats it with ``std::to_string``).

Requests are decoded into :mod:`.protocol`'s neutral type and validated there, as REST's are;
metadata, config and statistics come from :mod:`.describe`'s dicts, as REST's do.

Keep this module free of any ``tritonclient`` import: both register the same ``inference.*``
protobuf symbols, and one process cannot hold both.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message

from cifar_serve.v1 import open_inference_pb2 as pb
from cifar_serve.v1 import open_inference_pb2_grpc as pb_grpc

from . import describe
from .control import ModelControl
from .core import ServingCore
from .edge import Received, ordered_stream
from .errors import InferenceError, InvalidInput, ModelNotFound
from .protocol import (
    INLINE_STRINGS,
    INPUT_NAME,
    InferPlan,
    InferRequest,
    InputTensor,
    OutputRequest,
    ParamValue,
    check_input_names,
    infer_outputs,
    parse_request,
    request_deadline,
    server_version,
    write_shm_outputs,
)
from .servicer import STREAM_WINDOW, deadline_of
from .shm import SharedMemoryRegistry

__all__ = [
    "OipServicer",
    "add_servicer",
    "decode_request",
    "encode_response",
]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- protobuf <-> neutral


def _parameters(params: Mapping[str, pb.InferParameter]) -> dict[str, ParamValue]:
    """InferParameters as plain values. A parameter with no value set is left out, as if absent:
    the neutral type has no value for it, and no parameter the server reads means anything empty."""
    out: dict[str, ParamValue] = {}
    if not params:  # the common case; iterating an empty protobuf map still costs a microsecond
        return out
    for key, param in params.items():
        kind = param.WhichOneof("parameter_choice")
        if kind is not None:
            value: ParamValue = getattr(param, kind)
            out[key] = value
    return out


def decode_request(request: pb.ModelInferRequest) -> InferRequest:
    """A ModelInferRequest as the neutral :class:`~.protocol.InferRequest`.

    The raw input bytes are the ``bytes`` objects protobuf hands out, not copied again, and the
    typed contents stay protobuf's repeated field (a sequence), so nothing is copied here.
    Two things only the protobuf shows are checked here, in the same words as ever: typed
    contents in a field other than ``uint_contents``, and ``raw_input_contents`` entries that
    do not pair one to one with the inputs.
    """
    raw_contents = request.raw_input_contents
    inputs = request.inputs
    if raw_contents and inputs and len(raw_contents) != len(inputs):
        check_input_names([t.name for t in inputs])  # a wrong name or a repeat is the better message
        raise InvalidInput(
            f"input {INPUT_NAME!r}: raw_input_contents holds {len(raw_contents)} entries for "
            f"{len(inputs)} input; send one per input, in order"
        )
    tensors: list[InputTensor] = []
    for i, tensor in enumerate(inputs):
        values = None
        if tensor.HasField("contents"):
            contents = tensor.contents
            # Only for UINT8: another datatype gets parse_request's datatype message, the useful one.
            if tensor.datatype == "UINT8":
                others = [f.name for f, _ in contents.ListFields() if f.name != "uint_contents"]
                if others:
                    raise InvalidInput(
                        f"input {tensor.name!r}: UINT8 data goes in contents.uint_contents, "
                        f"got {', '.join(others)}"
                    )
            values = contents.uint_contents
        tensors.append(
            InputTensor(
                name=tensor.name,
                datatype=tensor.datatype,
                shape=tuple(tensor.shape),
                parameters=_parameters(tensor.parameters),
                data=raw_contents[i] if raw_contents else None,
                values=values,
            )
        )
    return InferRequest(
        model_name=request.model_name,
        model_version=request.model_version,
        id=request.id,
        inputs=tensors,
        outputs=[OutputRequest(o.name, _parameters(o.parameters)) for o in request.outputs],
        parameters=_parameters(request.parameters),
    )


def encode_response(
    request_id: str, model_name: str, version: str, plan: InferPlan, logits: np.ndarray, labels: Sequence[str]
) -> pb.ModelInferResponse:
    """The answer as a ModelInferResponse: every output raw or every one typed, as ``plan.raw`` says."""
    resp = pb.ModelInferResponse(model_name=model_name, model_version=version, id=request_id)
    for out in infer_outputs(plan, logits, labels):
        tensor = resp.outputs.add(name=out.name, datatype=out.datatype, shape=out.shape)
        if plan.raw:
            resp.raw_output_contents.append(out.raw())
        elif out.strings is not None:
            tensor.contents.bytes_contents.extend(out.strings)
        elif out.logits is not None:
            tensor.contents.fp32_contents.extend(out.logits.ravel().tolist())
        # else: written into shared memory already; as Triton, an entry without data
    return resp


_M = TypeVar("_M", bound=Message)


def _parse(message: _M, doc: dict[str, Any]) -> _M:
    """A :mod:`.describe` dict into its protobuf. Fields only the JSON has (version_policy,
    parameters) are left out: the protobuf has no place for them."""
    json_format.ParseDict(doc, message, ignore_unknown_fields=True)
    return message


class OipServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self, core: ServingCore, shm: SharedMemoryRegistry | None = None, control: ModelControl | None = None
    ) -> None:
        self.core = core
        self.version = server_version()
        self.shm = shm if shm is not None else SharedMemoryRegistry()
        self.control = control if control is not None else ModelControl(core, core.settings)

    # ------------------------------------------------------------------ health and metadata

    def _ready(self) -> bool:
        return self.core.lifecycle.ready  # a model is loaded, warm, and the server not draining

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._ready())

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=describe.model_ready(self.core, request.name, request.version))

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        doc = describe.server_metadata(self.version)
        return _parse(pb.ServerMetadataResponse(), doc)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        self.core.check_model(request.name, request.version)
        return _parse(pb.ModelMetadataResponse(), describe.model_metadata(self.core))

    # ------------------------------------------------------------------ inference

    async def _infer(self, request: pb.ModelInferRequest, deadline: float | None) -> pb.ModelInferResponse:
        received = time.monotonic()  # a 'timeout' parameter counts from here
        core = self.core
        core.check_model(request.model_name, request.model_version)
        req = decode_request(request)
        plan = parse_request(req, core.num_classes, core.settings.max_images_per_request, self.shm)
        logits, version = await core.infer(plan.images, request_deadline(req.parameters, deadline, received))
        if plan.shm_outputs:
            write_shm_outputs(self.shm, plan, logits)
        args = (req.id, core.model_name, version, plan, logits, core.labels)
        if len(logits) * sum(plan.outputs) > INLINE_STRINGS:
            # Thousands of classification strings take milliseconds: keep them off the event loop.
            return await asyncio.to_thread(encode_response, *args)
        return encode_response(*args)

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        return await self._infer(request, deadline_of(context))

    def ModelStreamInfer(
        self, request_iterator: AsyncIterator[Received], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        deadline = deadline_of(context)

        async def handle(req: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
            return pb.ModelStreamInferResponse(infer_response=await self._infer(req, deadline))

        def error_answer(req: pb.ModelInferRequest, exc: InferenceError) -> pb.ModelStreamInferResponse:
            # As Triton: the error travels on the stream, with the id to tell which request failed.
            return pb.ModelStreamInferResponse(
                error_message=exc.message, infer_response=pb.ModelInferResponse(id=req.id)
            )

        # Answers go out in request order (as Triton's non-decoupled streams), while up to
        # STREAM_WINDOW requests compute at once and so share batches.
        return ordered_stream(
            request_iterator,
            handle,
            error_answer,
            method="ModelStreamInfer",
            metrics=self.core.metrics,
            limit=self.core.settings.max_stream_requests,
            window=STREAM_WINDOW,
            lifecycle=self.core.lifecycle,
        )

    # ------------------------------------------------------------------ model repository

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        models = describe.repository_index(self.core, ready_only=request.ready)
        return _parse(pb.RepositoryIndexResponse(), {"models": models})

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        params: dict[str, object] = {}
        for key, param in request.parameters.items():
            if key == "model_dir" and param.WhichOneof("parameter_choice") != "string_param":
                raise InvalidInput("parameter 'model_dir' must be a string_param")
            params[key] = getattr(param, param.WhichOneof("parameter_choice") or "string_param")
        await self.control.load(request.model_name, params)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        await self.control.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # ------------------------------------------------------------------ configuration and statistics
    # (Triton's extensions; perf_analyzer and model_analyzer read both.)

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        self.core.check_model(request.name, request.version)
        doc = {"config": describe.model_config(self.core)}
        return _parse(pb.ModelConfigResponse(), doc)

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        core = self.core
        if request.name:  # as Triton: no name means every model
            core.check_model(request.name)
        elif request.version:
            raise InvalidInput("a model version needs a model name")
        snaps = await core.statistics()  # one entry per version that has served
        if request.version:
            if request.version not in snaps:
                raise ModelNotFound(
                    f"model {core.model_name!r} has no version {request.version!r}; "
                    f"versions with statistics: {', '.join(sorted(snaps))}"
                )
            snaps = {request.version: snaps[request.version]}
        doc = describe.model_statistics(core, snaps)
        return _parse(pb.ModelStatisticsResponse(), doc)

    # ------------------------------------------------------------------ system shared memory

    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryStatusResponse:
        resp = pb.SystemSharedMemoryStatusResponse()
        for r in self.shm.status(request.name):
            resp.regions[r.name].CopyFrom(
                pb.SystemSharedMemoryStatusResponse.RegionStatus(
                    name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size
                )
            )
        return resp

    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryRegisterResponse:
        self.shm.register(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        self.shm.unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()


# The generated registration function, for :meth:`.edge.Edge.add`.
add_servicer = pb_grpc.add_GRPCInferenceServiceServicer_to_server
