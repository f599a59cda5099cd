"""The native API (cifar_serve.v1.Classifier): protobuf in, core call, protobuf out."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np

from cifar_serve.v1 import classifier_pb2 as pb
from cifar_serve.v1 import classifier_pb2_grpc as pb_grpc

from .core import ServingCore, rank
from .edge import Received, ordered_stream
from .errors import InferenceError, InvalidInput
from .limits import check_image_count, sooner_deadline
from .preprocess import decode_image, packed_to_array, raw_to_array

__all__ = ["ClassifierServicer", "deadline_of", "request_images"]

logger = logging.getLogger(__name__)

STREAM_WINDOW = 64  # requests of one stream computing at once; bounds a stream's memory


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's deadline as a ``time.monotonic()`` instant, or None."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return time.monotonic() + max(0.0, remaining)


def request_images(request: pb.ClassifyRequest, max_images: int, max_pixels: int) -> np.ndarray:
    """The request's images as uint8 ``[N,32,32,3]`` (may decode: call off the event loop)."""
    has_packed = request.HasField("packed") and (request.packed.count or request.packed.data)
    if has_packed and len(request.images):
        raise InvalidInput("send either images or packed, not both")
    if has_packed:
        check_image_count(request.packed.count, max_images)
        return packed_to_array(request.packed.data, request.packed.count)
    n = len(request.images)
    if n == 0:
        raise InvalidInput("request holds no images: set images or packed")
    check_image_count(n, max_images)
    out = np.empty((n, 32, 32, 3), np.uint8)
    for i, image in enumerate(request.images):
        kind = image.WhichOneof("data")
        what = f"images[{i}]"
        if kind == "encoded":
            out[i] = decode_image(image.encoded, max_pixels=max_pixels, what=what)
        elif kind == "raw_rgb":
            out[i] = raw_to_array(image.raw_rgb, what=what)
        else:
            raise InvalidInput(f"{what}: empty, set encoded or raw_rgb")
    return out


class ClassifierServicer(pb_grpc.ClassifierServicer):
    def __init__(self, core: ServingCore) -> None:
        self.core = core

    async def _decode(self, request: pb.ClassifyRequest) -> np.ndarray:
        s = self.core.settings
        if any(img.WhichOneof("data") == "encoded" for img in request.images):
            # Decoding large files takes milliseconds each: keep it off the event loop.
            return await asyncio.to_thread(
                request_images, request, s.max_images_per_request, s.max_image_pixels
            )
        return request_images(request, s.max_images_per_request, s.max_image_pixels)

    async def _classify(self, request: pb.ClassifyRequest, deadline: float | None) -> pb.ClassifyResponse:
        k = request.top_k if request.HasField("top_k") else 1
        self.core.check_top_k(k)
        images = await self._decode(request)
        logits, version = await self.core.infer(images, deadline)
        return self._response(logits, k, request.include_logits, version)

    def _response(
        self, logits: np.ndarray, k: int, include_logits: bool, version: str
    ) -> pb.ClassifyResponse:
        ranked = rank(logits, k)
        labels = self.core.labels
        idx = ranked.indices.tolist()
        probs = ranked.probabilities.tolist()
        rows = logits.tolist() if include_logits else None
        results = []
        for i in range(len(idx)):
            preds = [
                pb.ClassPrediction(label=labels[c], class_index=c, probability=p)
                for c, p in zip(idx[i], probs[i], strict=False)
            ]
            results.append(pb.Classification(predictions=preds, logits=rows[i] if rows else ()))
        return pb.ClassifyResponse(results=results, model_name=self.core.model_name, model_version=version)

    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        return await self._classify(request, deadline_of(context))

    def ClassifyStream(
        self, request_iterator: AsyncIterator[Received], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ClassifyStreamResponse]:
        deadline = deadline_of(context)

        async def handle(req: pb.ClassifyStreamRequest) -> pb.ClassifyStreamResponse:
            return pb.ClassifyStreamResponse(
                id=req.id,
                response=await self._classify(req.request, sooner_deadline(deadline, req.timeout_us)),
            )

        def error_answer(req: pb.ClassifyStreamRequest, exc: InferenceError) -> pb.ClassifyStreamResponse:
            return pb.ClassifyStreamResponse(id=req.id, error_code=exc.code.value, error_message=exc.message)

        return ordered_stream(
            request_iterator,
            handle,
            error_answer,
            method="ClassifyStream",
            metrics=self.core.metrics,
            limit=self.core.settings.max_stream_requests,
            window=STREAM_WINDOW,
            lifecycle=self.core.lifecycle,
        )

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        d = self.core.info()
        return pb.ModelInfo(
            name=d["name"],
            version=d["version"],
            labels=d["labels"],
            input=pb.TensorSpec(name="images", datatype="UINT8", shape=[-1, 32, 32, 3], layout="NHWC"),
            output=pb.TensorSpec(name="logits", datatype="FP32", shape=[-1, len(d["labels"])]),
            artifact_sha256=d["sha256"],
            test_accuracy=d["test_accuracy"],
            device=d["device"],
            backend=d["backend"],
            precision=d["precision"],
            batching=pb.BatchingInfo(
                max_batch_size=d["max_batch_size"],
                max_batch_delay_ms=d["max_batch_delay_ms"],
                max_queue_images=d["max_queue_images"],
            ),
            limits=pb.Limits(
                max_images_per_request=d["max_images_per_request"],
                max_image_pixels=d["max_image_pixels"],
                max_receive_message_bytes=d["max_receive_message_bytes"],
                max_stream_requests=d["max_stream_requests"],
            ),
            runtime_table=[pb.RuntimeBucket(**bucket) for bucket in d.get("runtime_table", [])],
        )
