"""Classification metrics: accuracy, macro-F1, per class, confusion matrix. Plain Python."""

from __future__ import annotations

from typing import Any


def classification_metrics(predicted: list[str], actual: list[str], *, labels: list[str]) -> dict[str, Any]:
    if len(predicted) != len(actual) or not actual:
        raise ValueError("need as many predictions as labels, and at least one")
    index = {label: i for i, label in enumerate(labels)}
    confusion = [[0] * len(labels) for _ in labels]
    for p, a in zip(predicted, actual, strict=True):
        confusion[index[a]][index[p]] += 1
    per_class: dict[str, dict[str, float]] = {}
    for label, i in index.items():
        tp = confusion[i][i]
        fp = sum(confusion[r][i] for r in range(len(labels))) - tp
        fn = sum(confusion[i]) - tp
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": float(tp + fn)}
    return {
        "accuracy": sum(p == a for p, a in zip(predicted, actual, strict=True)) / len(actual),
        "macro_f1": sum(c["f1"] for c in per_class.values()) / len(per_class),
        "per_class": per_class,
        "confusion_matrix": {"labels": labels, "rows_actual_cols_predicted": confusion},
    }


def format_metrics(metrics: dict[str, Any]) -> str:
    """A plain-text table: per-class precision/recall/F1/support, totals, and the confusion matrix."""
    per_class: dict[str, dict[str, float]] = metrics["per_class"]
    width = max(len("label"), *(len(label) for label in per_class))
    lines = [f"{'label':<{width}}  precision  recall     f1  support"]
    for label, m in per_class.items():
        lines.append(
            f"{label:<{width}}  {m['precision']:>9.3f}  {m['recall']:>6.3f}  {m['f1']:>5.3f}  {int(m['support']):>7}"
        )
    lines.append(f"accuracy {metrics['accuracy']:.3f}   macro-F1 {metrics['macro_f1']:.3f}")
    matrix = metrics["confusion_matrix"]["rows_actual_cols_predicted"]
    lines.append("confusion matrix (rows: actual, columns: predicted, in label order)")
    cell = max(3, *(len(str(v)) for row in matrix for v in row))
    lines.append(" " * (width + 2) + " ".join(f"{i:>{cell}}" for i in range(len(matrix))))
    for i, (label, row) in enumerate(zip(per_class, matrix, strict=True)):
        lines.append(f"{label:<{width}}  " + " ".join(f"{v:>{cell}}" for v in row) + f"   <- {i}")
    return "\n".join(lines)
