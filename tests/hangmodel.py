"""A tiny bundle whose model hangs on one word: a real way to make the inference worker hang.

The graph is the tiny bag-of-words classifier plus an ONNX ``Loop`` whose trip count is
10^15 times the number of ``dark`` tokens in the input. Texts without ``dark`` (the golden
vectors among them) run the loop zero times and answer at once, so the bundle passes the
health check and serves; a text with ``dark`` runs onnxruntime for days. Nothing in the agent
is told about it: the hang is in the model, where a real one would be.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_agent.protocol import Manifest
from export.bundle import write_manifest
from tests.tinymodel import WORDS, make_tiny_bundle

HANG_WORD = "dark"


def _add_hang(path: Path) -> None:
    model = onnx.load(str(path))
    graph = model.graph
    for node in graph.node:  # the classifier's result becomes "raw"; "logits" is rebuilt below
        node.output[:] = ["raw" if out == "logits" else out for out in node.output]
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.array(1.0, np.float32))),
            helper.make_node("Add", ["v_in", "one"], ["v_out"]),
        ],
        "spin",
        [
            helper.make_tensor_value_info("iteration", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, []),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, []),
        ],
    )
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(WORDS.index(HANG_WORD), np.int64), "hang_id"),
            numpy_helper.from_array(np.array(10**15, np.int64), "forever"),
            numpy_helper.from_array(np.array(True), "keep_going"),
            numpy_helper.from_array(np.array(0.0, np.float32), "v0"),
            numpy_helper.from_array(np.array(0.0, np.float32), "nought"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("Equal", ["input_ids", "hang_id"], ["is_hang"]),
            helper.make_node("Cast", ["is_hang"], ["hang_i"], to=TensorProto.INT64),
            helper.make_node("ReduceSum", ["hang_i"], ["hangs"], keepdims=0),
            helper.make_node("Mul", ["hangs", "forever"], ["trips"]),
            helper.make_node("Loop", ["trips", "keep_going", "v0"], ["spun"], body=body),
            helper.make_node("Mul", ["spun", "nought"], ["nothing"]),
            helper.make_node("Add", ["raw", "nothing"], ["logits"]),
        ]
    )
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def make_hanging_bundle(bundle_dir: Path, *, version: int) -> Manifest:
    """The tiny classifier's bundle, its model replaced by one that never finishes on ``dark``."""
    manifest = make_tiny_bundle(bundle_dir, version=version)
    _add_hang(bundle_dir / "model.onnx")
    return write_manifest(bundle_dir, manifest.model_dump(exclude={"files"}))
