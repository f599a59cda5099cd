"""A model-free echo of cifar-serve's two classify methods, to measure the load generator itself.

It answers ``cifar_serve.v1.Classifier/Classify`` and ``inference.GRPCInferenceService/ModelInfer``
with the same shapes as the real server (one top-1 result per image; ``logits`` FP32 ``[n,10]``),
but every answer is a fixed, pre-serialized message per image count: no model, no batcher. The
request is still parsed (as the real server must) to learn the image count. What ``cifar-bench``
reaches against it is the most the generator can drive on this machine; it must be well above
what the model server serves, or the benchmark would be measuring the client.

    python benchmarks/echo_server.py --port 0      # prints "listening on 127.0.0.1:PORT"

It also answers what ``perf_analyzer`` asks before it loads a model (server and model metadata,
the model config, statistics counting the ModelInfer calls answered), so perf_analyzer can drive
it: the CPU it costs per request is grpc.aio's floor under the request path. With ``--hop`` each
ModelInfer waits for a minimal batcher first (the calls that arrived together resolved by one
thread round trip), the floor of a batching server in Python:

    python benchmarks/echo_server.py --port 8123 --model-name cifar10_null [--hop]
    perf_analyzer -i grpc -u 127.0.0.1:8123 -m cifar10_null --concurrency-range 128:128
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

import grpc

from cifar_serve.v1 import classifier_pb2 as cpb
from cifar_serve.v1 import open_inference_pb2 as opb

__all__ = ["EchoAnswers", "main", "serve"]

logger = logging.getLogger("cifar_serve.bench.echo")

NUM_CLASSES = 10
LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class EchoAnswers:
    """Pre-serialized answers, one per image count, built on first use."""

    def __init__(self, model_name: str = "cifar10_resnet18", model_version: str = "1") -> None:
        self.model_name = model_name
        self.model_version = model_version
        self._native: dict[int, bytes] = {}
        self._v2: dict[int, bytes] = {}

    def native(self, request: bytes) -> bytes:
        req = cpb.ClassifyRequest.FromString(request)
        n = req.packed.count if req.HasField("packed") else len(req.images)
        answer = self._native.get(n)
        if answer is None:
            result = cpb.Classification(
                predictions=[cpb.ClassPrediction(label=LABELS[0], class_index=0, probability=1.0)]
            )
            answer = cpb.ClassifyResponse(
                results=[result] * n, model_name=self.model_name, model_version=self.model_version
            ).SerializeToString()
            self._native[n] = answer
        return answer

    def v2(self, request: bytes) -> bytes:
        req = opb.ModelInferRequest.FromString(request)
        n = int(req.inputs[0].shape[0]) if req.inputs and req.inputs[0].shape else 0
        answer = self._v2.get(n)
        if answer is None:
            resp = opb.ModelInferResponse(model_name=self.model_name, model_version=self.model_version)
            out = resp.outputs.add()
            out.name, out.datatype = "logits", "FP32"
            out.shape.extend([n, NUM_CLASSES])
            resp.raw_output_contents.append(bytes(4 * NUM_CLASSES * n))
            answer = resp.SerializeToString()
            self._v2[n] = answer
        return answer


class _Hop:
    """A minimal batcher: the calls waiting when the collector wakes share one thread round trip."""

    def __init__(self) -> None:
        self._waiting: list[asyncio.Future[None]] = []
        self._arrived: asyncio.Event | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1)
        self._collector: asyncio.Task[None] | None = None

    async def wait(self) -> None:
        if self._arrived is None:
            self._arrived = asyncio.Event()
            self._collector = asyncio.ensure_future(self._collect())
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        self._arrived.set()
        await future

    async def _collect(self) -> None:
        assert self._arrived is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            batch, self._waiting = self._waiting, []
            await loop.run_in_executor(self._executor, lambda: None)
            for future in batch:
                future.set_result(None)


def _handler(fn: Callable[[bytes], bytes], hop: _Hop | None = None) -> grpc.RpcMethodHandler:
    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            if hop is not None:
                await hop.wait()
            return fn(request)
        except Exception as exc:  # a malformed request: say so, like the real server
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{type(exc).__name__}: {exc}")
            raise

    # No (de)serializers: bytes in, bytes out.
    return grpc.unary_unary_rpc_method_handler(unary)


def _described(answers: EchoAnswers, counted: list[int]) -> dict[str, grpc.RpcMethodHandler]:
    """What perf_analyzer reads before its load: metadata, config, and statistics."""
    name = answers.model_name
    meta = opb.ModelMetadataResponse(name=name, versions=[answers.model_version], platform="echo")
    meta.inputs.add(name="images", datatype="UINT8", shape=[-1, 32, 32, 3])
    meta.outputs.add(name="logits", datatype="FP32", shape=[-1, NUM_CLASSES])
    config = opb.ModelConfigResponse()
    config.config.name = name
    config.config.max_batch_size = 256
    config.config.input.add(name="images", data_type=2, dims=[32, 32, 3])  # TYPE_UINT8
    config.config.output.add(name="logits", data_type=11, dims=[NUM_CLASSES])  # TYPE_FP32
    fixed = {
        "ServerMetadata": opb.ServerMetadataResponse(name="echo", version="0").SerializeToString(),
        "ModelMetadata": meta.SerializeToString(),
        "ModelConfig": config.SerializeToString(),
    }

    def answer(data: bytes) -> Callable[[bytes], bytes]:
        return lambda _request: data

    def statistics(_request: bytes) -> bytes:
        resp = opb.ModelStatisticsResponse()
        stats = resp.model_stats.add(name=name, version=answers.model_version)
        stats.inference_stats.success.count = stats.inference_count = stats.execution_count = counted[0]
        return resp.SerializeToString()

    handlers = {method: _handler(answer(data)) for method, data in fixed.items()}
    handlers["ModelStatistics"] = _handler(statistics)
    return handlers


async def serve(
    host: str,
    port: int,
    ready: Callable[[int], Any] | None = None,
    *,
    model_name: str = "cifar10_resnet18",
    hop: bool = False,
) -> None:
    """Serve until SIGTERM/SIGINT; ``ready(port)`` is called once listening."""
    answers = EchoAnswers(model_name)
    counted = [0]

    def v2(request: bytes) -> bytes:
        counted[0] += 1
        return answers.v2(request)

    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", 256 * 1024 * 1024), ("grpc.so_reuseport", 0)]
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "cifar_serve.v1.Classifier", {"Classify": _handler(answers.native)}
            ),
            grpc.method_handlers_generic_handler(
                "inference.GRPCInferenceService",
                {"ModelInfer": _handler(v2, _Hop() if hop else None), **_described(answers, counted)},
            ),
        ]
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    await server.start()
    if ready is not None:
        ready(bound)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: pick a free port")
    p.add_argument("--model-name", default="cifar10_resnet18", help="the model name it answers as")
    p.add_argument("--hop", action="store_true", help="ModelInfer waits for a minimal batcher's thread hop")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def ready(port: int) -> None:
        sys.stdout.write(f"listening on {args.host}:{port}\n")
        sys.stdout.flush()

    asyncio.run(serve(args.host, args.port, ready, model_name=args.model_name, hop=args.hop))
    return 0


if __name__ == "__main__":
    sys.exit(main())
