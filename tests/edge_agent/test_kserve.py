"""The Open Inference Protocol with tritonclient.http as the client, overload, and /metrics,
over a real onnxruntime model."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from edge_agent.config import HttpConfig, ServingConfig
from edge_agent.protocol import Manifest
from edge_agent.runtime import ModelHolder, TextClassifier
from edge_agent.serving import InferenceServer
from tests.conftest import http_json
from tests.tinymodel import make_tiny_bundle


@pytest.fixture
def server(tmp_path: Path) -> Iterator[InferenceServer]:
    make_tiny_bundle(tmp_path / "b", version=3)
    holder = ModelHolder()
    holder.swap(TextClassifier(bundle_dir=tmp_path / "b", manifest=Manifest.read(tmp_path / "b"),
                               providers=["CPUExecutionProvider"]))  # fmt: skip
    srv = InferenceServer(config=HttpConfig(port=0, max_texts=8), holder=holder, model_name="intents")
    srv.start()
    yield srv
    srv.stop()


def client(srv: InferenceServer) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url=f"127.0.0.1:{srv.address[1]}")


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_infer(server: InferenceServer, binary: bool) -> None:
    c = client(server)
    assert c.is_server_live()
    assert c.is_server_ready()
    assert c.is_model_ready("intents")
    metadata = c.get_model_metadata("intents")
    assert metadata["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    texts = triton.InferInput("text", [3], "BYTES")
    texts.set_data_from_numpy(np.array([b"turn on the lights", b"switch off", b"dark"], dtype=object),
                              binary_data=binary)  # fmt: skip
    outputs = [triton.InferRequestedOutput("label", binary_data=binary),
               triton.InferRequestedOutput("probabilities", binary_data=binary)]  # fmt: skip
    result = c.infer("intents", [texts], outputs=outputs, request_id="r1")
    assert [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label")] == [
        "lights_on", "lights_off", "lights_on",
    ]  # fmt: skip
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (3, 2)
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    assert result.get_response()["model_version"] == "3"
    assert result.get_response()["id"] == "r1"


def test_curl_style_json_infer(server: InferenceServer) -> None:
    body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["switch off"]}]}
    status, response = http_json(server.address[1], "POST", "/v2/models/intents/infer", body)
    assert status == 200
    assert response["outputs"][0] == {"name": "label", "datatype": "BYTES", "shape": [1], "data": ["lights_off"]}


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}, 400, "one input 'text'"),
        ({"inputs": [{"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}]}, 400, "must be BYTES"),
        ({"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["x"]}]}, 400, "needs 2 elements"),
        ({"inputs": [{"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": ["x"]}]}, 400, "must be [N]"),
        ({"inputs": []}, 400, "exactly one input"),
        ({"nope": 1}, 400, '"inputs" list'),
        ({"inputs": [{"name": "text", "shape": [9], "datatype": "BYTES", "data": ["x"] * 9}]}, 413, "the limit is 8"),
        ({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x" * 3000]}]}, 413, "characters"),
        ({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"]}], "outputs": [{"name": "z"}]},
         400, "unknown output"),
    ],
)  # fmt: skip
def test_bad_infer_requests(server: InferenceServer, body: object, status: int, message: str) -> None:
    got, response = http_json(server.address[1], "POST", "/v2/models/intents/infer", body)
    assert got == status
    assert message in response["error"]


def test_wrong_model_or_version_and_malformed_json(server: InferenceServer) -> None:
    port = server.address[1]
    assert http_json(port, "GET", "/v2/models/other")[0] == 404
    status, body = http_json(port, "POST", "/v2/models/intents/versions/9/infer", {"inputs": []})
    assert (status, body["error"]) == (404, "version 9 is not loaded (serving 3)")
    status, body = http_json(port, "POST", "/v2/models/intents/infer", raw=b"{bad")
    assert status == 400
    assert "not valid JSON" in body["error"]
    bad = triton.InferInput("text", [1], "INT32")
    bad.set_data_from_numpy(np.array([1], dtype=np.int32))
    with pytest.raises(InferenceServerException, match="must be BYTES"):
        client(server).infer("intents", [bad])


def test_overload_answers_503_and_never_queues_without_bound(tmp_path: Path) -> None:
    make_tiny_bundle(tmp_path / "b", version=1)
    holder = ModelHolder()
    srv = InferenceServer(config=HttpConfig(port=0), serving=ServingConfig(queue_size=2, workers=1), holder=holder,
                          model_name="intents")  # fmt: skip
    release = threading.Event()

    class SlowModel(TextClassifier):
        def predict(self, inputs):  # type: ignore[no-untyped-def]
            release.wait(10)
            return super().predict(inputs)

    holder.swap(SlowModel(bundle_dir=tmp_path / "b", manifest=Manifest.read(tmp_path / "b"),
                          providers=["CPUExecutionProvider"]))  # fmt: skip
    srv.start()
    # A lone request runs inline on the event loop (no thread hand-off); a model that blocks there
    # holds the loop, so no request would be read at all. Hold the inline slot, as a concurrent
    # inline run does, so every request takes the worker path this test is about.
    assert srv.batcher._inline.acquire(timeout=5)
    try:
        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(
            http_json(srv.address[1], "POST", "/v1/predict", {"texts": ["on"]})[0])) for _ in range(8)]  # fmt: skip
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        # The worker holds its first batch (the first request, plus any already queued when it
        # started); two more wait in the queue; the rest (3 to 5 of 8) are refused at once.
        while len(results) < 3 and time.monotonic() < deadline:
            threading.Event().wait(0.05)
        threading.Event().wait(0.5)
        refused = len(results)
        assert 3 <= refused <= 5, results
        assert set(results) == {503}
        release.set()
        for t in threads:
            t.join()
        assert sorted(results).count(200) == 8 - refused
        assert http_json(srv.address[1], "GET", "/v2/health/live")[0] == 200
    finally:
        release.set()
        srv.batcher._inline.release()
        srv.stop()


def test_metrics_endpoint(server: InferenceServer) -> None:
    port = server.address[1]
    http_json(port, "POST", "/v1/predict", {"texts": ["on", "off"]})
    http_json(port, "POST", "/v1/predict", raw=b"{bad")
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    assert 'edge_agent_requests_total{code="200",endpoint="predict"} 1.0' in text
    assert 'edge_agent_requests_total{code="400",endpoint="predict"} 1.0' in text
    assert "edge_agent_batch_size_bucket" in text
    assert "edge_agent_request_latency_seconds_bucket" in text
    assert "edge_agent_active_version 3.0" in text
    assert "edge_agent_queue_depth 0.0" in text
    window = server.metrics.window(60)
    assert window["requests"] == 1
    assert json.dumps(window)
