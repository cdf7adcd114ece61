"""The edge's task seam: what one kind of model (the manifest's ``task``) needs besides onnxruntime.

A :class:`Task` names the :class:`~edge_agent.runtime.classifier.Classifier` subclass that
pre-processes its inputs and runs them, and says how requests for it look and what the device keeps
of them:

- request decoding: the ``/v1/predict`` JSON member (``texts``, ``images``, ``inputs``), whether a
  multipart body may carry it, the inputs and outputs of the Open Inference Protocol
  (:class:`ProtocolInput`, :class:`ProtocolOutput`), and :meth:`Task.prepare`, which checks every
  input (and decodes what comes encoded) before a batch is formed, raising
  :class:`~edge_agent.runtime.classifier.InputError` (the caller's mistake) or :class:`InputTooLarge`;
- postprocessing: :meth:`Task.reply`, the results as the JSON every front end answers;
- the sample payload (classifiers): :meth:`ClassificationTask.sample_input`, the compact copy of one
  input that the sampler remembers and puts into a sample record.

A classifier's task (:class:`ClassificationTask`: text, image) answers labels and scores, and
its inputs are sampled; the ``tensor`` task (:mod:`edge_agent.runtime.tensor`) takes and answers
the model's own named tensors (:attr:`Task.raw_tensors`), one request one run, and is not sampled.

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
from edge_agent.runtime.classifier import Classifier, InputError, Prediction, Result
from edge_agent.runtime.session import ModelLoadError, ProviderSpec


class InputTooLarge(InputError):
    """An input of the right kind but over a size limit (a 413, not a 400)."""


@dataclass(frozen=True, kw_only=True)
class InputLimits:
    """What the agent's configuration bounds in one input (``[http]``, for every front end)."""

    max_text_chars: int
    max_tensor_bytes: int = 1 << 20
    """the bytes a tensor request's inputs may hold once decoded (``[http] max_body_bytes``)"""


@dataclass(frozen=True, kw_only=True)
class ProtocolInput:
    """An input on the Open Inference Protocol.

    Attributes:
        name: the tensor's name (``text``, ``image``; a tensor model's own input names).
        datatype: its declared datatype (``BYTES`` for strings, ``FP32`` for arrays).
        dims: its shape after the batch axis; with ``batched`` false, its whole shape (``-1``: any size).
        encoded_bytes: a numeric input also takes BYTES elements, each one encoded file (JPEG, PNG).
        batched: the server adds a batch axis (``-1``) in front of ``dims``, one input per row.
    """

    name: str
    datatype: str
    dims: list[int]
    encoded_bytes: bool = False
    batched: bool = True

    @property
    def shape(self) -> list[int]:
        """The shape the protocol's metadata declares (``-1``: any size)."""
        return [-1, *self.dims] if self.batched else list(self.dims)


@dataclass(frozen=True, kw_only=True)
class ProtocolOutput:
    """An output on the Open Inference Protocol (the same fields as :class:`ProtocolInput`)."""

    name: str
    datatype: str
    dims: list[int]
    batched: bool = True

    @property
    def shape(self) -> list[int]:
        return [-1, *self.dims] if self.batched else list(self.dims)


class SampleInput(Protocol):
    """What the sampler holds of one input: its accounted size, and its sample-record field."""

    @property
    def nbytes(self) -> int: ...

    def record_fields(self) -> dict[str, Any]:
        """The record's input field: ``{"text": ...}`` or ``{"image": ...}``."""
        ...


def classification_reply(
    predictions: Sequence[Result], ids: Sequence[str] | None, *, top_k: int | None = None
) -> list[dict[str, Any]]:
    """Predictions as JSON objects; each with its ``id`` when the sampler gave one (feedback names it).

    With ``top_k``, ``scores`` holds only the ``top_k`` best labels, best first."""
    out: list[dict[str, Any]] = []
    for p in predictions_of(predictions):
        scores = p.scores
        if top_k is not None:
            scores = dict(sorted(scores.items(), key=lambda item: -item[1])[:top_k])
        out.append({"label": p.label, "score": p.score, "scores": scores})
    for item, prediction_id in zip(out, ids or [], strict=False):
        item["id"] = prediction_id
    return out


def predictions_of(results: Sequence[Result]) -> list[Prediction]:
    """A classifier's results, typed as its predictions (``TypeError`` for any other result)."""
    predictions = [r for r in results if isinstance(r, Prediction)]
    if len(predictions) != len(results):
        raise TypeError("these results are not a classifier's predictions")
    return predictions


class Task(ABC):
    """One kind of model on the device. Stateless: one instance serves every model of its kind.

    Class attributes:
        name: the manifest's ``task``.
        classifier: the runtime class that loads and runs its bundles.
        field: the ``/v1/predict`` JSON member that holds the inputs, and what error messages call them.
        item_kinds: what that member must hold, in words (for the error message).
        multipart: whether a ``multipart/form-data`` body may carry the inputs as files.
        raw_tensors: inputs and outputs on the inference protocol are the model's own named tensors,
            and one request is one input (one model run); else one named input with a batch axis,
            one input per row, answered by the classifier's ``label`` and ``probabilities``.
    """

    name: ClassVar[str]
    classifier: ClassVar[type[Classifier]]
    field: ClassVar[str]
    item_kinds: ClassVar[str]
    multipart: ClassVar[bool] = False
    raw_tensors: ClassVar[bool] = False

    def load(
        self, bundle_dir: Path, manifest: Manifest, *, providers: Sequence[ProviderSpec], **session: Any
    ) -> Classifier:
        """The bundle's classifier (``session``: thread and spinning options for onnxruntime)."""
        return self.classifier(bundle_dir=bundle_dir, manifest=manifest, providers=providers, **session)

    @abstractmethod
    def items_valid(self, items: Any) -> bool:
        """Whether the ``/v1/predict`` value of :attr:`field` has the right shape and element types."""

    def request_items(self, value: Any) -> list[Any]:
        """The inputs that a valid ``/v1/predict`` value of :attr:`field` holds (a list: itself)."""
        return list(value)

    @abstractmethod
    def prepare(self, items: list[Any], model: Classifier, limits: InputLimits) -> list[Any]:
        """Check every input for ``model`` (decoding what came encoded) before a batch is formed;
        return the inputs to run. Raises :class:`InputError` or :class:`InputTooLarge` naming the
        first bad one, so one caller's mistake never reaches onnxruntime beside another's inputs."""

    @abstractmethod
    def protocol_inputs(self, manifest: Manifest) -> list[ProtocolInput]:
        """The model's inputs on the Open Inference Protocol."""

    @abstractmethod
    def protocol_outputs(self, manifest: Manifest) -> list[ProtocolOutput]:
        """The model's outputs on the Open Inference Protocol."""

    @abstractmethod
    def reply(
        self, predictions: Sequence[Result], ids: Sequence[str] | None, *, top_k: int | None = None
    ) -> list[dict[str, Any]]:
        """The results as every front end answers them (``/v1/predict``, MQTT)."""


class ClassificationTask(Task):
    """A classifier's task: one named input with a batch axis, labels and probabilities out, and
    sampling (the rules judge a prediction's scores; :meth:`sample_input` keeps its input)."""

    @abstractmethod
    def protocol_input(self, manifest: Manifest) -> ProtocolInput:
        """The model's one input on the Open Inference Protocol."""

    def protocol_inputs(self, manifest: Manifest) -> list[ProtocolInput]:
        return [self.protocol_input(manifest)]

    def protocol_outputs(self, manifest: Manifest) -> list[ProtocolOutput]:
        return [
            ProtocolOutput(name="label", datatype="BYTES", dims=[]),
            ProtocolOutput(name="probabilities", datatype="FP32", dims=[len(manifest.labels)]),
        ]

    @abstractmethod
    def sample_input(self, item: Any) -> SampleInput:
        """The compact copy of one prepared input that sampling remembers and uploads."""

    def reply(
        self, predictions: Sequence[Result], ids: Sequence[str] | None, *, top_k: int | None = None
    ) -> list[dict[str, Any]]:
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
