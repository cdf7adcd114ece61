"""A tiny, real text classifier for fast tests: a WordLevel tokenizer and a bag-of-words ONNX graph.

It runs in real onnxruntime through the agent's own runtime, and its bundle is written by the
real bundle writer (``export.bundle``), so the tests exercise the same files a trained model
produces, in a second instead of a minute. The slow tests use a fine-tuned MiniLM.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, models, pre_tokenizers

from edge_agent.protocol import Lineage, Manifest
from export.bundle import record_golden, stage_text_bundle

LABELS = ["lights_off", "lights_on"]
WORDS = ["[PAD]", "[UNK]", "turn", "on", "off", "the", "lights", "switch", "dark", "bright"]
# Which words push towards which label (rows: vocab, cols: labels).
_WEIGHTS = {"on": (0.0, 3.0), "off": (3.0, 0.0), "dark": (0.0, 2.0), "bright": (2.0, 0.0)}


def _tokenizer(path: Path) -> None:
    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


def _onnx_model(path: Path, *, scale: float = 1.0, nan: bool = False, fragile: bool = False) -> None:
    """logits = sum over tokens of W[input_ids], masked by attention_mask.

    ``fragile`` adds a lookup in a table that only covers the first six words: the model passes
    golden vectors made of those words and fails in onnxruntime on any text with another word.
    """
    weights = np.zeros((len(WORDS), len(LABELS)), dtype=np.float32)
    for word, row in _WEIGHTS.items():
        weights[WORDS.index(word)] = row
    weights *= scale
    if nan:
        weights[:] = np.nan
    nodes = [
        helper.make_node("Gather", ["W", "input_ids"], ["emb"], axis=0),  # [B, S, L]
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "axis2"], ["mask3"]),
        helper.make_node("Mul", ["emb", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["logits" if not fragile else "raw"], keepdims=0),
    ]
    extra = []
    if fragile:
        nodes += [
            helper.make_node("Gather", ["W_small", "input_ids"], ["small"], axis=0),
            helper.make_node("ReduceSum", ["small", "axis1"], ["small_sum"], keepdims=0),
            helper.make_node("Mul", ["small_sum", "zero"], ["nothing"]),
            helper.make_node("Add", ["raw", "nothing"], ["logits"]),
        ]
        extra = [
            numpy_helper.from_array(np.ones((6, len(LABELS)), dtype=np.float32), "W_small"),
            numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        ]
    graph = helper.make_graph(
        nodes,
        "tiny-bow",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(LABELS)])],
        initializer=[
            numpy_helper.from_array(weights, "W"),
            numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
            *extra,
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def make_tiny_bundle(
    bundle_dir: Path,
    *,
    version: int,
    model: str = "intents",
    scale: float = 1.0,
    nan: bool = False,
    fragile: bool = False,
    padding: int = 0,
) -> Manifest:
    """Write a complete, verified bundle of the tiny classifier into ``bundle_dir``.

    ``padding`` adds a file of that many random bytes, to make transfers span many chunks.
    """
    scratch = bundle_dir.parent / f".{bundle_dir.name}-src"
    scratch.mkdir(parents=True, exist_ok=True)
    _tokenizer(scratch / "tokenizer.json")
    _onnx_model(scratch / "model.onnx", scale=scale, fragile=fragile)
    manifest = stage_text_bundle(
        bundle_dir,
        model_file=scratch / "model.onnx",
        tokenizer_file=scratch / "tokenizer.json",
        model=model,
        version=version,
        labels=LABELS,
        max_length=16,
        opset=17,
        quantization="none",
        lineage=Lineage(base_model="tiny-bag-of-words"),
    )
    if padding:
        (bundle_dir / "padding.bin").write_bytes(np.random.default_rng(version).bytes(padding))
    golden = ["turn on", "turn off the"] if fragile else ["turn on the lights", "switch off"]
    manifest = record_golden(bundle_dir, manifest, golden, metrics={"accuracy": 1.0})
    if nan:
        # The golden vectors stay those of a healthy model; the served weights turn to NaN.
        _onnx_model(bundle_dir / "model.onnx", scale=scale, nan=True)
        from export.bundle import write_manifest

        fields = manifest.model_dump(exclude={"files"})
        manifest = write_manifest(bundle_dir, fields)
    return manifest
