"""A tiny, real image classifier for fast tests, without torch: an ONNX graph (the mean colour of the
image, plus a small seeded 3x3 convolution) written into a bundle by the real bundle writer, with
golden PNGs recorded through the agent's own decoder. It runs in milliseconds in onnxruntime, so
tests of the device's image path (requests, health checks, sampling) need no training.

Labels are ``red``, ``green``, ``blue``: a solid colour gets its own name.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from edge_agent.protocol import ImagePreprocessing, Lineage, Manifest
from edge_agent.runtime.imagecodec import data_url
from export.bundle import GOLDEN_FILE, record_golden, stage_bundle, write_manifest

LABELS = ["red", "green", "blue"]
SIZE = 32
PRE = ImagePreprocessing(height=SIZE, width=SIZE, channels=3, resize=36, scale=1 / 255,
                         mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])  # fmt: skip


def colour_model(path: Path) -> Path:
    """logits = 4 x mean colour + 0.5 x (mean of relu(conv3x3(x))) x W, with seeded weights."""
    rng = np.random.default_rng(7)
    conv = rng.normal(0, 0.3, size=(3, 3, 3, 3)).astype(np.float32)
    mix = rng.normal(0, 1, size=(3, 3)).astype(np.float32) * 0.5
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["pixel_values"], ["pooled"], axes=[2, 3], keepdims=0),
            helper.make_node("MatMul", ["pooled", "colour"], ["by_colour"]),
            helper.make_node("Conv", ["pixel_values", "conv"], ["edges"], pads=[1, 1, 1, 1], strides=[2, 2]),
            helper.make_node("Relu", ["edges"], ["edges_relu"]),
            helper.make_node("ReduceMean", ["edges_relu"], ["edges_pooled"], axes=[2, 3], keepdims=0),
            helper.make_node("MatMul", ["edges_pooled", "mix"], ["by_edges"]),
            helper.make_node("Add", ["by_colour", "by_edges"], ["logits"]),
        ],
        "tiny_colour_cnn",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [
            numpy_helper.from_array(np.eye(3, dtype=np.float32) * 4, "colour"),
            numpy_helper.from_array(conv, "conv"),
            numpy_helper.from_array(mix, "mix"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def encode(pixels: np.ndarray[Any, Any], fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(
        buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {})
    )
    return buffer.getvalue()


def solid(colour: tuple[int, int, int], size: tuple[int, int] = (48, 40)) -> np.ndarray[Any, Any]:
    """An ``size`` (width, height) image of one colour, with a little seeded noise."""
    noise = np.random.default_rng(sum(colour)).integers(-12, 12, size=(size[1], size[0], 3))
    return np.clip(np.asarray(colour, dtype=np.int16) + noise, 0, 255).astype(np.uint8)


def noise(seed: int, size: tuple[int, int]) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)


def golden_images() -> list[str]:
    """Landscape and portrait PNGs, larger than the crop, as ``data:`` URLs."""
    images = [solid((220, 30, 30)), solid((20, 200, 40), (40, 56)), noise(3, (50, 44))]
    return [data_url(encode(pixels), "image/png") for pixels in images]


def make_colour_bundle(bundle_dir: Path, *, version: int = 1, model: str = "intents") -> Manifest:
    """An image-classification bundle of the tiny model, golden vectors recorded on the device's path."""
    work = bundle_dir.parent / f".{bundle_dir.name}-model"
    work.mkdir(parents=True, exist_ok=True)
    staged = stage_bundle(
        bundle_dir, model_file=colour_model(work / "model.onnx"), task="image-classification", preprocessing=PRE,
        model=model, version=version, labels=LABELS, opset=17, quantization="none",
        lineage=Lineage(base_model="tests.tinyimage"),
    )  # fmt: skip
    return record_golden(bundle_dir, staged, golden_images(), metrics={})


def rewrite_golden(bundle_dir: Path, *, inputs: list[Any] | None = None, probabilities: Any = None) -> Manifest:
    """Replace the golden vectors' inputs or probabilities and re-seal the manifest (sizes, sha256s):
    a bundle that verifies file by file and fails only its health check."""
    golden = json.loads((bundle_dir / GOLDEN_FILE).read_text())
    if inputs is not None:
        golden["inputs"] = inputs
    if probabilities is not None:
        golden["probabilities"] = probabilities
    (bundle_dir / GOLDEN_FILE).write_text(json.dumps(golden))
    manifest = Manifest.read(bundle_dir)
    return write_manifest(bundle_dir, manifest.model_dump(by_alias=False, exclude={"files"}))
