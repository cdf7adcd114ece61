"""sd_notify and the watchdog: a real agent process reports to a notification socket this test owns."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cloud_trainer.demo.localbroker import LocalBroker
from cloud_trainer.releases.publish import push_bundle
from edge_agent.sdnotify import Notifier
from edge_agent.watchdog import Heartbeat, Watchdog
from tests.conftest import AgentProcess, Keys, agent_toml, http_json
from tests.hangmodel import HANG_WORD, make_hanging_bundle


class NotifySocket:
    """A datagram socket standing in for systemd: collects every KEY=VALUE the agent sends."""

    def __init__(self, address: str) -> None:
        self.address = address  # what goes into NOTIFY_SOCKET
        self.messages: list[dict[str, str]] = []
        self._cond = threading.Condition()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self._sock.settimeout(0.2)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            with self._cond:
                self.messages.append(fields)
                self._cond.notify_all()

    def wait_for(self, predicate: Callable[[dict[str, str]], bool], *, since: int = 0, timeout_s: float = 30) -> int:
        """Index of the first message from ``since`` on that matches."""
        with self._cond:
            found: list[int] = []

            def match() -> bool:
                found[:] = [i for i, m in enumerate(self.messages) if i >= since and predicate(m)][:1]
                return bool(found)

            assert self._cond.wait_for(match, timeout=timeout_s), f"no such notification; got {self.messages[-8:]}"
            return found[0]

    def count(self, key: str, *, since: int = 0) -> int:
        with self._cond:
            return sum(1 for m in self.messages[since:] if key in m)

    def close(self) -> None:
        self._closed.set()
        self._sock.close()
        self._thread.join(timeout=2)


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    sock = NotifySocket(f"@edgeloop-test-{uuid.uuid4().hex}")
    yield sock
    sock.close()


def test_notifier_sends_to_path_and_abstract_sockets(tmp_path: Path) -> None:
    path_sock = NotifySocket(str(tmp_path / "notify"))
    abstract = NotifySocket(f"@edgeloop-unit-{uuid.uuid4().hex}")
    try:
        for sock in (path_sock, abstract):
            notifier = Notifier({"NOTIFY_SOCKET": sock.address, "WATCHDOG_USEC": "2000000"})
            assert notifier.enabled
            assert notifier.watchdog_s == 2.0
            assert notifier.send(READY=1, STATUS="serving v1")
            sock.wait_for(lambda m: m == {"READY": "1", "STATUS": "serving v1"})
            with pytest.raises(ValueError, match="must be one line"):
                notifier.send(STATUS="two\nlines")
            notifier.close()
    finally:
        path_sock.close()
        abstract.close()


def test_notifier_without_systemd_is_a_no_op() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.watchdog_s is None
    assert notifier.send(READY=1) is False
    # The watchdog belongs to another process: not ours to ping.
    other = Notifier({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)})
    assert other.watchdog_s is None


def test_watchdog_withholds_pings_while_a_check_fails(notify_socket: NotifySocket) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "1000000"})
    heartbeat = Heartbeat("the main loop", max_age_s=3600)
    broken: list[str] = []
    watchdog = Watchdog(
        notifier=notifier,
        checks={"loop": heartbeat.check, "worker": lambda: broken[0] if broken else None},
        status=lambda: "serving v7",
    )
    assert watchdog.tick()
    first = notify_socket.wait_for(lambda m: m.get("WATCHDOG") == "1")
    assert notify_socket.messages[first]["STATUS"] == "serving v7"
    broken.append("the inference worker is stuck")
    assert not watchdog.tick()
    assert not watchdog.tick()
    withheld = notify_socket.wait_for(lambda m: "withheld" in m.get("STATUS", ""), since=first + 1)
    assert "the inference worker is stuck" in notify_socket.messages[withheld]["STATUS"]
    broken.clear()
    assert watchdog.tick()
    resumed = notify_socket.wait_for(lambda m: m.get("WATCHDOG") == "1", since=withheld + 1)
    assert resumed == withheld + 1  # the failing ticks sent no ping, and the status only once
    notifier.close()


def _start_agent(
    tmp_path: Path, broker: LocalBroker, fleet: str, keys: Keys, notify: NotifySocket, *, max_stall_s: float
) -> AgentProcess:
    config = tmp_path / "agent.toml"
    config.write_text(
        agent_toml(state_dir=tmp_path / "state", broker=broker, fleet=fleet, public_key=keys.public)
        + f"\n[watchdog]\nmax_stall_s = {max_stall_s}\n"
    )
    env = {"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "400000"}  # a ping every 0.2 s
    return AgentProcess(config_path=config, log_path=tmp_path / "agent.log", env=env).start()


def test_agent_reports_ready_watchdog_and_stopping(
    tmp_path: Path, mosquitto: LocalBroker, fleet: str, keys: Keys, notify_socket: NotifySocket
) -> None:
    agent = _start_agent(tmp_path, mosquitto, fleet, keys, notify_socket, max_stall_s=30)
    try:
        ready = notify_socket.wait_for(lambda m: m.get("READY") == "1")
        assert notify_socket.messages[ready]["MAINPID"] == str(agent.process.pid)  # type: ignore[union-attr]
        assert "no model yet" in notify_socket.messages[ready]["STATUS"]
        pings = ready
        for _ in range(3):  # periodic, not a one-off
            pings = notify_socket.wait_for(lambda m: m.get("WATCHDOG") == "1", since=pings + 1)
    finally:
        assert agent.stop() == 0, agent.log()
    stopping = notify_socket.wait_for(lambda m: m.get("STOPPING") == "1", since=pings)
    assert notify_socket.messages[stopping]["STATUS"] == "stopping"


def test_watchdog_pings_stop_when_inference_hangs(
    tmp_path: Path, mosquitto: LocalBroker, fleet: str, keys: Keys, notify_socket: NotifySocket
) -> None:
    make_hanging_bundle(tmp_path / "v1", version=1)
    push_bundle(tmp_path / "v1", host=mosquitto.host, port=mosquitto.port, fleet=fleet, key_path=keys.private)
    agent = _start_agent(tmp_path, mosquitto, fleet, keys, notify_socket, max_stall_s=2)
    try:
        agent.wait_version(1)
        assert agent.predict(["turn on the lights"])[0] == 200  # the model serves; only "dark" hangs it
        serving = notify_socket.wait_for(lambda m: "serving intents v1" in m.get("STATUS", ""))
        pings = serving
        for _ in range(3):
            pings = notify_socket.wait_for(lambda m: m.get("WATCHDOG") == "1", since=pings + 1)

        def hang() -> None:
            with contextlib.suppress(OSError):  # the request never gets an answer; the client times out
                http_json(agent.http_port, "POST", "/v1/predict", {"texts": [f"the {HANG_WORD}"]})

        threading.Thread(target=hang, daemon=True).start()
        # The hung run is inline on the HTTP loop, so the loop check trips too (first, or with it).
        withheld = notify_socket.wait_for(
            lambda m: "withheld" in m.get("STATUS", "") and "model run has lasted" in m["STATUS"], since=pings + 1
        )
        # systemd would now kill the agent after WatchdogSec; over many ping intervals, none comes.
        stop_waiting = threading.Event()
        stop_waiting.wait(3.0)  # 15 ping intervals
        assert notify_socket.count("WATCHDOG", since=withheld) == 0
        assert agent.process is not None and agent.process.poll() is None  # hung, not crashed
    finally:
        if agent.process is not None and agent.process.poll() is None:
            agent.process.send_signal(signal.SIGKILL)  # what systemd does to a service whose watchdog expires
            agent.process.wait()
