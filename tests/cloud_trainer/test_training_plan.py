"""The training plan and its parts, without training a model: max length and truncation from the
data, class weights in the loss, the best epoch restored, head+tail applied the same way on the
device; all in milliseconds."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cloud_trainer.training.fit import BestEpoch, WeightedLossTrainer, weighted_cross_entropy
from cloud_trainer.training.plan import (
    balanced_class_weights,
    choose_max_length,
    is_imbalanced,
    majority_baseline,
    percentile,
)
from edge_agent.protocol import Lineage, TextPreprocessing
from edge_agent.runtime import load_classifier
from edge_agent.runtime.text import TextEncoder
from tests import tinymodel


def test_max_length_follows_the_texts_and_is_capped() -> None:
    short = [8, 9, 10, 11, 12] * 20
    choice = choose_max_length(short, model_limit=512)
    assert choice.max_length == 32  # p95 is 12: at least 32
    assert choice.truncation == "head"
    assert choice.truncated_share == 0

    reviews = [100] * 95 + [300] * 5  # p95 = 110
    choice = choose_max_length(reviews, model_limit=512)
    assert choice.max_length == 112
    assert choice.truncated_share == pytest.approx(0.05)
    assert choice.truncation == "head+tail"  # over 1 % of texts are cut
    assert choice.head_tokens == 28

    assert choose_max_length(list(range(100, 1000)), model_limit=512).max_length == 256  # the speed budget
    assert choose_max_length(list(range(100, 1000)), model_limit=128).max_length == 128  # the model's limit
    assert choose_max_length(reviews, model_limit=512, requested=64, truncation="head").max_length == 64
    with pytest.raises(ValueError, match="above the model's limit"):
        choose_max_length(reviews, model_limit=128, requested=300)
    assert percentile([1, 2, 3, 4], 50) == 2.5


def test_class_weights_balance_what_each_class_contributes() -> None:
    labels = ["pos"] * 64 + ["neg"] * 27 + ["neu"] * 9
    names = ["neg", "neu", "pos"]
    weights = balanced_class_weights(labels, names)
    assert is_imbalanced(labels)
    assert not is_imbalanced(["a", "b"] * 10)
    # every class contributes the same total weight: count * weight == n / k
    for name, weight in zip(names, weights, strict=True):
        assert labels.count(name) * weight == pytest.approx(len(labels) / len(names))
    with pytest.raises(ValueError, match="no training examples of neu"):
        balanced_class_weights(["pos", "neg"], names)


def test_the_loss_is_weighted_as_intended() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 3.0], [1.0, 1.0, 1.0]])
    labels = torch.tensor([0, 1, 2, 2])
    weights = torch.tensor([1.0, 4.0, 0.5])
    per_example = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    w = weights[labels]
    expected = (per_example * w).sum() / w.sum()
    assert weighted_cross_entropy(logits, labels, weights).item() == pytest.approx(expected.item())
    assert weighted_cross_entropy(logits, labels, None).item() == pytest.approx(per_example.mean().item())
    # the trainer's loss is that function, with its weights
    trainer = WeightedLossTrainer.__new__(WeightedLossTrainer)
    trainer.class_weights = weights
    loss = trainer.compute_loss(
        lambda **_: SimpleNamespace(logits=logits),  # type: ignore[arg-type]
        {"labels": labels, "input_ids": torch.zeros(4, 2)},
    )
    assert loss.item() == pytest.approx(expected.item())


def _evaluate(callback: BestEpoch, model: torch.nn.Module, value: float, epoch: int) -> SimpleNamespace:
    control = SimpleNamespace(should_training_stop=False, should_evaluate=False)
    args = SimpleNamespace(num_train_epochs=10, max_steps=-1)
    state = SimpleNamespace(epoch=float(epoch))
    metrics = {"eval_loss": 1.0 - value, "eval_accuracy": value, "eval_macro_f1": value}
    callback.on_evaluate(args, state, control, metrics=metrics, model=model)  # type: ignore[arg-type]
    return control


def test_early_stopping_restores_the_best_epoch() -> None:
    lines: list[str] = []
    callback = BestEpoch(metric="macro_f1", patience=2, budget_s=None, say=lines.append)
    model = torch.nn.Linear(2, 2)
    controls = []
    for epoch, value in enumerate([0.40, 0.70, 0.65, 0.60, 0.90], start=1):
        with torch.no_grad():
            model.weight.fill_(epoch)  # the weights "of" this epoch
        controls.append(_evaluate(callback, model, value, epoch))
        if controls[-1].should_training_stop:
            break
    assert len(controls) == 4  # two epochs without improvement after epoch 2
    assert "no better macro_f1 for 2 epochs" in callback.stop_reason
    assert callback.best_epoch == 2
    callback.restore_best(model)
    assert torch.all(model.weight == 2)
    assert sum("* best" in line for line in lines) == 2
    assert lines[0].startswith("epoch 1/10") and "macro-F1 0.400" in lines[0]

    by_loss = BestEpoch(metric="loss", patience=0, budget_s=None, say=lines.append)
    for epoch, value in enumerate([0.4, 0.9, 0.5], start=1):
        assert not _evaluate(by_loss, model, value, epoch).should_training_stop  # patience 0: never stops
    assert by_loss.best_epoch == 2  # loss 0.1 is the lowest


def test_head_plus_tail_keeps_the_end_of_a_long_text(tmp_path: Path) -> None:
    manifest = tinymodel.make_tiny_bundle(tmp_path / "head", version=1)
    tokenizer = tmp_path / "head" / "tokenizer.json"
    # 6 filler words then the verdict: "on" at the end pushes to lights_on
    text = "the the the the the the turn on"
    head = TextEncoder.from_file(tokenizer, TextPreprocessing(tokenizer="t", max_length=4))
    both = TextEncoder.from_file(
        tokenizer, TextPreprocessing(tokenizer="t", max_length=4, truncation="head+tail", head_tokens=1)
    )
    words = tinymodel.WORDS
    assert [words[i] for i in head.encode([text])["input_ids"][0]] == ["the", "the", "the", "the"]
    assert [words[i] for i in both.encode([text])["input_ids"][0]] == ["the", "the", "turn", "on"]
    assert both.lengths([text, "on"]) == [4, 1]
    batch = both.encode([text, "on"])
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]  # padded to the longest only
    huge = "off " + "the " * 200_000 + "on"  # bounded before tokenizing, and still head plus tail
    assert [words[i] for i in both.encode([huge])["input_ids"][0]] == ["off", "the", "the", "on"]

    # the device applies what the manifest says
    from export.bundle import record_golden, stage_text_bundle

    scratch = tmp_path / "src"
    scratch.mkdir()
    (scratch / "model.onnx").write_bytes((tmp_path / "head" / "model.onnx").read_bytes())
    staged = stage_text_bundle(
        tmp_path / "tail", model_file=scratch / "model.onnx", tokenizer_file=tokenizer, model="intents", version=2,
        labels=tinymodel.LABELS, max_length=4, truncation="head+tail", head_tokens=1, opset=17, quantization="none",
        lineage=Lineage(base_model="tiny"),
    )  # fmt: skip
    staged = record_golden(tmp_path / "tail", staged, [text], metrics={})
    assert staged.preprocessing.truncation == "head+tail"  # type: ignore[union-attr]
    cut_head = load_classifier(tmp_path / "head", manifest, providers=["CPUExecutionProvider"])
    cut_both = load_classifier(tmp_path / "tail", staged, providers=["CPUExecutionProvider"])
    long_text = " ".join(["the"] * 20 + ["turn", "on"])
    assert cut_both.predict([long_text])[0].label == "lights_on"
    assert cut_head.predict([long_text])[0].scores["lights_on"] == pytest.approx(0.5)  # it never saw "on"


def test_head_plus_tail_needs_room_for_the_tail() -> None:
    with pytest.raises(ValueError, match="head_tokens must be below max_length"):
        TextPreprocessing(tokenizer="t", max_length=4, truncation="head+tail", head_tokens=4)


def test_majority_baseline() -> None:
    baseline = majority_baseline(["a", "a", "b"], ["a", "b", "b", "c"])
    assert baseline["label"] == "a"
    assert baseline["accuracy"] == 0.25
    assert baseline["macro_f1"] == pytest.approx((2 * 0.25 / 1.25) / 3)


def test_the_linear_probe_fits_the_head_on_frozen_features() -> None:
    from cloud_trainer.training.fit import linear_probe

    torch.manual_seed(0)

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = torch.nn.Linear(4, 8)
            self.dropout = torch.nn.Dropout(0.5)
            self.classifier = torch.nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(self.dropout(torch.tanh(self.encoder(x))))

    model = Tiny().train()
    centers = torch.eye(3, 4) * 4
    labels = torch.tensor([0, 1, 2] * 20)
    x = centers[labels] + 0.3 * torch.randn(60, 4)
    encoder_before = model.encoder.weight.clone()
    accuracy = linear_probe(model, [{"x": x[:32]}, {"x": x[32:]}], labels, [1.0, 1.0, 1.0])
    assert accuracy == 1.0
    assert model.training  # put back as it was
    assert torch.equal(model.encoder.weight, encoder_before)  # only the head changed
    model.eval()
    assert (model(x).argmax(-1) == labels).all()
    assert linear_probe(torch.nn.Sequential(torch.nn.Linear(2, 2)), [], labels, None) is None


def test_the_head_learns_at_its_own_rate(tmp_path: Path) -> None:
    from transformers import TrainingArguments

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = torch.nn.Linear(4, 8)
            self.classifier = torch.nn.Linear(8, 3)

    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-4, weight_decay=0.01, report_to=[])
    trainer = WeightedLossTrainer(model=Tiny(), args=args, head_learning_rate=1e-3)
    optimizer = trainer.create_optimizer()
    rates = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    model = trainer.model
    assert model is not None
    for name, parameter in model.named_parameters():
        assert rates[id(parameter)] == (1e-3 if name.startswith("classifier.") else 1e-4), name
    decays = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    assert decays[id(model.classifier.bias)] == 0.0  # type: ignore[union-attr]
    assert decays[id(model.classifier.weight)] == 0.01  # type: ignore[union-attr]
