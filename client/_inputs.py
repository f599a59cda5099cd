"""Turn what callers hand to ``classify()`` into requests.

Every input becomes either decoded pixels (a uint8 ``[n,32,32,3]`` block) or encoded file bytes:

- numpy arrays and PIL images are converted here with the server's own functions
  (:mod:`cifar_serve.server.preprocess`) and travel as pixels: the packed fast path.
- file paths are read and decoded here too, with the same ``decode_image`` the server runs, so
  the pixels are identical to what the server would have produced. Doing it on the client means
  a bad file fails locally, naming its path, before anything is sent; a request carries 3 KB per
  image instead of the whole file (photos of several MB would quickly hit the server's message
  limit); and the decoding work is spread over the callers rather than the shared server.
- ``bytes`` are sent as they are (``Image.encoded``) and decoded by the server: the caller chose to
  hand over an encoded file, and the server is the reference decoder.

Requests hold at most ``max_images`` images and about ``max_bytes`` of payload. A request whose
images are all pixels uses ``PackedImages``; one with encoded files uses ``images``, pixels then
going as ``raw_rgb``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cifar_serve.server.errors import InvalidInput
from cifar_serve.server.preprocess import IMAGE_BYTES, IMAGE_SHAPE, decode_image, pil_to_array
from cifar_serve.v1 import classifier_pb2 as pb

from ._errors import invalid_argument, readable_message

__all__ = [
    "DEFAULT_MAX_REQUEST_BYTES",
    "ImageInput",
    "Inputs",
    "Part",
    "build_request",
    "chunk_parts",
    "count_images",
    "decode_file_bytes",
    "load_image_file",
    "to_parts",
]

ImageInput = str | os.PathLike[str] | bytes | bytearray | memoryview | Image.Image | np.ndarray
"""One image (or, for a 4-D array, a batch): a file path, encoded file bytes, a PIL image, a numpy array."""

Inputs = ImageInput | Iterable[ImageInput]

Part = np.ndarray | bytes
"""A uint8 ``[n,32,32,3]`` block of decoded images, or one encoded file."""

# Well under the server's default 16 MiB message limit, large enough that packed requests of the
# default 256 images (768 KiB) are never split by size.
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024


def load_image_file(path: str | os.PathLike[str], *, max_pixels: int = 16_000_000) -> np.ndarray:
    """Read and decode one image file into uint8 ``[32,32,3]``, exactly as the server would.

    Raises ``OSError`` when the file cannot be read and ``InvalidArgumentError`` when it is
    not a decodable image (the message names the file).
    """
    return decode_file_bytes(Path(path).read_bytes(), os.fspath(path), max_pixels=max_pixels)


def decode_file_bytes(data: bytes, what: str, *, max_pixels: int = 16_000_000) -> np.ndarray:
    """Decode one encoded file's bytes into uint8 ``[32,32,3]``, exactly as the server would.

    Raises ``InvalidArgumentError`` naming ``what`` when the bytes are not a decodable image.
    """
    try:
        image: np.ndarray = decode_image(data, max_pixels=max_pixels, what=what)
    except InvalidInput as exc:
        if isinstance(exc.__cause__, UnidentifiedImageError):
            # The server's wording tells a caller what to send; here the caller has a file.
            raise invalid_argument(
                f"{what}: not an image file ({len(data)} bytes in none of the formats read: PNG, JPEG, "
                "BMP, GIF, TIFF, WebP)"
            ) from None
        raise invalid_argument(readable_message(exc.message)) from None
    return image


def _from_pil(img: Image.Image) -> np.ndarray:
    """``[32,32,3]`` uint8 through the server's own ``pil_to_array``."""
    out: np.ndarray = pil_to_array(img)
    return out


def _to_uint8(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind in "biu" and arr.size and (arr.min() < 0 or arr.max() > 255):
        raise invalid_argument(f"{what}: integer pixel values must lie in 0..255")
    if arr.dtype.kind in "biu":
        return arr.astype(np.uint8)
    raise invalid_argument(
        f"{what}: arrays must hold uint8 pixels (0..255), got {arr.dtype}; convert floats in [0, 1] "
        "with (x * 255).round().astype(np.uint8)"
    )


def _one_image(arr: np.ndarray, what: str) -> np.ndarray:
    """One HW / HWC array (any size, 1, 3 or 4 channels) as ``[32,32,3]`` via the shared preprocess."""
    if arr.shape == IMAGE_SHAPE:
        return arr
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
        raise invalid_argument(
            f"{what}: expected an HWC image with 1, 3 or 4 channels, got shape {arr.shape}"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise invalid_argument(f"{what}: empty image of shape {arr.shape}")
    # uint8 HW -> "L", HWx3 -> "RGB", HWx4 -> "RGBA": what Pillow would give for the same file.
    return _from_pil(Image.fromarray(np.ascontiguousarray(arr)))


def _array_part(arr: np.ndarray, what: str) -> np.ndarray:
    arr = _to_uint8(np.asarray(arr), what)
    if arr.ndim == 4:  # NHWC batch
        if arr.shape[1:] == IMAGE_SHAPE:
            return np.ascontiguousarray(arr)
        if len(arr) == 0:
            return np.empty((0, *IMAGE_SHAPE), np.uint8)
        return np.stack([_one_image(a, f"{what}[{i}]") for i, a in enumerate(arr)])
    if arr.ndim in (2, 3):
        return np.ascontiguousarray(_one_image(arr, what))[None]
    raise invalid_argument(
        f"{what}: expected one HWC image ([32,32,3]) or an NHWC batch ([N,32,32,3]), got shape {arr.shape}"
    )


def _part(item: object, what: str) -> Part:
    if isinstance(item, np.ndarray):
        return _array_part(item, what)
    if isinstance(item, Image.Image):
        return _from_pil(item)[None]
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, (str, os.PathLike)):
        try:
            return load_image_file(item)[None]
        except OSError as exc:  # the library's errors are all CifarServeError, a missing file too
            reason = exc.strerror or str(exc)
            raise invalid_argument(f"{what}: cannot read {os.fspath(item)}: {reason}") from exc
    raise TypeError(
        f"{what}: cannot classify a {type(item).__name__}; pass file paths, encoded bytes, PIL images "
        "or uint8 numpy arrays"
    )


def _is_single(inputs: object) -> bool:
    return isinstance(inputs, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray))


def to_parts(inputs: Inputs) -> list[Part]:
    """Normalise ``inputs`` (one input or an iterable of them) into parts, in order."""
    single = _is_single(inputs)
    items: Sequence[object] = [inputs] if single else list(inputs)  # type: ignore[arg-type]
    parts: list[Part] = []
    for i, item in enumerate(items):
        part = _part(item, "inputs" if single else f"inputs[{i}]")
        if isinstance(part, bytes) or len(part):
            parts.append(part)
    return parts


def count_images(parts: Sequence[Part]) -> int:
    return sum(1 if isinstance(p, bytes) else len(p) for p in parts)


def chunk_parts(
    parts: Iterable[Part], max_images: int, max_bytes: int = DEFAULT_MAX_REQUEST_BYTES
) -> Iterator[list[Part]]:
    """Group parts into requests of at most ``max_images`` images and about ``max_bytes`` bytes, in order.

    An encoded file larger than ``max_bytes`` still travels, alone in its request.
    """
    if max_images < 1:
        raise ValueError("max_images_per_request must be at least 1")
    max_bytes = max(max_bytes, IMAGE_BYTES)
    chunk: list[Part] = []
    n = nbytes = 0
    for part in parts:
        if isinstance(part, bytes):
            if chunk and (n + 1 > max_images or nbytes + len(part) > max_bytes):
                yield chunk
                chunk, n, nbytes = [], 0, 0
            chunk.append(part)
            n += 1
            nbytes += len(part)
            continue
        i = 0
        while i < len(part):
            room = min(max_images - n, (max_bytes - nbytes) // IMAGE_BYTES)
            if room <= 0:
                yield chunk
                chunk, n, nbytes = [], 0, 0
                continue
            block = part[i : i + room]
            chunk.append(block)
            n += len(block)
            nbytes += block.nbytes
            i += len(block)
    if chunk:
        yield chunk


def build_request(chunk: Sequence[Part], top_k: int, include_logits: bool) -> pb.ClassifyRequest:
    """One ``ClassifyRequest``: packed when every image is pixels, else a list of ``Image`` messages."""
    if all(isinstance(p, np.ndarray) for p in chunk):
        blocks = [p for p in chunk if isinstance(p, np.ndarray)]
        data = blocks[0].tobytes() if len(blocks) == 1 else np.concatenate(blocks).tobytes()
        count = sum(len(b) for b in blocks)
        return pb.ClassifyRequest(
            packed=pb.PackedImages(data=data, count=count), top_k=top_k, include_logits=include_logits
        )
    images: list[pb.Image] = []
    for p in chunk:
        if isinstance(p, bytes):
            images.append(pb.Image(encoded=p))
        else:
            images.extend(pb.Image(raw_rgb=img.tobytes()) for img in p)
    return pb.ClassifyRequest(images=images, top_k=top_k, include_logits=include_logits)
