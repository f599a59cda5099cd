"""The Open Inference Protocol (KServe v2) API, ``inference.GRPCInferenceService``.

A thin translation layer like :mod:`.servicer`: protocol tensors in, one core
call, protocol tensors out. v2 requests join the same dynamic batcher as the native API and count
in the same metrics, under their own method names. Triton's and KServe's clients work unchanged.

The model, under the core's name and version, takes ``images`` UINT8 ``[-1,32,32,3]`` (raw or in
``uint_contents``) and answers ``logits`` FP32 ``[-1,classes]``. Triton's classification
extension is supported: an output requested with the ``classification`` parameter (N) comes back
as BYTES ``"<score>:<index>:<label>"``, top-N per image, shape ``[batch, N]``; the score is the
logit printed with ``%f`` (Triton formats it with ``std::to_string``).

Keep this module free of any ``tritonclient`` import: both register the same ``inference.*``
protobuf symbols, and one process cannot hold both.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import grpc
import numpy as np

from cifar_serve.v1 import open_inference_pb2 as pb
from cifar_serve.v1 import open_inference_pb2_grpc as pb_grpc

from .control import ModelControl
from .core import ServingCore
from .edge import Received, ordered_stream
from .errors import InferenceError, InvalidInput, ModelNotFound
from .lifecycle import State
from .servicer import STREAM_WINDOW, deadline_of
from .shm import SharedMemoryRegistry
from .stats import Duration, StatsSnapshot

__all__ = [
    "EXTENSIONS",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "InferPlan",
    "OipServicer",
    "ShmRef",
    "add_oip_to_server",
    "classification_strings",
    "model_ready",
    "parse_request",
    "repository_state",
    "serialize_bytes_tensor",
    "write_shm_outputs",
]

logger = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
IMAGE_SHAPE = (32, 32, 3)
IMAGE_BYTES = 32 * 32 * 3
EXTENSIONS = ("classification", "model_configuration", "statistics", "system_shared_memory")
SERVER_NAME = "cifar-serve"
# The platform names Triton reports for the same artifacts, so clients that switch on it work.
# auto serves both artifacts (same weights); the TorchScript one is its primary, as in ModelInfo.
_PLATFORMS = {
    "torchscript": "pytorch_libtorch",
    "onnxruntime": "onnxruntime_onnx",
    "auto": "pytorch_libtorch",
}
# Triton's backend name for each platform.
_BACKENDS = {"pytorch_libtorch": "pytorch", "onnxruntime_onnx": "onnxruntime"}
_INLINE_STRINGS = 2048  # classification strings formatted on the event loop; more go to a thread
_SHARED_MEMORY = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


def _server_version() -> str:
    try:
        return metadata.version("cifar-serve")
    except metadata.PackageNotFoundError:  # running from a source tree without an install
        return "0+unknown"


@dataclass(frozen=True)
class ShmRef:
    """A tensor's place in a registered shared memory region (its ``shared_memory_*`` parameters)."""

    region: str
    offset: int
    byte_size: int


@dataclass(frozen=True)
class InferPlan:
    """A validated request: the images, what to answer, and how.

    ``outputs`` holds one entry per output to return, in order: 0 for the logits tensor itself,
    N for its top-N classification strings. ``raw`` answers in ``raw_output_contents``.
    ``shm_outputs`` (empty, or one per output) says where an output goes in shared memory.
    """

    images: np.ndarray
    outputs: tuple[int, ...]
    raw: bool
    shm_outputs: tuple[ShmRef | None, ...] = ()


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def _int_param(param: pb.InferParameter, what: str) -> int:
    kind = param.WhichOneof("parameter_choice")
    if kind == "int64_param":
        return int(param.int64_param)
    if kind == "uint64_param":
        return int(param.uint64_param)
    raise InvalidInput(f"{what} must be an int64_param, got {kind or 'no value'}")


def _shm_ref(params: Any, what: str) -> ShmRef | None:
    """The tensor's ``shared_memory_*`` parameters, or None when it has none."""
    if not any(k in params for k in _SHARED_MEMORY):
        return None
    if "shared_memory_region" not in params:
        raise InvalidInput(
            f"{what}: shared_memory_byte_size or shared_memory_offset given without shared_memory_region"
        )
    region = params["shared_memory_region"]
    if region.WhichOneof("parameter_choice") != "string_param":
        raise InvalidInput(f"{what}: parameter 'shared_memory_region' must be a string_param")
    if "shared_memory_byte_size" not in params:
        raise InvalidInput(f"{what}: shared memory needs shared_memory_byte_size with shared_memory_region")
    size = _int_param(params["shared_memory_byte_size"], f"{what}: parameter 'shared_memory_byte_size'")
    offset = 0
    if "shared_memory_offset" in params:
        offset = _int_param(params["shared_memory_offset"], f"{what}: parameter 'shared_memory_offset'")
    return ShmRef(region.string_param, offset, size)


def _parse_images(
    tensor: pb.ModelInferRequest.InferInputTensor,
    raw: bytes | None,
    max_images: int,
    shm: SharedMemoryRegistry | None = None,
) -> np.ndarray:
    what = f"input {tensor.name!r}"
    if tensor.datatype != "UINT8":
        raise InvalidInput(f"{what}: datatype {tensor.datatype or '(empty)'}, expected UINT8")
    shape = tuple(tensor.shape)
    if len(shape) != 4 or shape[1:] != IMAGE_SHAPE or shape[0] < 1:
        raise InvalidInput(f"{what}: shape {_shape_text(shape)}, expected [n,32,32,3] with n >= 1")
    n = shape[0]
    if n > max_images:
        raise InvalidInput(f"{what}: {n} images, more than the limit of {max_images} per request; split it")
    expected = n * IMAGE_BYTES
    ref = _shm_ref(tensor.parameters, what) if shm is not None else None
    if ref is not None and shm is not None:
        if raw is not None or tensor.HasField("contents"):
            raise InvalidInput(f"{what}: data given both in shared memory and in the request; send one")
        if ref.byte_size != expected:
            raise InvalidInput(
                f"{what}: shared_memory_byte_size is {ref.byte_size}, shape {_shape_text(shape)} "
                f"needs {expected}"
            )
        # A copy: the owner may rewrite or shrink its region while the batch waits.
        data = shm.read(ref.region, ref.offset, ref.byte_size, what)
        return np.frombuffer(data, np.uint8).reshape(n, *IMAGE_SHAPE)
    if any(k in tensor.parameters for k in _SHARED_MEMORY):
        raise InvalidInput(f"{what}: shared memory is not supported; send the data in the request")
    if raw is not None:
        if tensor.HasField("contents"):
            raise InvalidInput(f"{what}: both raw_input_contents and typed contents given; send one")
        if len(raw) != expected:
            raise InvalidInput(
                f"{what}: raw_input_contents holds {len(raw)} bytes, shape {_shape_text(shape)} "
                f"needs {expected}"
            )
        # A zero-copy view of the request bytes; the batcher copies it into its batch.
        return np.frombuffer(raw, np.uint8).reshape(n, *IMAGE_SHAPE)
    contents = tensor.contents
    others = [f.name for f, _ in contents.ListFields() if f.name != "uint_contents"]
    if others:
        raise InvalidInput(f"{what}: UINT8 data goes in contents.uint_contents, got {', '.join(others)}")
    values = np.asarray(contents.uint_contents, dtype=np.uint32)
    if values.size == 0:
        raise InvalidInput(f"{what}: no data; set raw_input_contents or contents.uint_contents")
    if values.size != expected:
        raise InvalidInput(
            f"{what}: contents.uint_contents holds {values.size} values, shape {_shape_text(shape)} "
            f"needs {expected}"
        )
    if int(values.max()) > 255:
        raise InvalidInput(f"{what}: contents.uint_contents holds values above 255, out of range for UINT8")
    return values.astype(np.uint8).reshape(n, *IMAGE_SHAPE)


def _parse_outputs(
    request: pb.ModelInferRequest, num_classes: int, shm: SharedMemoryRegistry | None = None
) -> tuple[tuple[int, ...], bool, tuple[ShmRef | None, ...]]:
    """Class count per requested output (0: the tensor), whether any asked for binary data, and
    where each goes in shared memory (empty when none does)."""
    if not request.outputs:
        return (0,), False, ()  # the spec: no outputs named means every output, as tensors
    seen: set[str] = set()
    plan: list[int] = []
    refs: list[ShmRef | None] = []
    binary = False
    for out in request.outputs:
        what = f"output {out.name!r}"
        if out.name != OUTPUT_NAME:
            raise InvalidInput(f"{what}: unknown; this model's only output is {OUTPUT_NAME!r}")
        if out.name in seen:
            raise InvalidInput(f"{what}: requested more than once")
        seen.add(out.name)
        params = out.parameters
        ref = _shm_ref(params, what) if shm is not None else None
        if ref is not None and shm is not None:
            # As Triton: classification strings and binary data travel in the response.
            if "classification" in params:
                raise InvalidInput(f"{what}: shared memory cannot hold a classification output")
            if "binary_data" in params and params["binary_data"].bool_param:
                raise InvalidInput(f"{what}: set either shared_memory_region or binary_data, not both")
            shm.check(ref.region, ref.offset, ref.byte_size, what)
        elif any(k in params for k in _SHARED_MEMORY):
            raise InvalidInput(f"{what}: shared memory is not supported")
        refs.append(ref)
        classes = 0
        if "classification" in params:
            classes = _int_param(params["classification"], f"{what}: parameter 'classification'")
            if classes < 1:
                raise InvalidInput(f"{what}: parameter 'classification' must be at least 1, got {classes}")
            classes = min(classes, num_classes)  # as Triton: at most every class
        if "binary_data" in params:
            binary = binary or params["binary_data"].bool_param
        plan.append(classes)
    return tuple(plan), binary, tuple(refs) if any(refs) else ()


def parse_request(
    request: pb.ModelInferRequest,
    num_classes: int,
    max_images: int,
    shm: SharedMemoryRegistry | None = None,
) -> InferPlan:
    """Validate a ModelInferRequest (model already checked) into an :class:`InferPlan`.

    With ``shm``, inputs and outputs may name registered shared memory regions (read here).
    """
    names = [t.name for t in request.inputs]
    if not names:
        raise InvalidInput(f"no input tensors; this model takes {INPUT_NAME!r} UINT8 [n,32,32,3]")
    for name in names:
        if name != INPUT_NAME:
            raise InvalidInput(f"input {name!r}: unknown; this model's only input is {INPUT_NAME!r}")
    if len(names) > 1:
        raise InvalidInput(f"input {INPUT_NAME!r}: given {len(names)} times; send it once")
    raw_contents = request.raw_input_contents
    if raw_contents and len(raw_contents) != len(names):
        raise InvalidInput(
            f"input {INPUT_NAME!r}: raw_input_contents holds {len(raw_contents)} entries for "
            f"{len(names)} input; send one per input, in order"
        )
    raw = raw_contents[0] if raw_contents else None
    tensor = request.inputs[0]
    outputs, binary, shm_outputs = _parse_outputs(request, num_classes, shm)
    images = _parse_images(tensor, raw, max_images, shm)
    for ref in shm_outputs:
        need = len(images) * num_classes * 4
        if ref is not None and ref.byte_size < need:
            raise InvalidInput(
                f"output {OUTPUT_NAME!r}: shared_memory_byte_size is {ref.byte_size}, "
                f"{len(images)} images need {need} bytes of FP32 logits"
            )
    from_shm = shm is not None and _shm_ref(tensor.parameters, "") is not None
    # The spec forbids mixing raw and typed outputs; answer the way the client sent its input
    # (shared memory counts as binary, as Triton answers it), unless it asked for binary data.
    return InferPlan(images, outputs, raw=raw is not None or binary or from_shm, shm_outputs=shm_outputs)


def write_shm_outputs(shm: SharedMemoryRegistry, plan: InferPlan, logits: np.ndarray) -> None:
    """Write the logits of every output that asked for shared memory into its region."""
    data = b""
    for ref in plan.shm_outputs:
        if ref is not None:
            data = data or logits.astype("<f4", copy=False).tobytes()
            shm.write(ref.region, ref.offset, ref.byte_size, data, f"output {OUTPUT_NAME!r}")


def classification_strings(logits: np.ndarray, k: int, labels: Sequence[str]) -> list[bytes]:
    """Top-k ``b"<score>:<index>:<label>"`` per row, best first, flattened row-major (Triton's format).

    The score is the logit printed with ``%f``, as Triton's ``std::to_string(float)`` prints it.
    Ranking is vectorised; the strings themselves need one format per element, and a plain
    comprehension over prepared suffixes is several times faster than numpy's char functions.
    """
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]  # ties keep class order
    scores = np.take_along_axis(logits, order, axis=1)
    suffixes = [f":{i}:{label}".encode() for i, label in enumerate(labels)]
    pairs = zip(scores.ravel().tolist(), order.ravel().tolist(), strict=True)
    return [b"%f" % score + suffixes[index] for score, index in pairs]


def serialize_bytes_tensor(elements: Iterable[bytes]) -> bytes:
    """BYTES elements in the protocol's raw layout: each a 4-byte little-endian length, then the bytes."""
    return b"".join(len(e).to_bytes(4, "little") + e for e in elements)


def repository_state(core: ServingCore) -> tuple[str, str]:
    """The model's state in the repository extension (READY, UNAVAILABLE, LOADING) and why."""
    life = core.lifecycle
    if life.state is State.LOADING:
        if life.answers_while_loading:
            return "LOADING", "a new version is loading beside the serving one"
        return "LOADING", "loading after an unload"
    if life.state is State.UNLOADED:
        return "UNAVAILABLE", "unloaded"
    return ("READY", core.last_load_error) if life.ready else ("UNAVAILABLE", "not ready")


def model_ready(core: ServingCore, name: str, version: str) -> bool:
    """v2 ModelReady: an unknown model or version is "not ready", not an error (as Triton)."""
    known = name == core.model_name and version in ("", core.model_version)
    return known and core.lifecycle.ready


class OipServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self, core: ServingCore, shm: SharedMemoryRegistry | None = None, control: ModelControl | None = None
    ) -> None:
        self.core = core
        self.version = _server_version()
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
        return pb.ModelReadyResponse(ready=model_ready(self.core, request.name, request.version))

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self.version, extensions=EXTENSIONS)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        core = self.core
        core.check_model(request.name, request.version)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=core.model_name,
            versions=[core.model_version],
            platform=_PLATFORMS.get(core.runtime.backend, core.runtime.backend),
            inputs=[tensor(name=INPUT_NAME, datatype="UINT8", shape=[-1, *IMAGE_SHAPE])],
            outputs=[tensor(name=OUTPUT_NAME, datatype="FP32", shape=[-1, core.num_classes])],
        )

    # ------------------------------------------------------------------ inference

    async def _infer(self, request: pb.ModelInferRequest, deadline: float | None) -> pb.ModelInferResponse:
        core = self.core
        core.check_model(request.model_name, request.model_version)
        plan = parse_request(request, core.num_classes, core.settings.max_images_per_request, self.shm)
        logits, version = await core.infer(plan.images, deadline)
        if plan.shm_outputs:
            write_shm_outputs(self.shm, plan, logits)
        if len(logits) * sum(plan.outputs) > _INLINE_STRINGS:
            # Thousands of classification strings take milliseconds: keep them off the event loop.
            return await asyncio.to_thread(self._response, request.id, plan, logits, version)
        return self._response(request.id, plan, logits, version)

    def _response(
        self, request_id: str, plan: InferPlan, logits: np.ndarray, version: str
    ) -> pb.ModelInferResponse:
        core = self.core
        resp = pb.ModelInferResponse(model_name=core.model_name, model_version=version, id=request_id)
        shm_outputs = plan.shm_outputs or (None,) * len(plan.outputs)
        for classes, ref in zip(plan.outputs, shm_outputs, strict=True):
            tensor = resp.outputs.add(name=OUTPUT_NAME)
            if ref is not None:  # written into shared memory already; as Triton, an empty entry
                tensor.datatype = "FP32"
                tensor.shape.extend(logits.shape)
                if plan.raw:
                    resp.raw_output_contents.append(b"")
            elif classes:
                strings = classification_strings(logits, classes, core.labels)
                tensor.datatype = "BYTES"
                tensor.shape.extend([len(logits), classes])
                if plan.raw:
                    resp.raw_output_contents.append(serialize_bytes_tensor(strings))
                else:
                    tensor.contents.bytes_contents.extend(strings)
            else:
                tensor.datatype = "FP32"
                tensor.shape.extend(logits.shape)
                if plan.raw:
                    resp.raw_output_contents.append(logits.astype("<f4", copy=False).tobytes())
                else:
                    tensor.contents.fp32_contents.extend(logits.ravel().tolist())
        return resp

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
        )

    # ------------------------------------------------------------------ model repository

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        core = self.core
        state, reason = repository_state(core)
        if request.ready and state != "READY":
            return pb.RepositoryIndexResponse()
        index = pb.RepositoryIndexResponse.ModelIndex(
            name=core.model_name, version=core.model_version, state=state, reason=reason
        )
        return pb.RepositoryIndexResponse(models=[index])

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
        core = self.core
        core.check_model(request.name, request.version)
        s = core.settings
        platform = _PLATFORMS.get(core.runtime.backend, core.runtime.backend)
        device = core.runtime.device
        group = pb.ModelInstanceGroup(
            name=f"{core.model_name}_0",
            # One instance per batch the server computes at once.
            count=core.max_inflight,
            kind=pb.ModelInstanceGroup.KIND_GPU if device.type == "cuda" else pb.ModelInstanceGroup.KIND_CPU,
            gpus=[device.index or 0] if device.type == "cuda" else [],
        )
        config = pb.ModelConfig(
            name=core.model_name,
            platform=platform,
            backend=_BACKENDS.get(platform, platform),
            # What one request may hold; batches the server forms are capped by
            # preferred_batch_size instead.
            max_batch_size=s.max_images_per_request,
            input=[
                pb.ModelInput(
                    name=INPUT_NAME,
                    data_type=pb.TYPE_UINT8,
                    format=pb.ModelInput.FORMAT_NHWC,
                    dims=list(IMAGE_SHAPE),
                )
            ],
            output=[pb.ModelOutput(name=OUTPUT_NAME, data_type=pb.TYPE_FP32, dims=[core.num_classes])],
            instance_group=[group],
            dynamic_batching=pb.ModelDynamicBatching(
                preferred_batch_size=[s.max_batch_size],
                max_queue_delay_microseconds=round(s.max_batch_delay_ms * 1000),
                preserve_ordering=True,
            ),
        )
        return pb.ModelConfigResponse(config=config)

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
        return pb.ModelStatisticsResponse(
            model_stats=[self._model_stats(version, snap) for version, snap in snaps.items()]
        )

    def _model_stats(self, version: str, snap: StatsSnapshot) -> pb.ModelStatistics:
        def dur(d: Duration) -> pb.StatisticDuration:
            return pb.StatisticDuration(count=d.count, ns=d.ns)

        return pb.ModelStatistics(
            name=self.core.model_name,
            version=version,
            last_inference=snap.last_inference_ms,
            inference_count=snap.inference_count,
            execution_count=snap.execution_count,
            inference_stats=pb.InferStatistics(
                success=dur(snap.success),
                fail=dur(snap.fail),
                queue=dur(snap.queue),
                compute_input=dur(snap.compute_input),
                compute_infer=dur(snap.compute_infer),
                compute_output=dur(snap.compute_output),
            ),
            batch_stats=[
                pb.InferBatchStatistics(
                    batch_size=size,
                    compute_input=dur(phases[0]),
                    compute_infer=dur(phases[1]),
                    compute_output=dur(phases[2]),
                )
                for size, phases in snap.batches.items()
            ],
        )

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


def add_oip_to_server(
    server: grpc.aio.Server,
    core: ServingCore,
    shm: SharedMemoryRegistry | None = None,
    control: ModelControl | None = None,
) -> str:
    """Serve the Open Inference Protocol on ``server``; returns its full service name (for reflection).

    ``shm``: the shared memory registry, when another API (REST) shares it; ``control``: the
    model control both APIs share.
    """
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(OipServicer(core, shm, control), server)
    name: str = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
    return name
