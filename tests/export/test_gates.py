"""The quantization gate on small validation splits (milliseconds: no training, no broker), the registry
leaving nothing behind after a failed build, and `models list|show` naming the split."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cloud_trainer.cli import main
from cloud_trainer.releases.registry import Registry
from edge_agent.protocol import Manifest
from export.bundle import write_manifest
from export.errors import AccuracyGateFailed
from export.gates import bootstrap_macro_f1_drop, judge_quantization, mcnemar_exact
from tests.tinymodel import make_tiny_bundle

LABELS = ["lights_on", "lights_off", "weather", "timer"]


def balanced(n: int = 120) -> list[str]:
    """``n`` true labels, the four classes in turn."""
    return [LABELS[i % len(LABELS)] for i in range(n)]


def wrong(label: str) -> str:
    return LABELS[(LABELS.index(label) + 1) % len(LABELS)]


def flipped(truth: list[str], against: int, *, towards: int = 0) -> list[str]:
    """``truth`` with the first ``against`` predictions made wrong and the last ``towards`` made right."""
    pred = [wrong(t) for t in truth[:against]] + truth[against:]
    if towards:
        pred[-towards:] = truth[-towards:]
    return pred


def test_mcnemar_exact_against_hand_computation() -> None:
    assert mcnemar_exact(2, 0) == pytest.approx(0.25)  # both discordant pairs against: (1/2)^2
    assert mcnemar_exact(1, 0) == pytest.approx(0.5)
    assert mcnemar_exact(3, 1) == pytest.approx(5 / 16)  # C(4,3) + C(4,4) over 2^4
    assert mcnemar_exact(5, 0) == pytest.approx(1 / 32)
    assert mcnemar_exact(15, 0) == pytest.approx(2**-15)
    assert mcnemar_exact(60, 40) == pytest.approx(sum(math.comb(100, k) for k in range(60, 101)) / 2**100)
    assert mcnemar_exact(1, 1) == 1.0  # no evidence the candidate is worse
    assert mcnemar_exact(0, 3) == 1.0
    assert mcnemar_exact(0, 0) == 1.0
    with pytest.raises(ValueError, match="must be >= 0"):
        mcnemar_exact(-1, 0)


def test_bootstrap_is_seeded_and_brackets_the_drop() -> None:
    truth = [i % 4 for i in range(120)]
    cand = [(t + 1) % 4 if i < 10 else t for i, t in enumerate(truth)]
    a = bootstrap_macro_f1_drop(truth, cand, truth, classes=4, seed=7)
    b = bootstrap_macro_f1_drop(truth, cand, truth, classes=4, seed=7)
    assert a == b
    assert a.reference == pytest.approx(1.0)
    assert a.low < a.drop < a.high
    assert a.low > 0  # ten flips against, none for: every resample sees a loss
    assert a.p_value == pytest.approx(1 / 2001)
    same = bootstrap_macro_f1_drop(truth, truth, truth, classes=4)
    assert (same.drop, same.low, same.high, same.p_value) == (0.0, 0.0, 0.0, 1.0)


@pytest.mark.parametrize("flips", [1, 2])
def test_one_or_two_flipped_examples_of_120_pass(flips: int) -> None:
    truth = balanced()
    reference = flipped(truth, 0, towards=0)
    reference[5] = wrong(truth[5])  # fp32 is not perfect either
    candidate = list(reference)
    for i in range(10, 10 + flips):
        candidate[i] = wrong(truth[i])
    report = judge_quantization(reference, candidate, truth, LABELS, variant="dynamic-int8")
    assert report.passed, report.reason
    assert (report.examples, report.changed, report.b, report.c) == (120, flips, flips, 0)
    assert report.accuracy_drop_points == pytest.approx(100 * flips / 120)
    if flips == 2:  # beyond the 1-point allowance, yet two flips are no evidence (p = 0.25)
        assert report.accuracy_drop_points > 1.0
        assert report.accuracy_p_value == pytest.approx(0.25)
    assert report.to_dict()["split"] == "validation"
    assert json.loads(json.dumps(report.to_dict()))["macro_f1_interval"] == list(report.macro_f1_interval)


@pytest.mark.parametrize(
    ("variant", "next_step"),
    [
        ("dynamic-int8", "try --quantize weight-int8 (int8 weights in blocks, activations per block) or static-int8"),
        ("static-int8", "try --quantize weight-int8, or dynamic-int8 with --target avx512_vnni/arm64"),
        ("weight-int8", "try --quantize fp16 (GPU) or none"),
        ("fp16", "try --quantize none"),
    ],
)
def test_a_real_loss_fails_and_names_the_next_quantization(variant: str, next_step: str) -> None:
    truth = balanced()
    with pytest.raises(AccuracyGateFailed) as failure:
        judge_quantization(truth, flipped(truth, 15), truth, LABELS, variant=variant)
    message = str(failure.value)
    report = failure.value.report
    assert report is not None
    assert not report.passed
    assert not report.accuracy_passed
    assert (report.b, report.c, report.changed) == (15, 0, 15)
    assert report.accuracy_p_value < 0.05
    assert f"{variant} accuracy 87.50% is 12.50 points below fp32 100.00%" in message
    assert f"{variant} macro-F1" in message
    assert "15 predictions changed: 15 now wrong, 0 now right" in message
    assert "--max-accuracy-drop" in message
    assert "--max-f1-drop" in message
    assert message.endswith(next_step)


def test_a_minority_class_wiped_out_fails_on_macro_f1_alone() -> None:
    truth = ["common"] * 60 + ["other"] * 57 + ["rare"] * 3
    labels = ["common", "other", "rare"]
    reference = list(truth)
    reference[0], reference[1] = "other", "other"  # fp32 misses two common ones ...
    candidate = list(truth)  # ... which the candidate gets right,
    candidate[-3:] = ["common"] * 3  # but it never predicts "rare" again
    report = judge_quantization(reference, candidate, truth, labels, variant="dynamic-int8", raise_on_failure=False)
    assert report.accuracy_drop_points == pytest.approx(100 / 120)  # accuracy barely moves
    assert report.accuracy_passed
    assert report.macro_f1_drop > 0.25
    assert not report.macro_f1_passed
    assert not report.passed
    assert "FAILED on macro-F1" in report.reason
    with pytest.raises(AccuracyGateFailed, match="FAILED on macro-F1; try --quantize weight-int8"):
        judge_quantization(reference, candidate, truth, labels, variant="dynamic-int8")


def test_a_negative_allowance_always_fails() -> None:
    truth = balanced()
    with pytest.raises(AccuracyGateFailed) as failure:
        judge_quantization(truth, truth, truth, LABELS, variant="dynamic-int8", max_accuracy_drop_points=-5.0)
    message = str(failure.value)
    assert "dynamic-int8 accuracy" in message
    assert "below fp32" in message
    assert message.count("%") >= 2
    assert "the gate allows -5.00" in message
    with pytest.raises(AccuracyGateFailed, match="FAILED on macro-F1"):
        judge_quantization(truth, truth, truth, LABELS, variant="fp16", max_macro_f1_drop=-0.01)
    # even a candidate 12.5 points better than fp32 cannot satisfy "must be 1 point better"
    better = judge_quantization(
        flipped(truth, 15), truth, truth, LABELS, variant="static-int8", max_accuracy_drop_points=-1.0,
        raise_on_failure=False,
    )  # fmt: skip
    assert better.accuracy_drop_points == pytest.approx(-12.5)
    assert not better.accuracy_passed
    assert "a negative allowance (-1) always fails" in better.reason


def test_a_failed_build_leaves_no_model_directory(tmp_path: Path) -> None:
    registry = Registry(tmp_path)

    def failing(_d: Path, _v: int, _p: int | None) -> Manifest:
        raise AccuracyGateFailed("gate failed")

    with pytest.raises(AccuracyGateFailed):
        registry.register("intents", version=None, build=failing)
    assert not (tmp_path / "intents").exists()
    assert registry.models() == []

    (tmp_path / "kept").mkdir()  # a directory this call did not create stays
    with pytest.raises(AccuracyGateFailed):
        registry.register("kept", version=None, build=failing)
    assert (tmp_path / "kept").is_dir()
    assert not list((tmp_path / "kept").iterdir())


def test_registry_option_before_and_after_the_models_subcommand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EDGELOOP_REGISTRY", str(tmp_path / "elsewhere"))
    root = tmp_path / "registry"
    assert main(["models", "list", "--registry", str(root)]) == 0
    assert capsys.readouterr().out.strip() == f"no models in {root}"
    assert main(["models", "--registry", str(root), "list"]) == 0  # not overwritten by list's own option
    assert capsys.readouterr().out.strip() == f"no models in {root}"


def test_models_list_and_show_name_split_and_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "registry"
    registry = Registry(root)
    registry.register("intents", version=None, build=lambda d, v, _p: make_tiny_bundle(d, version=v))  # old metrics

    def with_split(bundle_dir: Path, version: int, _p: int | None) -> Manifest:
        fields = make_tiny_bundle(bundle_dir, version=version).model_dump(exclude={"files"})
        fields["metrics"] = {
            "export": {"split": "validation", "examples": 120, "onnx_fp32_accuracy": 0.96},
            "bundle": {"split": "validation", "examples": 120, "accuracy": 0.95, "macro_f1": 0.94},
            "bundle_accuracy": 0.95,
        }
        return write_manifest(bundle_dir, fields)

    registry.register("intents", version=None, build=with_split)
    assert main(["models", "list", "--registry", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "macro-F1" in lines[0]
    assert "split" in lines[0]
    old, new = (line.split() for line in lines[1:])
    assert old[0] == "intents:1"
    assert old[3:6] == ["-", "-", "-"]  # accuracy, macro-F1, split of a manifest from before
    assert new[3:7] == ["0.950", "0.940", "validation", "n=120"]

    assert main(["models", "show", "intents:2", "--registry", str(root)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["summary"]["split"] == "validation"
    assert shown["summary"]["examples"] == 120
    assert shown["summary"]["macro_f1"] == 0.94
