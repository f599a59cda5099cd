"""The Open Inference Protocol's request and answer, free of any transport.

gRPC (:mod:`.oip`) and REST (:mod:`.rest`) decode their wire format into an
:class:`InferRequest`; :func:`parse_request` validates it against the served model into an
:class:`InferPlan`, and :func:`infer_outputs` turns the logits into the answer's tensors, which
each transport encodes in its own format. Validation lives here once, so both APIs accept and
refuse exactly the same requests, with the same messages.

No grpc or protobuf import here: the error messages name the protocol's fields
(``raw_input_contents``, ``contents.uint_contents``, ``int64_param``), which the v2 spec defines
for both transports, but the types are plain Python.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata

import numpy as np

from .errors import DeadlineExceeded, InvalidInput
from .limits import check_image_count, sooner_deadline
from .shm import SharedMemoryRegistry

__all__ = [
    "EXTENSIONS",
    "IMAGE_BYTES",
    "IMAGE_SHAPE",
    "INLINE_STRINGS",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "SERVER_NAME",
    "InferPlan",
    "InferRequest",
    "InputTensor",
    "OutputRequest",
    "OutputTensor",
    "ParamValue",
    "ShmRef",
    "backend_name",
    "check_input_names",
    "classification_strings",
    "infer_outputs",
    "param_kind",
    "parse_request",
    "platform_name",
    "request_deadline",
    "serialize_bytes_tensor",
    "server_version",
    "timeout_us_of",
    "write_shm_outputs",
]

logger = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
IMAGE_SHAPE = (32, 32, 3)
IMAGE_BYTES = 32 * 32 * 3
EXTENSIONS = ("classification", "model_configuration", "statistics", "system_shared_memory")
SERVER_NAME = "cifar-serve"
# Classification strings up to this many are formatted on the event loop; more go to a thread.
INLINE_STRINGS = 2048
# The platform names Triton reports for the same artifacts, so clients that switch on it work.
# auto serves both artifacts (same weights); the TorchScript one is its primary, as in ModelInfo.
_PLATFORMS = {
    "torchscript": "pytorch_libtorch",
    "onnxruntime": "onnxruntime_onnx",
    "auto": "pytorch_libtorch",
}
# Triton's backend name for each platform.
_BACKENDS = {"pytorch_libtorch": "pytorch", "onnxruntime_onnx": "onnxruntime"}
_SHARED_MEMORY = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")

# A parameter's value: what JSON and the protobuf InferParameter can both carry.
ParamValue = bool | int | float | str


def server_version() -> str:
    """The installed cifar-serve's version (``0+unknown`` from a source tree without an install)."""
    try:
        return metadata.version("cifar-serve")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def platform_name(runtime_backend: str) -> str:
    """Triton's platform name for a runtime backend (``torchscript`` -> ``pytorch_libtorch``)."""
    return _PLATFORMS.get(runtime_backend, runtime_backend)


def backend_name(platform: str) -> str:
    """Triton's backend name for a platform (``pytorch_libtorch`` -> ``pytorch``)."""
    return _BACKENDS.get(platform, platform)


def param_kind(value: ParamValue) -> str:
    """The protocol's name for the kind of a parameter value, for error messages.

    Both transports name kinds the way the protobuf ``InferParameter`` does; an int is an
    ``int64_param`` whether it came as int64 or uint64 (the server accepts either).
    """
    if isinstance(value, bool):  # before int: bool is an int in Python
        return "bool_param"
    if isinstance(value, int):
        return "int64_param"
    if isinstance(value, float):
        return "double_param"
    return "string_param"


# ---------------------------------------------------------------------------- the request


@dataclass(frozen=True)
class InputTensor:
    """One input tensor.

    ``data`` is the tensor in the raw layout (gRPC's ``raw_input_contents`` entry, REST's binary
    data), kept as the transport delivered it so the images can be a zero-copy view of it.
    ``values`` is the typed contents (gRPC's ``contents.uint_contents``, REST's JSON ``data``);
    None when the request had none, which differs from an empty sequence.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    parameters: Mapping[str, ParamValue] = field(default_factory=dict)
    data: bytes | memoryview | None = None
    values: Sequence[int] | None = None


@dataclass(frozen=True)
class OutputRequest:
    """One output the client asked for, with its parameters (classification, binary_data, ...)."""

    name: str
    parameters: Mapping[str, ParamValue] = field(default_factory=dict)


@dataclass(frozen=True)
class InferRequest:
    """An inference request as both transports decode it. No outputs named means every output."""

    model_name: str
    model_version: str = ""
    id: str = ""
    inputs: Sequence[InputTensor] = ()
    outputs: Sequence[OutputRequest] = ()
    parameters: Mapping[str, ParamValue] = field(default_factory=dict)


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
    N for its top-N classification strings. ``raw`` answers in the raw layout (gRPC's
    ``raw_output_contents``). ``shm_outputs`` (empty, or one per output) says where an output
    goes in shared memory.
    """

    images: np.ndarray
    outputs: tuple[int, ...]
    raw: bool
    shm_outputs: tuple[ShmRef | None, ...] = ()


# ---------------------------------------------------------------------------- validation


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def _int_param(value: ParamValue, what: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise InvalidInput(f"{what} must be an int64_param, got {param_kind(value)}")


def _has_shm(params: Mapping[str, ParamValue]) -> bool:
    return bool(params) and any(k in params for k in _SHARED_MEMORY)


def _shm_ref(params: Mapping[str, ParamValue], what: str) -> ShmRef | None:
    """The tensor's ``shared_memory_*`` parameters, or None when it has none."""
    if not _has_shm(params):
        return None
    if "shared_memory_region" not in params:
        raise InvalidInput(
            f"{what}: shared_memory_byte_size or shared_memory_offset given without shared_memory_region"
        )
    region = params["shared_memory_region"]
    if not isinstance(region, str):
        raise InvalidInput(f"{what}: parameter 'shared_memory_region' must be a string_param")
    if "shared_memory_byte_size" not in params:
        raise InvalidInput(f"{what}: shared memory needs shared_memory_byte_size with shared_memory_region")
    size = _int_param(params["shared_memory_byte_size"], f"{what}: parameter 'shared_memory_byte_size'")
    offset = 0
    if "shared_memory_offset" in params:
        offset = _int_param(params["shared_memory_offset"], f"{what}: parameter 'shared_memory_offset'")
    return ShmRef(region, offset, size)


def _parse_images(
    tensor: InputTensor, max_images: int, shm: SharedMemoryRegistry | None = None
) -> np.ndarray:
    what = f"input {tensor.name!r}"
    if tensor.datatype != "UINT8":
        raise InvalidInput(f"{what}: datatype {tensor.datatype or '(empty)'}, expected UINT8")
    shape = tensor.shape
    if len(shape) != 4 or shape[1:] != IMAGE_SHAPE or shape[0] < 1:
        raise InvalidInput(f"{what}: shape {_shape_text(shape)}, expected [n,32,32,3] with n >= 1")
    n = shape[0]
    check_image_count(n, max_images, what)
    expected = n * IMAGE_BYTES
    raw = tensor.data
    ref = _shm_ref(tensor.parameters, what) if shm is not None else None
    if ref is not None and shm is not None:
        if raw is not None or tensor.values is not None:
            raise InvalidInput(f"{what}: data given both in shared memory and in the request; send one")
        if ref.byte_size != expected:
            raise InvalidInput(
                f"{what}: shared_memory_byte_size is {ref.byte_size}, shape {_shape_text(shape)} "
                f"needs {expected}"
            )
        # A copy: the owner may rewrite or shrink its region while the batch waits.
        data = shm.read(ref.region, ref.offset, ref.byte_size, what)
        return np.frombuffer(data, np.uint8).reshape(n, *IMAGE_SHAPE)
    if _has_shm(tensor.parameters):
        raise InvalidInput(f"{what}: shared memory is not supported; send the data in the request")
    if raw is not None:
        if tensor.values is not None:
            raise InvalidInput(f"{what}: both raw_input_contents and typed contents given; send one")
        if len(raw) != expected:
            raise InvalidInput(
                f"{what}: raw_input_contents holds {len(raw)} bytes, shape {_shape_text(shape)} "
                f"needs {expected}"
            )
        # A zero-copy view of the request bytes; the batcher copies it into its batch.
        return np.frombuffer(raw, np.uint8).reshape(n, *IMAGE_SHAPE)
    values = np.asarray(tensor.values if tensor.values is not None else (), dtype=np.int64)
    if values.size == 0:
        raise InvalidInput(f"{what}: no data; set raw_input_contents or contents.uint_contents")
    if values.size != expected:
        raise InvalidInput(
            f"{what}: contents.uint_contents holds {values.size} values, shape {_shape_text(shape)} "
            f"needs {expected}"
        )
    if int(values.max()) > 255:
        raise InvalidInput(f"{what}: contents.uint_contents holds values above 255, out of range for UINT8")
    if int(values.min()) < 0:  # neither transport delivers one today; a guard against wrap-around
        raise InvalidInput(f"{what}: contents.uint_contents holds negative values, out of range for UINT8")
    return values.astype(np.uint8).reshape(n, *IMAGE_SHAPE)


def _parse_outputs(
    request: InferRequest, num_classes: int, shm: SharedMemoryRegistry | None = None
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
        # Only a true boolean asks for binary data, as the protobuf's bool_param reads.
        wants_binary = params.get("binary_data") is True
        ref = _shm_ref(params, what) if shm is not None else None
        if ref is not None and shm is not None:
            # As Triton: classification strings and binary data travel in the response.
            if "classification" in params:
                raise InvalidInput(f"{what}: shared memory cannot hold a classification output")
            if wants_binary:
                raise InvalidInput(f"{what}: set either shared_memory_region or binary_data, not both")
            shm.check(ref.region, ref.offset, ref.byte_size, what)
        elif _has_shm(params):
            raise InvalidInput(f"{what}: shared memory is not supported")
        refs.append(ref)
        classes = 0
        if "classification" in params:
            classes = _int_param(params["classification"], f"{what}: parameter 'classification'")
            if classes < 1:
                raise InvalidInput(f"{what}: parameter 'classification' must be at least 1, got {classes}")
            classes = min(classes, num_classes)  # as Triton: at most every class
        binary = binary or wants_binary
        plan.append(classes)
    return tuple(plan), binary, tuple(refs) if any(refs) else ()


def check_input_names(names: Sequence[str]) -> None:
    """This model takes exactly one input, ``images``: refuse none, an unknown one, or a repeat."""
    if not names:
        raise InvalidInput(f"no input tensors; this model takes {INPUT_NAME!r} UINT8 [n,32,32,3]")
    for name in names:
        if name != INPUT_NAME:
            raise InvalidInput(f"input {name!r}: unknown; this model's only input is {INPUT_NAME!r}")
    if len(names) > 1:
        raise InvalidInput(f"input {INPUT_NAME!r}: given {len(names)} times; send it once")


def parse_request(
    request: InferRequest,
    num_classes: int,
    max_images: int,
    shm: SharedMemoryRegistry | None = None,
) -> InferPlan:
    """Validate a request (model already checked) into an :class:`InferPlan`.

    With ``shm``, inputs and outputs may name registered shared memory regions (read here).
    """
    check_input_names([t.name for t in request.inputs])
    tensor = request.inputs[0]
    outputs, binary, shm_outputs = _parse_outputs(request, num_classes, shm)
    images = _parse_images(tensor, max_images, shm)
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
    return InferPlan(
        images, outputs, raw=tensor.data is not None or binary or from_shm, shm_outputs=shm_outputs
    )


def timeout_us_of(value: object) -> int:
    """A ``timeout`` parameter's microseconds (0: none, as Triton reads it), or INVALID_ARGUMENT."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidInput("parameter 'timeout' must be a non-negative integer (microseconds)")
    return value


def request_deadline(
    parameters: Mapping[str, ParamValue], deadline: float | None, received: float
) -> float | None:
    """The request's deadline: the transport's (``deadline``, a ``time.monotonic()`` instant or
    None) or, when sooner, its ``timeout`` parameter (microseconds; Triton's request timeout, which
    ``tritonclient``'s ``infer(timeout=...)`` sets) counted from ``received``, when the transport
    had the request. Work still queued at the deadline is dropped uncomputed; raises if it has
    passed already. Call it just before the work is queued.
    """
    deadline = sooner_deadline(deadline, timeout_us_of(parameters.get("timeout", 0)), received)
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded(
            "the request's deadline (its 'timeout' or the call's) passed before it was queued"
        )
    return deadline


# ---------------------------------------------------------------------------- the answer


@dataclass(frozen=True)
class OutputTensor:
    """One output of the answer, before a transport encodes it.

    Exactly one of ``logits`` (FP32) and ``strings`` (BYTES, classification) is set, or neither
    when the output was written into shared memory already (as Triton, an entry with no data).
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    logits: np.ndarray | None = None
    strings: list[bytes] | None = None

    def raw(self) -> bytes:
        """The tensor in the protocol's raw layout (empty for one in shared memory)."""
        if self.strings is not None:
            return serialize_bytes_tensor(self.strings)
        if self.logits is not None:
            return self.logits.astype("<f4", copy=False).tobytes()
        return b""


def infer_outputs(plan: InferPlan, logits: np.ndarray, labels: Sequence[str]) -> list[OutputTensor]:
    """The answer's outputs, one per planned output, in order.

    Formatting thousands of classification strings takes milliseconds: transports run this (and
    their encoding) in a thread when ``len(logits) * sum(plan.outputs) > INLINE_STRINGS``.
    """
    shm_outputs = plan.shm_outputs or (None,) * len(plan.outputs)
    outputs: list[OutputTensor] = []
    for classes, ref in zip(plan.outputs, shm_outputs, strict=True):
        if ref is not None:
            outputs.append(OutputTensor(OUTPUT_NAME, "FP32", tuple(logits.shape)))
        elif classes:
            strings = classification_strings(logits, classes, labels)
            outputs.append(OutputTensor(OUTPUT_NAME, "BYTES", (len(logits), classes), strings=strings))
        else:
            outputs.append(OutputTensor(OUTPUT_NAME, "FP32", tuple(logits.shape), logits=logits))
    return outputs


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
