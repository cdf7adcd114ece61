"""The edge's task seam: what one kind of model (the manifest's ``task``) needs besides onnxruntime.

A :class:`Task` names the :class:`~edge_agent.runtime.classifier.Classifier` that pre-processes its
inputs and runs them, and says how requests for it look and what the device keeps of them:

- request decoding: the ``/v1/predict`` JSON list (``texts``, ``images``), whether a multipart body
  may carry it, the one input of the Open Inference Protocol (:class:`ProtocolInput`), and
  :meth:`Task.prepare`, which checks every input (and decodes what comes encoded) before a batch is
  formed, raising :class:`~edge_agent.runtime.classifier.InputError` (the caller's mistake) or
  :class:`InputTooLarge`;
- postprocessing: :meth:`Task.reply`, the predictions as the JSON every front end answers;
- the sample payload: :meth:`Task.sample_input`, the compact copy of one input that the sampler
  remembers and puts into a sample record.

Tasks are registered by name (:func:`register_task`, :func:`task_for`); the built-in ones are
registered in :mod:`edge_agent.runtime`. A new task is one module (its classifier and its ``Task``)
plus one registration there; the wire contract must also allow its name in the manifest.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from edge_agent.protocol.manifest import Manifest
from edge_agent.runtime.classifier import Classifier, InputError, Prediction
from edge_agent.runtime.session import ModelLoadError, ProviderSpec


class InputTooLarge(InputError):
    """An input of the right kind but over a size limit (a 413, not a 400)."""


@dataclass(frozen=True, kw_only=True)
class InputLimits:
    """What the agent's configuration bounds in one input (``[http]``, for every front end)."""

    max_text_chars: int


@dataclass(frozen=True, kw_only=True)
class ProtocolInput:
    """A task's one input on the Open Inference Protocol.

    Attributes:
        name: the tensor's name (``text``, ``image``).
        datatype: its declared datatype (``BYTES`` for strings, ``FP32`` for arrays).
        dims: its shape after the batch axis.
        encoded_bytes: a numeric input also takes BYTES elements, each one encoded file (JPEG, PNG).
    """

    name: str
    datatype: str
    dims: list[int]
    encoded_bytes: bool = False


class SampleInput(Protocol):
    """What the sampler holds of one input: its accounted size, and its sample-record field."""

    @property
    def nbytes(self) -> int: ...

    def record_fields(self) -> dict[str, Any]:
        """The record's input field: ``{"text": ...}`` or ``{"image": ...}``."""
        ...


def classification_reply(
    predictions: Sequence[Prediction], ids: Sequence[str] | None, *, top_k: int | None = None
) -> list[dict[str, Any]]:
    """Predictions as JSON objects; each with its ``id`` when the sampler gave one (feedback names it).

    With ``top_k``, ``scores`` holds only the ``top_k`` best labels, best first."""
    out: list[dict[str, Any]] = []
    for p in predictions:
        scores = p.scores
        if top_k is not None:
            scores = dict(sorted(scores.items(), key=lambda item: -item[1])[:top_k])
        out.append({"label": p.label, "score": p.score, "scores": scores})
    for item, prediction_id in zip(out, ids or [], strict=False):
        item["id"] = prediction_id
    return out


class Task(ABC):
    """One kind of model on the device. Stateless: one instance serves every model of its kind.

    Class attributes:
        name: the manifest's ``task``.
        classifier: the runtime class that loads and runs its bundles.
        field: the ``/v1/predict`` JSON list of inputs, and what error messages call them.
        item_kinds: what that list must hold, in words (for the error message).
        multipart: whether a ``multipart/form-data`` body may carry the inputs as files.
    """

    name: ClassVar[str]
    classifier: ClassVar[type[Classifier]]
    field: ClassVar[str]
    item_kinds: ClassVar[str]
    multipart: ClassVar[bool] = False

    def load(
        self, bundle_dir: Path, manifest: Manifest, *, providers: Sequence[ProviderSpec], **session: Any
    ) -> Classifier:
        """The bundle's classifier (``session``: thread and spinning options for onnxruntime)."""
        return self.classifier(bundle_dir=bundle_dir, manifest=manifest, providers=providers, **session)

    @abstractmethod
    def items_valid(self, items: Any) -> bool:
        """Whether the ``/v1/predict`` value of :attr:`field` is a list of the right element types."""

    @abstractmethod
    def prepare(self, items: list[Any], model: Classifier, limits: InputLimits) -> list[Any]:
        """Check every input for ``model`` (decoding what came encoded) before a batch is formed;
        return the inputs to run. Raises :class:`InputError` or :class:`InputTooLarge` naming the
        first bad one, so one caller's mistake never reaches onnxruntime beside another's inputs."""

    @abstractmethod
    def protocol_input(self, manifest: Manifest) -> ProtocolInput:
        """The model's one input on the Open Inference Protocol."""

    @abstractmethod
    def sample_input(self, item: Any) -> SampleInput:
        """The compact copy of one prepared input that sampling remembers and uploads."""

    def reply(
        self, predictions: Sequence[Prediction], ids: Sequence[str] | None, *, top_k: int | None = None
    ) -> list[dict[str, Any]]:
        """The predictions as every front end answers them (``/v1/predict``, MQTT)."""
        return classification_reply(predictions, ids, top_k=top_k)


_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Make ``task`` the one for manifests whose ``task`` is ``task.name``; a name is registered once."""
    if task.name in _TASKS:
        raise ValueError(f"task {task.name!r} is registered already")
    _TASKS[task.name] = task
    return task


def task_for(name: str) -> Task:
    """The registered task of that name; ``ModelLoadError`` when this agent has none."""
    try:
        return _TASKS[name]
    except KeyError:
        raise ModelLoadError(f"this agent serves no {name!r} models (it knows {', '.join(sorted(_TASKS))})") from None


def registered_tasks() -> list[str]:
    return sorted(_TASKS)
