"""Image classification: numeric pixels, normalised as the bundle says, into onnxruntime. numpy only."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.protocol.manifest import ImagePreprocessing, Manifest
from edge_agent.runtime.classifier import Classifier, Feeds, InputError
from edge_agent.runtime.session import ModelLoadError, ProviderSpec


class ImageClassifier(Classifier):
    """An image-classification bundle; each input is an ``H x W`` or ``H x W x C`` array of raw pixels."""

    def __init__(
        self, *, bundle_dir: Path, manifest: Manifest, providers: Sequence[ProviderSpec], **session: Any
    ) -> None:
        pre = manifest.preprocessing
        if not isinstance(pre, ImagePreprocessing):
            raise ModelLoadError(f"bundle v{manifest.version} has {pre.kind} preprocessing, not image")
        super().__init__(bundle_dir=bundle_dir, manifest=manifest, providers=providers, **session)
        self.pre = pre
        self._mean = np.asarray(pre.mean, dtype=np.float32)
        self._std = np.asarray(pre.std, dtype=np.float32)
        if len(self.input_names) != 1:
            raise ModelLoadError(f"image model has inputs {self.input_names}; exactly one is supported")

    def feeds(self, inputs: Sequence[Any]) -> Feeds:
        pre = self.pre
        try:
            batch = np.asarray(inputs, dtype=np.float32)
        except (TypeError, ValueError):
            raise InputError(f"images must be numeric arrays of {pre.height}x{pre.width}x{pre.channels}") from None
        if batch.ndim == 3 and pre.channels == 1:
            batch = batch[..., np.newaxis]
        if batch.shape[1:] != (pre.height, pre.width, pre.channels):
            raise InputError(
                f"images have shape {list(batch.shape[1:])}; this model takes {pre.height}x{pre.width}"
                + (f"x{pre.channels}" if pre.channels > 1 else "")
            )
        if not np.isfinite(batch).all():
            raise InputError("images contain NaN or infinite values")
        batch = (batch * pre.scale - self._mean) / self._std
        if pre.layout == "NCHW":
            batch = batch.transpose(0, 3, 1, 2)
        return {self.input_names[0]: np.ascontiguousarray(batch, dtype=np.float32)}

    def golden_inputs(self, records: list[Any]) -> list[Any]:
        return [np.asarray(r, dtype=np.float32) for r in records]
