"""What every served model shares: the onnxruntime session, softmax, labels, golden vectors.

:class:`Classifier` is the base of every model the agent serves (the name is older than the
``tensor`` task, whose :class:`~edge_agent.runtime.tensor.TensorModel` has no labels): serving calls
:meth:`Classifier.run`, which answers one :data:`Result` per input, a :class:`Prediction` (label and
scores) for a classifier, :class:`TensorOutputs` (every output, by name) for a tensor model.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.protocol.manifest import Manifest, safe_relative_path
from edge_agent.runtime.session import ProviderSpec, open_session

Feeds = dict[str, npt.NDArray[Any]]


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float
    scores: dict[str, float]


@dataclass(frozen=True)
class TensorOutputs:
    """Every output of one model run, by name, as onnxruntime gave it (a ``tensor`` model's answer)."""

    outputs: dict[str, npt.NDArray[Any]]


Result = Prediction | TensorOutputs
"""What serving gets back for one input: a classifier's :class:`Prediction`, a tensor model's :class:`TensorOutputs`."""


class HealthCheckError(Exception):
    """A freshly loaded model does not reproduce its golden vectors, or gives non-finite outputs."""


class InputError(ValueError):
    """An input a model cannot take (wrong shape, type or size); the message names the problem."""


def softmax(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    result: npt.NDArray[np.float32] = exp / exp.sum(axis=-1, keepdims=True)
    return result


SMALL_LOGITS = 512
"""Up to this many logits (a request's few rows of a few classes), :func:`softmax_rows` uses plain Python."""


def softmax_rows(logits: npt.NDArray[np.float32]) -> list[list[float]]:
    """The softmax of each row, as Python floats (what predictions are built from).

    A small output goes through plain Python: right after an onnxruntime run the CPU's caches hold
    the model's weights, and numpy's ufunc machinery, cold, took 75 us for one row of 20 classes
    against 29 us for this loop (6.9 and 2.6 us warm; docs/benchmarks.md). Large outputs use numpy.
    NaN or infinite logits give NaN probabilities either way."""
    if logits.size > SMALL_LOGITS:
        rows: list[list[float]] = softmax(logits).tolist()
        return rows
    rows = []
    for row in logits.tolist():
        top = max(row)
        exps = [math.exp(value - top) for value in row]
        total = sum(exps)
        rows.append([value / total for value in exps])
    return rows


class Classifier(ABC):
    """A loaded classification bundle, ready to serve.

    Thread-safe: onnxruntime sessions may be run from several threads, and pre-processing only
    reads shared state. Subclasses turn raw inputs into feeds (:meth:`feeds`) and golden-vector
    records back into raw inputs (:meth:`golden_inputs`).
    """

    def __init__(
        self,
        *,
        bundle_dir: Path,
        manifest: Manifest,
        providers: Sequence[ProviderSpec],
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
        allow_spinning: bool = False,
    ) -> None:
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.version = manifest.version
        self.labels = list(manifest.labels)
        self.session = open_session(
            bundle_dir / safe_relative_path(manifest.model_file),
            providers=providers,
            intra_op_threads=intra_op_threads,
            inter_op_threads=inter_op_threads,
            allow_spinning=allow_spinning,
        )
        self.input_names = [i.name for i in self.session.get_inputs()]

    @abstractmethod
    def feeds(self, inputs: Sequence[Any]) -> Feeds:
        """Pre-process raw inputs (texts, images) into the session's feeds; raise ``InputError``."""

    @abstractmethod
    def golden_inputs(self, records: list[Any]) -> list[Any]:
        """Turn the JSON records of ``golden.json`` back into raw inputs."""

    def logits(self, inputs: Sequence[Any]) -> npt.NDArray[np.float32]:
        outputs = self.session.run(None, self.feeds(inputs))
        logits: npt.NDArray[np.float32] = np.asarray(outputs[0], dtype=np.float32)
        return logits

    def probabilities(self, inputs: Sequence[Any]) -> npt.NDArray[np.float32]:
        return softmax(self.logits(inputs))

    def predict(self, inputs: Sequence[Any]) -> list[Prediction]:
        results = []
        for row in softmax_rows(self.logits(inputs)):
            best = max(range(len(row)), key=row.__getitem__)
            results.append(
                Prediction(label=self.labels[best], score=row[best], scores=dict(zip(self.labels, row, strict=True)))
            )
        return results

    def run(self, inputs: Sequence[Any]) -> Sequence[Result]:
        """What serving calls (the batcher): one result per input. A classifier's are its predictions."""
        return self.predict(inputs)

    def health_check(self, *, atol: float) -> None:
        """Reproduce the golden vectors the exporter recorded, or raise ``HealthCheckError``."""
        path = self.bundle_dir / safe_relative_path(self.manifest.golden_file)
        try:
            golden = json.loads(path.read_text())
            inputs = self.golden_inputs(list(golden["inputs"]))
            expected = np.asarray(golden["probabilities"], dtype=np.float32)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise HealthCheckError(f"golden vectors {path.name} are unreadable: {exc}") from None
        if not inputs:
            raise HealthCheckError("golden vectors hold no inputs")
        try:
            actual = self.probabilities(inputs)
        except InputError as exc:  # a golden image this device cannot decode, a raw array of the wrong shape
            raise HealthCheckError(f"golden inputs cannot be pre-processed on this device: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - onnxruntime's error types are not public API; any failure here fails the check
            raise HealthCheckError(f"the model fails on its golden inputs: {type(exc).__name__}: {exc}") from None
        if actual.shape != expected.shape:
            raise HealthCheckError(f"model output shape {actual.shape} differs from golden {expected.shape}")
        if not np.isfinite(actual).all():
            raise HealthCheckError("model gives NaN or infinite outputs on its golden inputs")
        worst = float(np.abs(actual - expected).max())
        if worst > atol:
            raise HealthCheckError(f"golden vectors differ by {worst:.4f} (tolerance {atol})")
