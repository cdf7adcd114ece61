"""The front door (issue 12): client mistakes stay the client's, HTTP framing and timeouts that
survive misbehaving clients, and the inference-protocol extensions, against a real onnxruntime
model, real sockets, tritonclient and a real agent process."""

from __future__ import annotations

import gzip
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton

from cloud_trainer.demo.localbroker import LocalBroker
from edge_agent.config import HttpConfig
from edge_agent.protocol import Manifest, Topics
from edge_agent.runtime import ModelHolder, TextClassifier
from edge_agent.serving import InferenceServer
from tests.conftest import AgentProcess, Keys, StateListener, http_json
from tests.edge_agent.test_mqtt_inference import Requester
from tests.edge_agent.test_update_path import push
from tests.tinymodel import make_tiny_bundle

NESTED = b"[" * 100_000


@pytest.fixture
def server(tmp_path: Path) -> Iterator[InferenceServer]:
    make_tiny_bundle(tmp_path / "b", version=3)
    holder = ModelHolder()
    holder.swap(TextClassifier(bundle_dir=tmp_path / "b", manifest=Manifest.read(tmp_path / "b"),
                               providers=["CPUExecutionProvider"]))  # fmt: skip
    config = HttpConfig(port=0, max_texts=8, idle_timeout_s=0.5, header_timeout_s=0.5, max_connections=4)
    srv = InferenceServer(config=config, holder=holder, model_name="intents")
    srv.start()
    yield srv
    srv.stop()


def raw_exchange(port: int, data: bytes, *, timeout_s: float = 5.0) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it (or the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)


def statuses(raw: bytes) -> list[int]:
    return [int(line.split()[1]) for line in raw.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]


def test_nested_json_is_a_400_on_both_endpoints(server: InferenceServer) -> None:
    port = server.address[1]
    for path in ("/v1/predict", "/v2/models/intents/infer"):
        status, body = http_json(port, "POST", path, raw=NESTED)
        assert status == 400, body
        assert "nested too deep" in body["error"]
    assert http_json(port, "GET", "/v2/health/live")[0] == 200


def test_inputs_the_tokenizer_cannot_take_are_refused_before_it(server: InferenceServer) -> None:
    port = server.address[1]
    status, body = http_json(port, "POST", "/v1/predict", raw=b'{"texts": ["\\ud800"]}')
    assert (status, body["error"]) == (400, "texts[0] is not valid Unicode (a lone surrogate?)")
    empty = {"inputs": [{"name": "text", "shape": [0], "datatype": "BYTES", "data": []}]}
    status, body = http_json(port, "POST", "/v2/models/intents/infer", empty)
    assert status == 400 and "empty" in body["error"]
    assert server.service.stats.fail_count == 0  # none of it reached the model


def test_query_strings_head_and_date(server: InferenceServer) -> None:
    port = server.address[1]
    raw = raw_exchange(port, b"GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert statuses(raw) == [200] and b"edge_agent_requests" in raw  # Prometheus `params:` add a query
    raw = raw_exchange(port, b"HEAD /v2/health/live?probe=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert statuses(raw) == [200] and body == b""
    assert b"\r\nDate: " in head and b"\r\nContent-Length: 14" in head


def test_chunked_and_gzip_bodies(server: InferenceServer) -> None:
    port = server.address[1]
    payload = json.dumps({"texts": ["turn on the lights"]}).encode()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (payload[:7], payload[7:])) + b"0\r\n\r\n"
    raw = raw_exchange(port, b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                             b"Connection: close\r\n\r\n" + chunked)  # fmt: skip
    assert statuses(raw) == [200] and b"lights_on" in raw
    zipped = gzip.compress(payload)
    raw = raw_exchange(port, b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(zipped), zipped))  # fmt: skip
    assert statuses(raw) == [200] and b"lights_on" in raw
    bomb = gzip.compress(b" " * (4 << 20))  # 4 MiB of spaces in a few KiB: refused while it inflates
    raw = raw_exchange(port, b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(bomb), bomb))  # fmt: skip
    assert statuses(raw) == [413]


def test_content_length_with_transfer_encoding_is_refused_and_closes(server: InferenceServer) -> None:
    smuggled = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    raw = raw_exchange(server.address[1], b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                                          b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + smuggled)  # fmt: skip
    assert statuses(raw) == [400]  # and nothing after it was read as a second request
    assert b"Connection: close" in raw


def test_idle_and_trickling_connections_are_closed(server: InferenceServer) -> None:
    port = server.address[1]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert statuses(sock.recv(65536)) == [200]
        start = time.monotonic()
        assert sock.recv(65536) == b""  # the keep-alive connection, left idle, is closed by the server
        print(f"\nidle keep-alive connection closed after {time.monotonic() - start:.2f}s (timeout 0.5 s)")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHo")  # and never the rest
        raw = sock.recv(65536)
        assert statuses(raw) == [408] and sock.recv(65536) == b""


def test_connections_past_the_cap_get_503(server: InferenceServer) -> None:
    port = server.address[1]
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(4)]
    try:
        for sock in held:  # make sure each is accepted and counted
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            assert statuses(sock.recv(65536)) == [200]
        raw = raw_exchange(port, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert statuses(raw) == [503]
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 5
    while http_json(port, "GET", "/v2/health/live")[0] != 200:  # the slots free up as they close
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_lone_request_runs_on_the_loop_and_a_burst_batches_on_the_workers(tmp_path: Path) -> None:
    """The HTTP server counts the requests it has read and not yet answered: one alone runs inline
    on its loop, a burst from many connections goes to the batcher's workers. The count must come
    back to zero whatever the clients do (pipelining, closing mid-request, framing errors), or every
    later request would take the slower path."""
    make_tiny_bundle(tmp_path / "b", version=3)
    holder = ModelHolder()
    model = TextClassifier(bundle_dir=tmp_path / "b", manifest=Manifest.read(tmp_path / "b"),
                           providers=["CPUExecutionProvider"])  # fmt: skip
    ran_on: list[str] = []
    real_run = model.run

    def run(inputs: Any) -> Any:
        ran_on.append(threading.current_thread().name)
        time.sleep(0.01)  # long enough for a burst to queue behind it
        return real_run(inputs)

    model.run = run  # type: ignore[method-assign]
    holder.swap(model)
    srv = InferenceServer(config=HttpConfig(port=0), holder=holder, model_name="intents")
    srv.start()
    port = srv.address[1]
    request = b'POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 21\r\n\r\n{"texts": ["lights"]}'
    try:
        assert http_json(port, "POST", "/v1/predict", {"texts": ["lights on"]})[0] == 200
        assert ran_on == ["http"]  # alone: inline on the loop's thread

        def client(_: int) -> list[int]:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                got: list[int] = []
                for _ in range(4):
                    sock.sendall(request)
                    got += statuses(sock.recv(65536))
                return got

        with ThreadPoolExecutor(12) as pool:
            answers = [s for got in pool.map(client, range(12)) for s in got]
        assert answers == [200] * 48
        assert any(name.startswith("inference-") for name in ran_on), set(ran_on)  # the burst batched

        def every_status(raw: bytes) -> list[int]:  # answers follow each other's bodies on one line
            return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)]

        pipelined = request * 3 + b"GET /v2 HTTP/1.1\r\nConnection: close\r\n\r\n"
        assert every_status(raw_exchange(port, pipelined)) == [200, 200, 200, 200]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(request * 2)  # and gone before the answers
        # a framing error ends the connection at once: the good request read with it is dropped
        assert every_status(raw_exchange(port, request + b"NOT HTTP\r\n\r\n")) == [400]

        deadline = time.monotonic() + 5
        while srv.open_requests != 0:  # the abandoned connection's requests are answered or dropped
            assert time.monotonic() < deadline, f"{srv.open_requests} requests still counted as open"
            time.sleep(0.02)
        ran_on.clear()
        assert http_json(port, "POST", "/v1/predict", {"texts": ["lights off"]})[0] == 200
        assert ran_on == ["http"]  # alone again: inline
    finally:
        srv.stop()


def test_tritonclient_config_statistics_gzip_and_class_count(server: InferenceServer) -> None:
    c = triton.InferenceServerClient(url=f"127.0.0.1:{server.address[1]}")
    config = c.get_model_config("intents")
    assert config["name"] == "intents" and config["max_batch_size"] == 8
    assert [i["name"] for i in config["input"]] == ["text"]
    texts = triton.InferInput("text", [2], "BYTES")
    texts.set_data_from_numpy(np.array([b"turn on the lights", b"switch off"], dtype=object))
    outputs = [triton.InferRequestedOutput("probabilities", class_count=1)]
    result = c.infer("intents", [texts], outputs=outputs, request_compression_algorithm="gzip")
    top = [v.decode() for v in result.as_numpy("probabilities").reshape(-1)]
    assert [t.split(":")[2] for t in top] == ["lights_on", "lights_off"]  # Triton's "score:index:label"
    stats = c.get_inference_statistics("intents")
    assert stats["model_stats"][0]["inference_stats"]["success"]["count"] >= 1
    assert c.is_server_ready() is not False  # ready: a model serves


def test_twenty_five_bad_requests_after_an_update_leave_the_new_version_active(
    tmp_path: Path, mosquitto: LocalBroker, fleet: str, keys: Keys,
    agent_process: Callable[..., AgentProcess], state_listener: StateListener,
) -> None:  # fmt: skip
    make_tiny_bundle(tmp_path / "v1", version=1)
    make_tiny_bundle(tmp_path / "v2", version=2, scale=2.0)
    push(tmp_path / "v1", mosquitto, fleet, keys)
    agent = agent_process(min_requests=5, max_error_rate=0.1, watch_s=300)
    agent.wait_version(1)
    push(tmp_path / "v2", mosquitto, fleet, keys)
    agent.wait_version(2)
    state_listener.wait_for(lambda s: s.get("active_version") == 2 and s.get("update_state") == "active")
    port = agent.http_port
    empty = {"inputs": [{"name": "text", "shape": [0], "datatype": "BYTES", "data": []}]}
    requester = Requester(mosquitto, Topics(fleet=fleet).device_infer("dev-1"))
    try:
        for i in range(25):
            kind = i % 3
            if kind == 0:
                status, _ = http_json(port, "POST", "/v2/models/intents/infer", empty)
            elif kind == 1:
                status, _ = http_json(port, "POST", "/v1/predict", raw=b'{"texts": ["\\ud800"]}')
            else:
                status = requester.ask(NESTED, f"n-{i}".encode())["status"]
            assert status == 400, (kind, status)
        ok = requester.ask(json.dumps({"texts": ["switch off the lights"]}).encode(), b"ok")
        assert (ok["status"], ok["version"]) == (200, 2)
    finally:
        requester.close()
    status, body = agent.predict(["switch off the lights"])
    assert (status, body["version"]) == (200, 2)
    assert not [s for s in state_listener.states if s.get("update_state") == "rolled-back"]
    assert "rolled back" not in agent.log()
