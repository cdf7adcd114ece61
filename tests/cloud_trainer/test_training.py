"""Fine-tuning behaviour on the real MiniLM: a fixed seed reproduces the model; --freeze-base trains
only the head; the accuracy gate fails with both numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.numpy import load_file

from cloud_trainer.training.data import PACKAGED_DATASET, load_labelled, stratified_split
from cloud_trainer.training.runs import export_run, train_run
from cloud_trainer.training.train import TrainConfig, default_base_model, train_text_classifier
from export.errors import AccuracyGateFailed

pytestmark = pytest.mark.slow


def _weights(checkpoint: Path) -> dict[str, object]:
    return dict(load_file(str(checkpoint / "model.safetensors")))


def test_same_seed_same_model_and_frozen_base(tmp_path: Path) -> None:
    train, val = stratified_split(load_labelled(PACKAGED_DATASET), val_fraction=0.2, seed=1)
    config = TrainConfig(max_steps=4, progress=False, seed=3)
    a = _weights(train_text_classifier(train, val, out_dir=tmp_path / "a", config=config).checkpoint)
    b = _weights(train_text_classifier(train, val, out_dir=tmp_path / "b", config=config).checkpoint)
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a)  # type: ignore[attr-defined]

    frozen_config = TrainConfig(max_steps=4, progress=False, seed=3, freeze_base=True)
    frozen = _weights(train_text_classifier(train, val, out_dir=tmp_path / "f", config=frozen_config).checkpoint)
    base = dict(load_file(str(Path(default_base_model()) / "model.safetensors")))
    encoder = [k for k in frozen if k.startswith("bert.encoder.")]
    assert encoder
    for key in encoder:
        assert (frozen[key] == base[key.removeprefix("bert.")]).all(), key  # type: ignore[attr-defined]
    assert not (frozen["classifier.weight"] == a["classifier.weight"]).all()  # type: ignore[attr-defined]
    assert any(not (a[k] == frozen[k]).all() for k in encoder)  # type: ignore[attr-defined]  # unfrozen moved


def test_accuracy_gate_fails_on_purpose_with_both_numbers(tmp_path: Path) -> None:
    train_run(PACKAGED_DATASET, tmp_path / "run", config=TrainConfig(max_steps=20, progress=False))
    with pytest.raises(AccuracyGateFailed) as failure:
        # a negative allowance cannot be met: the gate must refuse and say why
        export_run(tmp_path / "run", tmp_path / "bundle", model="intents", version=1, max_accuracy_drop=-5.0)
    message = str(failure.value)
    assert "weight-int8 accuracy" in message  # the default for text
    assert "below fp32" in message
    assert message.count("%") >= 2
    assert "the gate allows -5.00" in message
    assert not (tmp_path / "bundle").exists()  # nothing that failed a gate is left behind


def test_the_kept_model_is_the_best_epoch_and_test_data_is_scored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Through the real Trainer and the CLI: the saved model is the best validation epoch (not the
    last), one line per epoch, and ``--test-data`` is scored at the end by the evaluate code."""
    import json

    from cloud_trainer.cli import main

    data = load_labelled(PACKAGED_DATASET)
    test_file = tmp_path / "test.csv"
    test_file.write_text("text,label\n" + "\n".join(f'"{t}",{lab}' for t, lab in zip(data.texts[:40], data.labels[:40],
                                                                                    strict=True)))  # fmt: skip
    out = tmp_path / "run"
    code = main(["train", "--data", str(PACKAGED_DATASET), "--out", str(out), "--epochs", "3", "--patience", "0",
                 "--learning-rate", "3e-4", "--test-data", str(test_file)])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "majority baseline" in printed
    assert "mean pooling: the base is a sentence-transformer" in printed
    assert sum(line.startswith("epoch ") for line in printed.splitlines()) == 3
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["history"]
    best = max(range(len(history)), key=lambda i: history[i]["macro_f1"])
    assert metrics["best_epoch"] == best + 1
    # the final evaluation of the saved weights reproduces the best epoch's numbers, whichever epoch it was
    assert metrics["macro_f1"] == pytest.approx(history[best]["macro_f1"])
    assert metrics["accuracy"] == pytest.approx(history[best]["accuracy"])
    report = json.loads((out / "test_metrics.json").read_text())
    assert report["examples"] == 40
    assert "test split (40 examples" in printed
    run = json.loads((out / "run.json").read_text())
    assert run["preprocessing"]["max_length"] == 32  # chosen from the data: short commands
    assert run["hyperparameters"]["pooling"] == "mean"


def test_max_minutes_fits_the_epochs_to_the_budget(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A budget far below three epochs: the plan lowers the epochs before training (so the schedule
    ends inside it), and training stops at the budget even if the estimate was optimistic."""
    import json

    from cloud_trainer.cli import main

    code = main(["train", "--data", str(PACKAGED_DATASET), "--out", str(tmp_path / "run"), "--epochs", "3",
                 "--max-minutes", "0.05"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "epochs 1: about" in printed and "--max-minutes 0.05" in printed
    assert sum(line.startswith("epoch ") for line in printed.splitlines()) == 1
    assert json.loads((tmp_path / "run" / "run.json").read_text())["hyperparameters"]["epochs"] == 1
