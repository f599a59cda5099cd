"""Drive a running cifar-serve with Triton's own client (tritonclient.grpc and its aio twin); print JSON.

tests/test_oip.py runs this in a process of its own: tritonclient's generated protos register the
same protobuf symbols ("inference.*") as cifar-serve's open_inference_pb2, and one process cannot
import both ("duplicate symbol" from the descriptor pool). So this script imports nothing of
cifar_serve, and the test process never imports tritonclient.

usage: python tests/oip_client_check.py ADDRESS MODEL IMAGES.npy
"""

from __future__ import annotations

import asyncio
import json
import queue
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

TIMEOUT_S = 60.0


def _images_input(images: np.ndarray, datatype: str = "UINT8") -> grpcclient.InferInput:
    inp = grpcclient.InferInput("images", list(images.shape), datatype)
    inp.set_data_from_numpy(images)
    return inp


def _error(exc: InferenceServerException) -> dict[str, str]:
    # For gRPC errors status() is str(grpc.StatusCode.X), e.g. "StatusCode.NOT_FOUND".
    return {"status": str(exc.status()), "message": str(exc.message())}


def _strings(array: np.ndarray) -> list[list[str]]:
    return [[s.decode() for s in row] for row in array]


def sync_checks(address: str, model: str, images: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = {}
    client = grpcclient.InferenceServerClient(address)
    try:
        out["live"] = client.is_server_live()
        out["ready"] = client.is_server_ready()
        out["model_ready"] = client.is_model_ready(model)
        out["unknown_model_ready"] = client.is_model_ready("no_such_model")
        out["server_metadata"] = client.get_server_metadata(as_json=True)
        out["model_metadata"] = client.get_model_metadata(model, as_json=True)

        # Binary (raw) tensors both ways: tritonclient's gRPC client always sends raw contents.
        res = client.infer(
            model,
            [_images_input(images)],
            outputs=[grpcclient.InferRequestedOutput("logits")],
            request_id="req-1",
            client_timeout=TIMEOUT_S,
        )
        logits = res.as_numpy("logits")
        out["infer"] = {
            "dtype": str(logits.dtype),
            "shape": list(logits.shape),
            "logits": logits.tolist(),
            "id": res.get_response().id,
            "model_name": res.get_response().model_name,
        }

        # No outputs named: the spec says every output comes back.
        res = client.infer(model, [_images_input(images)], client_timeout=TIMEOUT_S)
        out["infer_default_outputs"] = res.as_numpy("logits").tolist()

        res = client.infer(
            model,
            [_images_input(images)],
            outputs=[grpcclient.InferRequestedOutput("logits", class_count=3)],
            client_timeout=TIMEOUT_S,
        )
        classes = res.as_numpy("logits")
        out["classification"] = {
            "shape": list(classes.shape),
            "dtype": res.get_output("logits").datatype,
            "strings": _strings(classes),
        }

        errors: dict[str, Any] = {}
        try:
            client.infer("no_such_model", [_images_input(images)], client_timeout=TIMEOUT_S)
        except InferenceServerException as exc:
            errors["unknown_model"] = _error(exc)
        try:
            client.infer(model, [_images_input(images.astype(np.float32), "FP32")], client_timeout=TIMEOUT_S)
        except InferenceServerException as exc:
            errors["wrong_datatype"] = _error(exc)
        try:
            client.infer(
                model,
                [_images_input(images)],
                outputs=[grpcclient.InferRequestedOutput("probs")],
                client_timeout=TIMEOUT_S,
            )
        except InferenceServerException as exc:
            errors["unknown_output"] = _error(exc)
        try:
            client.get_model_metadata("no_such_model")
        except InferenceServerException as exc:
            errors["unknown_model_metadata"] = _error(exc)
        try:  # Triton's request timeout (microseconds): one is over before the request queues
            client.infer(model, [_images_input(images)], timeout=1, client_timeout=TIMEOUT_S)
        except InferenceServerException as exc:
            errors["request_timeout"] = _error(exc)
        out["errors"] = errors
        # A timeout with room to spare is no error.
        res = client.infer(model, [_images_input(images)], timeout=60_000_000, client_timeout=TIMEOUT_S)
        out["infer_with_timeout"] = res.as_numpy("logits").tolist()
        # The server is still fine after those.
        res = client.infer(model, [_images_input(images)], client_timeout=TIMEOUT_S)
        out["after_errors"] = res.as_numpy("logits").tolist()

        # Triton's streaming extension: answers come back on the callback, errors included.
        answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        client.async_stream_infer(model, [_images_input(images)], request_id="s-1")
        client.async_stream_infer("no_such_model", [_images_input(images)], request_id="s-2")
        client.async_stream_infer(model, [_images_input(images[:1])], request_id="s-3")
        stream: list[dict[str, Any]] = []
        for _ in range(3):
            result, error = answers.get(timeout=TIMEOUT_S)
            if error is not None:
                stream.append({"error": str(error.message())})
            else:
                stream.append({"id": result.get_response().id, "logits": result.as_numpy("logits").tolist()})
        client.stop_stream()
        out["stream"] = stream
    finally:
        client.close()
    return out


async def aio_checks(address: str, model: str, images: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with aioclient.InferenceServerClient(address) as client:
        out["live"] = await client.is_server_live()
        out["ready"] = await client.is_server_ready()
        out["model_ready"] = await client.is_model_ready(model)
        meta = await client.get_model_metadata(model, as_json=True)
        out["model_metadata_name"] = meta["name"]
        half = len(images) // 2
        # Two requests at once: both go through the server's shared batcher.
        results = await asyncio.gather(
            client.infer(model, [_images_input(images[:half])], client_timeout=TIMEOUT_S),
            client.infer(model, [_images_input(images[half:])], client_timeout=TIMEOUT_S),
        )
        out["logits"] = np.concatenate([r.as_numpy("logits") for r in results]).tolist()
        res = await client.infer(
            model,
            [_images_input(images)],
            outputs=[aioclient.InferRequestedOutput("logits", class_count=3)],
            client_timeout=TIMEOUT_S,
        )
        out["classification"] = _strings(res.as_numpy("logits"))

        async def requests() -> Any:
            for i in range(2):
                yield {"model_name": model, "inputs": [_images_input(images)], "request_id": f"a-{i}"}

        stream = []
        async for result, error in client.stream_infer(requests(), stream_timeout=TIMEOUT_S):
            assert error is None, error
            stream.append({"id": result.get_response().id, "logits": result.as_numpy("logits").tolist()})
            if len(stream) == 2:
                break
        out["stream"] = stream
    return out


def main(argv: list[str]) -> int:
    address, model, images_path = argv
    images = np.load(images_path)
    report = {
        "sync": sync_checks(address, model, images),
        "aio": asyncio.run(aio_checks(address, model, images)),
        "imported_cifar_serve_oip": "cifar_serve.v1.open_inference_pb2" in sys.modules,
    }
    sys.stdout.write(json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
