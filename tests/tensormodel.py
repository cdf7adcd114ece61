"""A small ONNX model that is not a classifier, for the ``tensor`` task's tests, built with onnx.helper
(no torch, nothing downloaded), and its bundle written by the real importer.

Two inputs, two outputs::

    features FP32 [batch, 4], offsets INT64 [batch, 3]
    scores   FP32 [batch, 3] = features @ W + table[offsets]      (MatMul, Gather)
    best     INT64 [batch]   = argmax(scores, axis 1)              (ArgMax)

``table`` has 4 entries, so an offset of 4 or more is valid INT64 input on which onnxruntime itself
fails (Gather's index out of range): the model's failure, not the caller's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_agent.protocol import Manifest

TABLE_SIZE = 4


def ranker_model(path: Path, *, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    weights = rng.normal(0, 1, size=(4, 3)).astype(np.float32)
    table = np.asarray([0.0, 0.5, -0.25, 2.0], dtype=np.float32) * (1 + seed)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["features", "W"], ["mixed"]),
            helper.make_node("Gather", ["table", "offsets"], ["bias"], axis=0),
            helper.make_node("Add", ["mixed", "bias"], ["scores"]),
            helper.make_node("ArgMax", ["scores"], ["best"], axis=1, keepdims=0),
        ],
        "ranker",
        [
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("offsets", TensorProto.INT64, ["batch", 3]),
        ],
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("best", TensorProto.INT64, ["batch"]),
        ],
        [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def reference(path: Path, feeds: dict[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
    """What plain onnxruntime answers, outside the agent."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def make_tensor_bundle(bundle_dir: Path, *, version: int = 1, model: str = "intents", seed: int = 0) -> Manifest:
    """The ranker imported as ``cloud-train import --task tensor`` would (random golden cases)."""
    from cloud_trainer.training.tensor_import import TensorImportRequest, build_tensor_bundle

    source = ranker_model(bundle_dir.parent / f"ranker-{version}.onnx", seed=seed)
    request = TensorImportRequest(onnx_file=source, model=model)
    return build_tensor_bundle(request, bundle_dir, version=version, parent=None)


def example_feeds(batch: int, *, seed: int = 1) -> dict[str, np.ndarray[Any, Any]]:
    rng = np.random.default_rng(seed)
    return {
        "features": rng.normal(0, 1, size=(batch, 4)).astype(np.float32),
        "offsets": rng.integers(0, TABLE_SIZE, size=(batch, 3)).astype(np.int64),
    }
