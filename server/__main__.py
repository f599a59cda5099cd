"""``cifar-serve``: the gRPC inference server."""

from __future__ import annotations

import logging
import os
import sys
import warnings

__all__ = ["main"]

logger = logging.getLogger("cifar_serve.server")


def main(argv: list[str] | None = None) -> int:
    from .settings import settings_from_args

    settings = settings_from_args(argv)
    if not settings.spin_wait:
        # Read once, when OpenMP starts (with torch, not yet imported here); children inherit it.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    _grpc_experiments(settings.grpc_experiments)
    # torch.jit is deprecated upstream but TorchScript is the artifact we are asked to serve.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")
    from .app import StartupError
    from .launch import serve
    from .loops import run
    from .runtime import ArtifactError

    try:
        return run(serve(settings), settings.event_loop)
    except (ArtifactError, StartupError) as exc:
        logger.error("cannot start: %s", exc)
        return 2


def _grpc_experiments(wanted: str) -> None:
    """Hand ``--grpc-experiments`` to gRPC core, which reads ``GRPC_EXPERIMENTS`` once, when grpc is
    imported (worker processes inherit it); a variable already set is the operator's and wins."""
    if not wanted or "GRPC_EXPERIMENTS" in os.environ:
        return
    if "grpc" in sys.modules:  # main() called in a process that imported grpc: too late to apply
        logger.warning(
            "--grpc-experiments %r not applied: grpc was imported before cifar-serve started; "
            "set GRPC_EXPERIMENTS before the process starts instead",
            wanted,
        )
        return
    os.environ["GRPC_EXPERIMENTS"] = wanted


if __name__ == "__main__":
    sys.exit(main())
