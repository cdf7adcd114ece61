"""A training plan: the data summary, and every default that adapts to the data, with its reason.

Nothing here imports torch: the plan is made (and printed) before the model is loaded, and it is
unit-tested on plain token lengths.

- **max length**: the 95th percentile of the training texts' token lengths, rounded up to a
  multiple of 16, at least 32, capped by the model's limit and a speed budget (256 tokens: the
  cost of attention grows with the square of the length, and 2 CPU cores must train in minutes).
- **truncation**: when more than 1 % of the texts are cut, head+tail (the first quarter of the
  budget from the start, the rest from the end): for reviews and tickets the verdict is at the end.
- **learning rate, epochs, warm-up**: a full fine-tune of a small encoder (MiniLM) at 1e-4 with
  10 % warm-up over at most 8 epochs (early stopping keeps the best one), the fresh head at 10x
  that rate; a frozen base trains only the head, which needs a larger rate (2e-3), more epochs
  (30) and no warm-up, and starts from a linear probe.
- **class weights**: "balanced" (n / (k · count)) whenever the largest class is more than 1.5 times
  the smallest; the loss then counts a minority example as much as a majority one.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cloud_trainer.training.metrics import classification_metrics

SPEED_BUDGET_TOKENS = 256
PERCENTILE = 95.0
TRUNCATED_SHARE_FOR_HEAD_TAIL = 0.01
IMBALANCE_RATIO = 1.5

HEAD_RATE_FACTOR = 10
FULL_FINE_TUNE = {"learning_rate": 1e-4, "epochs": 8.0, "warmup_ratio": 0.1}
FROZEN_BASE = {"learning_rate": 2e-3, "epochs": 30.0, "warmup_ratio": 0.0}


def percentile(values: Sequence[int], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), without numpy."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class LengthChoice:
    max_length: int
    truncation: str
    head_tokens: int
    truncated_share: float
    reason: str


def choose_max_length(
    lengths: Sequence[int], *, model_limit: int, requested: int | None = None, truncation: str = "auto"
) -> LengthChoice:
    """The max length (special tokens included) and truncation for texts of these full token lengths."""
    cap = min(model_limit, SPEED_BUDGET_TOKENS)
    if requested is not None:
        chosen = requested
        reason = "set by --max-length"
        if requested > model_limit:
            raise ValueError(f"--max-length {requested} is above the model's limit of {model_limit} tokens")
    else:
        high = percentile(lengths, PERCENTILE)
        chosen = max(32, min(cap, 16 * math.ceil(high / 16)))
        limit = "the speed budget" if cap == SPEED_BUDGET_TOKENS else "the model's limit"
        reason = f"p{PERCENTILE:g} of training texts is {high:.0f} tokens; rounded up to 16, capped at {cap} ({limit})"
    share = sum(n > chosen for n in lengths) / len(lengths)
    if truncation == "auto":
        truncation = "head+tail" if share > TRUNCATED_SHARE_FOR_HEAD_TAIL else "head"
    head = chosen // 4 if truncation == "head+tail" else 0
    return LengthChoice(max_length=chosen, truncation=truncation, head_tokens=head, truncated_share=share,
                        reason=reason)  # fmt: skip


def balanced_class_weights(labels: Sequence[str], names: Sequence[str]) -> list[float]:
    """``n / (k * count)`` per class, in ``names`` order (scikit-learn's "balanced")."""
    counts = Counter(labels)
    missing = [name for name in names if counts[name] == 0]
    if missing:
        raise ValueError(f"no training examples of {', '.join(missing)}")
    return [len(labels) / (len(names) * counts[name]) for name in names]


def is_imbalanced(labels: Sequence[str]) -> bool:
    counts = Counter(labels).values()
    return max(counts) > IMBALANCE_RATIO * min(counts)


def majority_baseline(train_labels: Sequence[str], eval_labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy and macro-F1 of always answering the training split's most common label."""
    label = Counter(train_labels).most_common(1)[0][0]
    names = sorted(set(train_labels) | set(eval_labels))
    scores = classification_metrics([label] * len(eval_labels), list(eval_labels), labels=names)
    return {"label": label, "accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"]}


@dataclass
class DataSummary:
    """Rows per split, class counts, the majority baseline and token-length percentiles."""

    train_counts: dict[str, int]
    val_counts: dict[str, int]
    baseline: dict[str, Any]
    length_percentiles: dict[str, float]
    notes: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, train: Sequence[str], val: Sequence[str], lengths: Sequence[int]) -> DataSummary:
        names = sorted(set(train) | set(val))
        return cls(
            train_counts={n: sum(label == n for label in train) for n in names},
            val_counts={n: sum(label == n for label in val) for n in names},
            baseline=majority_baseline(train, val),
            length_percentiles={f"p{q}": percentile(lengths, q) for q in (50, 90, 95, 99)} | {"max": max(lengths)},
        )

    def lines(self) -> list[str]:
        train_n, val_n = sum(self.train_counts.values()), sum(self.val_counts.values())
        width = max(len(n) for n in self.train_counts)
        out = [f"data: {train_n} training rows, {val_n} validation rows, {len(self.train_counts)} classes"]
        for name, count in self.train_counts.items():
            out.append(
                f"  {name:<{width}}  train {count:>6} ({count / train_n:6.1%})   validation {self.val_counts[name]:>5}"
            )
        b = self.baseline
        out.append(
            f"majority baseline (always {b['label']!r}): accuracy {b['accuracy']:.3f}, macro-F1 {b['macro_f1']:.3f}"
        )
        pct = self.length_percentiles
        out.append("tokens per text: " + ", ".join(f"{k} {v:.0f}" for k, v in pct.items()))
        return out + self.notes
