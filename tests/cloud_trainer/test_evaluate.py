"""``cloud-train evaluate``: the device's labels, metrics beside the majority baseline, clear refusals."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from cloud_trainer.cli import main
from cloud_trainer.errors import CloudTrainError
from cloud_trainer.releases.registry import Registry
from cloud_trainer.training.evaluate import evaluate_predictions, evaluate_source, format_report, open_source
from cloud_trainer.training.metrics import classification_metrics
from edge_agent.protocol import Manifest
from edge_agent.runtime import load_classifier
from tests.tinymodel import LABELS, make_tiny_bundle

# What the tiny bag-of-words model says (on/dark push to lights_on, off/bright to lights_off; a tie
# goes to the first label), and what a careful labeller says: three of eight disagree.
CASES = [
    ("turn on the lights", "lights_on", "lights_on"),
    ("switch off", "lights_off", "lights_off"),
    ("it is dark", "lights_on", "lights_on"),
    ("too bright", "lights_off", "lights_off"),
    ("turn the lights", "lights_off", "lights_on"),  # no signal word: a tie
    ("Turn ON the lights", "lights_off", "lights_on"),  # the tokenizer is cased: ON is unknown
    ("off off on", "lights_off", "lights_on"),
    ("dark dark but off", "lights_on", "lights_on"),
]


def registered(tmp_path: Path) -> Path:
    root = tmp_path / "registry"
    Registry(root).register("intents", version=None, build=lambda d, v, _p: make_tiny_bundle(d, version=v))
    return root


def test_a_registered_bundle_is_scored_with_the_agents_own_labels(tmp_path: Path) -> None:
    root = registered(tmp_path)
    texts = [text for text, _, _ in CASES] * 5  # 40 texts: two batches of 32 and 8
    truth = [label for _, _, label in CASES] * 5
    bundle = Registry(root).get("intents", 1).bundle_dir
    agent = load_classifier(bundle, Manifest.read(bundle), providers=["CPUExecutionProvider"])
    served = [p.label for p in agent.predict(texts)]
    assert served == [label for _, label, _ in CASES] * 5  # the model is what this test thinks it is

    assert open_source("intents:1", registry_root=root).predict(texts) == served
    report = evaluate_source("intents", texts, truth, registry_root=root)  # newest version
    expected = classification_metrics(served, truth, labels=LABELS)
    assert {k: report[k] for k in expected} == expected
    assert report["accuracy"] == pytest.approx(5 / 8)
    about = ("source", "kind", "model", "version", "quantization")
    assert [report[k] for k in about] == ["intents", "registry", "intents", 1, "none"]
    assert report["examples"] == 40
    assert report["majority_baseline"] == {"label": "lights_on", "accuracy": 0.75, "macro_f1": pytest.approx(3 / 7)}
    assert report["beats_majority"] is False  # 5/8 < 6/8, although macro-F1 is better
    assert report["never_predicted"] == []
    assert report["latency_ms_per_text"] > 0
    assert "WARNING: the model does NOT beat the majority baseline" in format_report(report)

    # the bundle directory itself gives the same report, named as a bundle
    direct = evaluate_source(str(bundle), texts, truth, registry_root=tmp_path / "elsewhere")
    assert direct["kind"] == "bundle"
    assert {k: direct[k] for k in expected} == expected


def test_a_one_class_model_is_flagged_against_the_majority_baseline() -> None:
    truth = ["lights_on"] * 3 + ["lights_off"]
    lazy = evaluate_predictions(["lights_on"] * 4, truth, labels=LABELS, seconds=0.002)
    assert lazy["majority_baseline"] == {"label": "lights_on", "accuracy": 0.75, "macro_f1": pytest.approx(3 / 7)}
    assert lazy["accuracy"] == 0.75
    assert lazy["beats_majority"] is False
    assert lazy["never_predicted"] == ["lights_off"]
    assert lazy["latency_ms_per_text"] == pytest.approx(0.5)
    text = format_report(lazy)
    assert "majority baseline (always 'lights_on'): accuracy 0.750   macro-F1 0.429" in text
    assert "latency 0.500 ms per text" in text
    warnings = [line for line in text.splitlines() if line.startswith("WARNING:")]
    assert len(warnings) == 2
    assert "NOT beat the majority baseline" in warnings[0]
    assert "NEVER predicts lights_off" in warnings[1]

    good = evaluate_predictions(["lights_on"] * 3 + ["lights_off"], truth, labels=LABELS, seconds=0.002)
    assert good["beats_majority"] is True
    assert good["never_predicted"] == []
    assert "WARNING" not in format_report(good)


def test_ties_in_the_majority_go_to_the_first_label_and_absent_labels_are_named() -> None:
    labels = ["a", "b", "c"]
    report = evaluate_predictions(["b", "a"], ["b", "a"], labels=labels, seconds=0.0)
    assert report["majority_baseline"]["label"] == "a"
    assert report["labels_without_examples"] == ["c"]
    assert report["never_predicted"] == []  # c has no examples; not predicting it is no fault
    assert "no test examples of: c" in format_report(report)


def test_unknown_labels_in_the_test_data_are_refused_by_name(tmp_path: Path) -> None:
    root = registered(tmp_path)
    with pytest.raises(CloudTrainError, match=r"label\(s\) the model does not know: lights_dim, radio_on"):
        evaluate_source("intents:1", ["dim it", "radio", "off"], ["lights_dim", "radio_on", "lights_off"],
                        registry_root=root)  # fmt: skip
    with pytest.raises(CloudTrainError, match="does not know: lights_dim"):
        evaluate_predictions(["lights_on"], ["lights_dim"], labels=LABELS, seconds=0.0)


def test_a_bad_source_names_what_was_tried(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = registered(tmp_path)
    with pytest.raises(CloudTrainError, match=r"'intents:7': not a bundle or training run directory.*not registered"):
        evaluate_source("intents:7", ["on"], ["lights_on"], registry_root=root)
    with pytest.raises(CloudTrainError, match=r"'runs/none': not a bundle or training run directory.*registered"):
        evaluate_source("runs/none", ["on"], ["lights_on"], registry_root=root)
    with pytest.raises(CloudTrainError, match=r"neither manifest\.json \(a bundle\) nor run\.json"):
        evaluate_source(str(tmp_path), ["on"], ["lights_on"], registry_root=root)

    data = tmp_path / "test.csv"
    data.write_text("text,label\nturn on,lights_on\nswitch off,lights_off\n")
    assert main(["evaluate", "radio:1", "--data", str(data), "--registry", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot evaluate 'radio:1'")
    assert err.count("\n") == 1


def test_a_damaged_bundle_is_refused(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    make_tiny_bundle(bundle, version=1)
    (bundle / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(CloudTrainError, match=r"bundle .*'model\.onnx' has 11 bytes"):
        evaluate_source(str(bundle), ["on"], ["lights_on"], registry_root=tmp_path)


def test_json_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = registered(tmp_path)
    data = tmp_path / "test.csv"
    with data.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["utterance", "intent"])
        writer.writerows((text, label) for text, _, label in CASES)
    common = ["evaluate", "intents:1", "--data", str(data), "--text-column", "utterance", "--label-column", "intent"]

    assert main([*common, "--registry", str(root), "--json", "-"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["data"] == str(data)
    assert report["accuracy"] == pytest.approx(5 / 8)
    assert report["confusion_matrix"]["rows_actual_cols_predicted"] == [[2, 0], [3, 3]]
    assert "WARNING: the model does NOT beat the majority baseline" in err

    out_file = tmp_path / "report.json"
    assert main([*common, "--registry", str(root), "--json", str(out_file)]) == 0
    out, _ = capsys.readouterr()
    assert json.loads(out_file.read_text())["majority_baseline"]["label"] == "lights_on"
    assert out.startswith("source: intents:1 (registry; intents v1, quantization none)")
    assert out.rstrip().endswith(f"report: {out_file}")


def _tiny_bert_run(run_dir: Path, tokenizer_file: Path, *, preprocessing: dict[str, object] | None) -> None:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(4)  # wide random weights: labels that hang on case, truncation and the padding mask
    sizes = {"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 16, "max_position_embeddings": 32}  # fmt: skip
    config = BertConfig(**sizes, num_labels=2, pad_token_id=0, initializer_range=1.0)  # type: ignore[no-untyped-call]
    BertForSequenceClassification(config).save_pretrained(run_dir / "checkpoint")  # type: ignore[no-untyped-call]
    shutil.copy(tokenizer_file, run_dir / "checkpoint" / "tokenizer.json")
    info: dict[str, object] = {"labels": LABELS, "hyperparameters": {"max_length": 16}}
    if preprocessing is not None:
        info["preprocessing"] = preprocessing
    (run_dir / "run.json").write_text(json.dumps(info))


@pytest.mark.parametrize("preprocessing", [None, {"tokenizer": "tokenizer.json", "max_length": 3, "lowercase": True}])
def test_a_training_run_is_scored_in_torch_with_the_edge_preprocessing(
    tmp_path: Path, preprocessing: dict[str, object] | None
) -> None:
    import torch
    from tokenizers import Tokenizer
    from transformers import BertForSequenceClassification

    make_tiny_bundle(tmp_path / "bundle", version=1)
    run_dir = tmp_path / "run"
    _tiny_bert_run(run_dir, tmp_path / "bundle" / "tokenizer.json", preprocessing=preprocessing)
    texts = ["DARK", "dark", "BRIGHT", "ON", "on", "OFF", "off", "SWITCH", "THE lights", "turn", "lights", "the",
             "turn on the lights switch off the lights dark bright on off the lights"] * 3  # fmt: skip
    # One text at a time, unpadded: what the batched, padded, masked run must reproduce.
    tokenizer = Tokenizer.from_file(str(run_dir / "checkpoint" / "tokenizer.json"))
    model = BertForSequenceClassification.from_pretrained(str(run_dir / "checkpoint")).eval()
    expected = []
    for text in texts:
        ids = tokenizer.encode(text).ids[:16] if preprocessing is None else tokenizer.encode(text.lower()).ids[:3]
        with torch.no_grad():
            expected.append(LABELS[int(model(input_ids=torch.tensor([ids])).logits.argmax())])
    assert set(expected) == set(LABELS)

    truth = ["lights_on", "lights_off", "lights_on"] * 13
    report = evaluate_source(str(run_dir), texts, truth, registry_root=tmp_path)
    assert open_source(str(run_dir), registry_root=tmp_path).predict(texts) == expected
    assert report["kind"] == "run"
    assert "version" not in report
    assert report["accuracy"] == classification_metrics(expected, truth, labels=LABELS)["accuracy"]
    assert format_report(report).startswith(f"source: {run_dir} (run)")
