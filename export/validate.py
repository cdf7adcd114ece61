"""Validation gates: the ONNX model must match PyTorch, and quantization must keep accuracy.

Both run the device's own code path (:class:`edge_agent.runtime.TextClassifier`: the bundle's
tokenizer through ``tokenizers``, then onnxruntime), so a preprocessing mismatch fails here, not
in the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from edge_agent.runtime import TextClassifier
from edge_agent.runtime.text import TextEncoder
from export.errors import ValidationFailed


@dataclass(frozen=True)
class ParityReport:
    max_abs_diff: float
    argmax_agreement: float
    samples: int


def torch_logits(
    checkpoint: Path, texts: list[str], *, encoder: TextEncoder, batch_size: int = 32
) -> npt.NDArray[np.float32]:
    """The checkpoint's logits in PyTorch, on the very token ids the bundle's encoder gives the device."""
    import inspect

    import torch
    from transformers import AutoModelForSequenceClassification

    import export.pooling  # noqa: F401 - registers the mean-pooling classifier with the Auto classes

    model = AutoModelForSequenceClassification.from_pretrained(str(checkpoint)).eval()
    accepted = inspect.signature(model.forward).parameters
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            arrays = encoder.encode(texts[start : start + batch_size])
            feeds = {name: torch.from_numpy(values) for name, values in arrays.items() if name in accepted}
            chunks.append(model(**feeds).logits.float().numpy())
    return np.concatenate(chunks).astype(np.float32)


def check_parity(
    reference: npt.NDArray[np.float32], classifier: TextClassifier, texts: list[str], *, atol: float
) -> ParityReport:
    """Raise ``ValidationFailed`` unless ``classifier`` reproduces ``reference`` logits within ``atol``."""
    actual = np.concatenate([classifier.logits(texts[i : i + 32]) for i in range(0, len(texts), 32)])
    if actual.shape != reference.shape:
        raise ValidationFailed(f"ONNX output shape {actual.shape} differs from PyTorch's {reference.shape}")
    diff = float(np.abs(actual - reference).max())
    agreement = float((actual.argmax(-1) == reference.argmax(-1)).mean())
    if not np.isfinite(actual).all() or diff > atol:
        raise ValidationFailed(
            f"ONNX fp32 logits differ from PyTorch by up to {diff:.2e} on {len(texts)} real inputs "
            f"(tolerance {atol:.0e}); argmax agrees on {agreement:.1%}"
        )
    return ParityReport(max_abs_diff=diff, argmax_agreement=agreement, samples=len(texts))
