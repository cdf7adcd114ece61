"""Errors of the export pipeline.

ExportError                 the bundle was not written
├── OnnxExportFailed        optimum could not export the checkpoint
├── ValidationFailed        the ONNX model does not match PyTorch within tolerance
└── AccuracyGateFailed      the quantized model lost more accuracy than allowed
"""

from __future__ import annotations


class ExportError(Exception):
    """Export did not produce a bundle; the message says which step failed and why."""


class OnnxExportFailed(ExportError):
    pass


class ValidationFailed(ExportError):
    pass


class AccuracyGateFailed(ExportError):
    pass
