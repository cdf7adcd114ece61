"""Errors of the export pipeline.

ExportError                 the bundle was not written
├── OnnxExportFailed        optimum could not export the checkpoint
├── ValidationFailed        the ONNX model does not match PyTorch within tolerance
└── AccuracyGateFailed      the quantized model lost more accuracy or macro-F1 than allowed
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from export.gates import GateReport


class ExportError(Exception):
    """Export did not produce a bundle; the message says which step failed and why."""


class OnnxExportFailed(ExportError):
    pass


class ValidationFailed(ExportError):
    pass


class AccuracyGateFailed(ExportError):
    """The quantization gate refused the candidate; ``report`` holds the numbers (None from older callers)."""

    def __init__(self, message: str, *, report: GateReport | None = None) -> None:
        super().__init__(message)
        self.report = report
