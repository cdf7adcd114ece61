"""The second model family end to end: a CNN on sklearn's digits, trained in torch, exported with
torch.onnx, statically quantized with calibration, pushed, and served by the same agent."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from cloud_trainer.demo.localbroker import LocalBroker
from cloud_trainer.releases.publish import push_bundle
from cloud_trainer.releases.registry import Registry
from cloud_trainer.training.digits import LABELS, DigitsConfig, export_digits, load_split, train_digits
from export.errors import AccuracyGateFailed
from tests.conftest import AgentProcess, Keys, http_json


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("digits") / "run"
    result = train_digits(run, config=DigitsConfig(epochs=8))
    print(f"\ndigits CNN: val accuracy {result.metrics['accuracy']:.3f}, macro-F1 {result.metrics['macro_f1']:.3f}")
    assert result.metrics["accuracy"] > 0.9
    return run


def test_train_export_push_serve(
    digits_run: Path, tmp_path: Path, mosquitto: LocalBroker, fleet: str, keys: Keys,
    agent_process: Callable[..., AgentProcess],
) -> None:  # fmt: skip
    registry = Registry(tmp_path / "registry")
    reports: list[dict[str, object]] = []

    def build(bundle: Path, version: int, parent: int | None) -> object:
        result = export_digits(digits_run, bundle, model="intents", version=version, parent_version=parent)
        reports.append(result.report)
        return result.manifest

    entry = registry.register("intents", version=None, build=build)  # type: ignore[arg-type]
    report = reports[0]
    print(f"fp32 accuracy {report['onnx_fp32_accuracy']:.3f} ({report['onnx_fp32_bytes']} bytes), static int8 "
          f"{report['bundle_model_accuracy']:.3f} ({report['bundle_model_bytes']} bytes)")  # fmt: skip
    assert report["parity_max_abs_diff"] < 1e-4  # type: ignore[operator]
    assert report["bundle_model_bytes"] < report["onnx_fp32_bytes"]  # type: ignore[operator]
    manifest = json.loads((entry.bundle_dir / "manifest.json").read_text())
    assert (manifest["task"], manifest["quantization"]) == ("image-classification", "static-int8")
    assert manifest["preprocessing"]["kind"] == "image"

    push_bundle(entry.bundle_dir, host=mosquitto.host, port=mosquitto.port, fleet=fleet, key_path=keys.private)
    agent = agent_process()
    agent.wait_version(1)
    split = load_split(val_fraction=0.2, seed=42)
    images = [split.val_images[i].tolist() for i in range(6)]
    status, body = http_json(agent.http_port, "POST", "/v1/predict", {"images": images})
    assert status == 200
    predicted = [p["label"] for p in body["predictions"]]
    truth = [LABELS[i] for i in split.val_labels[:6]]
    print(f"served {predicted} for true {truth}")
    assert sum(p == t for p, t in zip(predicted, truth, strict=True)) >= 5

    flat = [v for row in images[0] for v in row]
    kserve = {"inputs": [{"name": "image", "shape": [1, 8, 8], "datatype": "FP32", "data": flat}]}
    status, body = http_json(agent.http_port, "POST", "/v2/models/intents/infer", kserve)
    assert status == 200
    assert body["outputs"][0]["data"] == [predicted[0]]

    status, body = http_json(agent.http_port, "POST", "/v1/predict", {"images": [[[1.0] * 7] * 8]})
    assert status == 400
    assert "images have shape [8, 7, 1]; this model takes 8x8" in body["error"]


def test_accuracy_gate_fails_with_both_numbers(digits_run: Path, tmp_path: Path) -> None:
    with pytest.raises(AccuracyGateFailed, match=r"static-int8 accuracy .*% is .* points below fp32 .*%"):
        export_digits(digits_run, tmp_path / "bundle", version=1, max_accuracy_drop=-1.0)
    assert not (tmp_path / "bundle").exists()
