"""The edge's task registry (one registration per task, chosen by the manifest's ``task``), and the
golden-vector health check for image bundles: a device reproduces the golden PNGs through its own
decoder before it serves a bundle, and a bundle whose golden images it cannot decode, or whose
probabilities it does not reproduce, is refused, at an update and at start-up, without taking the
agent down."""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cloud_trainer.demo.localbroker import LocalBroker
from cloud_trainer.releases.publish import push_bundle
from edge_agent.config import AgentConfig
from edge_agent.protocol import Manifest
from edge_agent.runtime import (
    HealthCheckError,
    ImageClassifier,
    InputLimits,
    ModelLoadError,
    TextClassification,
    load_classifier,
    register_task,
    registered_tasks,
    task_for,
)
from edge_agent.runtime.image import HeldEncoded, HeldPixels
from edge_agent.runtime.text import HeldText
from edge_agent.store import ModelStore
from edge_agent.updater import load_verified
from tests.conftest import AgentProcess, Keys, StateListener, http_json
from tests.tinyimage import PRE, encode, make_colour_bundle, rewrite_golden, solid

GIF = "data:image/gif;base64,R0lGODlhAQABAAAAACw="


# -- the registry ---------------------------------------------------------------------------------
def test_each_task_is_registered_once_and_chosen_by_the_manifest(tmp_path: Path) -> None:
    assert registered_tasks() == ["image-classification", "tensor", "text-classification"]
    text, image = task_for("text-classification"), task_for("image-classification")
    assert (text.field, text.multipart, image.field, image.multipart) == ("texts", False, "images", True)
    manifest = make_colour_bundle(tmp_path / "bundle")
    model = load_classifier(tmp_path / "bundle", manifest, providers=["CPUExecutionProvider"])
    assert isinstance(model, ImageClassifier)
    assert image.protocol_input(manifest).dims == [PRE.height, PRE.width, 3]
    with pytest.raises(ValueError, match="'text-classification' is registered already"):
        register_task(TextClassification())
    with pytest.raises(ModelLoadError, match="this agent serves no 'audio-classification' models"):
        task_for("audio-classification")


def test_each_task_decides_what_a_sample_keeps(tmp_path: Path) -> None:
    text, image = task_for("text-classification"), task_for("image-classification")
    held = text.sample_input("turn it up")
    assert isinstance(held, HeldText) and held.record_fields() == {"text": "turn it up"}
    manifest = make_colour_bundle(tmp_path / "bundle")
    model = load_classifier(tmp_path / "bundle", manifest, providers=["CPUExecutionProvider"])
    jpeg = encode(solid((10, 10, 230)), "JPEG")
    raw = solid((10, 10, 230), (32, 32)).tolist()
    decoded, array = image.prepare([jpeg, raw], model, InputLimits(max_text_chars=10))
    encoded = image.sample_input(decoded)
    assert isinstance(encoded, HeldEncoded)
    assert encoded.record_fields() == {"image": "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()}
    pixels = image.sample_input(array)
    assert isinstance(pixels, HeldPixels) and pixels.array.dtype == np.uint8
    assert pixels.record_fields() == {"image": raw}


# -- the golden-vector health check ---------------------------------------------------------------
def _config(tmp_path: Path, keys: Keys) -> AgentConfig:
    return AgentConfig.model_validate({"device_id": "d", "fleet": "f", "state_dir": tmp_path / "state",
                                       "update": {"trusted_keys": [keys.public]}})  # fmt: skip


def _broken(bundle: Path, how: str) -> Manifest:
    manifest = Manifest.read(bundle)
    golden = json.loads((bundle / manifest.golden_file).read_text())
    if how == "probabilities":
        shifted = np.asarray(golden["probabilities"])
        shifted[:, 0] += 0.1
        return rewrite_golden(bundle, probabilities=shifted.tolist())
    if how == "gif":
        return rewrite_golden(bundle, inputs=[GIF, *golden["inputs"][1:]])
    if how == "truncated":
        png = base64.b64decode(golden["inputs"][0].split(",", 1)[1])
        url = "data:image/png;base64," + base64.b64encode(png[: len(png) // 2]).decode()
        return rewrite_golden(bundle, inputs=[url, *golden["inputs"][1:]])
    if how == "raw-shape":
        return rewrite_golden(bundle, inputs=[np.zeros((31, 32, 3)).tolist()] * len(golden["inputs"]))
    return rewrite_golden(bundle, probabilities=golden["probabilities"][:-1])


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("probabilities", "golden vectors differ by 0.1"),
        ("gif", "golden inputs cannot be pre-processed on this device: images[0] is a data URL of image/gif"),
        ("truncated", "golden inputs cannot be pre-processed on this device: images[0] is truncated or corrupt"),
        ("raw-shape", "golden inputs cannot be pre-processed on this device: images have shape [31, 32, 3]"),
        ("count", "model output shape (3, 3) differs from golden (2, 3)"),
    ],
)
def test_an_image_bundle_that_fails_its_golden_vectors_is_a_health_check_failure(
    tmp_path: Path, keys: Keys, how: str, message: str
) -> None:
    make_colour_bundle(tmp_path / "bundle")
    load_verified(tmp_path / "bundle", _config(tmp_path, keys))  # as exported: passes
    _broken(tmp_path / "bundle", how)
    with pytest.raises(HealthCheckError) as caught:  # not an InputError escaping the updater's handlers
        load_verified(tmp_path / "bundle", _config(tmp_path, keys))
    assert message in str(caught.value)


def _install(state: Path, bundle: Path, version: int, *, activate: bool) -> None:
    store = ModelStore(state_dir=state, model="intents")
    staging = store.fresh_staging(version)
    shutil.copytree(bundle, staging, dirs_exist_ok=True)
    store.install(staging, version)
    if activate:
        store.activate(version)


def test_at_start_an_image_bundle_whose_golden_image_does_not_decode_falls_back(
    tmp_path: Path, agent_process: Callable[..., AgentProcess]
) -> None:
    make_colour_bundle(tmp_path / "v1", version=1)
    make_colour_bundle(tmp_path / "v2", version=2)
    _broken(tmp_path / "v2", "gif")
    _install(tmp_path / "state", tmp_path / "v1", 1, activate=False)
    _install(tmp_path / "state", tmp_path / "v2", 2, activate=True)
    agent = agent_process()
    agent.wait_version(1)
    assert agent.wait_log(r"installed version 2 is unusable: golden inputs cannot be pre-processed")
    red = base64.b64encode(encode(solid((230, 20, 20)), "JPEG")).decode()
    status, reply = http_json(agent.http_port, "POST", "/v1/predict", {"images": [red]})
    assert (status, reply["version"], reply["predictions"][0]["label"]) == (200, 1, "red")


def test_an_image_update_that_fails_its_golden_vectors_is_refused_and_v1_serves_on(
    tmp_path: Path, mosquitto: LocalBroker, fleet: str, keys: Keys, agent_process: Callable[..., AgentProcess],
    state_listener: StateListener,
) -> None:  # fmt: skip
    make_colour_bundle(tmp_path / "v1", version=1)
    push_bundle(tmp_path / "v1", host=mosquitto.host, port=mosquitto.port, fleet=fleet, key_path=keys.private)
    agent = agent_process()
    agent.wait_version(1)  # the golden PNGs reproduced through the agent's own decoder
    make_colour_bundle(tmp_path / "v2", version=2)
    _broken(tmp_path / "v2", "truncated")
    push_bundle(tmp_path / "v2", host=mosquitto.host, port=mosquitto.port, fleet=fleet, key_path=keys.private)
    state = state_listener.wait_for(lambda s: s.get("update_state") == "rejected" and s.get("update_version") == 2)
    assert "bundle v2 failed its health check: golden inputs cannot be pre-processed" in state["last_error"]
    assert state["active_version"] == 1
    status, ready = http_json(agent.http_port, "GET", "/v2/health/ready")
    assert (status, ready["version"]) == (200, 1)
