"""The server's one settings object: defaults, ``CIFAR_SERVE_*`` environment variables, CLI flags.

Precedence: a CLI flag beats the environment variable, which beats the default. Every field
is documented once, in its metadata, and that text feeds both ``--help`` and the README table.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["ENV_PREFIX", "Settings", "build_parser", "settings_from_args"]

ENV_PREFIX = "CIFAR_SERVE_"


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class Settings:
    host: str = _opt("127.0.0.1", "address to bind (0.0.0.0 for all interfaces)")
    port: int = _opt(50051, "gRPC port (0: pick a free one)")
    metrics_port: int = _opt(9090, "Prometheus metrics HTTP port (0: pick a free one, -1: off)")
    model_dir: str = _opt("artifacts", "folder holding manifest.json and the exported artifacts")
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N (auto: the GPU when there is one)")
    backend: str = _opt(
        "auto",
        "runtime: torchscript, onnxruntime, or auto (CPU fp32: ONNX Runtime for batches of up to 4 "
        "images, frozen TorchScript above; otherwise TorchScript)",
        choices=("auto", "torchscript", "onnxruntime"),
    )
    precision: str = _opt(
        "fp32", "fp32; bf16 (CPU with AMX or GPU); fp16 (GPU)", choices=("fp32", "bf16", "fp16")
    )
    max_batch_size: int = _opt(64, "most images in one forward pass")
    max_batch_delay_ms: float = _opt(2.0, "longest wait after the oldest queued image before a batch runs")
    idle_dispatch: bool = _opt(
        True, "when no batch is computing, run queued work at once instead of waiting for the delay"
    )
    max_queue_images: int = _opt(4096, "images allowed to wait; beyond it new work gets RESOURCE_EXHAUSTED")
    max_inflight_batches: int = _opt(0, "batches computing at once (0: 1 on CPU, 2 on GPU)")
    cuda_graphs: bool = _opt(True, "on GPU, replay CUDA graphs captured per batch-size bucket")
    torch_threads: int = _opt(0, "intra-op threads of the CPU runtime (0: one per core)")
    max_images_per_request: int = _opt(1024, "most images in one request (larger: INVALID_ARGUMENT)")
    max_image_pixels: int = _opt(16_000_000, "most pixels an encoded image may declare (decompression bombs)")
    max_receive_message_bytes: int = _opt(16 * 1024 * 1024, "largest request message accepted")
    max_stream_requests: int = _opt(100_000, "most requests on one ClassifyStream call")
    grace_period_s: float = _opt(10.0, "on SIGTERM/SIGINT, how long in-flight work may take to finish")
    model_name: str = _opt("", "name to serve the model under (default: the manifest's)")
    verify_sha256: bool = _opt(True, "check the artifact's sha256 against the manifest at start-up")
    tls_cert: str = _opt("", "server certificate (PEM) to serve TLS")
    tls_key: str = _opt("", "server private key (PEM)")
    tls_client_ca: str = _opt("", "CA (PEM) that client certificates must chain to (mutual TLS)")
    auth_token: str = _opt("", "if set, callers must send 'authorization: Bearer <token>'")
    log_level: str = _opt("INFO", "DEBUG, INFO, WARNING or ERROR")

    @property
    def env(self) -> dict[str, str]:
        return {f.name: ENV_PREFIX + f.name.upper() for f in fields(self)}

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def _convert(kind: Any, text: str) -> Any:
    if kind in (bool, "bool"):
        return _parse_bool(text)
    if kind in (int, "int"):
        return int(text)
    if kind in (float, "float"):
        return float(text)
    return text


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    env = os.environ if environ is None else environ
    p = argparse.ArgumentParser(
        prog="cifar-serve",
        description="Serve the CIFAR-10 ResNet18 over gRPC (own API and Open Inference Protocol) "
        "with dynamic batching, health checking, reflection and Prometheus metrics.",
    )
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        env_name = ENV_PREFIX + f.name.upper()
        default = f.default
        if env_name in env:
            try:
                default = _convert(f.type, env[env_name])
            except (ValueError, argparse.ArgumentTypeError) as exc:
                p.error(f"{env_name}: {exc}")
        help_text = f"{f.metadata['help']} [env {env_name}; default: {f.default!r}]"
        if f.type in (bool, "bool"):
            p.add_argument(flag, type=_parse_bool, default=default, metavar="BOOL", help=help_text)
        else:
            p.add_argument(
                flag,
                type=functools.partial(_convert, f.type),
                default=default,
                choices=f.metadata.get("choices"),
                help=help_text,
            )
    return p


def settings_from_args(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    args = build_parser(environ).parse_args(argv)
    s = Settings(**vars(args))
    _validate(s)
    return s


def _validate(s: Settings) -> None:
    problems = []
    if s.max_batch_size < 1:
        problems.append("--max-batch-size must be at least 1")
    if s.max_batch_delay_ms < 0:
        problems.append("--max-batch-delay-ms must not be negative")
    if s.max_queue_images < s.max_batch_size:
        problems.append("--max-queue-images must be at least --max-batch-size")
    if bool(s.tls_cert) != bool(s.tls_key):
        problems.append("--tls-cert and --tls-key go together")
    if s.tls_client_ca and not s.tls_cert:
        problems.append("--tls-client-ca needs --tls-cert and --tls-key")
    if problems:
        raise SystemExit("cifar-serve: " + "; ".join(problems))
