"""The local HTTP API over a real onnxruntime model: predictions, health, and every bad request a 4xx."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.config import HttpConfig
from edge_agent.protocol import Manifest
from edge_agent.runtime import ModelHolder, TextClassifier
from edge_agent.serving import InferenceServer
from tests.conftest import http_json
from tests.tinymodel import make_tiny_bundle


@pytest.fixture
def server(tmp_path: Path) -> Iterator[InferenceServer]:
    make_tiny_bundle(tmp_path / "b", version=7)
    holder = ModelHolder()
    srv = InferenceServer(
        config=HttpConfig(port=0, max_texts=4, max_text_chars=50, max_body_bytes=2048),
        holder=holder,
        model_name="intents",
    )
    srv.start()
    yield srv
    srv.stop()


def _load(srv: InferenceServer, tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    srv.holder.swap(
        TextClassifier(bundle_dir=bundle, manifest=Manifest.read(bundle), providers=["CPUExecutionProvider"])
    )


def test_not_ready_until_a_model_is_loaded(server: InferenceServer, tmp_path: Path) -> None:
    port = server.address[1]
    assert http_json(port, "GET", "/v2/health/live")[0] == 200
    assert http_json(port, "GET", "/v2/health/ready")[0] == 400  # the v2 protocol: 4xx means not ready
    status, body = http_json(port, "POST", "/v1/predict", {"texts": ["turn on"]})
    assert (status, body["error"]) == (503, "no verified model is active yet")
    _load(server, tmp_path)
    assert http_json(port, "GET", "/v2/health/ready") == (200, {"ready": True, "version": 7})


def test_predict(server: InferenceServer, tmp_path: Path) -> None:
    _load(server, tmp_path)
    status, body = http_json(server.address[1], "POST", "/v1/predict", {"texts": ["turn on the lights", "switch off"]})
    assert status == 200
    assert [p["label"] for p in body["predictions"]] == ["lights_on", "lights_off"]
    assert body["version"] == 7
    scores = body["predictions"][0]["scores"]
    assert set(scores) == {"lights_on", "lights_off"}
    assert abs(sum(scores.values()) - 1) < 1e-5


@pytest.mark.parametrize(
    ("raw", "status", "message"),
    [
        (b"{nope", 400, "not valid JSON"),
        (b"[1, 2]", 400, '"texts" list'),
        (b'{"texts": "on"}', 400, "list of strings"),
        (b'{"texts": [1]}', 400, "list of strings"),
        (b'{"texts": []}', 400, "is empty"),
        (b'{"texts": ["a", "b", "c", "d", "e"]}', 413, "5 texts in one request; the limit is 4"),
        (json.dumps({"texts": ["x" * 51]}).encode(), 413, "texts[0] has 51 characters; the limit is 50"),
        (json.dumps({"texts": ["x" * 40] * 60}).encode(), 413, "the limit is 2048"),
    ],
)
def test_bad_requests_get_a_4xx_that_names_the_problem(
    server: InferenceServer, tmp_path: Path, raw: bytes, status: int, message: str
) -> None:
    _load(server, tmp_path)
    got_status, body = http_json(server.address[1], "POST", "/v1/predict", raw=raw)
    assert got_status == status
    assert message in body["error"]
    assert http_json(server.address[1], "GET", "/v2/health/live")[0] == 200  # still up


def test_unknown_endpoint_and_missing_length(server: InferenceServer) -> None:
    port = server.address[1]
    assert http_json(port, "GET", "/nope")[0] == 404
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.putrequest("POST", "/v1/predict")
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 411
    assert "Content-Length" in json.loads(response.read())["error"]


def test_workers_split_a_burst_into_batches_that_run_at_once(tmp_path: Path) -> None:
    import threading
    import time

    from edge_agent.serving.batcher import Batcher

    make_tiny_bundle(tmp_path / "b", version=1)
    gate, lock = threading.Event(), threading.Lock()
    running: list[int] = []
    batches: list[int] = []

    class Gated(TextClassifier):
        def predict(self, inputs):  # type: ignore[no-untyped-def]
            with lock:
                running.append(len(inputs))
                batches.append(len(inputs))
            gate.wait(10)
            with lock:
                running.remove(len(inputs))
            return super().predict(inputs)

    holder = ModelHolder()
    holder.swap(Gated(bundle_dir=tmp_path / "b", manifest=Manifest.read(tmp_path / "b"),
                      providers=["CPUExecutionProvider"]))  # fmt: skip
    batcher = Batcher(model=holder.get, max_batch=32, max_delay_ms=0, queue_size=64, workers=2)
    futures = [batcher.submit(["turn on the lights"]) for _ in range(10)]  # a burst, queued before the workers start
    batcher.start()
    try:
        deadline = time.monotonic() + 10
        while len(running) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(running) == 2  # two model runs at once, each a batch of several requests
        gate.set()
        results = [f.result(timeout=10) for f in futures]
        assert all(version == 1 and p[0].label == "lights_on" for version, p in results)
        assert sum(batches) == 10 and len(batches) < 10
    finally:
        gate.set()
        batcher.stop()


def test_a_caller_that_gave_up_does_not_kill_a_worker(tmp_path: Path) -> None:
    from edge_agent.serving.batcher import Batcher

    make_tiny_bundle(tmp_path / "b", version=1)
    holder = ModelHolder()
    holder.swap(TextClassifier(bundle_dir=tmp_path / "b", manifest=Manifest.read(tmp_path / "b"),
                               providers=["CPUExecutionProvider"]))  # fmt: skip
    batcher = Batcher(model=holder.get, max_batch=8, max_delay_ms=0, queue_size=8, workers=1)
    gave_up = batcher.submit(["on"])
    assert gave_up.cancel()  # what asyncio.wait_for does to a request that timed out
    kept = batcher.submit(["turn on the lights"])
    batcher.start()
    try:
        assert kept.result(timeout=10)[1][0].label == "lights_on"
        assert batcher.worker_alive
        assert batcher.predict(["switch off"], timeout_s=10)[1][0].label == "lights_off"
    finally:
        batcher.stop()
    assert not batcher.worker_alive  # the worker that lived through the cancelled future ends at stop


def test_feedback_with_one_unknown_id_takes_none(tmp_path: Path) -> None:
    from edge_agent.protocol.samples import SampleRecord, SamplingRules
    from edge_agent.sampling import Sampler

    make_tiny_bundle(tmp_path / "b", version=1)
    holder = ModelHolder()
    holder.swap(TextClassifier(bundle_dir=tmp_path / "b", manifest=Manifest.read(tmp_path / "b"),
                               providers=["CPUExecutionProvider"]))  # fmt: skip
    kept: list[SampleRecord] = []
    sampler = Sampler(rules=SamplingRules(enabled=False), device="d", fleet="f", model="intents", sink=kept.extend)
    srv = InferenceServer(config=HttpConfig(port=0), holder=holder, model_name="intents", sampler=sampler)
    srv.start()
    try:
        port = srv.address[1]
        status, body = http_json(port, "POST", "/v1/predict", {"texts": ["on", "off"]})
        first, second = (p["id"] for p in body["predictions"])
        unknown = "0" * 32
        both = {"feedback": [{"id": first, "label": "a"}, {"id": unknown, "label": "b"}]}
        status, body = http_json(port, "POST", "/v1/feedback", both)
        assert status == 404 and body["error"].startswith("feedback[1]: prediction id") and kept == []
        status, body = http_json(port, "POST", "/v1/feedback", {"id": second, "label": "\ud800"})
        assert status == 400 and '"label"' in body["error"]
        status, body = http_json(port, "POST", "/v1/feedback", {"id": second, "label": "lights_off"})
        assert (status, body["accepted"], kept[0].label, kept[0].text) == (202, 1, "lights_off", "off")
    finally:
        srv.stop()
