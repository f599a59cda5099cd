from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Image(_message.Message):
    __slots__ = ("encoded", "raw_rgb")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    RAW_RGB_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    raw_rgb: bytes
    def __init__(self, encoded: _Optional[bytes] = ..., raw_rgb: _Optional[bytes] = ...) -> None: ...

class PackedImages(_message.Message):
    __slots__ = ("data", "count")
    DATA_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    count: int
    def __init__(self, data: _Optional[bytes] = ..., count: _Optional[int] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("images", "packed", "top_k", "include_logits")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_LOGITS_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    packed: PackedImages
    top_k: int
    include_logits: bool
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., packed: _Optional[_Union[PackedImages, _Mapping]] = ..., top_k: _Optional[int] = ..., include_logits: _Optional[bool] = ...) -> None: ...

class ClassPrediction(_message.Message):
    __slots__ = ("label", "class_index", "probability")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    label: str
    class_index: int
    probability: float
    def __init__(self, label: _Optional[str] = ..., class_index: _Optional[int] = ..., probability: _Optional[float] = ...) -> None: ...

class Classification(_message.Message):
    __slots__ = ("predictions", "logits")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[ClassPrediction]
    logits: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, predictions: _Optional[_Iterable[_Union[ClassPrediction, _Mapping]]] = ..., logits: _Optional[_Iterable[float]] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("results", "model_name", "model_version")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[Classification]
    model_name: str
    model_version: str
    def __init__(self, results: _Optional[_Iterable[_Union[Classification, _Mapping]]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class ClassifyStreamRequest(_message.Message):
    __slots__ = ("id", "request", "timeout_us")
    ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_US_FIELD_NUMBER: _ClassVar[int]
    id: str
    request: ClassifyRequest
    timeout_us: int
    def __init__(self, id: _Optional[str] = ..., request: _Optional[_Union[ClassifyRequest, _Mapping]] = ..., timeout_us: _Optional[int] = ...) -> None: ...

class ClassifyStreamResponse(_message.Message):
    __slots__ = ("id", "response", "error_code", "error_message")
    ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    id: str
    response: ClassifyResponse
    error_code: int
    error_message: str
    def __init__(self, id: _Optional[str] = ..., response: _Optional[_Union[ClassifyResponse, _Mapping]] = ..., error_code: _Optional[int] = ..., error_message: _Optional[str] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "datatype", "shape", "layout")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATATYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    name: str
    datatype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    layout: str
    def __init__(self, name: _Optional[str] = ..., datatype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., layout: _Optional[str] = ...) -> None: ...

class BatchingInfo(_message.Message):
    __slots__ = ("max_batch_size", "max_batch_delay_ms", "max_queue_images")
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_IMAGES_FIELD_NUMBER: _ClassVar[int]
    max_batch_size: int
    max_batch_delay_ms: float
    max_queue_images: int
    def __init__(self, max_batch_size: _Optional[int] = ..., max_batch_delay_ms: _Optional[float] = ..., max_queue_images: _Optional[int] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_images_per_request", "max_image_pixels", "max_receive_message_bytes", "max_stream_requests")
    MAX_IMAGES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_RECEIVE_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAM_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    max_images_per_request: int
    max_image_pixels: int
    max_receive_message_bytes: int
    max_stream_requests: int
    def __init__(self, max_images_per_request: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., max_receive_message_bytes: _Optional[int] = ..., max_stream_requests: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "labels", "input", "output", "artifact_sha256", "test_accuracy", "device", "backend", "precision", "batching", "limits", "runtime_table")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_SHA256_FIELD_NUMBER: _ClassVar[int]
    TEST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_TABLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    input: TensorSpec
    output: TensorSpec
    artifact_sha256: str
    test_accuracy: float
    device: str
    backend: str
    precision: str
    batching: BatchingInfo
    limits: Limits
    runtime_table: _containers.RepeatedCompositeFieldContainer[RuntimeBucket]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., input: _Optional[_Union[TensorSpec, _Mapping]] = ..., output: _Optional[_Union[TensorSpec, _Mapping]] = ..., artifact_sha256: _Optional[str] = ..., test_accuracy: _Optional[float] = ..., device: _Optional[str] = ..., backend: _Optional[str] = ..., precision: _Optional[str] = ..., batching: _Optional[_Union[BatchingInfo, _Mapping]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., runtime_table: _Optional[_Iterable[_Union[RuntimeBucket, _Mapping]]] = ...) -> None: ...

class RuntimeBucket(_message.Message):
    __slots__ = ("batch_size", "runtime", "ms_per_batch")
    class MsPerBatchEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    MS_PER_BATCH_FIELD_NUMBER: _ClassVar[int]
    batch_size: int
    runtime: str
    ms_per_batch: _containers.ScalarMap[str, float]
    def __init__(self, batch_size: _Optional[int] = ..., runtime: _Optional[str] = ..., ms_per_batch: _Optional[_Mapping[str, float]] = ...) -> None: ...
