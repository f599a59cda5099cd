"""Drive a running cifar-serve with Triton's own HTTP client and shared memory utilities; print JSON.

Run in a process of its own by tests/test_rest.py (mode ``http``) and tests/test_shm.py (mode
``shm``): the shm mode also uses tritonclient.grpc, whose generated protos clash with
cifar-serve's in one process (see tests/oip_client_check.py), so the test process never imports
tritonclient at all.

usage: python tests/http_client_check.py http HTTP_ADDRESS MODEL IMAGES.npy
       python tests/http_client_check.py shm HTTP_ADDRESS GRPC_ADDRESS MODEL IMAGES.npy
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

TIMEOUT_S = 60.0


def _input(images: np.ndarray, datatype: str = "UINT8", binary: bool = True) -> httpclient.InferInput:
    inp = httpclient.InferInput("images", list(images.shape), datatype)
    inp.set_data_from_numpy(images, binary_data=binary)
    return inp


def _error(exc: InferenceServerException) -> dict[str, str]:
    return {"status": str(exc.status()), "message": str(exc.message())}


def _strings(array: np.ndarray) -> list[list[str]]:
    # Binary BYTES come back as bytes, JSON ones as str.
    return [[s.decode() if isinstance(s, bytes) else str(s) for s in row] for row in array]


def sync_checks(address: str, model: str, images: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = {}
    client = httpclient.InferenceServerClient(address, network_timeout=TIMEOUT_S)
    try:
        out["live"] = client.is_server_live()
        out["ready"] = client.is_server_ready()
        out["model_ready"] = client.is_model_ready(model)
        out["unknown_model_ready"] = client.is_model_ready("no_such_model")
        out["server_metadata"] = client.get_server_metadata()
        out["model_metadata"] = client.get_model_metadata(model)
        out["model_config"] = client.get_model_config(model)
        out["stats"] = client.get_inference_statistics(model)

        # Binary tensor data both ways (Inference-Header-Content-Length).
        res = client.infer(
            model, [_input(images)], outputs=[httpclient.InferRequestedOutput("logits")], request_id="req-1"
        )
        logits = res.as_numpy("logits")
        out["infer_binary"] = {
            "dtype": str(logits.dtype),
            "shape": list(logits.shape),
            "logits": logits.tolist(),
            "id": res.get_response().get("id"),
            "model_name": res.get_response()["model_name"],
        }
        # JSON tensors both ways.
        res = client.infer(
            model,
            [_input(images, binary=False)],
            outputs=[httpclient.InferRequestedOutput("logits", binary_data=False)],
        )
        out["infer_json"] = {
            "logits": res.as_numpy("logits").tolist(),
            "has_data": "data" in res.get_output("logits"),
        }
        # No outputs named: tritonclient asks for binary_data_output.
        res = client.infer(model, [_input(images)])
        out["infer_default_outputs"] = res.as_numpy("logits").tolist()

        res = client.infer(
            model, [_input(images)], outputs=[httpclient.InferRequestedOutput("logits", class_count=3)]
        )
        out["classification"] = {
            "shape": list(res.as_numpy("logits").shape),
            "dtype": res.get_output("logits")["datatype"],
            "strings": _strings(res.as_numpy("logits")),
        }
        res = client.infer(
            model,
            [_input(images, binary=False)],
            outputs=[httpclient.InferRequestedOutput("logits", binary_data=False, class_count=2)],
        )
        out["classification_json"] = _strings(res.as_numpy("logits"))

        errors: dict[str, Any] = {}
        for key, call in {
            "unknown_model": lambda: client.infer("no_such_model", [_input(images)]),
            "unknown_model_metadata": lambda: client.get_model_metadata("no_such_model"),
            "wrong_datatype": lambda: client.infer(model, [_input(images.astype(np.float32), "FP32")]),
            "unknown_output": lambda: client.infer(
                model, [_input(images)], outputs=[httpclient.InferRequestedOutput("probs")]
            ),
            "wrong_shape": lambda: client.infer(model, [_input(images.reshape(len(images), 32, 96))]),
        }.items():
            try:
                call()
            except InferenceServerException as exc:
                errors[key] = _error(exc)
        out["errors"] = errors
        res = client.infer(model, [_input(images)])
        out["after_errors"] = res.as_numpy("logits").tolist()
    finally:
        client.close()
    return out


async def aio_checks(address: str, model: str, images: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = {}
    client = aioclient.InferenceServerClient(address)
    try:
        out["live"] = await client.is_server_live()
        out["ready"] = await client.is_server_ready()
        out["model_ready"] = await client.is_model_ready(model)
        out["model_metadata_name"] = (await client.get_model_metadata(model))["name"]
        half = len(images) // 2
        # Two requests at once: both go through the server's shared batcher.
        results = await asyncio.gather(
            client.infer(model, [_input(images[:half])]),
            client.infer(model, [_input(images[half:])]),
        )
        out["logits"] = np.concatenate([r.as_numpy("logits") for r in results]).tolist()
        res = await client.infer(
            model, [_input(images)], outputs=[aioclient.InferRequestedOutput("logits", class_count=3)]
        )
        out["classification"] = _strings(res.as_numpy("logits"))
        try:
            await client.infer("no_such_model", [_input(images)])
        except InferenceServerException as exc:
            out["unknown_model"] = _error(exc)
    finally:
        await client.close()
    return out


def shm_checks(client: Any, lib: Any, model: str, images: np.ndarray, tag: str) -> dict[str, Any]:
    """Register regions made with tritonclient.utils.shared_memory, infer through them, clean up."""
    in_size, out_size = images.nbytes, len(images) * 10 * 4
    key_in, key_out = f"/cifar-test-{tag}-in-{os.getpid()}", f"/cifar-test-{tag}-out-{os.getpid()}"
    h_in = shm.create_shared_memory_region(f"{tag}_in", key_in, in_size)
    h_out = shm.create_shared_memory_region(f"{tag}_out", key_out, out_size)
    out: dict[str, Any] = {}
    try:
        shm.set_shared_memory_region(h_in, [images])
        client.unregister_system_shared_memory()
        client.register_system_shared_memory(f"{tag}_in", key_in, in_size)
        client.register_system_shared_memory(f"{tag}_out", key_out, out_size)
        status = client.get_system_shared_memory_status()
        if tag == "grpc":
            status = [
                {"name": r.name, "key": r.key, "byte_size": int(r.byte_size)} for r in status.regions.values()
            ]
        out["status"] = sorted(
            [{"name": r["name"], "key": r["key"], "byte_size": int(r["byte_size"])} for r in status],
            key=lambda r: r["name"],
        )
        inp = lib.InferInput("images", list(images.shape), "UINT8")
        inp.set_shared_memory(f"{tag}_in", in_size)
        req_out = lib.InferRequestedOutput("logits")
        req_out.set_shared_memory(f"{tag}_out", out_size)
        res = client.infer(model, [inp], outputs=[req_out])
        meta = res.get_output("logits")
        if tag == "grpc":
            meta = {"datatype": meta.datatype, "shape": list(meta.shape)}
        out["output_meta"] = {"datatype": meta["datatype"], "shape": [int(d) for d in meta["shape"]]}
        logits = shm.get_contents_as_numpy(h_out, np.float32, [len(images), 10])
        out["logits"] = logits.tolist()
        # Shared memory input, the answer through the socket.
        res = client.infer(model, [inp])
        out["socket_logits"] = res.as_numpy("logits").tolist()
        # A region the client never registered.
        bad = lib.InferInput("images", list(images.shape), "UINT8")
        bad.set_shared_memory("never_registered", in_size)
        try:
            client.infer(model, [bad])
        except InferenceServerException as exc:
            out["unregistered"] = _error(exc)
        client.unregister_system_shared_memory(f"{tag}_in")
        client.unregister_system_shared_memory(f"{tag}_out")
        status = client.get_system_shared_memory_status()
        out["status_after"] = len(status.regions) if tag == "grpc" else len(status)
    finally:
        shm.destroy_shared_memory_region(h_in)
        shm.destroy_shared_memory_region(h_out)
    return out


def main(argv: list[str]) -> int:
    mode = argv[0]
    if mode == "http":
        address, model, images_path = argv[1:]
        images = np.load(images_path)
        report: dict[str, Any] = {
            "sync": sync_checks(address, model, images),
            "aio": asyncio.run(aio_checks(address, model, images)),
        }
    else:
        http_address, grpc_address, model, images_path = argv[1:]
        images = np.load(images_path)
        http = httpclient.InferenceServerClient(http_address, network_timeout=TIMEOUT_S)
        grpc_client = grpcclient.InferenceServerClient(grpc_address)
        try:
            report = {
                "http": shm_checks(http, httpclient, model, images, "http"),
                "grpc": shm_checks(grpc_client, grpcclient, model, images, "grpc"),
            }
        finally:
            http.close()
            grpc_client.close()
    sys.stdout.write(json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
