"""The quantization gate: did the shipped model lose accuracy or macro-F1 against fp32, with evidence?

A fixed allowance alone means little on a small validation split: on 120 examples one flipped
prediction is 0.83 accuracy points. So a metric fails only when its drop exceeds its allowance
**and** the drop is unlikely to be chance (one-sided p-value below ``alpha``), or the drop is so
large (beyond ``hard_limit_factor`` times the allowance) that no test is needed. A negative
allowance always fails: it asks for an improvement that nothing can prove.

- accuracy: the exact McNemar test on the paired predictions (``b`` examples fp32 got right and
  the candidate got wrong, ``c`` the opposite);
- macro-F1: a seeded paired bootstrap over the examples.

Pure Python and numpy, so it is testable in milliseconds and needs neither torch nor onnxruntime.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from export.errors import AccuracyGateFailed, ValidationFailed

NEXT_STEP = {
    "dynamic-int8": "try --quantize weight-int8 (int8 weights in blocks, activations per block) or static-int8",
    "static-int8": "try --quantize weight-int8, or dynamic-int8 with --target avx512_vnni/arm64",
    "weight-int8": "try --quantize fp16 (GPU) or none",
    "fp16": "try --quantize none",
}
_BLOCK_CELLS = 2_000_000  # resample-by-example cells per bootstrap block: bounds memory on big splits


def mcnemar_exact(b: int, c: int) -> float:
    """One-sided exact McNemar p-value that the candidate is worse: P(X >= b), X ~ Binomial(b + c, 1/2).

    ``b``: examples the reference got right and the candidate got wrong; ``c``: the opposite.
    1.0 when ``b <= c`` (no evidence the candidate is worse).
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, not b={b}, c={c}")
    if b <= c:
        return 1.0
    n = b + c
    term = math.comb(n, b)  # exact integers: no underflow until the final division
    tail = 0
    for k in range(b, n + 1):
        tail += term
        term = term * (n - k) // (k + 1)
    return min(1.0, tail / (1 << n))


def _macro_f1_by_weights(
    weights: npt.NDArray[np.float64], truth: npt.NDArray[np.intp], pred: npt.NDArray[np.intp], classes: int
) -> npt.NDArray[np.float64]:
    """Macro-F1 for each row of ``weights`` (how often each example is drawn), over ``classes`` labels."""
    eye = np.eye(classes)
    hits = eye[truth] * (truth == pred)[:, None]  # (n, K): true positives per class
    tp = weights @ hits
    predicted = weights @ eye[pred]
    actual = weights @ eye[truth]
    denominator = predicted + actual  # 2tp + fp + fn
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    result: npt.NDArray[np.float64] = f1.mean(axis=1)
    return result


@dataclass(frozen=True)
class BootstrapDrop:
    """How much macro-F1 the candidate lost, with a paired bootstrap's 95 % interval and one-sided p-value."""

    reference: float
    candidate: float
    drop: float
    low: float
    high: float
    p_value: float
    resamples: int
    seed: int


def bootstrap_macro_f1_drop(
    reference: Sequence[int],
    candidate: Sequence[int],
    truth: Sequence[int],
    *,
    classes: int,
    resamples: int = 2000,
    seed: int = 0,
) -> BootstrapDrop:
    """Paired bootstrap of ``macro_f1(reference) - macro_f1(candidate)`` on label indices.

    The p-value is the share of resamples in which the candidate is not worse (drop <= 0), with
    the usual +1 correction so it is never 0.
    """
    ref = np.asarray(reference, dtype=np.intp)
    cand = np.asarray(candidate, dtype=np.intp)
    gold = np.asarray(truth, dtype=np.intp)
    n = len(gold)
    if not n or len(ref) != n or len(cand) != n:
        raise ValueError("need as many predictions of each model as labels, and at least one")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, not {resamples}")
    ones = np.ones((1, n))
    ref_f1 = float(_macro_f1_by_weights(ones, gold, ref, classes)[0])
    cand_f1 = float(_macro_f1_by_weights(ones, gold, cand, classes)[0])
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_CELLS // n)
    drops: list[npt.NDArray[np.float64]] = []
    for start in range(0, resamples, block):
        rows = min(block, resamples - start)
        drawn = rng.integers(0, n, size=(rows, n)) + (np.arange(rows) * n)[:, None]
        weights = np.bincount(drawn.ravel(), minlength=rows * n).reshape(rows, n).astype(np.float64)
        drops.append(
            _macro_f1_by_weights(weights, gold, ref, classes) - _macro_f1_by_weights(weights, gold, cand, classes)
        )
    all_drops = np.concatenate(drops)
    low, high = np.percentile(all_drops, [2.5, 97.5])
    p_value = (int(np.count_nonzero(all_drops <= 0)) + 1) / (resamples + 1)
    return BootstrapDrop(
        reference=ref_f1,
        candidate=cand_f1,
        drop=ref_f1 - cand_f1,
        low=float(low),
        high=float(high),
        p_value=p_value,
        resamples=resamples,
        seed=seed,
    )


def _metric_fails(drop: float, allowance: float, p_value: float, *, alpha: float, hard_limit_factor: float) -> bool:
    if allowance < 0:
        return True  # an improvement was demanded; nothing here can prove one
    return drop > allowance and (p_value < alpha or drop > hard_limit_factor * allowance)


@dataclass(frozen=True)
class GateReport:
    """The quantization gate's verdict on one validation split, with every number it used.

    Accuracy drops are in points (percent); macro-F1 drops in F1 units (0..1).
    """

    variant: str
    split: str
    examples: int
    changed: int
    b: int
    c: int
    accuracy_reference: float
    accuracy_candidate: float
    accuracy_drop_points: float
    accuracy_p_value: float
    accuracy_allowance_points: float
    accuracy_passed: bool
    macro_f1_reference: float
    macro_f1_candidate: float
    macro_f1_drop: float
    macro_f1_interval: tuple[float, float]
    macro_f1_p_value: float
    macro_f1_allowance: float
    macro_f1_passed: bool
    alpha: float
    hard_limit_factor: float
    resamples: int
    passed: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: for the export report and the manifest's metrics."""
        data = asdict(self)
        data["macro_f1_interval"] = list(self.macro_f1_interval)
        return data


def judge_quantization(
    reference_pred: Sequence[str],
    candidate_pred: Sequence[str],
    truth: Sequence[str],
    labels: Sequence[str],
    *,
    variant: str,
    max_accuracy_drop_points: float = 1.0,
    max_macro_f1_drop: float = 0.02,
    alpha: float = 0.05,
    hard_limit_factor: float = 3.0,
    split: str = "validation",
    resamples: int = 2000,
    seed: int = 0,
    raise_on_failure: bool = True,
) -> GateReport:
    """Compare the fp32 (``reference_pred``) and quantized (``candidate_pred``) predictions on ``truth``.

    Args:
        reference_pred, candidate_pred, truth: predicted and true label names, one per example.
        labels: every label name (macro-F1 averages over all of them).
        variant: the quantization being judged, e.g. ``dynamic-int8`` (named in the verdict).
        max_accuracy_drop_points: accuracy allowance in points (``--max-accuracy-drop``).
        max_macro_f1_drop: macro-F1 allowance in F1 units (``--max-f1-drop``).
        alpha: a drop beyond its allowance fails when its one-sided p-value is below this.
        hard_limit_factor: a drop beyond this many allowances fails whatever the p-value.
        split: the name of the split the predictions are on (recorded, and named in the verdict).
        resamples, seed: the bootstrap of macro-F1.
        raise_on_failure: raise :class:`AccuracyGateFailed` (carrying the report) when the gate
            fails; with False, only the report's ``passed`` says so.

    Raises:
        AccuracyGateFailed: the candidate lost too much, with the verdict and the next quantization to try.
        ValidationFailed: no examples, or predictions and labels that do not line up.
    """
    n = len(truth)
    if not n:
        raise ValidationFailed(f"no {split} examples to judge {variant} on")
    if len(reference_pred) != n or len(candidate_pred) != n:
        raise ValidationFailed(
            f"{len(reference_pred)} fp32 and {len(candidate_pred)} {variant} predictions for {n} {split} labels"
        )
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({*reference_pred, *candidate_pred, *truth} - index.keys())
    if unknown:
        raise ValidationFailed(f"labels {unknown} are not among the model's labels {list(labels)}")
    ref = [index[p] for p in reference_pred]
    cand = [index[p] for p in candidate_pred]
    gold = [index[t] for t in truth]

    ref_right = [r == g for r, g in zip(ref, gold, strict=True)]
    cand_right = [k == g for k, g in zip(cand, gold, strict=True)]
    b = sum(r and not k for r, k in zip(ref_right, cand_right, strict=True))
    c = sum(k and not r for r, k in zip(ref_right, cand_right, strict=True))
    changed = sum(r != k for r, k in zip(ref, cand, strict=True))
    acc_ref, acc_cand = sum(ref_right) / n, sum(cand_right) / n
    acc_drop = (acc_ref - acc_cand) * 100
    acc_p = mcnemar_exact(b, c)
    f1 = bootstrap_macro_f1_drop(ref, cand, gold, classes=len(labels), resamples=resamples, seed=seed)

    acc_fails = _metric_fails(acc_drop, max_accuracy_drop_points, acc_p, alpha=alpha,
                              hard_limit_factor=hard_limit_factor)  # fmt: skip
    f1_fails = _metric_fails(f1.drop, max_macro_f1_drop, f1.p_value, alpha=alpha, hard_limit_factor=hard_limit_factor)
    fields: dict[str, Any] = {
        "variant": variant, "split": split, "examples": n, "changed": changed, "b": b, "c": c,
        "accuracy_reference": acc_ref, "accuracy_candidate": acc_cand, "accuracy_drop_points": acc_drop,
        "accuracy_p_value": acc_p, "accuracy_allowance_points": max_accuracy_drop_points,
        "accuracy_passed": not acc_fails, "macro_f1_reference": f1.reference, "macro_f1_candidate": f1.candidate,
        "macro_f1_drop": f1.drop, "macro_f1_interval": (f1.low, f1.high), "macro_f1_p_value": f1.p_value,
        "macro_f1_allowance": max_macro_f1_drop, "macro_f1_passed": not f1_fails, "alpha": alpha,
        "hard_limit_factor": hard_limit_factor, "resamples": resamples, "passed": not (acc_fails or f1_fails),
    }  # fmt: skip
    report = GateReport(**fields, reason=_reason(fields))
    if raise_on_failure and not report.passed:
        raise AccuracyGateFailed(report.reason, report=report)
    return report


def _why(drop: float, allowance: float, p_value: float, *, alpha: float, factor: float, unit: str) -> str:
    if allowance < 0:
        return f"a negative allowance ({allowance:g}) always fails"
    if drop <= allowance:
        return f"within the allowance of {allowance:g} {unit}"
    if drop > factor * allowance:
        return f"beyond {factor:g}x the allowance ({factor * allowance:g} {unit})"
    if p_value < alpha:
        return f"beyond the allowance and unlikely to be chance (p={p_value:.2g} < {alpha:g})"
    return f"beyond the allowance, but could be chance (p={p_value:.2g} >= {alpha:g})"


def _reason(f: dict[str, Any]) -> str:
    """The verdict in words: both metrics, the evidence, the allowances and what to try next."""
    variant, alpha, factor = f["variant"], f["alpha"], f["hard_limit_factor"]
    low, high = f["macro_f1_interval"]
    failed = [name for name, ok in (("accuracy", f["accuracy_passed"]), ("macro-F1", f["macro_f1_passed"])) if not ok]
    acc_why = _why(f["accuracy_drop_points"], f["accuracy_allowance_points"], f["accuracy_p_value"],
                   alpha=alpha, factor=factor, unit="points")  # fmt: skip
    f1_why = _why(f["macro_f1_drop"], f["macro_f1_allowance"], f["macro_f1_p_value"],
                  alpha=alpha, factor=factor, unit="macro-F1")  # fmt: skip
    verdict = f"FAILED on {' and '.join(failed)}" if failed else "passed"
    accuracy = (
        f"{variant} accuracy {f['accuracy_candidate']:.2%} is {f['accuracy_drop_points']:.2f} points below fp32 "
        f"{f['accuracy_reference']:.2%} on the {f['split']} split ({f['examples']} examples; {f['changed']} "
        f"predictions changed: {f['b']} now wrong, {f['c']} now right; "
        f"McNemar p={f['accuracy_p_value']:.2g}: {acc_why})"
    )
    macro_f1 = (
        f"{variant} macro-F1 {f['macro_f1_candidate']:.3f} vs fp32 {f['macro_f1_reference']:.3f} "
        f"(drop {f['macro_f1_drop']:.3f}, 95% interval {low:.3f} to {high:.3f}, "
        f"bootstrap p={f['macro_f1_p_value']:.2g}: {f1_why})"
    )
    rule = (
        f"the gate allows {f['accuracy_allowance_points']:.2f} accuracy points (--max-accuracy-drop) and "
        f"{f['macro_f1_allowance']:.3f} macro-F1 (--max-f1-drop), failing a larger drop when p < {alpha:g} "
        f"or the drop exceeds {factor:g}x the allowance"
    )
    text = f"{accuracy}; {macro_f1}; {rule}: {verdict}"
    if failed:
        text += f"; {NEXT_STEP.get(variant, 'try a different --quantize')}"
    return text
