"""weight-int8: int8 weights in blocks (MatMulNBits) and int8 embeddings, activations quantized per row
and block, run by the device's own runtime, close to fp32 and a quarter of its size; the dynamic
int8 presets' weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from cloud_trainer.training.train import default_base_model
from edge_agent.protocol import Lineage
from edge_agent.runtime import TextClassifier
from export.bundle import stage_text_bundle
from export.errors import ExportError
from export.onnx_export import export_onnx, onnx_opset
from export.quantize import quantize_dynamic_preset, quantize_weights_int8

TEXTS = [
    "the tablets stopped my migraines within a week and I have had no side effects at all",
    "made me dizzy and sick, I stopped after three days",
    "it works but the weight gain is hard to live with",
    "ok",
    "I would not recommend this to anyone; my blood pressure went up and I could not sleep for a month",
] * 4


@pytest.fixture(scope="module")
def fp32_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small BERT classifier with the packaged MiniLM's tokenizer, exported to ONNX as the pipeline does."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    work = tmp_path_factory.mktemp("weight-int8")
    torch.manual_seed(0)
    config = BertConfig(  # type: ignore[no-untyped-call]
        vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=128, num_labels=3,
    )  # fmt: skip
    checkpoint = work / "checkpoint"
    BertForSequenceClassification(config).eval().save_pretrained(checkpoint)  # type: ignore[no-untyped-call]
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        source = Path(default_base_model()) / name
        if source.is_file():
            shutil.copy(source, checkpoint / name)
    return export_onnx(checkpoint, work / "onnx")


def _classifier(model_file: Path, bundle_dir: Path, quantization: str, fp32_model: Path) -> TextClassifier:
    manifest = stage_text_bundle(
        bundle_dir, model_file=model_file, tokenizer_file=fp32_model.parent / "tokenizer.json",
        quantization=quantization, model="t", version=1, labels=["a", "b", "c"], max_length=64,
        truncation="head", head_tokens=0, opset=onnx_opset(fp32_model), lineage=Lineage(base_model="tiny-bert"),
    )  # fmt: skip
    return TextClassifier(bundle_dir=bundle_dir, manifest=manifest, providers=["CPUExecutionProvider"])


def _scores(classifier: TextClassifier) -> np.ndarray:
    return np.array([[p.scores[label] for label in ("a", "b", "c")] for p in classifier.predict(TEXTS)])


def test_weight_int8_is_a_quarter_of_fp32_and_stays_close_to_it(
    fp32_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shipped = quantize_weights_int8(fp32_model, tmp_path / "model.weight-int8.onnx")
    assert "pre-processing" not in caplog.text  # onnxruntime's advice for activation ranges, not printed on export
    graph = onnx.load(str(shipped)).graph
    ops = {node.op_type for node in graph.node}
    assert "MatMulNBits" in ops  # every encoder weight in int8 blocks
    weights = {init.name for init in graph.initializer}
    fp32_weights = [node.name for node in graph.node if node.op_type == "MatMul" and node.input[1] in weights]
    # what stays fp32 are the Gemms of the head (the classifier, and the [CLS] pooler a mean-pooling model has not)
    assert all(name.endswith("Gemm_MatMul") for name in fp32_weights), fp32_weights
    assert "DequantizeLinear" in ops  # the int8 embedding tables
    assert shipped.stat().st_size < 0.35 * fp32_model.stat().st_size

    fp32 = _scores(_classifier(fp32_model, tmp_path / "fp32", "none", fp32_model))
    weights = _scores(_classifier(shipped, tmp_path / "w8", "weight-int8", fp32_model))
    dynamic_file = quantize_dynamic_preset(fp32_model, tmp_path / "model.int8.onnx", target="avx2")
    dynamic = _scores(_classifier(dynamic_file, tmp_path / "d8", "dynamic-int8", fp32_model))
    assert np.abs(weights - fp32).max() < 0.01
    # activation scales per row and block: much closer to fp32 than one scale per batch (dynamic int8)
    assert np.abs(weights - fp32).mean() < np.abs(dynamic - fp32).mean()


def test_weight_int8_refuses_a_graph_with_no_weights_to_quantize(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )  # fmt: skip
    model = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    with pytest.raises(ExportError, match="no MatMul weight"):
        quantize_weights_int8(model, tmp_path / "out.onnx")


def test_a_weight_int8_answer_does_not_depend_on_the_batch_but_a_dynamic_int8_one_can(
    fp32_model: Path, tmp_path: Path
) -> None:
    """weight-int8 quantizes each row of activations per block; dynamic int8 takes one scale for the
    whole batch, so a long text beside a short one moves the short one's probabilities."""
    shipped = quantize_weights_int8(fp32_model, tmp_path / "model.weight-int8.onnx")
    dynamic_file = quantize_dynamic_preset(fp32_model, tmp_path / "model.int8.onnx", target="avx2")
    moved = {}
    for name, path, quantization in (("w8", shipped, "weight-int8"), ("d8", dynamic_file, "dynamic-int8")):
        classifier = _classifier(path, tmp_path / name, quantization, fp32_model)
        one_by_one = [p for text in TEXTS for p in classifier.predict([text])]
        alone = np.array([[p.scores[label] for label in ("a", "b", "c")] for p in one_by_one])
        together = _scores(classifier)
        moved[name] = float(np.abs(alone - together).max())
    assert moved["w8"] < 1e-4, moved
    assert moved["d8"] > 10 * moved["w8"], moved
