"""Turn request payloads into uint8 ``[N,32,32,3]`` RGB arrays (numpy and Pillow only).

Shared by the server and the client library, so an image classified offline and one sent
encoded to the server go through exactly the same decoding and resizing.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import InvalidInput

__all__ = [
    "IMAGE_BYTES",
    "IMAGE_SHAPE",
    "decode_image",
    "pil_to_array",
    "raw_to_array",
    "packed_to_array",
]

IMAGE_SHAPE = (32, 32, 3)
IMAGE_BYTES = 32 * 32 * 3
_RESAMPLE = Image.Resampling.BILINEAR


def pil_to_array(img: Image.Image) -> np.ndarray:
    """RGB (alpha and palettes dropped), resized to 32x32 with bilinear filtering when needed."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (32, 32):
        img = img.resize((32, 32), _RESAMPLE)
    return np.asarray(img, dtype=np.uint8)


def decode_image(data: bytes, *, max_pixels: int = 16_000_000, what: str = "image") -> np.ndarray:
    """Decode an encoded file (PNG, JPEG, BMP, WebP, GIF, ...) into ``[32,32,3]`` uint8.

    The declared size is checked against ``max_pixels`` from the header alone, before any
    pixel is decoded, so a decompression bomb costs nothing.
    """
    if not data:
        raise InvalidInput(f"{what}: empty image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise InvalidInput(
                    f"{what}: declares {width}x{height} = {width * height} pixels, over the limit of "
                    f"{max_pixels}"
                )
            img.load()  # decode now so truncation is reported here, not later
            return pil_to_array(img)
    except InvalidInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard fires in open() for sizes far beyond ours.
        raise InvalidInput(f"{what}: declared size is over the limit of {max_pixels} pixels ({exc})") from exc
    except UnidentifiedImageError as exc:
        # PIL's message names its file object (`<_io.BytesIO object at 0x…>`), which says nothing.
        raise InvalidInput(
            f"{what}: not a decodable image ({len(data)} bytes in no format Pillow reads: "
            "send PNG, JPEG, BMP, GIF, TIFF or WebP, or raw 32x32 RGB)"
        ) from exc
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
        raise InvalidInput(f"{what}: corrupt or truncated image ({exc})") from exc


def raw_to_array(data: bytes, *, what: str = "image") -> np.ndarray:
    """Raw 32x32x3 uint8 HWC RGB pixels, as a view of ``data`` (no copy)."""
    if len(data) != IMAGE_BYTES:
        raise InvalidInput(
            f"{what}: raw_rgb must be exactly {IMAGE_BYTES} bytes (32x32x3 uint8), got {len(data)}"
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(IMAGE_SHAPE)


def packed_to_array(data: bytes, count: int) -> np.ndarray:
    """N packed images as a ``[N,32,32,3]`` view of ``data`` (no copy)."""
    if count <= 0:
        raise InvalidInput("packed: count must be at least 1")
    if len(data) != count * IMAGE_BYTES:
        raise InvalidInput(
            f"packed: {count} images need {count * IMAGE_BYTES} bytes (count*32*32*3), got {len(data)}"
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(count, *IMAGE_SHAPE)
