"""Inference: onnxruntime sessions and the bundle's pre/post-processing, in numpy and tokenizers only."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from edge_agent.protocol.manifest import Manifest
from edge_agent.runtime.classifier import Classifier, HealthCheckError, InputError, Prediction, softmax
from edge_agent.runtime.holder import ModelHolder
from edge_agent.runtime.image import ImageClassifier
from edge_agent.runtime.imagecodec import DecodedImage, ImageDecodeError
from edge_agent.runtime.session import ModelLoadError, ProviderSpec, choose_providers, open_session
from edge_agent.runtime.text import TextClassifier


def load_classifier(
    bundle_dir: Path,
    manifest: Manifest,
    *,
    providers: Sequence[ProviderSpec],
    intra_op_threads: int = 1,
    inter_op_threads: int = 1,
    allow_spinning: bool = False,
) -> Classifier:
    """The classifier for the bundle's task."""
    kinds: dict[str, type[Classifier]] = {
        "text-classification": TextClassifier,
        "image-classification": ImageClassifier,
    }
    kind = kinds[manifest.task]
    return kind(
        bundle_dir=bundle_dir,
        manifest=manifest,
        providers=providers,
        intra_op_threads=intra_op_threads,
        inter_op_threads=inter_op_threads,
        allow_spinning=allow_spinning,
    )


__all__ = [
    "Classifier",
    "DecodedImage",
    "HealthCheckError",
    "ImageClassifier",
    "ImageDecodeError",
    "InputError",
    "ModelHolder",
    "ModelLoadError",
    "Prediction",
    "TextClassifier",
    "choose_providers",
    "load_classifier",
    "open_session",
    "softmax",
]
