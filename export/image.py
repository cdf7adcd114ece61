"""Export of image classifiers written as plain PyTorch modules (the digits CNN): torch.onnx,
parity gate, static int8 calibrated on training images, accuracy gate, bundle with golden images."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.protocol import ImagePreprocessing, Lineage
from edge_agent.runtime import ImageClassifier
from export.bundle import record_golden, stage_bundle
from export.errors import AccuracyGateFailed, ExportError, ValidationFailed
from export.pipeline import ExportResult
from export.quantize import quantize_static_int8
from export.validate import check_accuracy_drop

OPSET = 17


@dataclass(frozen=True, kw_only=True)
class ImageExportRequest:
    """An image classifier (a torch module) to export.

    Args:
        network: the trained module, in eval mode.
        example_shape: one input, e.g. ``(1, 1, 8, 8)``; the batch axis is made dynamic.
        preprocessing: what the device does to raw pixels (the bundle records it).
        val_images, val_labels: raw held-out images and their labels, for the gates.
        calibration_images: raw training images that calibrate static int8.
        torch_logits: the PyTorch logits for ``val_images`` (the parity reference).
    """

    network: Any
    example_shape: tuple[int, ...]
    preprocessing: ImagePreprocessing
    labels: list[str]
    val_images: list[Any]
    val_labels: list[str]
    calibration_images: list[Any]
    torch_logits: Any
    bundle_dir: Path
    work_dir: Path
    model: str
    version: int
    lineage: Lineage
    pytorch_metrics: dict[str, Any]
    quantization: str = "static-int8"
    max_accuracy_drop: float = 1.0


def export_image_classifier(req: ImageExportRequest) -> ExportResult:
    """torch.onnx export, parity gate, static int8, accuracy gate, bundle with golden images."""
    import torch

    if req.quantization not in ("static-int8", "none"):
        raise ExportError(f"image models export as static-int8 or none, not {req.quantization!r}")
    req.work_dir.mkdir(parents=True, exist_ok=True)
    fp32_model = req.work_dir / "model.fp32.onnx"
    torch.onnx.export(
        req.network, (torch.zeros(*req.example_shape),), str(fp32_model), input_names=["pixel_values"],
        output_names=["logits"], dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=OPSET, dynamo=False,
    )  # fmt: skip
    common: dict[str, Any] = {
        "task": "image-classification", "preprocessing": req.preprocessing, "model": req.model,
        "version": req.version, "labels": req.labels, "opset": OPSET, "lineage": req.lineage,
    }  # fmt: skip
    fp32_bundle = req.work_dir / "bundle-fp32"
    fp32_manifest = stage_bundle(fp32_bundle, model_file=fp32_model, quantization="none", **common)
    fp32 = ImageClassifier(bundle_dir=fp32_bundle, manifest=fp32_manifest, providers=["CPUExecutionProvider"])
    diff = float(np.abs(fp32.logits(req.val_images) - req.torch_logits).max())
    if diff > 1e-4:
        raise ValidationFailed(f"ONNX fp32 logits differ from PyTorch by up to {diff:.2e} (tolerance 1e-04)")
    fp32_accuracy = _accuracy(fp32, req.val_images, req.val_labels)
    report: dict[str, Any] = {"parity_max_abs_diff": diff, "parity_samples": len(req.val_images),
                              "onnx_fp32_accuracy": fp32_accuracy, "onnx_fp32_bytes": fp32_model.stat().st_size,
                              "quantization": req.quantization}  # fmt: skip
    shipped = fp32_model
    if req.quantization == "static-int8":
        images = req.calibration_images
        calibration = [fp32.feeds(images[i : i + 32]) for i in range(0, len(images), 32)]
        shipped = quantize_static_int8(fp32_model, req.work_dir / "model.int8.onnx", calibration=calibration)
    staged = stage_bundle(req.bundle_dir, model_file=shipped, quantization=req.quantization, **common)
    candidate = ImageClassifier(bundle_dir=req.bundle_dir, manifest=staged, providers=["CPUExecutionProvider"])
    bundle_accuracy = _accuracy(candidate, req.val_images, req.val_labels)
    report["bundle_model_accuracy"], report["bundle_model_bytes"] = bundle_accuracy, shipped.stat().st_size
    try:
        check_accuracy_drop(fp32_accuracy, bundle_accuracy, max_drop_points=req.max_accuracy_drop,
                            variant=req.quantization)  # fmt: skip
    except AccuracyGateFailed:
        shutil.rmtree(req.bundle_dir, ignore_errors=True)
        raise
    metrics = {"pytorch": req.pytorch_metrics, "export": report, "bundle_accuracy": bundle_accuracy}
    manifest = record_golden(req.bundle_dir, staged, req.val_images[:8], metrics=metrics)
    return ExportResult(bundle_dir=req.bundle_dir, manifest=manifest, report=report)


def _accuracy(classifier: ImageClassifier, images: list[Any], labels: list[str]) -> float:
    predicted = [p.label for i in range(0, len(images), 64) for p in classifier.predict(images[i : i + 64])]
    return sum(p == t for p, t in zip(predicted, labels, strict=True)) / len(labels)
