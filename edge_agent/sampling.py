"""Hard-example sampling: which predictions the device keeps for retraining, and app feedback.

:meth:`Sampler.observe` runs on the request path for every prediction: it gives each one an id
(returned to the caller, who may report the true label later), remembers the recent ones for
feedback (within a count and a byte bound; what is kept of an input is the model's task's choice,
:meth:`edge_agent.runtime.Task.sample_input`: a text, an image's encoded JPEG/PNG bytes when it came
encoded, else compact arrays), and keeps the hard ones by
the :class:`SamplingRules` (low confidence, small margin, high entropy, a random share) within
per-class and overall hourly caps. Kept records go to a
``sink`` (the outbox writer), never to disk on the request path.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
import uuid
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from edge_agent.protocol.samples import Reason, SampleRecord, SamplingRules
from edge_agent.runtime import ClassificationTask, Prediction, Result, SampleInput, task_for
from edge_agent.runtime.task import predictions_of

HOUR_S = 3600.0
ENTRY_OVERHEAD_BYTES = 480
"""What one remembered prediction costs besides its input and scores: its id, the dict entry,
the record object and the scores' array header (measured with tracemalloc on CPython 3.11: 460 with
10 classes, 550 with 1,000; it was 900 and 50,000 when a prediction's dict of floats was kept)."""
SCORE_BYTES = 4
"""What one class's score costs in a remembered prediction: a float32 in an array, in the model's
label order (the labels themselves are one tuple shared by every prediction of a model). A dict of
Python floats cost 50-60 bytes a class: a 1,000-class model's predictions were remembered 15 times
fewer within the same ``remember_mb``."""

log = logging.getLogger(__name__)


class UnknownPrediction(KeyError):
    """Feedback names a prediction id the agent does not remember (unknown, or too old)."""

    def __str__(self) -> str:
        return str(self.args[0])

    @staticmethod
    def message(prediction_id: str) -> str:
        return f"prediction id {prediction_id!r} is unknown or too old (the agent remembers recent predictions only)"


@dataclass(frozen=True, slots=True)
class _Seen:
    """A remembered prediction, compactly: the scores as float32 in the order of ``labels``."""

    input: SampleInput  # what the task keeps of the input (the text; an image's encoded bytes or numbers)
    label: str
    score: float
    labels: tuple[str, ...]  # shared by every prediction of one model (see Sampler._seen)
    scores: array[float]
    version: int
    size: int  # accounted bytes

    @property
    def prediction(self) -> Prediction:
        return Prediction(label=self.label, score=self.score, scores=dict(zip(self.labels, self.scores, strict=True)))


def reasons_for(prediction: Prediction, rules: SamplingRules, rng: random.Random) -> list[Reason]:
    """The rules that fire for one prediction (empty: not a hard example)."""
    reasons: list[Reason] = []
    scores = sorted(prediction.scores.values(), reverse=True)
    if rules.low_confidence is not None and prediction.score < rules.low_confidence:
        reasons.append("low_confidence")
    if rules.min_margin is not None and len(scores) > 1 and scores[0] - scores[1] < rules.min_margin:
        reasons.append("small_margin")
    if rules.max_entropy is not None and len(scores) > 1:
        entropy = -sum(p * math.log(p) for p in scores if p > 0) / math.log(len(scores))
        if entropy > rules.max_entropy:
            reasons.append("high_entropy")
    if rules.random_rate > 0 and rng.random() < rules.random_rate:
        reasons.append("random")
    return reasons


class _HourlyCaps:
    """Sliding one-hour windows: overall and per predicted class."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._all: deque[float] = deque()
        self._per_class: dict[str, deque[float]] = {}

    @staticmethod
    def _trim(window: deque[float], now: float) -> None:
        while window and window[0] <= now - HOUR_S:
            window.popleft()

    def take(self, label: str, rules: SamplingRules) -> bool:
        now = self._clock()
        per_class = self._per_class.setdefault(label, deque())
        self._trim(self._all, now)
        self._trim(per_class, now)
        if len(self._all) >= rules.per_hour or len(per_class) >= rules.per_class_per_hour:
            return False
        self._all.append(now)
        per_class.append(now)
        return True


def prediction_ids(count: int) -> list[str]:
    """New prediction ids (32 hex digits each), as replies carry them and feedback names them."""
    return [uuid.uuid4().hex for _ in range(count)]


class Sampler:
    """Chooses samples and takes feedback. Thread-safe.

    Args:
        rules: the sampling rules to start with (:meth:`set_rules` replaces them).
        device, fleet, model: written into every record.
        sink: takes the kept records (must not block for long).
        remember: how many recent predictions feedback can refer to.
        remember_bytes: and the memory they may take: inputs (text objects, image arrays),
            scores and a fixed overhead per prediction. Past either bound the oldest are
            forgotten (a single prediction larger than this is forgotten at once).
        clock: seconds, for the hourly caps (tests pass their own).
        seed: for the random rule (None: unpredictable).
    """

    def __init__(
        self,
        *,
        rules: SamplingRules,
        device: str,
        fleet: str,
        model: str,
        sink: Callable[[list[SampleRecord]], None],
        remember: int = 4096,
        remember_bytes: int = 16 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
        seed: int | None = None,
    ) -> None:
        self._rules = rules
        self._device, self._fleet, self._model = device, fleet, model
        self._sink = sink
        self._remember = remember
        self._remember_bytes = remember_bytes
        self._recent: OrderedDict[str, _Seen] = OrderedDict()
        self._recent_bytes = 0
        self._labels: dict[tuple[str, ...], tuple[str, ...]] = {}  # one tuple per label set, shared
        self._caps = _HourlyCaps(clock)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.kept = 0
        self.capped = 0
        self.invalid = 0  # kept by the rules but not valid on the wire (see _valid_record)

    @property
    def rules(self) -> SamplingRules:
        return self._rules

    def set_rules(self, rules: SamplingRules) -> None:
        self._rules = rules.rules()

    @property
    def remembered(self) -> tuple[int, int]:
        """How many predictions are remembered for feedback, and the bytes they are accounted."""
        with self._lock:
            return len(self._recent), self._recent_bytes

    def observe(
        self,
        inputs: list[Any],
        results: Sequence[Result],
        version: int,
        *,
        task: str,
        ids: list[str] | None = None,
    ) -> list[str]:
        """Record one request's predictions; return their ids (in order): ``ids`` if given (from
        :func:`prediction_ids`, when the reply went out first), else new ones. ``task`` is the
        model's (the manifest's ``task``): it decides what is kept of each input. Only a
        classifier's predictions are sampled (``TypeError`` for others: a tensor model's)."""
        kind = task_for(task)
        if not isinstance(kind, ClassificationTask):
            raise TypeError(f"{task} models are not sampled: the rules judge a classifier's scores")
        predictions = predictions_of(results)
        ids = ids if ids is not None else prediction_ids(len(predictions))
        seen = [self._seen(item, p, version, task=kind) for item, p in zip(inputs, predictions, strict=True)]
        chosen: list[tuple[str, _Seen, list[Reason]]] = []
        rules = self._rules
        with self._lock:
            for prediction_id, one, prediction in zip(ids, seen, predictions, strict=True):
                self._recent[prediction_id] = one
                self._recent_bytes += one.size
                if not rules.enabled:
                    continue
                reasons = reasons_for(prediction, rules, self._rng)
                if not reasons:
                    continue
                if not self._caps.take(prediction.label, rules):
                    self.capped += 1
                    continue
                chosen.append((prediction_id, one, reasons))
            while self._recent and (len(self._recent) > self._remember or self._recent_bytes > self._remember_bytes):
                self._recent_bytes -= self._recent.popitem(last=False)[1].size
            self.kept += len(chosen)
        if chosen:
            records = [r for c in chosen if (r := self._valid_record(*c)) is not None]
            if records:
                self._sink(records)
        return ids

    def _seen(self, item: Any, prediction: Prediction, version: int, *, task: ClassificationTask) -> _Seen:
        held = task.sample_input(item)
        key = tuple(prediction.scores)
        labels = self._labels.get(key)
        if labels is None:
            if len(self._labels) >= 16:  # label sets of models long gone: start again
                self._labels.clear()
            labels = self._labels.setdefault(key, key)
        scores = array("f", prediction.scores.values())
        size = held.nbytes + ENTRY_OVERHEAD_BYTES + SCORE_BYTES * len(scores)
        return _Seen(held, prediction.label, float(prediction.score), labels, scores, version, size)

    def _valid_record(self, prediction_id: str, seen: _Seen, reasons: list[Reason]) -> SampleRecord | None:
        """The record, or None (counted, logged) when it would not pass the wire contract: a label the
        model's manifest allows but the contract does not, a device clock before 2020. The
        prediction itself is unaffected."""
        try:
            return self._record(prediction_id, seen, reasons)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            self.invalid += 1
            if self.invalid <= 10 or self.invalid % 1000 == 0:
                log.warning("sample %s not kept (%d so far): %s", prediction_id, self.invalid, str(exc).splitlines()[0])
            return None

    def remembers(self, prediction_id: str) -> bool:
        with self._lock:
            return prediction_id in self._recent

    def feedback(self, prediction_id: str, label: str) -> SampleRecord:
        """The true ``label`` for a recent prediction; the record goes to the sink and is returned."""
        with self._lock:
            seen = self._recent.get(prediction_id)
        if seen is None:
            raise UnknownPrediction(UnknownPrediction.message(prediction_id))
        record = self._record(prediction_id, seen, ["feedback"], label=label)
        self._sink([record])
        return record

    def _record(self, prediction_id: str, seen: _Seen, reasons: list[Reason], label: str | None = None) -> SampleRecord:
        p = seen.prediction
        return SampleRecord(
            id=uuid.uuid4().hex if label is not None else prediction_id,
            kind="feedback" if label is not None else "sample",
            prediction_id=prediction_id,
            device=self._device,
            fleet=self._fleet,
            model=self._model,
            version=seen.version,
            created_at=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            **seen.input.record_fields(),
            predicted=p.label,
            score=p.score,
            scores=p.scores,
            reasons=reasons,
            label=label,
        )
