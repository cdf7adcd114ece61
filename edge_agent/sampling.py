"""Hard-example sampling: which predictions the device keeps for retraining, and app feedback.

:meth:`Sampler.observe` runs on the request path for every prediction: it gives each one an id
(returned to the caller, who may report the true label later), remembers the last few thousand
for feedback, and keeps the hard ones by the :class:`SamplingRules` (low confidence, small margin,
high entropy, a random share) within per-class and overall hourly caps. Kept records go to a
``sink`` (the outbox writer), never to disk on the request path.
"""

from __future__ import annotations

import math
import random
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from edge_agent.protocol.samples import Reason, SampleRecord, SamplingRules
from edge_agent.runtime import Prediction

HOUR_S = 3600.0


class UnknownPrediction(KeyError):
    """Feedback names a prediction id the agent does not remember (unknown, or too old)."""

    def __str__(self) -> str:
        return str(self.args[0])

    @staticmethod
    def message(prediction_id: str) -> str:
        return f"prediction id {prediction_id!r} is unknown or too old (the agent remembers recent predictions only)"


@dataclass(frozen=True)
class _Seen:
    input: Any
    prediction: Prediction
    version: int
    text: bool


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


class Sampler:
    """Chooses samples and takes feedback. Thread-safe.

    Args:
        rules: the sampling rules to start with (:meth:`set_rules` replaces them).
        device, fleet, model: written into every record.
        sink: takes the kept records (must not block for long).
        remember: how many recent predictions feedback can refer to.
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
        clock: Callable[[], float] = time.monotonic,
        seed: int | None = None,
    ) -> None:
        self._rules = rules
        self._device, self._fleet, self._model = device, fleet, model
        self._sink = sink
        self._remember = remember
        self._recent: OrderedDict[str, _Seen] = OrderedDict()
        self._caps = _HourlyCaps(clock)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.kept = 0
        self.capped = 0

    @property
    def rules(self) -> SamplingRules:
        return self._rules

    def set_rules(self, rules: SamplingRules) -> None:
        self._rules = rules.rules()

    def observe(self, inputs: list[Any], predictions: list[Prediction], version: int, *, text: bool) -> list[str]:
        """Record one request's predictions; return their ids (in order)."""
        ids = [uuid.uuid4().hex for _ in predictions]
        kept: list[SampleRecord] = []
        rules = self._rules
        with self._lock:
            for prediction_id, item, prediction in zip(ids, inputs, predictions, strict=True):
                self._recent[prediction_id] = _Seen(item, prediction, version, text)
                if not rules.enabled:
                    continue
                reasons = reasons_for(prediction, rules, self._rng)
                if not reasons:
                    continue
                if not self._caps.take(prediction.label, rules):
                    self.capped += 1
                    continue
                kept.append(self._record(prediction_id, self._recent[prediction_id], reasons))
            while len(self._recent) > self._remember:
                self._recent.popitem(last=False)
            self.kept += len(kept)
        if kept:
            self._sink(kept)
        return ids

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
            text=seen.input if seen.text else None,
            image=None if seen.text else _as_list(seen.input),
            predicted=p.label,
            score=p.score,
            scores=p.scores,
            reasons=reasons,
            label=label,
        )


def _as_list(value: Any) -> list[Any]:
    tolist = getattr(value, "tolist", None)
    result = tolist() if callable(tolist) else value
    return list(result)
