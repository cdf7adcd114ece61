"""The whole loop on real parts: fine-tune MiniLM (briefly) in torch, export with optimum, quantize with
onnxruntime, push with `cloud-train push`, and serve from `edge-agent` over a real Mosquitto."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from cloud_trainer.demo.localbroker import LocalBroker
from cloud_trainer.releases.registry import Registry
from cloud_trainer.training.data import PACKAGED_DATASET, load_labelled
from cloud_trainer.training.runs import register_run, train_run
from cloud_trainer.training.train import TrainConfig
from tests.conftest import AgentProcess, Keys, StateListener

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    """A short but real fine-tune (60 steps), exported through the gates into a registry as intents:1."""
    work = tmp_path_factory.mktemp("e2e")
    result = train_run(PACKAGED_DATASET, work / "run", config=TrainConfig(max_steps=60, progress=False))
    entry, report = register_run(Registry(work / "registry"), work / "run", model="intents", max_accuracy_drop=3.0)
    assert entry.ref == "intents:1"
    return entry.bundle_dir, {"train": result.metrics, "export": report, "registry": work / "registry"}


def test_packaged_dataset_is_a_real_labelled_set() -> None:
    data = load_labelled(PACKAGED_DATASET)
    assert len(data) >= 300
    assert len(data.label_names) == 10
    assert len({t.lower() for t in data.texts}) == len(data)


def test_fine_tuned_export_matches_pytorch_and_learns(trained: tuple[Path, dict[str, object]]) -> None:
    bundle, info = trained
    train, report = info["train"], info["export"]
    print(
        f"\nPyTorch val accuracy {train['accuracy']:.3f}; ONNX fp32 {report['onnx_fp32_accuracy']:.3f}; "  # type: ignore[index]
        f"int8 {report['bundle_model_accuracy']:.3f}; parity {report['parity_max_abs_diff']:.2e}"
    )  # type: ignore[index]
    assert train["accuracy"] > 0.5  # type: ignore[index]  # 10 classes: chance is 0.1
    assert report["parity_max_abs_diff"] < 1e-3  # type: ignore[index]
    assert report["bundle_model_bytes"] < report["onnx_fp32_bytes"] / 3  # type: ignore[index]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["quantization"] == "weight-int8"  # the default for text on a CPU
    assert manifest["lineage"]["dataset_sha256"]
    assert {f["path"] for f in manifest["files"]} == {"model.onnx", "tokenizer.json", "golden.json"}


def test_push_and_serve_the_fine_tuned_model(
    trained: tuple[Path, dict[str, object]],
    mosquitto: LocalBroker,
    fleet: str,
    keys: Keys,
    agent_process: Callable[..., AgentProcess],
    state_listener: StateListener,
) -> None:
    bundle, info = trained
    push = subprocess.run(
        [
            sys.executable,
            "-m",
            "cloud_trainer",
            "push",
            "intents",
            "--registry",
            str(info["registry"]),
            "--fleet",
            fleet,
            "--key",
            str(keys.private),
            "--broker",
            f"{mosquitto.host}:{mosquitto.port}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert push.returncode == 0, push.stderr
    assert "pushed intents v1" in push.stdout
    agent = agent_process()
    agent.wait_version(1, timeout_s=120)
    state = state_listener.wait_for(lambda s: s.get("update_state") == "active")
    assert state["bytes_transferred"] >= sum(f.stat().st_size for f in bundle.iterdir() if f.name != "manifest.json")
    labels = json.loads((bundle / "manifest.json").read_text())["labels"]
    status, body = agent.predict(["turn the lights off in the bedroom", "what's the weather like tomorrow"])
    assert status == 200
    for prediction in body["predictions"]:
        assert prediction["label"] in labels
        assert 0 < prediction["score"] <= 1
        assert abs(sum(prediction["scores"].values()) - 1) < 1e-4

    # `cloud-train evaluate` on the registered int8 version answers what the serving agent answers
    from cloud_trainer.training.evaluate import open_source

    data = load_labelled(PACKAGED_DATASET)
    texts = [*data.texts[::6], "turn " * 300 + "the lights on"]  # 61 texts, one cut to its first 32 tokens
    status, body = agent.predict(texts)
    assert status == 200
    served = [p["label"] for p in body["predictions"]]
    evaluated = open_source("intents:1", registry_root=info["registry"]).predict(texts)  # type: ignore[arg-type]
    assert evaluated == served


def test_demo_command_runs_end_to_end_twice(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "cloud_trainer",
        "demo",
        "--workdir",
        str(tmp_path / "demo"),
        "--max-steps",
        "30",
        "--broker-kind",
        "mosquitto",
    ]
    for _ in range(2):  # running it again works too
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        out = result.stdout
        assert "[12/12] stop everything" in out
        assert "fleet samples:" in out and "promoted intents v2" in out and "v2: 1" in out
        assert "update=active v1" in out
        assert "put on some relaxing jazz" in out
        assert out.count("ms ") >= 6  # a latency for each text
        assert "edge-agent stopped (exit code 0)" in out
