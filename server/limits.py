"""The per-request limits every API applies the same way, each implemented once."""

from __future__ import annotations

import time

from .errors import InvalidInput

__all__ = ["check_image_count", "sooner_deadline"]


def check_image_count(n: int, limit: int, what: str = "request") -> None:
    """Refuse a request of no images or more than ``--max-images-per-request`` of them.

    Called as soon as a request's image count is known (from a declared shape, before any pixel
    is read or decoded), by every decoder and by the core.
    """
    if n <= 0:
        raise InvalidInput(f"{what} holds no images")
    if n > limit:
        raise InvalidInput(
            f"{what} holds {n} images, more than the limit of {limit} per request "
            "(--max-images-per-request); split it"
        )


def sooner_deadline(deadline: float | None, timeout_us: int, since: float | None = None) -> float | None:
    """``deadline`` (a ``time.monotonic()`` instant, or None), or ``timeout_us`` microseconds from
    ``since`` (default: now) when that is sooner; a timeout of 0 is none. How every API applies a
    request's own timeout (v2's ``timeout`` parameter, a native stream item's ``timeout_us``) on
    top of the call's deadline."""
    if not timeout_us:
        return deadline
    ends = (time.monotonic() if since is None else since) + timeout_us / 1e6
    return ends if deadline is None else min(deadline, ends)
