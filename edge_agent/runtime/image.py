"""Image classification: encoded images (JPEG, PNG) or raw pixel arrays, normalised as the bundle
says, into onnxruntime. numpy, and Pillow for decoding (:mod:`edge_agent.runtime.imagecodec`).

:class:`ImageClassification` is the task: ``{"images": [...]}`` (raw arrays, base64 JPEG/PNG) or a
multipart body, an ``image`` input on the inference protocol (FP32 arrays or BYTES files), and
samples that keep an image as it came (:class:`HeldEncoded`) or as compact numbers (:class:`HeldPixels`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.protocol.manifest import ImagePreprocessing, Manifest
from edge_agent.protocol.samples import MAX_IMAGE_DATA_CHARS
from edge_agent.runtime.classifier import Classifier, Feeds, InputError
from edge_agent.runtime.imagecodec import (
    MAX_PIXELS,
    DecodedImage,
    ImageDecodeError,
    base64_image,
    compact_copy,
    data_url,
    decode_image,
)
from edge_agent.runtime.session import ModelLoadError, ProviderSpec
from edge_agent.runtime.task import ClassificationTask, InputLimits, ProtocolInput


class ImageClassifier(Classifier):
    """An image-classification bundle. Each input is one of:

    - an ``H x W`` or ``H x W x C`` array (or nested lists) of raw pixels at the model's size;
    - the bytes of a JPEG or PNG, or a base64 string of them (optionally a ``data:`` URL), which is
      decoded, resized and cropped as the manifest says (:meth:`prepare`);
    - a :class:`DecodedImage` that :meth:`prepare` made.

    Raw arrays and decoded images are both RGB (or grayscale); ``channel_order`` BGR flips them.
    """

    def __init__(
        self,
        *,
        bundle_dir: Path,
        manifest: Manifest,
        providers: Sequence[ProviderSpec],
        max_pixels: int = MAX_PIXELS,
        **session: Any,
    ) -> None:
        pre = manifest.preprocessing
        if not isinstance(pre, ImagePreprocessing):
            raise ModelLoadError(f"bundle v{manifest.version} has {pre.kind} preprocessing, not image")
        super().__init__(bundle_dir=bundle_dir, manifest=manifest, providers=providers, **session)
        self.pre = pre
        self.max_pixels = max_pixels
        self._mean = np.asarray(pre.mean, dtype=np.float32)
        self._std = np.asarray(pre.std, dtype=np.float32)
        if len(self.input_names) != 1:
            raise ModelLoadError(f"image model has inputs {self.input_names}; exactly one is supported")

    def prepare(self, inputs: Sequence[Any], *, what: str = "images") -> list[Any]:
        """Decode every encoded image (bytes, base64 string) into a :class:`DecodedImage`; leave raw
        arrays as they are. ``InputError`` names the first input that cannot be decoded."""
        prepared = list(inputs)
        for index, item in enumerate(prepared):
            if isinstance(item, (str, bytes, bytearray, memoryview)):
                try:
                    data = base64_image(item) if isinstance(item, str) else bytes(item)
                    prepared[index] = decode_image(data, self.pre, max_pixels=self.max_pixels)
                except ImageDecodeError as exc:
                    raise ImageDecodeError(f"{what}[{index}] {exc}") from None
        return prepared

    def feeds(self, inputs: Sequence[Any]) -> Feeds:
        pre = self.pre
        if any(not isinstance(i, (DecodedImage, np.ndarray, list, tuple)) for i in inputs):
            inputs = self.prepare(inputs)
        arrays = [i.pixels if isinstance(i, DecodedImage) else i for i in inputs]
        try:
            batch = np.asarray(arrays, dtype=np.float32)
        except (TypeError, ValueError):
            raise InputError(
                f"images must be JPEG or PNG (base64), or numeric arrays of {pre.height}x{pre.width}x{pre.channels}"
            ) from None
        if batch.ndim == 3 and pre.channels == 1:
            batch = batch[..., np.newaxis]
        if batch.shape[1:] != (pre.height, pre.width, pre.channels):
            raise InputError(
                f"images have shape {list(batch.shape[1:])}; this model takes {pre.height}x{pre.width}"
                + (f"x{pre.channels}" if pre.channels > 1 else "")
            )
        if not np.isfinite(batch).all():
            raise InputError("images contain NaN or infinite values")
        if pre.channel_order == "BGR":
            batch = batch[..., ::-1]
        batch = (batch * pre.scale - self._mean) / self._std
        if pre.layout == "NCHW":
            batch = batch.transpose(0, 3, 1, 2)
        return {self.input_names[0]: np.ascontiguousarray(batch, dtype=np.float32)}

    def golden_inputs(self, records: list[Any]) -> list[Any]:
        """Golden inputs are raw arrays (nested lists) or encoded images as ``data:`` URLs."""
        return [r if isinstance(r, str) else np.asarray(r, dtype=np.float32) for r in records]


@dataclass(frozen=True, slots=True)
class HeldPixels:
    """A raw image array held compactly: the smallest dtype that holds its values exactly (``uint8``
    for 0..255 pixels, whether they came as ints or floats), and whether they came as floats, so
    :meth:`tolist` gives back the nested lists the record held before (``12.0`` stays ``12.0``)."""

    array: npt.NDArray[Any]
    floats: bool

    @classmethod
    def of(cls, value: Any) -> HeldPixels:
        array = np.asarray(value)
        if array.dtype.kind not in "biuf":  # numbers as strings: the model took them as float32
            array = np.asarray(value, dtype=np.float32)
        return cls(_smallest(array), floats=array.dtype.kind == "f")

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)

    def tolist(self) -> list[Any]:
        array = self.array.astype(np.float64) if self.floats and self.array.dtype.kind != "f" else self.array
        return list(array.tolist())

    def record_fields(self) -> dict[str, Any]:
        return {"image": self.tolist()}


_INTEGERS = (np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.uint64, np.int64)
_FLOATS = (np.float16, np.float32, np.float64)


def _smallest(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """``array`` in the smallest integer or float dtype that holds every value exactly."""
    if array.size == 0 or array.dtype.kind == "b":
        return array
    whole = array.dtype.kind in "iu" or (
        bool(np.isfinite(array).all())
        and bool((array == np.round(array)).all())
        and not bool((np.signbit(array) & (array == 0)).any())  # -0.0 would come back as 0.0
    )
    if whole:
        low, high = int(array.min()), int(array.max())
        for integer in _INTEGERS:
            info = np.iinfo(integer)
            if info.min <= low and high <= info.max:
                return array.astype(integer)
    for floating in _FLOATS:
        if np.dtype(floating).itemsize >= array.dtype.itemsize:
            break
        with np.errstate(over="ignore"):  # values too large for the narrow type: inf, and not equal
            narrow = array.astype(floating)
        if np.array_equal(narrow.astype(array.dtype), array, equal_nan=True):
            return narrow
    return array


SAMPLE_IMAGE_BYTES = (MAX_IMAGE_DATA_CHARS // 4) * 3
"""An encoded image kept as it came when it has at most this many bytes (its base64 fits a record)."""


@dataclass(frozen=True, slots=True)
class HeldEncoded:
    """An image that came encoded (JPEG, PNG), held as encoded bytes: its own if they are small enough
    to travel in a sample record, else the model-sized pixels re-encoded (:func:`compact_copy`)."""

    data: bytes
    mime: str

    @classmethod
    def of(cls, image: DecodedImage) -> HeldEncoded:
        data, mime = compact_copy(image, max_bytes=SAMPLE_IMAGE_BYTES)
        return cls(data, mime)

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def data_url(self) -> str:
        return data_url(self.data, self.mime)

    def record_fields(self) -> dict[str, Any]:
        return {"image": self.data_url()}


class ImageClassification(ClassificationTask):
    """``image-classification``: raw pixel arrays or encoded JPEG/PNG images in, decoded and
    normalised as the manifest says; a sample keeps the encoded bytes (or compact numbers)."""

    name = "image-classification"
    classifier = ImageClassifier
    field = "images"
    item_kinds = "pixel arrays or base64 JPEG/PNG strings"
    multipart = True

    def items_valid(self, items: Any) -> bool:
        return isinstance(items, list) and all(isinstance(i, (list, str, bytes)) for i in items)

    def prepare(self, items: list[Any], model: Classifier, limits: InputLimits) -> list[Any]:
        """Encoded images decoded, and everything of the model's shape and finite, else an
        ``InputError``. Returns the inputs with each encoded image decoded once."""
        try:
            prepared: list[Any] = model.prepare(items) if isinstance(model, ImageClassifier) else items
            model.feeds(prepared)
        except InputError:
            raise
        except (TypeError, ValueError, OverflowError) as exc:
            raise InputError(f"images are not numeric arrays: {exc}") from None
        return prepared

    def protocol_input(self, manifest: Manifest) -> ProtocolInput:
        pre = manifest.preprocessing
        if not isinstance(pre, ImagePreprocessing):
            raise ModelLoadError(f"bundle v{manifest.version} has {pre.kind} preprocessing, not image")
        dims = [pre.height, pre.width] + ([pre.channels] if pre.channels > 1 else [])
        return ProtocolInput(name="image", datatype="FP32", dims=dims, encoded_bytes=True)

    def sample_input(self, item: Any) -> HeldPixels | HeldEncoded:
        return HeldEncoded.of(item) if isinstance(item, DecodedImage) else HeldPixels.of(item)
