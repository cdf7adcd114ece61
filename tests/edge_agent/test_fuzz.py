"""A bounded, seeded fuzz of the front doors: HTTP framing and bodies against the real server, MQTT
request payloads and properties against a real agent. Whatever arrives, the answer is a well-formed
4xx/2xx (or a closed connection), never a 500, never a hang, and the server keeps serving.

``EDGELOOP_FUZZ_CASES`` raises the number of cases (the suite runs a couple of seconds' worth).
"""

from __future__ import annotations

import json
import os
import random
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cloud_trainer.demo.localbroker import LocalBroker
from edge_agent.config import HttpConfig
from edge_agent.protocol import Manifest, Topics
from edge_agent.runtime import ModelHolder, TextClassifier
from edge_agent.serving import InferenceServer
from tests.conftest import AgentProcess, Keys, http_json
from tests.edge_agent.test_mqtt_inference import Requester
from tests.edge_agent.test_update_path import push
from tests.tinymodel import make_tiny_bundle

CASES = int(os.environ.get("EDGELOOP_FUZZ_CASES", "400"))
PATHS = [
    "/v1/predict", "/v2/models/intents/infer", "/v1/feedback", "/metrics", "/v2/health/ready", "/v2/models/intents",
    "/v2/models/intents/config", "/v2/models/stats", "/nope", "/v2/models/intents/versions/3/infer", "/" * 300,
]  # fmt: skip
BODIES: list[bytes] = [
    b"", b"{", b"[]", b"null", b'{"texts": []}', b'{"texts": ["on"]}', b'{"texts": ["\\ud800"]}', b'{"texts": [1]}',
    b'{"texts": "on"}', b"[" * 5000, b'{"inputs": [{"name": "text", "shape": [0], "datatype": "BYTES", "data": []}]}',
    b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["on"]}]}',
    b'{"inputs": [{"name": "text", "shape": [-1], "datatype": "BYTES", "data": ["on"]}]}',
    b'{"inputs": [{"name": "text", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]}]}',
    b'{"id": "' + b"0" * 32 + b'", "label": "x"}', "\u00e9\u00e9".encode(), b"\xff\xfe\x00",
    b'{"texts": ["x"' + b"]" * 3,
]  # fmt: skip


def mutate(rng: random.Random, data: bytes) -> bytes:
    if not data or rng.random() < 0.5:
        return data
    raw = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not raw:
            break
        i = rng.randrange(len(raw))
        op = rng.random()
        if op < 0.4:
            raw[i] = rng.randrange(256)
        elif op < 0.7:
            del raw[i]
        else:
            raw[i:i] = bytes([rng.randrange(256)]) * rng.randint(1, 8)
    return bytes(raw)


def http_case(rng: random.Random) -> bytes:
    method = rng.choice(["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "POST", "POST", "G\x00T"])
    path = rng.choice(PATHS) + rng.choice(["", "?x=1", "?a=%zz", "#frag", "?" + "q" * 100])
    body = mutate(rng, rng.choice(BODIES))
    headers = [f"Host: {rng.choice(['x', '', 'a' * 50])}"]
    framing = rng.random()
    if framing < 0.5:
        headers.append(f"Content-Length: {len(body) + rng.choice([0, 0, 0, -1, 1, 1000, -len(body) - 5])}")
    elif framing < 0.65:
        headers.append("Transfer-Encoding: chunked")
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if rng.random() < 0.8 else body
    elif framing < 0.75:
        headers += [f"Content-Length: {len(body)}", "Transfer-Encoding: chunked"]
    if rng.random() < 0.2:
        extra = ["Content-Encoding: gzip", "Content-Encoding: br", "Expect: 100-continue", "Connection: keep-alive",
                 "X-Long: " + "v" * 20000, "Bad Header", ": x"]  # fmt: skip
        headers.append(rng.choice(extra))
    version = rng.choice(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTX/1.1", ""])
    head = f"{method} {path} {version}\r\n" + "\r\n".join(headers) + "\r\nConnection: close\r\n\r\n"
    return mutate(rng, head.encode("latin-1")) + body


@pytest.fixture
def server(tmp_path: Path) -> Iterator[InferenceServer]:
    make_tiny_bundle(tmp_path / "b", version=3)
    holder = ModelHolder()
    holder.swap(TextClassifier(bundle_dir=tmp_path / "b", manifest=Manifest.read(tmp_path / "b"),
                               providers=["CPUExecutionProvider"]))  # fmt: skip
    config = HttpConfig(port=0, header_timeout_s=1, body_timeout_s=1, idle_timeout_s=1, max_body_bytes=64 * 1024)
    srv = InferenceServer(config=config, holder=holder, model_name="intents")
    srv.start()
    yield srv
    srv.stop()


def test_http_fuzz_gets_no_500_and_the_server_survives(server: InferenceServer) -> None:
    rng = random.Random(1234)
    port = server.address[1]
    seen: dict[int, int] = {}
    for case in range(CASES):
        data = http_case(rng)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
            except (ConnectionResetError, BrokenPipeError):
                continue  # closed on us mid-send: a refusal too
        for line in answer.split(b"\r\n"):
            if line.startswith(b"HTTP/1.1 "):
                status = int(line.split()[1])
                seen[status] = seen.get(status, 0) + 1
                assert status < 500 or status == 503, f"case {case}: {data[:300]!r} -> {answer[:300]!r}"
    print(f"\n{CASES} fuzzed HTTP requests, statuses: {dict(sorted(seen.items()))}")
    assert http_json(port, "GET", "/v2/health/live")[0] == 200
    assert server.service.stats.fail_count == 0


def test_mqtt_fuzz_gets_no_model_failure_and_the_agent_survives(
    tmp_path: Path, mosquitto: LocalBroker, fleet: str, keys: Keys, agent_process: Callable[..., AgentProcess]
) -> None:
    make_tiny_bundle(tmp_path / "v1", version=1)
    push(tmp_path / "v1", mosquitto, fleet, keys)
    agent = agent_process()
    agent.wait_version(1)
    topic = Topics(fleet=fleet).device_infer("dev-1")
    requester = Requester(mosquitto, topic)
    rng = random.Random(99)
    try:
        for _case in range(CASES // 4):
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if rng.random() < 0.8:
                props.ResponseTopic = rng.choice(["test/replies", "test/+/x", "#", "a" * 300, "test/replies"])
            if rng.random() < 0.8:
                props.CorrelationData = rng.randbytes(rng.randint(0, 64))
            if rng.random() < 0.2:
                props.UserProperty = [("k", "v" * rng.randint(0, 100))]
            requester.client.publish(topic, mutate(rng, rng.choice(BODIES)), qos=rng.choice([0, 1]), properties=props)
        answer = requester.ask(json.dumps({"texts": ["turn on the lights"]}).encode(), b"after-the-fuzz")
    finally:
        requester.close()
    assert (answer["status"], answer["predictions"][0]["label"]) == (200, "lights_on")
    assert "Traceback" not in agent.log()
    _status, body = http_json(agent.http_port, "GET", "/v2/models/intents/stats")
    assert body["model_stats"][0]["inference_stats"]["fail"]["count"] == 0
