"""The image family round the loop: a tiny ResNet and a tiny ViT (transformers' ``ResNetConfig``
and ``ViTConfig``, random weights, each saved with its image processor) fine-tuned with
``cloud-train train --family image`` on a folder of rendered shapes, exported through optimum to
static int8 with ``cloud-train export``, pushed, and served by a real agent process. The same
images get the same labels sent as multipart and as base64 JSON by curl, as inference-protocol
BYTES by tritonclient, and over MQTT 5 request/response; those are the labels the device runtime
gives the registered bundle in this process."""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton

from cloud_trainer.cli import main
from cloud_trainer.demo.localbroker import LocalBroker
from cloud_trainer.releases.publish import push_bundle
from cloud_trainer.releases.registry import Registry
from cloud_trainer.training.images.data import load_images
from edge_agent.protocol import Topics
from edge_agent.runtime import ImageClassifier
from tests.conftest import AgentProcess, Keys, StateListener
from tests.edge_agent.test_mqtt_inference import Requester
from tests.imagemodels import SHAPES, save_tiny_resnet, save_tiny_vit, write_shapes


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Two intra-op threads on two cores shared with other jobs spin against each other; one keeps this fast."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def curl(*args: str) -> dict[str, object]:
    done = subprocess.run(["curl", "-sS", "--fail-with-body", *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr + done.stdout
    reply: dict[str, object] = json.loads(done.stdout)
    return reply


def labels_of(reply: dict[str, object]) -> list[str]:
    predictions = reply["predictions"]
    assert isinstance(predictions, list)
    return [str(p["label"]) for p in predictions]


@pytest.mark.parametrize("architecture", ["resnet", "vit"])
def test_trained_image_model_served_alike_by_curl_tritonclient_and_mqtt(
    architecture: str, tmp_path: Path, mosquitto: LocalBroker, fleet: str, keys: Keys, state_listener: StateListener,
    agent_process: Callable[..., AgentProcess], capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    shapes = write_shapes(tmp_path / "shapes", per_class=15)
    base = {"resnet": save_tiny_resnet, "vit": save_tiny_vit}[architecture](tmp_path / architecture)
    run, registry = tmp_path / "run", tmp_path / "registry"
    assert main(["train", "--family", "image", "--data", str(shapes), "--base-model", str(base), "--out", str(run),
                 "--epochs", "2", "--learning-rate", "3e-3", "--min-crop-scale", "0.5"]) == 0  # fmt: skip
    # 9 validation images cannot judge int8 (one flip is 11 points): the gate is tested elsewhere
    assert main(["export", "--run", str(run), "--model", "intents", "--registry", str(registry),
                 "--max-accuracy-drop", "100", "--max-f1-drop", "1"]) == 0  # fmt: skip
    capsys.readouterr()
    entry = Registry(registry).verified("intents")
    assert (entry.manifest.task, entry.manifest.quantization) == ("image-classification", "static-int8")
    push_bundle(entry.bundle_dir, host=mosquitto.host, port=mosquitto.port, fleet=fleet, key_path=keys.private)
    agent = agent_process()
    agent.wait_version(1)  # the agent checked the golden images through its own decoder first
    state_listener.wait_for(lambda s: s["online"] and s["active_version"] == 1)  # subscribed to inference requests

    val = load_images(run / "val.csv")
    paths = val.paths[:6]
    assert {p.suffix for p in paths} >= {".png", ".jpg"}
    device = ImageClassifier(bundle_dir=entry.bundle_dir, manifest=entry.manifest, providers=["CPUExecutionProvider"])
    expected = [p.label for p in device.predict([p.read_bytes() for p in paths])]
    assert set(expected) <= set(SHAPES)
    url = f"http://127.0.0.1:{agent.http_port}"

    multipart = curl(*[arg for p in paths for arg in ("-F", f"images=@{p}")], f"{url}/v1/predict")
    assert labels_of(multipart) == expected

    body = tmp_path / "body.json"
    body.write_text(json.dumps({"images": [base64.b64encode(p.read_bytes()).decode() for p in paths]}))
    as_json = curl("-H", "Content-Type: application/json", "--data-binary", f"@{body}", f"{url}/v1/predict")
    assert labels_of(as_json) == expected
    scores = [p["scores"] for p in as_json["predictions"]]  # type: ignore[union-attr]
    served = np.asarray([[s[label] for label in SHAPES] for s in scores])
    assert np.abs(served - device.probabilities([p.read_bytes() for p in paths])).max() < 1e-5

    client = triton.InferenceServerClient(url=f"127.0.0.1:{agent.http_port}")
    for binary in (True, False):  # raw bytes in the binary extension; base64 strings in JSON
        encoded = [p.read_bytes() if binary else base64.b64encode(p.read_bytes()) for p in paths]
        images = triton.InferInput("image", [len(paths)], "BYTES")
        images.set_data_from_numpy(np.array(encoded, dtype=object), binary_data=binary)
        result = client.infer("intents", [images], outputs=[triton.InferRequestedOutput("label", binary_data=binary)])
        served_labels = [v.decode() if isinstance(v, bytes) else str(v) for v in result.as_numpy("label")]
        assert served_labels == expected, binary

    requester = Requester(mosquitto, Topics(fleet=fleet).device_infer("dev-1"))
    try:
        reply = requester.ask(body.read_bytes(), b"images-1")
    finally:
        requester.close()
    assert (reply["status"], reply["version"]) == (200, 1)
    assert labels_of(reply) == expected
