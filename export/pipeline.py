"""The whole export: checkpoint → ONNX → parity gate → optimize/quantize → quantization gate → bundle."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.protocol import Lineage, Manifest
from edge_agent.runtime import TextClassifier
from export.bundle import record_golden, stage_text_bundle
from export.errors import ExportError, ValidationFailed
from export.gates import judge_quantization
from export.onnx_export import export_onnx, onnx_opset
from export.quantize import (
    DEFAULT_TARGET,
    DEFAULT_TEXT_QUANTIZATION,
    QUANTIZATIONS,
    convert_fp16,
    optimize_transformer,
    quantize_dynamic_preset,
    quantize_static_int8,
    quantize_weights_int8,
)
from export.validate import check_parity, torch_logits

log = logging.getLogger(__name__)
SPLIT = "validation"  # the split every metric the export writes is measured on


@dataclass(frozen=True, kw_only=True)
class ExportRequest:
    """What to export and how.

    Args:
        checkpoint: a Hugging Face sequence-classification checkpoint directory.
        out_dir: where the bundle goes (replaced if present).
        work_dir: scratch space for the intermediate fp32 export.
        model: the model's name in the fleet.
        version: the bundle's version.
        labels: label names in logit order.
        val_texts: held-out texts for parity and accuracy.
        val_labels: their labels.
        lineage: where the model came from.
        metrics: evaluation metrics from training, stored in the manifest.
        max_length: tokens per text on the device (special tokens included), as in training.
        truncation: ``head`` or ``head+tail``, as in training.
        head_tokens: head+tail only: tokens kept from the start.
        quantization: one of :data:`export.quantize.QUANTIZATIONS`.
        target: CPU preset for dynamic int8 (:data:`export.quantize.TARGETS`).
        calibration_texts: training texts that calibrate static int8 (a few hundred are plenty).
        max_accuracy_drop: the quantization gate, in accuracy points.
        max_f1_drop: the quantization gate, in macro-F1 (0..1); see :mod:`export.gates`.
        parity_atol: how far ONNX fp32 logits may be from PyTorch's.
        golden_count: how many validation texts become golden vectors.
    """

    checkpoint: Path
    out_dir: Path
    work_dir: Path
    model: str
    version: int
    labels: list[str]
    val_texts: list[str]
    val_labels: list[str]
    lineage: Lineage
    metrics: dict[str, Any] = field(default_factory=dict)
    max_length: int = 128
    truncation: str = "head"
    head_tokens: int = 0
    quantization: str = DEFAULT_TEXT_QUANTIZATION
    target: str = DEFAULT_TARGET
    calibration_texts: list[str] = field(default_factory=list)
    max_accuracy_drop: float = 1.0
    max_f1_drop: float = 0.02
    parity_atol: float = 1e-3
    golden_count: int = 8


@dataclass(frozen=True)
class ExportResult:
    bundle_dir: Path
    manifest: Manifest
    report: dict[str, Any]


def _convert(req: ExportRequest, fp32_model: Path, fp32: TextClassifier) -> Path:
    """The model file to ship, in the requested precision."""
    work = req.work_dir
    if req.quantization == "dynamic-int8":
        return quantize_dynamic_preset(fp32_model, work / "model.int8.onnx", target=req.target)
    if req.quantization == "static-int8":
        texts = req.calibration_texts or req.val_texts
        batches = [fp32.feeds(texts[i : i + 8]) for i in range(0, len(texts), 8)]
        return quantize_static_int8(fp32_model, work / "model.static-int8.onnx", calibration=batches)
    if req.quantization == "weight-int8":
        return quantize_weights_int8(fp32_model, work / "model.weight-int8.onnx")
    fused = optimize_transformer(fp32_model, work / "model.fused.onnx")
    if req.quantization == "fp16":
        return convert_fp16(fused, work / "model.fp16.onnx")
    return fused


def export_text_classifier(req: ExportRequest) -> ExportResult:
    fp32_dir = req.work_dir / "onnx-fp32"
    fp32_model = export_onnx(req.checkpoint, fp32_dir)
    opset = onnx_opset(fp32_model)
    tokenizer = fp32_dir / "tokenizer.json"
    common: dict[str, Any] = {
        "model": req.model,
        "version": req.version,
        "labels": req.labels,
        "max_length": req.max_length,
        "truncation": req.truncation,
        "head_tokens": req.head_tokens,
        "opset": opset,
        "lineage": req.lineage,
    }

    fp32_bundle = req.work_dir / "bundle-fp32"
    fp32_manifest = stage_text_bundle(
        fp32_bundle, model_file=fp32_model, tokenizer_file=tokenizer, quantization="none", **common
    )
    fp32 = TextClassifier(bundle_dir=fp32_bundle, manifest=fp32_manifest, providers=["CPUExecutionProvider"])
    reference = torch_logits(req.checkpoint, req.val_texts, encoder=fp32.encoder)
    parity = check_parity(reference, fp32, req.val_texts, atol=req.parity_atol)
    fp32_pred = _predicted(fp32, req.val_texts)
    log.info("ONNX fp32 matches PyTorch: max |diff| %.2e on %d texts", parity.max_abs_diff, parity.samples)
    report: dict[str, Any] = {
        "split": SPLIT,
        "examples": len(req.val_texts),
        "parity_max_abs_diff": parity.max_abs_diff,
        "parity_samples": parity.samples,
        "onnx_fp32_bytes": fp32_model.stat().st_size,
    }

    if req.quantization not in QUANTIZATIONS:
        raise ExportError(f"unknown quantization {req.quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
    shipped = _convert(req, fp32_model, fp32)
    staged = stage_text_bundle(
        req.out_dir, model_file=shipped, tokenizer_file=tokenizer, quantization=req.quantization, **common
    )
    candidate = TextClassifier(bundle_dir=req.out_dir, manifest=staged, providers=["CPUExecutionProvider"])
    bundle_pred = _predicted(candidate, req.val_texts)
    report["quantization"] = req.quantization
    report["target"] = req.target if req.quantization == "dynamic-int8" else None
    report["bundle_model_bytes"] = shipped.stat().st_size
    try:  # "none" ships the fused fp32 graph: judged and recorded, not enforced
        gate = judge_quantization(
            fp32_pred, bundle_pred, req.val_labels, req.labels, variant=req.quantization, split=SPLIT,
            max_accuracy_drop_points=req.max_accuracy_drop, max_macro_f1_drop=req.max_f1_drop,
            raise_on_failure=req.quantization != "none",
        )  # fmt: skip
    except ExportError:  # AccuracyGateFailed, or ValidationFailed for labels that do not line up
        shutil.rmtree(req.out_dir, ignore_errors=True)  # no bundle that failed a gate is left to push
        raise
    bundle_accuracy = gate.accuracy_candidate
    report["onnx_fp32_accuracy"] = gate.accuracy_reference
    report["bundle_model_accuracy"] = bundle_accuracy
    report["onnx_fp32_macro_f1"] = gate.macro_f1_reference
    report["bundle_model_macro_f1"] = gate.macro_f1_candidate
    report["gate"] = {**gate.to_dict(), "enforced": req.quantization != "none"}
    log.info("quantization gate: %s", gate.reason)

    given = {
        name: {"split": SPLIT, "examples": len(req.val_texts), **block} if isinstance(block, dict) else block
        for name, block in req.metrics.items()
    }
    bundle = {"split": SPLIT, "examples": len(req.val_texts), "accuracy": bundle_accuracy,
              "macro_f1": gate.macro_f1_candidate}  # fmt: skip
    metrics = {**given, "export": report, "bundle": bundle, "bundle_accuracy": bundle_accuracy}
    manifest = record_golden(req.out_dir, staged, req.val_texts[: req.golden_count], metrics=metrics)
    (req.work_dir / "export_report.json").write_text(json.dumps(report, indent=2))
    return ExportResult(bundle_dir=req.out_dir, manifest=manifest, report=report)


def _predicted(classifier: TextClassifier, texts: list[str], batch_size: int = 32) -> list[str]:
    """The label ``classifier`` predicts for each text, in order."""
    if not texts:
        raise ValidationFailed(f"no {SPLIT} examples to measure accuracy on")
    return [p.label for i in range(0, len(texts), batch_size) for p in classifier.predict(texts[i : i + batch_size])]
