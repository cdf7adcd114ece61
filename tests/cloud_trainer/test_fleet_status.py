"""`cloud-train fleet status` against a real broker and a real agent process: what the devices
report (retained state, availability, telemetry) becomes one row per device."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cloud_trainer.cli import main
from cloud_trainer.demo.localbroker import LocalBroker
from cloud_trainer.fleet.view import DeviceRow, FleetView, read_fleet
from cloud_trainer.releases.publish import push_bundle
from edge_agent.protocol.topics import Topics
from tests.conftest import AgentProcess, Keys
from tests.mqttclient import TestClient
from tests.tinymodel import make_tiny_bundle


def _cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(args))
    return code, out.getvalue()


def _wait(what: str, predicate: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:g}s"
        time.sleep(0.05)


def test_a_device_goes_online_downloading_active_then_offline_after_kill_9(
    tmp_path: Path, mosquitto: LocalBroker, fleet: str, keys: Keys, agent_process: Callable[..., AgentProcess]
) -> None:
    seen: list[tuple[bool | None, str | None, int | None]] = []
    lock = threading.Lock()

    def on_change(row: DeviceRow) -> None:
        with lock:
            state = row.state
            seen.append((row.online, state.update_state if state else None, state.active_version if state else None))

    view = FleetView(host=mosquitto.host, port=mosquitto.port, fleet=fleet, on_change=on_change)
    view.start(timeout_s=10)
    try:
        assert view.rows() == []  # a fresh fleet: nobody yet
        agent = agent_process(group="line-3", extra_toml="\n[serving]\ntelemetry_interval_s = 0.5\n")
        _wait("the agent online", lambda: any(online for online, _, _ in seen))
        make_tiny_bundle(tmp_path / "v1", version=1)
        push_bundle(tmp_path / "v1", host=mosquitto.host, port=mosquitto.port, fleet=fleet, key_path=keys.private)
        agent.wait_version(1)
        _wait("active v1 reported", lambda: (True, "active", 1) in seen)
        _wait("telemetry", lambda: view.rows()[0].telemetry is not None)

        code, out = _cli(
            "fleet", "status", "--fleet", fleet, "--broker", f"{mosquitto.host}:{mosquitto.port}", "--json"
        )
        assert code == 0
        (row,) = json.loads(out)
        assert (row["device"], row["online"], row["group"], row["active_version"], row["update_state"]) == (
            "dev-1", True, "line-3", 1, "active",
        )  # fmt: skip
        assert row["agent_version"] and row["machine"] and row["last_seen"] and row["problem"] is None
        assert row["requests_per_s"] is not None and row["outbox"] is not None

        assert agent.process is not None
        os.kill(agent.process.pid, signal.SIGKILL)  # no clean stop: the broker's last will says offline
        agent.process.wait()
        _wait("offline after kill -9", lambda: seen[-1][0] is False, timeout_s=30)
    finally:
        view.stop()
    with lock:
        states = [s for _, s, _ in seen]
    assert "downloading" in states and states.index("downloading") < states.index("active"), states
    assert seen[-1] == (False, "active", 1)  # offline, and still names the version it was serving

    code, out = _cli("fleet", "status", "--fleet", fleet, "--broker", f"{mosquitto.host}:{mosquitto.port}")
    assert code == 0
    assert "dev-1" in out and "offline" in out and "v1" in out
    assert "1 devices, 0 online, 1 offline; versions v1: 1; update states active: 1" in out


def test_a_bad_document_is_reported_on_its_row_and_the_rest_of_the_fleet_still_shows(
    mosquitto: LocalBroker, fleet: str
) -> None:
    topics = Topics(fleet=fleet)
    publisher = TestClient(host=mosquitto.host, port=mosquitto.port, security=None, client_id=f"{fleet}-pub")
    try:
        good = {"schema": "edgeloop.state/1", "device": "good-1", "fleet": fleet, "online": True, "model": "intents",
                "active_version": 3, "update_state": "active", "updated_at": "2026-11-26T06:00:00+00:00"}  # fmt: skip
        assert publisher.publish(topics.device_state("good-1"), json.dumps(good).encode(), retain=True) == "Success"
        assert publisher.publish(topics.device_state("bad-1"), b"{not json", retain=True) == "Success"
        rows = {r.device: r for r in read_fleet(host=mosquitto.host, port=mosquitto.port, fleet=fleet)}
        assert set(rows) == {"good-1", "bad-1"}
        assert rows["good-1"].problem is None and rows["good-1"].state is not None
        assert rows["good-1"].state.active_version == 3
        assert rows["bad-1"].problem is not None and rows["bad-1"].problem.startswith("state: not a valid document")
        # A cleared document (empty retained message) removes the device once nothing of it is left.
        for device in ("good-1", "bad-1"):
            assert publisher.publish(topics.device_state(device), b"", retain=True) == "Success"
        assert read_fleet(host=mosquitto.host, port=mosquitto.port, fleet=fleet) == []
    finally:
        publisher.close()
