"""Image classification: encoded images (JPEG, PNG) or raw pixel arrays, normalised as the bundle
says, into onnxruntime. numpy, and Pillow for decoding (:mod:`edge_agent.runtime.imagecodec`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.protocol.manifest import ImagePreprocessing, Manifest
from edge_agent.runtime.classifier import Classifier, Feeds, InputError
from edge_agent.runtime.imagecodec import MAX_PIXELS, DecodedImage, ImageDecodeError, base64_image, decode_image
from edge_agent.runtime.session import ModelLoadError, ProviderSpec


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
