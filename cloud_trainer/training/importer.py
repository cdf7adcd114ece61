"""Bring your own model: an existing image classifier becomes a registered, validated bundle.

The model is an ONNX file (from a model zoo, or a module the user exported with ``torch.onnx``) or
a PyTorch module named as ``package.module:factory`` that is exported here (torch.onnx, dynamic
batch axis, opset 17). Either way it is checked the way a device will run it:

1. ``onnx.checker`` on the file, then onnxruntime: one float input of rank 4 whose fixed dimensions
   agree with the declared preprocessing (layout, channels, height, width), a dynamic batch axis
   (the device batches requests), and a first output ``[batch, labels]``;
2. synthetic images (deterministic PNGs larger than the crop, landscape and portrait) run through
   the device's own decoder and preprocessing (:class:`edge_agent.runtime.ImageClassifier`) and
   must give finite outputs of the right shape; a module must match its ONNX export within 1e-4;
3. with a labelled image folder (``--calibration``), static int8 calibrated on a third of it and
   judged against fp32 on the rest by the quantization gate (:func:`export.gates.judge_quantization`);
4. golden vectors: the synthetic PNGs (as ``data:`` URLs) and the probabilities the bundle gives
   them, which every device reproduces before it serves the bundle.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cloud_trainer.errors import CloudTrainError
from edge_agent.protocol import ImagePreprocessing, Lineage, Manifest, sha256_file

OPSET = 17
INPUT_NAME, OUTPUT_NAME = "pixel_values", "logits"
PARITY_TOLERANCE = 1e-4
GOLDEN_IMAGES = 4
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_LABEL = re.compile(r"^[^\x00-\x1f]{1,100}$")
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class ModelImportError(CloudTrainError):
    """A model, labels file, preprocessing or calibration folder that cannot be imported as given."""


@dataclass(frozen=True, kw_only=True)
class ImportRequest:
    """An existing image classifier to register.

    Args:
        onnx_file: the ONNX model; or None with ``module``.
        module: ``package.module:factory``, a callable returning a ``torch.nn.Module`` (or the
            module itself), importable from the current directory; exported here.
        labels: class names in logit order.
        preprocessing: what the device does to an image before the model sees it.
        model: the name in the registry and the fleet.
        calibration: a folder with one sub-folder of images per label: quantize (static int8).
        max_accuracy_drop, max_f1_drop: the quantization gate's allowances.
    """

    onnx_file: Path | None = None
    module: str | None = None
    labels: list[str]
    preprocessing: ImagePreprocessing
    model: str
    calibration: Path | None = None
    max_accuracy_drop: float = 1.0
    max_f1_drop: float = 0.02


def read_labels(path: Path) -> list[str]:
    """Class names, one a line, in logit order (blank lines ignored); at least two, each once."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelImportError(f"cannot read labels file {path}: {exc}") from None
    labels = [line.strip() for line in lines if line.strip()]
    if len(labels) < 2:
        raise ModelImportError(f"labels file {path} has {len(labels)} label(s); a classifier needs at least 2")
    for number, label in enumerate(labels, 1):
        if not _LABEL.fullmatch(label):
            raise ModelImportError(f"labels file {path}: label {number} {label[:40]!r} is not 1-100 printable chars")
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ModelImportError(f"labels file {path} lists {', '.join(map(repr, duplicates[:5]))} more than once")
    return labels


def example_shape(pre: ImagePreprocessing) -> tuple[int, int, int, int]:
    if pre.layout == "NCHW":
        return (1, pre.channels, pre.height, pre.width)
    return (1, pre.height, pre.width, pre.channels)


# -- a PyTorch module, exported here --------------------------------------------------------------
def load_factory(reference: str) -> Callable[[], Any]:
    """The object that ``package.module:attribute`` names (the current directory is importable)."""
    import sys

    if not _FACTORY.fullmatch(reference):
        raise ModelImportError(f"--module {reference!r} is not package.module:factory")
    module_name, _, attribute = reference.partition(":")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelImportError(f"--module {reference}: cannot import {module_name}: {exc}") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ModelImportError(f"--module {reference}: {module_name} has no attribute {attribute}")
        target = getattr(target, part)
    if not callable(target):
        raise ModelImportError(f"--module {reference} is not callable")
    return target  # type: ignore[no-any-return]


def build_module(reference: str) -> Any:
    """The ``torch.nn.Module`` a factory returns (or the module itself), in eval mode, returning logits."""
    from torch import nn

    factory = load_factory(reference)
    network = factory if isinstance(factory, nn.Module) else factory()
    if not isinstance(network, nn.Module):
        raise ModelImportError(f"--module {reference} returned {type(network).__name__}, not a torch.nn.Module")
    return _Logits(network).eval()


def _logits_of(output: Any) -> Any:
    if hasattr(output, "logits"):  # transformers' ImageClassifierOutput and friends
        return output.logits
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def _Logits(network: Any) -> Any:  # noqa: N802 - builds a module class lazily, so torch loads only here
    from torch import nn

    class Logits(nn.Module):
        """The network, answering its logits tensor whatever it returns (a tensor, a tuple, a ModelOutput)."""

        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, pixels: Any) -> Any:
            return _logits_of(self.inner(pixels))

    return Logits(network)


def export_module(network: Any, pre: ImagePreprocessing, out: Path) -> Path:
    """torch.onnx export (TorchScript exporter, opset 17) with a dynamic batch axis."""
    import warnings

    import torch

    with warnings.catch_warnings():  # the exporter's deprecation and tracer warnings are not the user's
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                network.eval(), (torch.zeros(*example_shape(pre)),), str(out), input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=OPSET, dynamo=False,
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - torch.onnx raises many types; the user needs the message
            raise ModelImportError(f"torch.onnx could not export the module: {type(exc).__name__}: {exc}") from None
    return out


# -- checks ---------------------------------------------------------------------------------------
def checked_session(path: Path, shown: str) -> Any:
    """The model after ``onnx.checker``, loaded in onnxruntime (CPU); ``ModelImportError`` naming
    ``shown`` (what the messages call the model) when either refuses it."""
    import onnx
    import onnxruntime as ort

    def said(exc: BaseException) -> str:
        return (str(exc).replace(str(path), shown).strip().splitlines() or [type(exc).__name__])[0]

    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # noqa: BLE001 - onnx raises ValidationError, or others for a file that is not ONNX
        raise ModelImportError(f"{shown} fails onnx.checker: {said(exc)}") from None
    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types are not public API
        raise ModelImportError(f"onnxruntime cannot load {shown}: {said(exc)}") from None


def check_onnx(path: Path, pre: ImagePreprocessing, labels: list[str], *, name: str | None = None) -> dict[str, Any]:
    """onnx.checker, then the signature onnxruntime sees against the declared preprocessing and labels.
    ``name``: what the messages call the model (default: the file's name)."""
    import onnxruntime as ort

    shown = name or path.name
    session = checked_session(path, shown)
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        raise ModelImportError(f"{shown} has {len(inputs)} inputs {[i.name for i in inputs]}; image models take 1")
    model_input = inputs[0]
    if model_input.type != "tensor(float)":
        raise ModelImportError(f"input {model_input.name!r} is {model_input.type}; image models take tensor(float)")
    shape = list(model_input.shape)
    if len(shape) != 4:
        raise ModelImportError(f"input {model_input.name!r} has shape {shape}; an image batch has rank 4")
    if isinstance(shape[0], int):
        raise ModelImportError(
            f"input {model_input.name!r} has a fixed batch of {shape[0]}; the device batches requests: export "
            f"with a dynamic batch axis (torch.onnx.export(..., dynamic_axes={{{model_input.name!r}: {{0: 'batch'}}}}))"
        )
    declared = list(example_shape(pre)[1:])
    names = ["channels", "height", "width"] if pre.layout == "NCHW" else ["height", "width", "channels"]
    for axis, fixed, want in zip(names, shape[1:], declared, strict=True):
        if isinstance(fixed, int) and fixed != want:
            raise ModelImportError(
                f"input {model_input.name!r} has shape {shape} ({pre.layout}), but the declared preprocessing "
                f"gives {axis} {want}: check --size, --channels and --layout"
            )
    logits = outputs[0]
    out_shape = list(logits.shape)
    if len(out_shape) != 2:
        raise ModelImportError(f"output {logits.name!r} has shape {out_shape}; a classifier answers [batch, classes]")
    if isinstance(out_shape[1], int) and out_shape[1] != len(labels):
        raise ModelImportError(
            f"output {logits.name!r} has {out_shape[1]} classes, but the labels file has {len(labels)} labels"
        )
    return {"onnx_checker": "passed", "input": {"name": model_input.name, "shape": [str(d) for d in shape]},
            "output": {"name": logits.name, "shape": [str(d) for d in out_shape]},
            "onnxruntime": ort.__version__}  # fmt: skip


def synthetic_images(pre: ImagePreprocessing, *, count: int = GOLDEN_IMAGES, seed: int = 0) -> list[bytes]:
    """Deterministic PNGs for the golden vectors: colour blocks over gradients, landscape and
    portrait, larger than the model's input so resizing and cropping are exercised."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = pre.resize or max(pre.height, pre.width)
    mode = {1: "L", 3: "RGB"}.get(pre.channels)
    if mode is None:
        raise ModelImportError(f"models of {pre.channels} channels cannot take encoded images; use 1 or 3")
    images = []
    for index in range(count):
        long, short = base + base // 4 + 3 * index, base + index
        width, height = (long, short) if index % 2 == 0 else (short, long)
        blocks = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
        image = Image.fromarray(blocks).resize((width, height), Image.Resampling.NEAREST)
        gradient = np.linspace(0, 1, width, dtype=np.float32)[np.newaxis, :, np.newaxis]
        pixels = np.asarray(image, dtype=np.float32) * (0.5 + 0.5 * gradient)
        image = Image.fromarray(pixels.astype(np.uint8)).convert(mode)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


def read_image_folder(folder: Path, labels: list[str]) -> tuple[list[bytes], list[str]]:
    """Images (their bytes) and labels of a folder with one sub-folder per label."""
    if not folder.is_dir():
        raise ModelImportError(f"calibration folder {folder} does not exist")
    found = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in found if p.name not in labels]
    if unknown:
        raise ModelImportError(f"calibration folder {folder} has sub-folders {unknown[:5]} that are not labels")
    images, truth = [], []
    for sub in found:
        for path in sorted(sub.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                images.append(path.read_bytes())
                truth.append(sub.name)
    if len(images) < 6:
        raise ModelImportError(f"calibration folder {folder} has {len(images)} JPEG/PNG images; at least 6 are needed")
    return images, truth


# -- the bundle -----------------------------------------------------------------------------------
def build_import_bundle(req: ImportRequest, bundle_dir: Path, *, version: int, parent: int | None) -> Manifest:
    """Check, (quantize,) and write the bundle to ``bundle_dir``; the registry's ``build`` callback."""
    from edge_agent.runtime import ImageClassifier
    from export.bundle import record_golden, stage_bundle

    if (req.onnx_file is None) == (req.module is None):
        raise ModelImportError("give either an ONNX file or --module package.module:factory, not both or neither")
    with tempfile.TemporaryDirectory(prefix="edgeloop-import-") as tmp:
        work = Path(tmp)
        network = None
        if req.module is not None:
            network = build_module(req.module)
            fp32 = export_module(network, req.preprocessing, work / "model.fp32.onnx")
            base_model = f"module:{req.module}"
        else:
            assert req.onnx_file is not None
            if not req.onnx_file.is_file():
                raise ModelImportError(f"ONNX file {req.onnx_file} does not exist")
            fp32 = work / "model.fp32.onnx"
            shutil.copyfile(req.onnx_file, fp32)
            base_model = f"onnx:{req.onnx_file.name}"
        shown = req.onnx_file.name if req.onnx_file is not None else f"the export of {req.module}"
        report = check_onnx(fp32, req.preprocessing, req.labels, name=shown)
        report["source_sha256"] = sha256_file(fp32)
        lineage = Lineage(
            base_model=base_model, parent_version=parent,
            dataset_sha256=_folder_sha(req.calibration) if req.calibration else None,
            hyperparameters={"imported": str(req.module or req.onnx_file), "source_sha256": report["source_sha256"]},
        )  # fmt: skip
        common: dict[str, Any] = {"task": "image-classification", "preprocessing": req.preprocessing,
                                  "model": req.model, "version": version, "labels": req.labels,
                                  "opset": onnx_opset(fp32), "lineage": lineage}  # fmt: skip
        fp32_bundle = work / "bundle-fp32"
        staged = stage_bundle(fp32_bundle, model_file=fp32, quantization="none", **common)
        fp32_model = ImageClassifier(bundle_dir=fp32_bundle, manifest=staged, providers=["CPUExecutionProvider"])
        golden = synthetic_images(req.preprocessing)
        _check_outputs(fp32_model, golden, req.labels)
        if network is not None:
            report["parity_max_abs_diff"] = _parity(network, fp32_model, golden)
        metrics: dict[str, Any] = {"import": report}
        shipped, quantization = fp32, "none"
        if req.calibration is not None:
            shipped, gate = _quantize(req, fp32_model, work)
            quantization = "static-int8"
            metrics["export"] = {"quantization": quantization, "onnx_fp32_bytes": fp32.stat().st_size,
                                 "bundle_model_bytes": shipped.stat().st_size, **gate}  # fmt: skip
            metrics["bundle"] = {"accuracy": gate["gate"]["accuracy_candidate"],
                                 "macro_f1": gate["gate"]["macro_f1_candidate"], "split": "calibration-holdout",
                                 "examples": gate["gate"]["examples"]}  # fmt: skip
        manifest = stage_bundle(bundle_dir, model_file=shipped, quantization=quantization, **common)
        golden_urls = [_data_url(png) for png in golden]
        return record_golden(bundle_dir, manifest, golden_urls, metrics=metrics)


def onnx_opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=OPSET)


def _check_outputs(model: Any, images: list[bytes], labels: list[str]) -> None:
    try:
        logits = model.logits(images)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's failure, whatever its type, ends the import
        raise ModelImportError(f"onnxruntime cannot run the model on {len(images)} images: {exc}") from None
    if logits.shape != (len(images), len(labels)):
        raise ModelImportError(
            f"the model answers shape {list(logits.shape)} for {len(images)} images; expected "
            f"[{len(images)}, {len(labels)}] (one logit per label)"
        )
    if not np.isfinite(logits).all():
        raise ModelImportError("the model gives NaN or infinite outputs on synthetic images")


def _parity(network: Any, model: Any, images: list[bytes]) -> float:
    """The largest difference between PyTorch's and onnxruntime's logits on the same feeds."""
    import torch

    from export.errors import ValidationFailed

    feeds = model.feeds(images)
    with torch.inference_mode():
        reference = network(torch.from_numpy(next(iter(feeds.values())))).numpy()
    diff = float(np.abs(model.logits(images) - reference).max())
    if diff > PARITY_TOLERANCE:
        raise ValidationFailed(f"ONNX logits differ from PyTorch by up to {diff:.2e} (tolerance {PARITY_TOLERANCE})")
    return diff


def _quantize(req: ImportRequest, fp32_model: Any, work: Path) -> tuple[Path, dict[str, Any]]:
    """Static int8 calibrated on a seeded third of the folder, judged against fp32 on the rest."""
    from edge_agent.runtime import ImageClassifier
    from export.bundle import stage_bundle
    from export.gates import judge_quantization
    from export.quantize import quantize_static_int8

    assert req.calibration is not None
    images, truth = read_image_folder(req.calibration, req.labels)
    order = list(range(len(images)))
    random.Random(0).shuffle(order)
    cut = max(2, len(order) // 3)
    calibrate, hold = order[:cut], order[cut:]
    decoded = fp32_model.prepare(images, what=f"calibration images in {req.calibration}")
    batches = [fp32_model.feeds([decoded[i] for i in calibrate[s : s + 32]]) for s in range(0, len(calibrate), 32)]
    int8 = quantize_static_int8(work / "model.fp32.onnx", work / "model.int8.onnx", calibration=batches)
    manifest = stage_bundle(work / "bundle-int8", model_file=int8, quantization="static-int8",
                            **_common_of(fp32_model.manifest))  # fmt: skip
    candidate = ImageClassifier(bundle_dir=work / "bundle-int8", manifest=manifest, providers=["CPUExecutionProvider"])
    held = [decoded[i] for i in hold]
    reference_pred = [p.label for p in fp32_model.predict(held)]
    candidate_pred = [p.label for p in candidate.predict(held)]
    gate = judge_quantization(
        reference_pred, candidate_pred, [truth[i] for i in hold], req.labels, variant="static-int8",
        max_accuracy_drop_points=req.max_accuracy_drop, max_macro_f1_drop=req.max_f1_drop,
        split="calibration-holdout",
    )  # fmt: skip
    return int8, {"calibration_images": len(calibrate), "examples": len(hold), "gate": gate.to_dict()}


def _common_of(manifest: Manifest) -> dict[str, Any]:
    return {"task": manifest.task, "preprocessing": manifest.preprocessing, "model": manifest.model,
            "version": manifest.version, "labels": list(manifest.labels), "opset": manifest.opset,
            "lineage": manifest.lineage}  # fmt: skip


def _folder_sha(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            digest.update(str(path.relative_to(folder)).encode() + b"\0" + sha256_file(path).encode())
    return digest.hexdigest()


def _data_url(png: bytes) -> str:
    from edge_agent.runtime.imagecodec import data_url

    return data_url(png, "image/png")


def import_model(req: ImportRequest, *, registry: Any, version: int | None = None) -> Any:
    """Check and register ``req`` as ``req.model`` (the next version unless given); returns the ModelVersion."""

    def build(bundle_dir: Path, number: int, parent: int | None) -> Manifest:
        return build_import_bundle(req, bundle_dir, version=number, parent=parent)

    source = {"import": str(req.module or req.onnx_file), "calibration": str(req.calibration or "")}
    return registry.register(req.model, version=version, build=build, source=source)
