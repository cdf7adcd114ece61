"""Checkpoint → ONNX with optimum."""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

from export.errors import OnnxExportFailed

log = logging.getLogger(__name__)


def export_onnx(checkpoint: Path, out_dir: Path, *, opset: int | None = None) -> Path:
    """Export a sequence-classification checkpoint with optimum; return the fp32 ``model.onnx``.

    optimum's own validation (ONNX vs PyTorch on dummy inputs) runs here too; ours, on real
    inputs, runs afterwards in :mod:`export.validate`.
    """
    from optimum.exporters.onnx import main_export
    from transformers.utils import logging as hf_logging

    from export.pooling import is_mean_pooling

    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]  # no "torch_dtype is deprecated" per export
    out_dir.mkdir(parents=True, exist_ok=True)
    if is_mean_pooling(checkpoint):
        return _export_mean_pooling(checkpoint, out_dir, opset=opset)
    try:
        with warnings.catch_warnings():
            # The tracer warns about constants in the attention-mask helper; the parity gate checks the result.
            warnings.simplefilter("ignore")
            main_export(
                str(checkpoint),
                output=str(out_dir),
                task="text-classification",
                opset=opset,
                local_files_only=True,
            )
    except Exception as exc:
        raise OnnxExportFailed(f"optimum could not export {checkpoint}: {exc}") from exc
    model = out_dir / "model.onnx"
    if not model.is_file():
        raise OnnxExportFailed(f"optimum wrote no model.onnx in {out_dir}")
    return model


def _export_mean_pooling(checkpoint: Path, out_dir: Path, *, opset: int | None) -> Path:
    """optimum's exporter with BERT's ONNX config (same inputs, ``logits`` out) for the mean-pooling head.

    optimum's task registry does not know our ``model_type``, so its lower-level ``export`` is
    called with the config given; the parity gate compares the result with PyTorch afterwards.
    """
    from optimum.exporters.onnx import export
    from optimum.exporters.onnx.model_configs import BertOnnxConfig
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(checkpoint)).eval()
        config = BertOnnxConfig(model.config, task="text-classification")
        model_file = out_dir / "model.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export(model, config, model_file, opset=opset or config.DEFAULT_ONNX_OPSET)
        shutil.copyfile(checkpoint / "tokenizer.json", out_dir / "tokenizer.json")
        model.config.save_pretrained(str(out_dir))  # the quantizer reads it beside the model
    except Exception as exc:
        raise OnnxExportFailed(f"optimum could not export {checkpoint}: {exc}") from exc
    return model_file


def onnx_opset(model: Path) -> int:
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    return max(int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx"))
