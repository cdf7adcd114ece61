"""export: a fine-tuned checkpoint becomes a validated, quantized, self-describing model bundle.

- :mod:`export.onnx_export`  optimum ONNX export and onnxruntime int8 quantization
- :mod:`export.validate`     the gates: ONNX vs PyTorch parity, accuracy after quantization
- :mod:`export.bundle`       bundle files, manifest, golden vectors
- :mod:`export.pipeline`     the steps in order

Imports :mod:`edge_agent.protocol` for the bundle format and :mod:`edge_agent.runtime` so that
validation runs the device's own code path; the edge never imports this package.
"""

from export.errors import AccuracyGateFailed, ExportError, OnnxExportFailed, ValidationFailed
from export.pipeline import ExportRequest, ExportResult, export_text_classifier

__all__ = [
    "AccuracyGateFailed",
    "ExportError",
    "ExportRequest",
    "ExportResult",
    "OnnxExportFailed",
    "ValidationFailed",
    "export_text_classifier",
]
