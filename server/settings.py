"""The server's one settings object: defaults, ``CIFAR_SERVE_*`` environment variables, CLI flags.

Precedence: a CLI flag beats the environment variable, which beats the default. Every field
is documented once, in its metadata, and that text feeds both ``--help`` and the README table.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, NoReturn

__all__ = ["ENV_PREFIX", "Settings", "SettingsError", "build_parser", "settings_from_args"]

ENV_PREFIX = "CIFAR_SERVE_"


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


class SettingsError(ValueError):
    """Settings that cannot work: the message names every flag involved."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class Settings:
    host: str = _opt("127.0.0.1", "address to bind (0.0.0.0 for all interfaces)")
    port: int = _opt(50051, "gRPC port (0: pick a free one)")
    metrics_port: int = _opt(9090, "Prometheus metrics HTTP port (0: pick a free one, -1: off)")
    model_dir: str = _opt("artifacts", "folder holding manifest.json and the exported artifacts")
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N (auto: the GPU when there is one)")
    backend: str = _opt(
        "auto",
        "runtime: torchscript, onnxruntime, or auto (CPU fp32: both load, warm-up times each at every "
        "batch size and the faster serves it, as the start-up runtime table shows; otherwise TorchScript)",
        choices=("auto", "torchscript", "onnxruntime"),
    )
    precision: str = _opt(
        "fp32",
        "fp32; bf16 (CPU with AMX or GPU); fp16 (GPU); int8 (CPU: model.int8.onnx on ONNX Runtime)",
        choices=("fp32", "bf16", "fp16", "int8"),
    )
    max_batch_size: int = _opt(
        256,
        "most images in one forward pass; a batch takes whatever is queued up to it (256: on a 2-core "
        "CPU it needs 0.87x the CPU per image of 64, larger ones save at most 0.03x more, and a full "
        "one runs in ~50 ms; BENCHMARKS.md)",
    )
    max_batch_delay_ms: float = _opt(
        5.0,
        "longest wait for more images: after the oldest queued image while a batch computes, and for "
        "the callers of the batch just answered (--batch-regroup) (5: by turns on 2 CPU cores, 0.85-0.93x "
        "the server CPU per request of 2 ms for the null model at c=8-128; the ResNet18's batches of 8 "
        "or more compute for longer than twice the delay, so it does not change them. Callers that do "
        "not come back pay for it in latency: the null model at a steady 1,000 req/s, p50 2.0 against "
        "0.7 ms. 0: regroup waits only half a batch's compute time, the lowest latency at moderate load; "
        "BENCHMARKS.md)",
    )
    idle_dispatch: bool = _opt(
        True, "when no batch is computing, run queued work at once instead of waiting for the delay"
    )
    batch_regroup: bool = _opt(
        True,
        "with --idle-dispatch: after a batch, wait (at most half its compute time or "
        "--max-batch-delay-ms, whichever is longer) for as many images "
        "as it answered before running what queued meanwhile, so callers that come straight back join "
        "it (served by turns on 2 CPU cores, single images at c=32: batches of 28 instead of 16, 1.31x "
        "the images at 0.70x the server CPU per request; BENCHMARKS.md)",
    )
    max_queue_images: int = _opt(4096, "images allowed to wait; beyond it new work gets RESOURCE_EXHAUSTED")
    max_inflight_batches: int = _opt(0, "batches computing at once (0: 1 on CPU, 2 on GPU)")
    cuda_graphs: bool = _opt(True, "on GPU, replay CUDA graphs captured per batch-size bucket")
    torch_threads: int = _opt(0, "intra-op threads of the CPU runtime (0: one per core)")
    spin_wait: bool = _opt(
        False,
        "CPU runtimes' idle threads spin-wait for work (ONNX Runtime's pool, OpenMP) instead of "
        "sleeping (off by default: on 2 cores under load, sleeping served 1.21x the images at c=32 "
        "and 1.10x at c=128 with 0.63x and 0.91x the server CPU per request; BENCHMARKS.md)",
    )
    max_images_per_request: int = _opt(1024, "most images in one request (larger: INVALID_ARGUMENT)")
    max_image_pixels: int = _opt(16_000_000, "most pixels an encoded image may declare (decompression bombs)")
    max_receive_message_bytes: int = _opt(16 * 1024 * 1024, "largest request message accepted")
    max_stream_requests: int = _opt(
        100_000, "most requests on one streaming call (ClassifyStream, ModelStreamInfer)"
    )
    grace_period_s: float = _opt(10.0, "on SIGTERM/SIGINT, how long in-flight work may take to finish")
    model_name: str = _opt("", "name to serve the model under (default: the manifest's)")
    verify_sha256: bool = _opt(True, "check the artifact's sha256 against the manifest at start-up")
    tls_cert: str = _opt("", "server certificate (PEM) to serve TLS")
    tls_key: str = _opt("", "server private key (PEM)")
    tls_client_ca: str = _opt("", "CA (PEM) that client certificates must chain to (mutual TLS)")
    auth_token: str = _opt(
        "",
        "if set, inference calls (and admin calls, unless --admin-token is set) must send "
        "'authorization: Bearer <token>'; health, liveness, readiness and server metadata stay open",
    )
    admin_token: str = _opt(
        "",
        "if set, admin calls (model repository load/unload/index, shared-memory registration) must "
        "send 'authorization: Bearer <admin token>'; the --auth-token does not grant them",
    )
    model_control_mode: str = _opt(
        "none",
        "none: RepositoryModelLoad/Unload are refused and the model keeps serving (SIGHUP still "
        "reloads); explicit: admin callers may unload, and load versions from inside "
        "--model-repository",
        choices=("none", "explicit"),
    )
    model_repository: str = _opt(
        "",
        "the only folder a load may read model versions from (default: the folder that holds --model-dir)",
    )
    max_inflight_request_bytes: int = _opt(
        256 * 1024 * 1024,
        "most request bytes held at once before their images are queued (being parsed, decoded or "
        "waiting); beyond it new requests get RESOURCE_EXHAUSTED",
    )
    event_loop: str = _opt(
        "auto",
        "event loop of every server process: uvloop, asyncio, or auto (uvloop where installed: served "
        "by turns on 2 cores, 1.12x the single images at c=32 with 0.92x the server CPU per request, "
        "and 0.97-0.99x the CPU per request on the null model; BENCHMARKS.md)",
        choices=("auto", "uvloop", "asyncio"),
    )
    grpc_experiments: str = _opt(
        "",
        "gRPC core experiments of every server process, in GRPC_EXPERIMENTS' syntax, applied where "
        "that variable is unset (yours wins; '': gRPC's defaults). '-event_engine_listener' has the "
        "completion queue's poller read the connections instead of gRPC's EventEngine threads: by "
        "turns on 2 cores, 0.91-0.93x the server CPU per single-image request where the model is "
        "nearly free (the null model, a GPU's case) in every run; for the ResNet18 on the CPU three runs "
        "gave 1.06x, 0.93x and 0.98x at c=32 (noise), so it is not the default; BENCHMARKS.md",
    )
    log_level: str = _opt(
        "INFO", "DEBUG, INFO, WARNING or ERROR", choices=("DEBUG", "INFO", "WARNING", "ERROR")
    )
    # --- HTTP/REST (server/rest.py) ---
    http_port: int = _opt(
        8000,
        "Open Inference Protocol HTTP/REST port, on --host with the same TLS and token (0: pick a "
        "free one, -1: off)",
    )

    http_read_timeout_s: float = _opt(
        30.0,
        "longest an HTTP client may leave its request headers or body unfinished without sending "
        "a byte; then the connection is closed (headers) or answered 408 (body) and its bytes freed",
    )

    # --- processes (server/workers.py) ---
    workers: int = _opt(
        1,
        "front-end processes accepting gRPC and REST calls on the same ports (SO_REUSEPORT); with "
        "2 or more, the model runs in one more process that batches the calls of all of them",
    )
    max_restarts: int = _opt(
        5,
        "with --workers 2 or more: a worker or the model process that dies is restarted, at most this "
        "many times within --restart-window-s; one more death makes cifar-serve exit 1 (0: never restart)",
    )
    restart_window_s: float = _opt(
        60.0,
        "the window --max-restarts counts restarts in; repeated restarts of one role wait longer each "
        "time, all together less than half of it",
    )
    pid_file: str = _opt(
        "",
        "write the server's process id to this file at start-up (for kill -HUP $(cat FILE) on a host "
        "with other servers); removed at exit",
    )

    def __post_init__(self) -> None:
        # Validated here, not in the CLI, so settings built from the environment, from flags or
        # in code are held to the same rules.
        problems = list(_problems(self))
        if problems:
            raise SettingsError("; ".join(problems))


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(
        f"not a boolean: {text!r} (use true or false; yes/no, on/off, 1/0 work too)"
    )


def _convert(kind: Any, text: str) -> Any:
    if kind in (bool, "bool"):
        return _parse_bool(text)
    if kind in (int, "int"):
        return int(text)
    if kind in (float, "float"):
        return float(text)
    return text


# --help lists the options in these groups, in this order; a field named in none of them is
# listed under "other" (so a new option shows up even before it is placed here).
_GROUPS: dict[str, tuple[str, ...]] = {
    "network": ("host", "port", "http_port", "metrics_port", "http_read_timeout_s"),
    "model": (
        "model_dir",
        "model_name",
        "device",
        "backend",
        "precision",
        "torch_threads",
        "spin_wait",
        "cuda_graphs",
        "verify_sha256",
        "model_control_mode",
        "model_repository",
    ),
    "batching": (
        "max_batch_size",
        "max_batch_delay_ms",
        "idle_dispatch",
        "batch_regroup",
        "max_queue_images",
        "max_inflight_batches",
    ),
    "limits": (
        "max_images_per_request",
        "max_image_pixels",
        "max_receive_message_bytes",
        "max_stream_requests",
        "max_inflight_request_bytes",
        "grace_period_s",
    ),
    "security": ("tls_cert", "tls_key", "tls_client_ca", "auth_token", "admin_token"),
    "workers": ("workers", "max_restarts", "restart_window_s", "event_loop", "grpc_experiments"),
    "logging and process": ("log_level", "pid_file"),
}


class _Parser(argparse.ArgumentParser):
    """Every usage error in one line, as the settings' own checks report theirs: the full usage
    (40 options) would bury the one word that was wrong."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    env = os.environ if environ is None else environ
    p = _Parser(
        prog="cifar-serve",
        usage="%(prog)s [OPTIONS]  (every option also reads CIFAR_SERVE_<NAME>)",
        description="Serve the CIFAR-10 ResNet18 over gRPC (own API and Open Inference Protocol) "
        "with dynamic batching, health checking, reflection and Prometheus metrics.",
    )
    groups = {title: p.add_argument_group(title) for title in _GROUPS}
    group_of = {name: groups[title] for title, names in _GROUPS.items() for name in names}
    order = [name for names in _GROUPS.values() for name in names]
    by_name = {f.name: f for f in fields(Settings)}
    other = [f for f in fields(Settings) if f.name not in group_of]
    if other:
        groups["other"] = p.add_argument_group("other")
    for f in [by_name[n] for n in order if n in by_name] + other:
        g = group_of.get(f.name, groups.get("other"))
        assert g is not None
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
            g.add_argument(flag, type=_parse_bool, default=default, metavar="BOOL", help=help_text)
        else:
            g.add_argument(
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
    """Flags over ``CIFAR_SERVE_*`` variables over defaults; exits 2 with one line if invalid."""
    parser = build_parser(environ)
    args = parser.parse_args(argv)
    try:
        return Settings(**vars(args))
    except SettingsError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")


def _problems(s: Settings) -> Sequence[str]:
    out: list[str] = []
    for f in fields(s):
        choices = f.metadata.get("choices")
        value = getattr(s, f.name)
        if choices and value not in choices:
            out.append(
                f"{_flag(f.name)} (env {ENV_PREFIX}{f.name.upper()}) is {value!r}; "
                f"choose one of {', '.join(choices)}"
            )
    if s.event_loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        out.append("--event-loop is 'uvloop', but uvloop is not installed here (pip install uvloop)")
    positive = (
        "max_batch_size",
        "max_queue_images",
        "max_images_per_request",
        "max_image_pixels",
        "max_receive_message_bytes",
        "max_stream_requests",
        "max_inflight_request_bytes",
    )
    for name in positive:
        if getattr(s, name) < 1:
            out.append(f"{_flag(name)} must be at least 1, got {getattr(s, name)}")
    if not 1 <= s.workers <= 64:
        out.append(f"--workers must be between 1 and 64, got {s.workers}")
    if s.http_read_timeout_s <= 0:
        out.append(f"--http-read-timeout-s must be positive, got {s.http_read_timeout_s}")
    if s.admin_token and s.admin_token == s.auth_token:
        out.append("--admin-token must differ from --auth-token: a shared secret grants every group")
    for name in (
        "max_batch_delay_ms",
        "grace_period_s",
        "max_inflight_batches",
        "torch_threads",
        "max_restarts",
    ):
        if getattr(s, name) < 0:
            out.append(f"{_flag(name)} must not be negative, got {getattr(s, name)}")
    for name in ("port", "metrics_port", "http_port"):
        low = -1 if name in ("metrics_port", "http_port") else 0
        if not low <= getattr(s, name) <= 65535:
            out.append(f"{_flag(name)} must be a port number (0-65535), got {getattr(s, name)}")
    if s.restart_window_s <= 0:
        out.append(f"--restart-window-s must be positive, got {s.restart_window_s}")
    if s.max_queue_images < s.max_batch_size:
        out.append(
            f"--max-queue-images ({s.max_queue_images}) must be at least "
            f"--max-batch-size ({s.max_batch_size})"
        )
    if s.max_images_per_request > s.max_queue_images:
        out.append(
            f"--max-images-per-request ({s.max_images_per_request}) must not exceed --max-queue-images "
            f"({s.max_queue_images}): a request that large could never be queued"
        )
    if s.max_inflight_request_bytes < s.max_receive_message_bytes:
        out.append(
            f"--max-inflight-request-bytes ({s.max_inflight_request_bytes}) must be at least "
            f"--max-receive-message-bytes ({s.max_receive_message_bytes}): "
            "the largest request could never run"
        )
    if bool(s.tls_cert) != bool(s.tls_key):
        out.append("--tls-cert and --tls-key go together")
    if s.tls_client_ca and not s.tls_cert:
        out.append("--tls-client-ca needs --tls-cert and --tls-key")
    return out
