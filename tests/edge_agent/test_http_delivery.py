"""Bundles from an HTTP server instead of the broker: Range requests per chunk, resumed after failures."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from cloud_trainer.demo.localbroker import LocalBroker
from cloud_trainer.releases.publish import push_bundle
from tests.conftest import AgentProcess, Keys, StateListener
from tests.tinymodel import make_tiny_bundle


class ArtifactServer:
    """Serves a directory with Range support; can be told to fail a number of requests."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ranges: list[str] = []  # every 206 answered
        self.fail_after = -1  # answer 503 once this many ranges were served ...
        self.failures = 0  # ... this many times
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: Any) -> None:
                pass

            def do_GET(self) -> None:
                path = server.root / self.path.lstrip("/")
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                match = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
                if match is None:
                    self._answer(200, data)
                    return
                if server.fail_after >= 0 and len(server.ranges) >= server.fail_after and server.failures > 0:
                    server.failures -= 1
                    self._answer(503, b"busy")
                    return
                first, last = int(match[1]), int(match[2])
                server.ranges.append(f"{self.path}:{first}")
                self._answer(206, data[first : last + 1])

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"


@pytest.fixture
def artifacts(tmp_path: Path) -> Iterator[ArtifactServer]:
    server = ArtifactServer(tmp_path / "www")
    yield server
    server.httpd.shutdown()


def test_bundle_over_http_with_resume(
    tmp_path: Path, artifacts: ArtifactServer, mosquitto: LocalBroker, fleet: str, keys: Keys,
    agent_process: Callable[..., AgentProcess], state_listener: StateListener,
) -> None:  # fmt: skip
    manifest = make_tiny_bundle(tmp_path / "www" / "v1", version=1, padding=1_000_000)
    chunks = sum(len(entry.chunks) for entry in manifest.files)
    artifacts.fail_after, artifacts.failures = chunks // 2, 3  # the server fails half way through, three times
    result = push_bundle(
        tmp_path / "www" / "v1", host=mosquitto.host, port=mosquitto.port, fleet=fleet, key_path=keys.private,
        artifact_url=f"{artifacts.url}/v1",
    )  # fmt: skip
    assert result.chunks == 0  # nothing but the release went to the broker
    agent = agent_process(retry_base_s=0.2)
    agent.wait_version(1, timeout_s=60)
    assert agent.predict(["turn on the lights"])[1]["predictions"][0]["label"] == "lights_on"
    assert len(artifacts.ranges) == chunks  # each chunk fetched once: the retries resumed, not restarted
    assert len(set(artifacts.ranges)) == chunks
    deferred = [s for s in state_listener.states if "stalled" in (s.get("last_error") or "")]
    assert deferred
    assert "answered 503" in deferred[0]["last_error"]


def test_corrupt_http_artifact_is_refused(
    tmp_path: Path, artifacts: ArtifactServer, mosquitto: LocalBroker, fleet: str, keys: Keys,
    agent_process: Callable[..., AgentProcess], state_listener: StateListener,
) -> None:  # fmt: skip
    make_tiny_bundle(tmp_path / "www" / "v1", version=1)
    push_bundle(
        tmp_path / "www" / "v1", host=mosquitto.host, port=mosquitto.port, fleet=fleet, key_path=keys.private,
        artifact_url=f"{artifacts.url}/v1",
    )  # fmt: skip
    tokenizer = tmp_path / "www" / "v1" / "tokenizer.json"
    tokenizer.write_bytes(tokenizer.read_bytes().replace(b"lights", b"LIGHTS"))  # same size, other bytes
    agent_process()
    state = state_listener.wait_for(lambda s: s.get("update_state") == "rejected")
    assert "arrived with sha256" in state["last_error"]
