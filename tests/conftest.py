"""Shared fixtures: a real Mosquitto per session, signing keys, agents in-process or as processes."""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cloud_trainer.demo.localbroker import LocalBroker
from cloud_trainer.releases.signing import generate_keypair
from tests.ports import start_mosquitto

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    """A real Mosquitto on a free port, owned by this test session."""
    broker = start_mosquitto(workdir=tmp_path_factory.mktemp("mosquitto"))
    try:
        yield broker
    finally:
        broker.stop()


@dataclass(frozen=True)
class Keys:
    private: Path
    public: Path


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    private, public = generate_keypair(tmp_path_factory.mktemp("keys"))
    return Keys(private, public)


@pytest.fixture
def fleet(request: pytest.FixtureRequest) -> str:
    """A fleet name unique to the test, so retained messages of one test never reach another."""
    name = request.node.name.replace("[", "-").replace("]", "").replace("_", "-")
    return f"t-{name}"[:60]


def agent_toml(
    *,
    state_dir: Path,
    broker: LocalBroker,
    fleet: str,
    public_key: Path,
    http_port: int = 0,
    protocol: str = "5",
    group: str | None = None,
    **update: Any,
) -> str:
    """An agent config for tests; ``update`` overrides ``[update]`` settings."""
    settings = {"trusted_keys": [str(public_key)], "chunk_timeout_s": 5, **update}
    update_lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())
    return (
        textwrap.dedent(
            f"""\
        device_id = "dev-1"
        fleet = "{fleet}"
        model = "intents"
        state_dir = "{state_dir}"
        {f'group = "{group}"' if group else ""}

        [mqtt]
        host = "{broker.host}"
        port = {broker.port}
        protocol = "{protocol}"
        keepalive_s = 5

        [http]
        port = {http_port}

        [update]
        """
        )
        + update_lines
    )


class StateListener:
    """Collects the retained state documents a device publishes."""

    def __init__(self, broker: LocalBroker, topic: str) -> None:
        self.states: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self._client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self._client.on_message = self._on_message
        self._client.connect(broker.host, broker.port)
        self._client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.states.append(json.loads(msg.payload))
            self._cond.notify_all()

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = 30.0, *, since: int = 0
    ) -> dict[str, Any]:
        """The first state from index ``since`` on that matches ``predicate``."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for state in self.states[since:]:
                    if predicate(state):
                        return state
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no state matched within {timeout_s}s; saw {self.states[-5:]}")
                self._cond.wait(remaining)

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


@pytest.fixture
def state_listener(mosquitto: LocalBroker, fleet: str) -> Iterator[StateListener]:
    from edge_agent.protocol import Topics

    listener = StateListener(mosquitto, Topics(fleet=fleet).device_state("dev-1"))
    try:
        yield listener
    finally:
        listener.close()


def http_json(port: int, method: str, path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    payload = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=payload, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, json.loads(data) if data else None


SERVING_ON = re.compile(rb"serving on http://[^\s:]+:(\d+) ")
"""the line ``edge-agent run`` logs once it serves; it names the port the agent bound"""


@dataclass
class AgentProcess:
    """``edge-agent run`` as a separate process, as systemd would run it.

    Give its config ``[http] port = 0``: the agent binds a port of its own and :meth:`start` reads it
    from the log into :attr:`http_port` (again at every start), so no other process can take it first.
    """

    config_path: Path
    log_path: Path
    http_port: int = 0
    process: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    def start(self) -> AgentProcess:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "edge_agent", "run", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
            )
        try:
            self._wait_serving(offset)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_serving(self, offset: int) -> None:
        assert self.process is not None
        deadline = time.monotonic() + 30
        port = None
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"agent exited early:\n{self.log()}"
            if port is None:
                with self.log_path.open("rb") as log:
                    log.seek(offset)
                    found = SERVING_ON.search(log.read())
                port = int(found.group(1)) if found else None
            if port is not None:
                self.http_port = port
                try:
                    status, _ = http_json(port, "GET", "/v2/health/live")
                    if status == 200:
                        return
                except OSError:
                    pass
            time.sleep(0.05)
        raise AssertionError(f"agent did not start:\n{self.log()}")

    def wait_version(self, version: int, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None and self.process.poll() is None, f"agent died:\n{self.log()}"
            status, body = http_json(self.http_port, "GET", "/v2/health/ready")
            if status == 200 and body["version"] == version:
                return
            time.sleep(0.1)
        raise AssertionError(f"agent did not serve version {version}:\n{self.log()}")

    def predict(self, texts: list[str]) -> tuple[int, Any]:
        return http_json(self.http_port, "POST", "/v1/predict", {"texts": texts})

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_log(self, pattern: str, *, count: int = 1, timeout_s: float = 60.0) -> list[str]:
        """Wait until the agent's log has ``count`` lines matching the regex ``pattern``; return them all.

        A log line the agent writes when it decides *not* to act is how a test sees that nothing
        happened, without sleeping and hoping.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        while True:
            lines = [line for line in self.log_path.read_text(errors="replace").splitlines() if regex.search(line)]
            if len(lines) >= count:
                return lines
            assert time.monotonic() < deadline, (
                f"{count} log lines matching {pattern!r} not within {timeout_s:g}s:\n{self.log()}"
            )
            assert self.process is not None and self.process.poll() is None, f"agent died:\n{self.log()}"
            time.sleep(0.05)


@pytest.fixture
def agent_process(
    tmp_path: Path, mosquitto: LocalBroker, fleet: str, keys: Keys
) -> Iterator[Callable[..., AgentProcess]]:
    started: list[AgentProcess] = []

    def make(
        *,
        broker: LocalBroker | None = None,
        env: dict[str, str] | None = None,
        extra_toml: str = "",
        group: str | None = None,
        **update: Any,
    ) -> AgentProcess:
        """``update`` sets ``[update]`` keys; ``extra_toml`` adds whole sections (``[sampling]``...)."""
        config = tmp_path / "agent.toml"
        config.write_text(
            agent_toml(
                state_dir=tmp_path / "state",
                broker=broker or mosquitto,
                fleet=fleet,
                public_key=keys.public,
                group=group,
                **update,
            )
            + extra_toml
        )
        agent = AgentProcess(config_path=config, log_path=tmp_path / "agent.log", env=env or {})
        started.append(agent)  # stopped at teardown even if it fails to start
        return agent.start()

    try:
        yield make
    finally:
        for agent in started:
            if agent.process is not None:
                agent.stop()


@pytest.fixture
def serving_v1(
    tmp_path: Path, mosquitto: LocalBroker, fleet: str, keys: Keys, agent_process: Callable[..., AgentProcess]
) -> AgentProcess:
    """An agent process serving v1 of the tiny ``intents`` model, pushed to the whole fleet."""
    from cloud_trainer.releases.publish import push_bundle
    from tests.tinymodel import make_tiny_bundle

    make_tiny_bundle(tmp_path / "v1", version=1)
    push_bundle(tmp_path / "v1", host=mosquitto.host, port=mosquitto.port, fleet=fleet, key_path=keys.private)
    agent = agent_process()
    agent.wait_version(1)
    return agent
