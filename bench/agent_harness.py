"""What the serving and soak benchmarks share: a trained bundle, a real agent process, an HTTP and an
MQTT 5 client for it, and the process's RSS, fds and threads from ``/proc``.

Imported by the scripts beside it (``bench/`` is the script's directory, so on ``sys.path``).
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloud_trainer.demo.localbroker import free_port

MODEL = "intents"


def train_bundle(work: Path, *, run: str = "run", epochs: float = 8.0, seed: int | None = None) -> Path:
    """Fine-tune MiniLM on the packaged voice commands, export int8 and register the next version in
    ``work/registry``; returns the bundle directory. The run (with its ``val.csv``) is ``work/run``."""
    from cloud_trainer.releases.registry import Registry
    from cloud_trainer.training.data import PACKAGED_DATASET
    from cloud_trainer.training.runs import register_run, train_run
    from cloud_trainer.training.train import TrainConfig

    options: dict[str, Any] = {"epochs": epochs, "progress": False}
    if seed is not None:
        options["seed"] = seed
    train_run(PACKAGED_DATASET, work / run, config=TrainConfig(**options))
    # the gate is one of the 70 validation texts: the versions here are measured, not judged
    entry, _ = register_run(Registry(work / "registry"), work / run, model=MODEL, max_accuracy_drop=1.5)
    return entry.bundle_dir


def install_bundle(state: Path, bundle: Path, version: int = 1) -> None:
    """Put ``bundle`` into an agent's state directory as its active version, as an update would."""
    import shutil

    from edge_agent.store import ModelStore

    store = ModelStore(state_dir=state, model=MODEL)
    staging = store.fresh_staging(version)
    shutil.copytree(bundle, staging, dirs_exist_ok=True)
    store.install(staging, version)
    store.activate(version)


def write_agent_config(
    path: Path,
    *,
    state: Path,
    http_port: int,
    mqtt_port: int,
    public_key: Path,
    device: str = "bench",
    fleet: str = "bench",
    threads: int = 1,
    telemetry_s: float = 0,
) -> None:
    path.write_text(textwrap.dedent(f"""\
        device_id = "{device}"
        fleet = "{fleet}"
        state_dir = "{state}"
        [mqtt]
        port = {mqtt_port}
        [http]
        port = {http_port}
        [runtime]
        intra_op_threads = {threads}
        [serving]
        telemetry_interval_s = {telemetry_s}
        [update]
        trusted_keys = ["{public_key}"]
        """))  # fmt: skip


UNIT_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
"""What systemd/edge-agent.service sets for the agent's memory: the benchmarks run it the same way."""


def start_agent(config: Path, *, log: Path | None = None, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``edge-agent run`` as a child process, with the unit's environment (its log to ``log``, else
    discarded; ``env`` added to ours and overriding the unit's)."""
    out = log.open("wb") if log is not None else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
                            stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, **UNIT_ENV, **(env or {})})  # fmt: skip


def stop_agent(agent: subprocess.Popen[bytes]) -> None:
    agent.terminate()
    try:
        agent.wait(timeout=15)
    except subprocess.TimeoutExpired:
        agent.kill()
        agent.wait()


def post(conn: http.client.HTTPConnection, text: str) -> bytes:
    """One ``POST /v1/predict`` of one text on a keep-alive connection; the reply's body (not parsed)."""
    conn.request(
        "POST", "/v1/predict", body=json.dumps({"texts": [text]}), headers={"Content-Type": "application/json"}
    )
    response = conn.getresponse()
    body = response.read()
    if response.status != 200:
        raise RuntimeError(f"agent answered {response.status}")
    return body


class RawHttp:
    """A keep-alive HTTP/1.1 client on a bare socket (TCP_NODELAY), for measuring the agent rather
    than the client: one pre-framed ``sendall`` per request, and a response read by its
    ``Content-Length`` without parsing the headers into objects, as ``wrk`` does. ``http.client``
    spends a few hundred microseconds of Python per request on the same work (its header parser)."""

    _LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)

    def __init__(self, port: int, *, timeout_s: float = 5.0) -> None:
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = b""

    def _recv(self) -> None:
        data = self._sock.recv(65536)
        if not data:
            raise ConnectionError("the agent closed the connection")
        self._buffer += data

    def post(self, text: str) -> bytes:
        """One ``POST /v1/predict`` of one text; the reply's body (not parsed)."""
        body = json.dumps({"texts": [text]}).encode()
        self._sock.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
        )
        while (end := self._buffer.find(b"\r\n\r\n")) < 0:
            self._recv()
        head = self._buffer[:end]
        match = self._LENGTH.search(head)
        if match is None:
            raise RuntimeError(f"reply without Content-Length: {head[:200]!r}")
        stop = end + 4 + int(match.group(1))
        while len(self._buffer) < stop:
            self._recv()
        reply, self._buffer = self._buffer[end + 4 : stop], self._buffer[stop:]
        if not head.startswith(b"HTTP/1.1 200 "):
            raise RuntimeError(f"agent answered {head[:40]!r}")
        return reply

    def close(self) -> None:
        self._sock.close()


def wait_serving(port: int, text: str, *, version: int | None = None, timeout_s: float = 120) -> None:
    """Until the agent on ``port`` answers ``POST /v1/predict`` (with ``version``, if given)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            reply = json.loads(post(conn, text))
            conn.close()
            if version is None or reply["version"] == version:
                return
        except (OSError, RuntimeError):
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"the agent on port {port} did not serve{f' version {version}' if version else ''}")
        time.sleep(0.2)


@dataclass(frozen=True)
class ProcessStats:
    rss_mb: float
    peak_rss_mb: float
    fds: int
    threads: int


def process_stats(pid: int) -> ProcessStats:
    """RSS (``VmRSS``), peak RSS (``VmHWM``), open fds and threads of a live process, from ``/proc``."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            fields[name] = value.split()
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return ProcessStats(
        rss_mb=int(fields["VmRSS"][0]) / 1024,
        peak_rss_mb=int(fields["VmHWM"][0]) / 1024,
        fds=fds,
        threads=int(fields["Threads"][0]),
    )


class MqttRequester:
    """An MQTT 5 requester for the agent's inference topic, on the project's :class:`MqttTransport`.

    Requests go to ``infer_topic`` at ``qos`` with a ``ResponseTopic`` and a fresh
    ``CorrelationData``; the reply topic is subscribed at the same QoS. Safe to call from several
    threads: each caller waits for its own correlation data.

    Args:
        host: broker host.
        port: broker port.
        infer_topic: the device's ``.../infer`` topic.
        reply_topic: where replies should go (under the device's ``.../replies/``, for ACLs).
        qos: QoS of the requests and of the reply subscription.
        client_id: MQTT client id.
    """

    def __init__(self, *, host: str, port: int, infer_topic: str, reply_topic: str, qos: int, client_id: str) -> None:
        from edge_agent.transport import MqttTransport

        self.infer_topic = infer_topic
        self.reply_topic = reply_topic
        self.qos = qos
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._pending: dict[bytes, _Slot] = {}
        self._transport = MqttTransport(host=host, port=port, client_id=client_id, max_inflight=100)
        self._transport.connect()
        self._transport.subscribe_messages(reply_topic, self._on_reply, qos=qos)
        self._transport.wait_subscribed(reply_topic, timeout_s=10)

    def _on_reply(self, message: Any) -> None:
        correlation = getattr(message.properties, "CorrelationData", None)
        with self._lock:
            slot = self._pending.pop(bytes(correlation), None) if correlation is not None else None
        if slot is not None:
            slot.payload = bytes(message.payload)
            slot.event.set()

    def ask(self, payload: bytes, *, timeout_s: float = 10.0, response_topic: bool = True) -> bytes | None:
        """Publish one request and wait for its reply; None if none came in ``timeout_s`` (or, without
        ``response_topic``, at once: such a request has nowhere to be answered)."""
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        if not response_topic:
            self._transport.publish(self.infer_topic, payload, qos=self.qos)
            return None
        correlation = f"c-{next(self._ids)}".encode()
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = correlation
        slot = _Slot()
        with self._lock:
            self._pending[correlation] = slot
        self._transport.publish(self.infer_topic, payload, qos=self.qos, properties=props)
        if slot.event.wait(timeout_s):
            return slot.payload
        with self._lock:
            self._pending.pop(correlation, None)
        return None

    def predict(self, text: str) -> dict[str, Any]:
        """One text, batch 1; the reply's JSON; raises if there is none or it is not a 200."""
        return _ok_reply(self.ask(json.dumps({"texts": [text]}).encode()), self.reply_topic)

    def wait_agent(self, text: str, *, timeout_s: float = 60) -> None:
        """Until the agent answers over MQTT: a request to a topic nobody subscribes to yet is dropped."""
        deadline = time.monotonic() + timeout_s
        while self.ask(json.dumps({"texts": [text]}).encode(), timeout_s=1.0) is None:
            if time.monotonic() > deadline:
                raise SystemExit(f"the agent did not answer on {self.infer_topic} within {timeout_s:g}s")

    def close(self) -> None:
        self._transport.stop()


class MqttSyncRequester:
    """A single-threaded MQTT 5 requester: paho without its network thread, TCP_NODELAY.

    Like ``http.client`` for HTTP, the calling thread writes the request and reads the reply
    itself, so the round trip holds no hand-over between the caller and a network thread
    (:class:`MqttRequester` has two: one to send, one to wake the caller). One caller at a time.
    """

    def __init__(self, *, host: str, port: int, infer_topic: str, reply_topic: str, qos: int, client_id: str) -> None:
        import paho.mqtt.client as mqtt

        from edge_agent.transport import set_nodelay

        self.infer_topic = infer_topic
        self.reply_topic = reply_topic
        self.qos = qos
        self._ids = itertools.count()
        self._want: bytes | None = None
        self._reply: bytes | None = None
        self._subscribed = False
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTProtocolVersion.MQTTv5
        )
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda *_: setattr(self, "_subscribed", True)
        self._client.connect(host, port, keepalive=60)
        set_nodelay(self._client.socket())
        self._client.subscribe(reply_topic, qos=qos)
        self._spin(lambda: self._subscribed, timeout_s=10, what=f"a SUBACK for {reply_topic}")

    def _on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        if getattr(message.properties, "CorrelationData", None) == self._want:
            self._reply = bytes(message.payload)

    def _spin(self, done: Any, *, timeout_s: float, what: str) -> bool:
        deadline = time.monotonic() + timeout_s
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self._client.loop(timeout=min(left, 1.0)) != 0:
                raise RuntimeError(f"MQTT connection lost while waiting for {what}")
        return True

    def predict(self, text: str) -> dict[str, Any]:
        """One text, batch 1; the reply's JSON; raises if there is none in 10 s or it is not a 200."""
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = self._want = f"s-{next(self._ids)}".encode()
        self._reply = None
        self._client.publish(self.infer_topic, json.dumps({"texts": [text]}).encode(), qos=self.qos, properties=props)
        self._spin(lambda: self._reply is not None, timeout_s=10, what="a reply")
        return _ok_reply(self._reply, self.reply_topic)

    def close(self) -> None:
        self._client.disconnect()


def _ok_reply(payload: bytes | None, reply_topic: str) -> dict[str, Any]:
    """An MQTT inference reply's JSON; raises if there was none or it is not a 200."""
    if payload is None:
        raise RuntimeError(f"no MQTT reply on {reply_topic}")
    reply: dict[str, Any] = json.loads(payload)
    if reply["status"] != 200:
        raise RuntimeError(f"agent answered {reply['status']} over MQTT: {reply.get('error')}")
    return reply


class _Slot:
    __slots__ = ("event", "payload")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.payload: bytes | None = None


__all__ = [
    "MODEL",
    "MqttRequester",
    "MqttSyncRequester",
    "ProcessStats",
    "free_port",
    "install_bundle",
    "post",
    "process_stats",
    "start_agent",
    "stop_agent",
    "train_bundle",
    "wait_serving",
    "write_agent_config",
]
