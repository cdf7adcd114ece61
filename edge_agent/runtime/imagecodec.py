"""Encoded images (JPEG, PNG) into model-sized pixel arrays: Pillow for decoding and resampling,
numpy for the rest. No torch, no torchvision.

The one seam to Pillow: every Pillow error becomes an :class:`ImageDecodeError` (an ``InputError``,
so the serving layer answers 400) naming the problem, and a header that declares more than
``max_pixels`` pixels is refused before a single pixel is decoded (a decompression bomb is a small
PNG of zeros). A JPEG far larger than the model needs is decoded at a reduced scale (libjpeg's DCT
scaling, Pillow's ``draft``): a 12-megapixel photo decodes at 1/8 of the work.

Resizing follows torchvision's ``Resize(resize)`` then ``CenterCrop((height, width))`` on a PIL
image: the shorter side becomes ``resize``, the longer ``int(resize * long / short)``, antialiased
bilinear (or bicubic, nearest), and the crop offsets are ``round((size - crop) / 2)``. A model
trained with those transforms sees the same pixels here.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.protocol.manifest import ImagePreprocessing
from edge_agent.runtime.classifier import InputError

MAX_PIXELS = 40_000_000
"""The most pixels an encoded image may declare (a 40-megapixel photo); larger is refused unread."""
FORMATS = ("JPEG", "PNG")
MIME = {"JPEG": "image/jpeg", "PNG": "image/png"}
_DATA_URL = re.compile(r"^data:(?P<mime>[a-z]+/[a-z0-9.+-]+)?(?P<params>(;[^;,]*)*),", re.IGNORECASE)
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


class ImageDecodeError(InputError):
    """An encoded image that cannot be decoded: not base64, not JPEG or PNG, corrupt, or too large."""


@dataclass(frozen=True, slots=True, eq=False)
class DecodedImage:
    """An encoded image and the model-sized pixels decoded from it.

    Attributes:
        data: the encoded bytes as they came (sampling keeps them, not the pixels).
        format: ``JPEG`` or ``PNG``.
        pixels: ``height x width x channels`` uint8, RGB (or grayscale) order, resized and cropped.
        size: the encoded image's own ``(width, height)``.
    """

    data: bytes
    format: str
    pixels: npt.NDArray[np.uint8]
    size: tuple[int, int]

    @property
    def mime(self) -> str:
        return MIME[self.format]


def base64_image(value: str) -> bytes:
    """The bytes of a base64 string or a ``data:image/...;base64,`` URL; ``ImageDecodeError`` if neither."""
    text = value.strip()
    match = _DATA_URL.match(text)
    if match is not None:
        mime = (match["mime"] or "").lower()
        if mime not in ("", *MIME.values()):
            raise ImageDecodeError(f"is a data URL of {mime}; JPEG and PNG images are accepted")
        if "base64" not in match["params"].lower():
            raise ImageDecodeError("is a data URL without ;base64")
        text = text[match.end() :]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageDecodeError("is not base64 (nor a data:image/...;base64, URL)") from None


def resized_size(width: int, height: int, pre: ImagePreprocessing) -> tuple[int, int]:
    """The ``(width, height)`` an image is scaled to before the center crop (torchvision's rule)."""
    if pre.resize is None:
        return pre.width, pre.height
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = pre.resize, int(pre.resize * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def decode_image(data: bytes, pre: ImagePreprocessing, *, max_pixels: int = MAX_PIXELS) -> DecodedImage:
    """Decode, convert, resize and crop one JPEG or PNG as ``pre`` says; raise ``ImageDecodeError``."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageDecodeError("is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise ImageDecodeError("is not a JPEG or PNG image") from None
    except Image.DecompressionBombError:
        raise ImageDecodeError(f"declares more than {max_pixels} pixels; the limit is {max_pixels}") from None
    except (OSError, ValueError, SyntaxError) as exc:  # Pillow raises SyntaxError for some broken headers
        raise ImageDecodeError(f"is not a readable image: {exc}") from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageDecodeError(f"is {width}x{height} pixels; the limit is {max_pixels} pixels")
        fmt = str(image.format)
        target = resized_size(width, height, pre)
        try:
            if fmt == "JPEG" and width >= 2 * target[0] and height >= 2 * target[1]:
                image.draft(_MODES.get(pre.channels, "RGB"), target)  # DCT scaling: still at least `target`
            pixels = _transform(image, pre, target)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise ImageDecodeError(f"is truncated or corrupt ({fmt}): {exc}") from None
    return DecodedImage(data=data, format=fmt, pixels=pixels, size=(width, height))


def _transform(image: Any, pre: ImagePreprocessing, target: tuple[int, int]) -> npt.NDArray[np.uint8]:
    from PIL import Image

    filters = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
               "nearest": Image.Resampling.NEAREST}  # fmt: skip
    image.load()
    mode = _MODES.get(pre.channels)
    if mode is None:
        raise ValueError(f"a model of {pre.channels} channels takes raw arrays, not encoded images")
    if image.mode != mode:
        image = image.convert(mode)
    if image.size != target:
        image = image.resize(target, filters[pre.resample])
    if pre.resize is not None:
        left = round((target[0] - pre.width) / 2.0)
        top = round((target[1] - pre.height) / 2.0)
        image = image.crop((left, top, left + pre.width, top + pre.height))
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[..., np.newaxis] if pixels.ndim == 2 else pixels


def encode_png(pixels: npt.NDArray[Any]) -> bytes:
    """``pixels`` (H x W, H x W x 1 or H x W x 3 uint8) as PNG bytes."""
    from PIL import Image

    array = np.asarray(pixels, dtype=np.uint8)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_jpeg(pixels: npt.NDArray[Any], *, quality: int = 85) -> bytes:
    """``pixels`` (H x W, H x W x 1 or H x W x 3 uint8) as JPEG bytes."""
    from PIL import Image

    array = np.asarray(pixels, dtype=np.uint8)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def compact_copy(image: DecodedImage, *, max_bytes: int) -> tuple[bytes, str]:
    """What sampling keeps of an image: its own encoded bytes when they fit ``max_bytes``, else the
    model-sized pixels it was classified from as a JPEG (quality 85, then 60)."""
    if len(image.data) <= max_bytes:
        return image.data, image.mime
    small = b""
    for quality in (85, 60):
        small = encode_jpeg(image.pixels, quality=quality)
        if len(small) <= max_bytes:
            break
    return small, MIME["JPEG"]
