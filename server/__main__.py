"""``cifar-serve``: the gRPC inference server."""

from __future__ import annotations

import asyncio
import logging
import sys
import warnings

__all__ = ["main"]

logger = logging.getLogger("cifar_serve.server")


def main(argv: list[str] | None = None) -> int:
    from .settings import settings_from_args

    settings = settings_from_args(argv)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # torch.jit is deprecated upstream but TorchScript is the artifact we are asked to serve.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")
    from .app import StartupError, serve
    from .runtime import ArtifactError

    try:
        return asyncio.run(serve(settings))
    except (ArtifactError, StartupError) as exc:
        logger.error("cannot start: %s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
