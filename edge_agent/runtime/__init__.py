"""Inference: onnxruntime sessions and the bundle's pre/post-processing, in numpy and tokenizers only.

The tasks this agent serves are registered here, one line each (:mod:`edge_agent.runtime.task`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from edge_agent.protocol.manifest import Manifest
from edge_agent.runtime.classifier import (
    Classifier,
    HealthCheckError,
    InputError,
    Prediction,
    Result,
    TensorOutputs,
    softmax,
)
from edge_agent.runtime.holder import ModelHolder
from edge_agent.runtime.image import ImageClassification, ImageClassifier
from edge_agent.runtime.imagecodec import DecodedImage, ImageDecodeError
from edge_agent.runtime.session import ModelLoadError, ProviderSpec, choose_providers, open_session
from edge_agent.runtime.task import (
    ClassificationTask,
    InputLimits,
    InputTooLarge,
    ProtocolInput,
    ProtocolOutput,
    SampleInput,
    Task,
    register_task,
    registered_tasks,
    task_for,
)
from edge_agent.runtime.tensor import TensorModel, TensorTask
from edge_agent.runtime.text import TextClassification, TextClassifier

register_task(TextClassification())
register_task(ImageClassification())
register_task(TensorTask())


def load_classifier(
    bundle_dir: Path,
    manifest: Manifest,
    *,
    providers: Sequence[ProviderSpec],
    intra_op_threads: int = 1,
    inter_op_threads: int = 1,
    allow_spinning: bool = False,
) -> Classifier:
    """The served model for the bundle's task (a classifier, or a ``tensor`` task's :class:`TensorModel`)."""
    return task_for(manifest.task).load(
        bundle_dir,
        manifest,
        providers=providers,
        intra_op_threads=intra_op_threads,
        inter_op_threads=inter_op_threads,
        allow_spinning=allow_spinning,
    )


__all__ = [
    "ClassificationTask",
    "Classifier",
    "DecodedImage",
    "HealthCheckError",
    "ImageClassification",
    "ImageClassifier",
    "ImageDecodeError",
    "InputError",
    "InputLimits",
    "InputTooLarge",
    "ModelHolder",
    "ModelLoadError",
    "Prediction",
    "ProtocolInput",
    "ProtocolOutput",
    "Result",
    "SampleInput",
    "Task",
    "TensorModel",
    "TensorOutputs",
    "TensorTask",
    "TextClassification",
    "TextClassifier",
    "choose_providers",
    "load_classifier",
    "open_session",
    "register_task",
    "registered_tasks",
    "softmax",
    "task_for",
]
