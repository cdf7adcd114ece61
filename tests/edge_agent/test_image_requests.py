"""One image classifier served by a real agent process answers the same JPEGs alike on every front
end: ``POST /v1/predict`` with base64 in JSON (Python's http.client) and as multipart/form-data (the
``curl`` binary), the Open Inference Protocol's BYTES input (``tritonclient.http``, binary tensor
extension), and MQTT 5 request/response through Mosquitto. Each gives the labels and probabilities
the device runtime gives the bundle in this process (the decoded pixels are the same bytes' pixels)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton

from cloud_trainer.demo.localbroker import LocalBroker
from cloud_trainer.releases.publish import push_bundle
from edge_agent.protocol import Topics
from edge_agent.runtime import ImageClassifier
from tests.conftest import AgentProcess, Keys, StateListener, http_json
from tests.edge_agent.test_mqtt_inference import Requester
from tests.tinyimage import LABELS, encode, make_colour_bundle, noise, solid


def _probabilities(prediction: dict[str, Any]) -> list[float]:
    return [prediction["scores"][label] for label in LABELS]


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs the curl binary")
def test_the_same_jpegs_get_the_same_answers_over_json_multipart_tritonclient_and_mqtt(
    tmp_path: Path, mosquitto: LocalBroker, fleet: str, keys: Keys, agent_process: Callable[..., AgentProcess],
    state_listener: StateListener,
) -> None:  # fmt: skip
    manifest = make_colour_bundle(tmp_path / "v1", version=1)
    assert manifest.task == "image-classification"
    push_bundle(tmp_path / "v1", host=mosquitto.host, port=mosquitto.port, fleet=fleet, key_path=keys.private)
    agent = agent_process()
    agent.wait_version(1)
    state_listener.wait_for(lambda s: s["online"] and s["active_version"] == 1)  # subscribed to .../infer

    pictures = [solid((20, 30, 220), (64, 48)), solid((200, 20, 30), (40, 72)), noise(11, (50, 50))]
    jpegs = [encode(pixels, "JPEG") for pixels in pictures]
    paths = []
    for index, data in enumerate(jpegs):
        paths.append(tmp_path / f"photo-{index}.jpg")
        paths[-1].write_bytes(data)
    local = ImageClassifier(bundle_dir=tmp_path / "v1", manifest=manifest,
                            providers=["CPUExecutionProvider"]).predict(jpegs)  # fmt: skip
    expected_labels = [p.label for p in local]
    expected = np.asarray([[p.scores[label] for label in LABELS] for p in local])
    assert expected_labels[:2] == ["blue", "red"]  # the pictures differ, so a mix-up would show

    answers: dict[str, tuple[list[str], np.ndarray[Any, Any]]] = {}
    as_json = {"images": [base64.b64encode(data).decode() for data in jpegs]}
    status, reply = http_json(agent.http_port, "POST", "/v1/predict", as_json)
    assert status == 200, reply
    answers["http json"] = ([p["label"] for p in reply["predictions"]],
                            np.asarray([_probabilities(p) for p in reply["predictions"]]))  # fmt: skip

    url = f"http://127.0.0.1:{agent.http_port}/v1/predict"
    files = [arg for path in paths for arg in ("-F", f"images=@{path};type=image/jpeg")]
    done = subprocess.run(["curl", "-sS", "--fail-with-body", *files, url], capture_output=True, text=True,
                          timeout=30, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    reply = json.loads(done.stdout)
    answers["curl multipart"] = ([p["label"] for p in reply["predictions"]],
                                 np.asarray([_probabilities(p) for p in reply["predictions"]]))  # fmt: skip

    client = triton.InferenceServerClient(url=f"127.0.0.1:{agent.http_port}")
    try:
        images = triton.InferInput("image", [len(jpegs)], "BYTES")
        images.set_data_from_numpy(np.asarray(jpegs, dtype=np.object_), binary_data=True)
        outputs = [triton.InferRequestedOutput("label", binary_data=True),
                   triton.InferRequestedOutput("probabilities", binary_data=True)]  # fmt: skip
        result = client.infer("intents", [images], outputs=outputs)
        labels = [label.decode() for label in result.as_numpy("label")]
        answers["tritonclient BYTES"] = (labels, np.asarray(result.as_numpy("probabilities"), dtype=np.float64))
        assert client.get_model_metadata("intents")["inputs"] == [
            {"name": "image", "datatype": "FP32", "shape": [-1, 32, 32, 3]}
        ]
    finally:
        client.close()

    requester = Requester(mosquitto, Topics(fleet=fleet).device_infer("dev-1"))
    try:
        reply = requester.ask(json.dumps(as_json).encode(), b"jpegs-1")
    finally:
        requester.close()
    assert reply["status"] == 200, reply
    answers["mqtt 5"] = ([p["label"] for p in reply["predictions"]],
                         np.asarray([_probabilities(p) for p in reply["predictions"]]))  # fmt: skip

    for front_end, (labels, probabilities) in answers.items():
        assert labels == expected_labels, front_end
        assert np.abs(probabilities - expected).max() < 1e-6, front_end  # float32 on the wire for tritonclient
