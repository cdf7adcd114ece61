"""Export of image classifiers: ONNX, parity gate, precision (static int8 calibrated on training
images, fp16, or fp32), the quantization gate, and a bundle with golden images.

Two sources, one path after the ONNX file exists:

- a Hugging Face ``AutoModelForImageClassification`` checkpoint directory, exported with optimum
  (``main_export``, task ``image-classification``), as the text family is;
- a plain PyTorch module returning logits (the digits CNN), exported with ``torch.onnx``.

Every check runs the device's own code (:class:`edge_agent.runtime.ImageClassifier`): encoded
validation images are decoded, resized and cropped by the agent's decoder, and PyTorch's logits
are computed on exactly the arrays the ONNX model was fed, so a preprocessing mismatch fails
here, not on the device.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.protocol import ImagePreprocessing, Lineage, Manifest
from edge_agent.runtime import ImageClassifier
from export.bundle import record_golden, stage_bundle
from export.errors import ExportError, OnnxExportFailed, ValidationFailed
from export.gates import judge_quantization
from export.pipeline import ExportResult
from export.quantize import convert_fp16, quantize_static_int8

log = logging.getLogger(__name__)

OPSET = 17
IMAGE_QUANTIZATIONS = ("static-int8", "fp16", "none")
"""Dynamic int8 is not offered: it quantizes MatMul weights only and leaves a CNN's convolutions in fp32."""
BATCH = 32


@dataclass(frozen=True, kw_only=True)
class ImageExportRequest:
    """An image classifier to export. Give ``checkpoint`` (Hugging Face, via optimum) or ``network``
    with ``example_shape`` (a torch module, via torch.onnx).

    Args:
        checkpoint: an ``AutoModelForImageClassification`` directory (``save_pretrained``).
        network: a torch module in eval mode whose output is the logits tensor.
        example_shape: one input for torch.onnx, e.g. ``(1, 1, 8, 8)``; the batch axis is made dynamic.
        preprocessing: what the device does to an image (the bundle records it).
        labels: label names in logit order.
        val_images, val_labels: held-out inputs (encoded JPEG/PNG bytes, or raw pixel arrays at the
            model's size) and their labels: the parity gate and the quantization gate run on them.
        calibration_images: training inputs of the same kinds that calibrate static int8.
        golden_inputs: what the golden vectors record (default: the first 8 validation inputs);
            encoded images go in as ``data:`` URLs.
        quantization: ``static-int8``, ``fp16`` or ``none``.
        max_accuracy_drop, max_f1_drop: the quantization gate's allowances (:mod:`export.gates`).
        parity_atol: how far ONNX fp32 logits may be from PyTorch's.
        split: the name of the held-out split, recorded with every metric.
    """

    preprocessing: ImagePreprocessing
    labels: list[str]
    val_images: list[Any]
    val_labels: list[str]
    calibration_images: list[Any]
    bundle_dir: Path
    work_dir: Path
    model: str
    version: int
    lineage: Lineage
    pytorch_metrics: dict[str, Any]
    checkpoint: Path | None = None
    network: Any = None
    example_shape: tuple[int, ...] | None = None
    golden_inputs: list[Any] | None = None
    quantization: str = "static-int8"
    max_accuracy_drop: float = 1.0
    max_f1_drop: float = 0.02
    parity_atol: float = 1e-4
    split: str = "validation"


def export_image_classifier(req: ImageExportRequest) -> ExportResult:
    """ONNX export, parity gate, precision, quantization gate, bundle with golden images."""
    if req.quantization not in IMAGE_QUANTIZATIONS:
        raise ExportError(
            f"image models export as {', '.join(IMAGE_QUANTIZATIONS)}, not {req.quantization!r} (dynamic int8 "
            "would quantize only MatMul weights and leave the convolutions in fp32)"
        )
    if (req.checkpoint is None) == (req.network is None):
        raise ExportError("give either a Hugging Face checkpoint or a torch module to export, not both or neither")
    req.work_dir.mkdir(parents=True, exist_ok=True)
    network, fp32_model = _to_onnx(req)
    common: dict[str, Any] = {
        "task": "image-classification", "preprocessing": req.preprocessing, "model": req.model,
        "version": req.version, "labels": req.labels, "opset": _opset(fp32_model), "lineage": req.lineage,
    }  # fmt: skip
    fp32_manifest = stage_bundle(req.work_dir / "bundle-fp32", model_file=fp32_model, quantization="none", **common)
    fp32 = _classifier(req.work_dir / "bundle-fp32", fp32_manifest)
    val = fp32.prepare(req.val_images, what="validation images")  # decoded once, by the device's decoder
    diff = _parity(network, fp32, val, atol=req.parity_atol)
    log.info("ONNX fp32 matches PyTorch: max |diff| %.2e on %d images", diff, len(val))
    fp32_pred = _predicted(fp32, val)
    report: dict[str, Any] = {"split": req.split, "examples": len(val), "parity_max_abs_diff": diff,
                              "parity_samples": len(val), "onnx_fp32_bytes": fp32_model.stat().st_size,
                              "quantization": req.quantization}  # fmt: skip

    shipped = _convert(req, fp32_model, fp32)
    staged = stage_bundle(req.bundle_dir, model_file=shipped, quantization=req.quantization, **common)
    candidate = _classifier(req.bundle_dir, staged)
    try:  # "none" ships the fp32 graph itself: judged and recorded, not enforced
        gate = judge_quantization(
            fp32_pred, _predicted(candidate, val), req.val_labels, req.labels, variant=req.quantization,
            split=req.split, max_accuracy_drop_points=req.max_accuracy_drop, max_macro_f1_drop=req.max_f1_drop,
            raise_on_failure=req.quantization != "none",
        )  # fmt: skip
    except ExportError:  # no bundle that failed a gate is left behind to push
        shutil.rmtree(req.bundle_dir, ignore_errors=True)
        raise
    report.update(
        onnx_fp32_accuracy=gate.accuracy_reference, onnx_fp32_macro_f1=gate.macro_f1_reference,
        bundle_model_accuracy=gate.accuracy_candidate, bundle_model_macro_f1=gate.macro_f1_candidate,
        bundle_model_bytes=shipped.stat().st_size, gate={**gate.to_dict(), "enforced": req.quantization != "none"},
    )  # fmt: skip
    log.info("quantization gate: %s", gate.reason)
    sized = {"split": req.split, "examples": len(val)}
    metrics = {
        "pytorch": {**sized, **req.pytorch_metrics},
        "export": report,
        "bundle": {**sized, "accuracy": gate.accuracy_candidate, "macro_f1": gate.macro_f1_candidate},
        "bundle_accuracy": gate.accuracy_candidate,
    }
    golden = req.golden_inputs if req.golden_inputs is not None else req.val_images[:8]
    manifest = record_golden(req.bundle_dir, staged, golden, metrics=metrics)
    (req.work_dir / "export_report.json").write_text(json.dumps(report, indent=2))
    return ExportResult(bundle_dir=req.bundle_dir, manifest=manifest, report=report)


def _classifier(bundle_dir: Path, manifest: Manifest) -> ImageClassifier:
    return ImageClassifier(bundle_dir=bundle_dir, manifest=manifest, providers=["CPUExecutionProvider"])


# -- ONNX -----------------------------------------------------------------------------------------
def _to_onnx(req: ImageExportRequest) -> tuple[Any, Path]:
    """The torch module that gives the reference logits, and its fp32 ONNX file."""
    if req.checkpoint is not None:
        return logits_module(load_hf_image_classifier(req.checkpoint)), export_hf_image(
            req.checkpoint, req.work_dir / "onnx-fp32"
        )
    if req.example_shape is None:
        raise ExportError("a torch module needs example_shape to be exported")
    return req.network, _export_module(req.network, req.example_shape, req.work_dir / "model.fp32.onnx")


def load_hf_image_classifier(checkpoint: Path) -> Any:
    """An ``AutoModelForImageClassification`` checkpoint, in eval mode."""
    from transformers import AutoModelForImageClassification

    try:
        return AutoModelForImageClassification.from_pretrained(str(checkpoint)).eval()
    except (OSError, ValueError) as exc:
        raise OnnxExportFailed(f"cannot load image classifier {checkpoint}: {exc}") from None


def logits_module(model: Any) -> Any:
    """``model`` as a module from pixel values to the logits tensor (Hugging Face models return a ModelOutput)."""
    from torch import nn

    class Logits(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values: Any) -> Any:
            return self.inner(pixel_values=pixel_values).logits

    return Logits(model).eval()


def export_hf_image(checkpoint: Path, out_dir: Path) -> Path:
    """optimum's ONNX export of an image classifier (``pixel_values`` in, ``logits`` out, dynamic batch).

    optimum's own validation on dummy inputs is skipped: the parity gate checks real images, as the
    device prepares them, afterwards.
    """
    from optimum.exporters.onnx import main_export
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():  # the tracer's warnings about Python conditionals on shapes
            warnings.simplefilter("ignore")
            main_export(str(checkpoint), output=str(out_dir), task="image-classification", local_files_only=True,
                        do_validation=False)  # fmt: skip
    except Exception as exc:
        raise OnnxExportFailed(f"optimum could not export {checkpoint}: {exc}") from exc
    model = out_dir / "model.onnx"
    if not model.is_file():
        raise OnnxExportFailed(f"optimum wrote no model.onnx in {out_dir}")
    return model


def _export_module(network: Any, example_shape: tuple[int, ...], out: Path) -> Path:
    import torch

    torch.onnx.export(
        network, (torch.zeros(*example_shape),), str(out), input_names=["pixel_values"],
        output_names=["logits"], dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=OPSET, dynamo=False,
    )  # fmt: skip
    return out


def _opset(model: Path) -> int:
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    return max((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=OPSET)


# -- gates and precision --------------------------------------------------------------------------
def _parity(network: Any, fp32: ImageClassifier, images: list[Any], *, atol: float) -> float:
    """The largest |ONNX - PyTorch| logit over ``images``, both fed the device's own arrays."""
    import torch

    worst = 0.0
    agree = 0
    for start in range(0, len(images), BATCH):
        batch = images[start : start + BATCH]
        (pixels,) = fp32.feeds(batch).values()
        with torch.inference_mode():
            reference = network(torch.from_numpy(pixels)).float().numpy()
        actual = fp32.logits(batch)
        if actual.shape != reference.shape:
            raise ValidationFailed(f"ONNX output shape {actual.shape} differs from PyTorch's {reference.shape}")
        if not np.isfinite(actual).all():
            raise ValidationFailed("the ONNX model gives NaN or infinite logits on the validation images")
        worst = max(worst, float(np.abs(actual - reference).max()))
        agree += int((actual.argmax(-1) == reference.argmax(-1)).sum())
    if worst > atol:
        raise ValidationFailed(
            f"ONNX fp32 logits differ from PyTorch by up to {worst:.2e} on {len(images)} validation images "
            f"(tolerance {atol:.0e}); argmax agrees on {agree / len(images):.1%}"
        )
    return worst


def _predicted(classifier: ImageClassifier, images: list[Any]) -> list[str]:
    if not images:
        raise ValidationFailed("no validation images to measure accuracy on")
    return [p.label for i in range(0, len(images), BATCH) for p in classifier.predict(images[i : i + BATCH])]


def _convert(req: ImageExportRequest, fp32_model: Path, fp32: ImageClassifier) -> Path:
    """The model file to ship, in the requested precision."""
    if req.quantization == "static-int8":
        if not req.calibration_images:
            raise ExportError("static int8 needs calibration images (training images, as the device prepares them)")
        images = fp32.prepare(req.calibration_images, what="calibration images")
        batches = (fp32.feeds(images[i : i + BATCH]) for i in range(0, len(images), BATCH))
        return quantize_static_int8(fp32_model, req.work_dir / "model.int8.onnx", calibration=batches)
    if req.quantization == "fp16":
        return convert_fp16(fp32_model, req.work_dir / "model.fp16.onnx")
    return fp32_model
