"""Image samples round the loop, with a real agent process, Mosquitto and the collector: images sent
as base64 JPEG, as a multipart PNG, as a PNG too large to travel in a sample, and as a raw array are
kept by the agent's sampler, uploaded at QoS 1 and stored; feedback labels one of them; the store's
images go out as Label Studio image tasks and come back to training as the bytes the device was sent."""

from __future__ import annotations

import base64
import http.client
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cloud_trainer.demo.localbroker import LocalBroker
from cloud_trainer.releases.publish import push_bundle
from cloud_trainer.samples.collect import Collector
from cloud_trainer.samples.labelling import export_label_studio, labelled_images
from cloud_trainer.samples.store import SampleStore
from tests.conftest import AgentProcess, Keys, http_json
from tests.end_to_end.test_sample_upload import SAMPLE_EVERYTHING, wait_until
from tests.tinyimage import encode, make_colour_bundle, noise, solid


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SampleStore]:
    opened = SampleStore(tmp_path / "store")
    try:
        yield opened
    finally:
        opened.close()


def multipart(port: int, png: bytes) -> dict[str, Any]:
    boundary = "imageSampleBoundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="leaf.png"\r\n'
            f"Content-Type: image/png\r\n\r\n").encode() + png + f"\r\n--{boundary}--\r\n".encode()  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(
        "POST", "/v1/predict", body=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    response = conn.getresponse()
    reply: dict[str, Any] = json.loads(response.read())
    conn.close()
    assert response.status == 200, reply
    return reply


def test_image_samples_are_uploaded_stored_labelled_and_handed_to_training(
    tmp_path: Path, mosquitto: LocalBroker, fleet: str, keys: Keys, agent_process: Callable[..., AgentProcess],
    store: SampleStore,
) -> None:  # fmt: skip
    make_colour_bundle(tmp_path / "v1", version=1)
    push_bundle(tmp_path / "v1", host=mosquitto.host, port=mosquitto.port, fleet=fleet, key_path=keys.private)
    collector = Collector(store=store, fleet=fleet, host=mosquitto.host, port=mosquitto.port,
                          client_id=f"collect-{fleet}")  # fmt: skip
    collector.start()
    try:
        agent = agent_process(extra_toml=SAMPLE_EVERYTHING)
        agent.wait_version(1)
        jpeg = encode(solid((220, 30, 30), (64, 48)), "JPEG")
        png = encode(solid((30, 200, 40), (40, 60)))
        large = encode(noise(5, (220, 220)))  # over 90 KB of PNG: too large for a sample record
        raw = solid((10, 10, 230), (32, 32)).tolist()
        assert len(large) > 90_000
        body = {"images": [base64.b64encode(jpeg).decode(), base64.b64encode(large).decode(), raw]}
        status, reply = http_json(agent.http_port, "POST", "/v1/predict", body)
        assert status == 200, reply
        ids = [p["id"] for p in reply["predictions"]]
        ids.append(multipart(agent.http_port, png)["predictions"][0]["id"])
        status, _ = http_json(agent.http_port, "POST", "/v1/feedback", {"id": ids[0], "label": "crimson"})
        assert status == 202

        def arrived() -> bool:
            samples = {s.prediction_id: s for s in store.query(model="intents")}
            return set(samples) == set(ids) and samples[ids[0]].label == "crimson"

        wait_until(arrived, "four image samples and the feedback label in the store")
    finally:
        collector.stop()

    samples = {s.prediction_id: s for s in store.query(model="intents")}
    images = {pid: json.loads(samples[pid].image_json or "null") for pid in ids}
    assert all(samples[pid].text is None for pid in ids)
    assert images[ids[0]] == "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()  # the bytes as sent
    assert images[ids[3]] == "data:image/png;base64," + base64.b64encode(png).decode()
    small = base64.b64decode(images[ids[1]].split(",", 1)[1])  # re-encoded: the 32x32 pixels the model saw
    assert images[ids[1]].startswith("data:image/jpeg;base64,") and Image.open(io.BytesIO(small)).size == (32, 32)
    assert images[ids[2]] == raw  # a raw array stays numbers
    assert (samples[ids[0]].label_source, "feedback" in samples[ids[0]].reasons) == ("device", True)

    assert export_label_studio(list(samples.values()), tmp_path / "ls.json") == 4
    tasks = {t["data"]["sample_id"]: t for t in json.loads((tmp_path / "ls.json").read_text())}
    assert tasks[ids[0]]["data"]["image"] == images[ids[0]]
    shown = Image.open(io.BytesIO(base64.b64decode(tasks[ids[2]]["data"]["image"].split(",", 1)[1])))
    assert np.asarray(shown).shape == (32, 32, 3)
    assert labelled_images(store, "intents") == [(jpeg, "crimson")]
