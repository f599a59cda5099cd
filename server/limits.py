"""The per-request limits every API applies the same way, each implemented once."""

from __future__ import annotations

from .errors import InvalidInput

__all__ = ["check_image_count"]


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
