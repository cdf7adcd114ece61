"""The dashboard without a browser: its history and error log, and its HTTP API (snapshot, device
history, the Server-Sent Events stream, the actions) in-process against a real broker."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cloud_trainer.demo.localbroker import LocalBroker
from cloud_trainer.fleet.dashboard import DashboardServer, DashboardService, Signing
from cloud_trainer.fleet.dashboard.history import ErrorLog, History
from cloud_trainer.fleet.view import DeviceRow
from edge_agent.protocol.state import DeviceState
from edge_agent.protocol.telemetry import Telemetry
from edge_agent.protocol.topics import Topics
from tests.conftest import Keys
from tests.fleetdocs import publish_devices, signed_release, state, telemetry
from tests.mqttclient import TestClient

DEADLINE_S = 10.0


# -- history and errors, no broker ---------------------------------------------------------------------
def _row(device: str = "dev-1", **state_fields: Any) -> DeviceRow:
    return DeviceRow(
        fleet="f", device=device, state=DeviceState.model_validate_json(state("f", device, **state_fields))
    )


def test_history_keeps_the_newest_points_and_each_telemetry_document_once() -> None:
    history = History(points=3)
    row = _row()
    for i in range(5):
        row.telemetry = Telemetry.model_validate_json(
            telemetry("f", "dev-1", rps=float(i), sent_at=f"2026-11-26T06:00:0{i}Z")
        )
        assert history.record(row)
        assert not history.record(row)  # the same document again (a state change of the row): no new point
    assert [p["requests_per_s"] for p in history.series("dev-1")] == [2.0, 3.0, 4.0]
    history.forget("dev-1")
    assert history.series("dev-1") == []
    with pytest.raises(ValueError, match="at least 1"):
        History(points=0)


def test_error_log_records_each_error_once_when_it_appears() -> None:
    log = ErrorLog(size=10)
    assert log.record(_row()) == []
    assert [e.kind for e in log.record(_row(last_error="model failed to load"))] == ["error"]
    assert log.record(_row(last_error="model failed to load")) == []  # still the same error
    failed = log.record(_row(last_error="model failed to load", update_state="rolled-back", update_version=2))
    assert [(e.kind, e.message) for e in failed] == [("update", "v2 rolled-back")]
    log.record(_row())  # cleared
    assert [e.kind for e in log.record(_row(last_error="model failed to load"))] == ["error"]  # it came back
    assert [e["kind"] for e in log.recent()] == ["error", "update", "error"]  # newest first


# -- the HTTP API against a real broker --------------------------------------------------------------
@contextmanager
def _service(mosquitto: LocalBroker, fleet: str, signing: Signing | None = None) -> Iterator[DashboardService]:
    service = DashboardService(host=mosquitto.host, port=mosquitto.port, fleet=fleet, signing=signing)
    service.start()
    try:
        yield service
    finally:
        service.stop()


@asynccontextmanager
async def _served(service: DashboardService) -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    server = DashboardServer(service, port=0, update_interval_s=0.05)
    url = await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            yield url, session
    finally:
        await server.stop()


async def _get(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def _until(what: str, probe: Callable[[], Awaitable[bool]]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not await probe():
        assert time.monotonic() < deadline, f"{what}: not within {DEADLINE_S:g}s"
        await asyncio.sleep(0.05)


class _Events:
    """Reads a Server-Sent Events stream: (event, data) pairs."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._content = response.content

    async def next(self, timeout_s: float = DEADLINE_S) -> tuple[str, dict[str, Any]]:
        event, data = "message", ""
        while True:
            line = (await asyncio.wait_for(self._content.readline(), timeout_s)).decode()
            assert line, "the stream ended"
            line = line.rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data += line[6:]
            elif line == "" and data:
                return event, json.loads(data)


def test_snapshot_device_history_and_events_follow_the_fleet(mosquitto: LocalBroker, fleet: str, keys: Keys) -> None:
    topics = Topics(fleet=fleet)
    client = TestClient(host=mosquitto.host, port=mosquitto.port, security=None, client_id=f"{fleet}-pub")
    try:
        publish_devices(client, fleet, ["dev-1", "dev-2", "dev-3"])
        client.publish(topics.fleet_release("intents"), signed_release(fleet, keys.private, version=1), retain=True)
        with _service(mosquitto, fleet) as service:

            async def scenario() -> None:
                async with _served(service) as (url, session):
                    snapshot = await _get(session, f"{url}api/snapshot")
                    assert [r["device"] for r in snapshot["rows"]] == ["dev-1", "dev-2", "dev-3"]
                    assert snapshot["writable"] is False and snapshot["token"] is None
                    assert snapshot["summary"]["devices"] == 3 and snapshot["summary"]["versions"] == {"v1": 3}
                    (release,) = snapshot["releases"]
                    assert (release["version"], release["active"], release["targeted"]) == (1, 3, 3)

                    async with session.get(f"{url}api/events") as response:
                        assert response.headers["Content-Type"].startswith("text/event-stream")
                        events = _Events(response)
                        event, data = await events.next()
                        assert event == "snapshot" and len(data["rows"]) == 3

                        state_topic = f"{topics.base}/devices/dev-2/state"
                        client.publish(
                            state_topic, state(fleet, "dev-2", active_version=2, update_version=2), retain=True
                        )
                        while True:  # each update carries what changed; wait for dev-2's
                            event, data = await events.next()
                            rows = {r["device"]: r for r in data["rows"]}
                            if "dev-2" in rows and rows["dev-2"]["active_version"] == 2:
                                break
                        assert event == "update"
                        (release,) = data["releases"]
                        assert (release["active"], release["pending"]) == (2, 1)  # dev-2 left v1

                        for kind in ("state", "availability", "telemetry"):  # every document of dev-3 cleared: gone
                            client.publish(f"{topics.base}/devices/dev-3/{kind}", b"", retain=True)
                        while "dev-3" not in (await events.next())[1]["removed"]:
                            pass

                    telemetry_topic = f"{topics.base}/devices/dev-1/telemetry"
                    client.publish(telemetry_topic, telemetry(fleet, "dev-1", p99=20.0, sent_at="2099-01-01T00:00:00Z"))

                    async def two_points() -> bool:
                        return len((await _get(session, f"{url}api/devices/dev-1"))["history"]) == 2

                    await _until("dev-1's second telemetry point", two_points)
                    detail = await _get(session, f"{url}api/devices/dev-1")
                    assert detail["row"]["device"] == "dev-1" and detail["history"][-1]["p99_ms"] == 20.0
                    async with session.get(f"{url}api/devices/nobody") as response:
                        assert response.status == 404

            asyncio.run(scenario())
    finally:
        client.close()


def test_a_read_only_dashboard_refuses_actions_and_foreign_hosts(mosquitto: LocalBroker, fleet: str) -> None:
    with _service(mosquitto, fleet) as service:

        async def scenario() -> None:
            async with _served(service) as (url, session):
                headers = {"X-Dashboard-Token": service.token}
                async with session.post(f"{url}api/actions/withdraw", json={"topic": "x"}, headers=headers) as response:
                    assert response.status == 403
                    assert "read-only" in (await response.json())["error"]
                async with session.get(f"{url}api/snapshot", headers={"Host": "attacker.example"}) as response:
                    assert response.status == 421  # DNS rebinding: another name for 127.0.0.1
                async with session.get(url) as response:
                    page = await response.text()
                    assert response.status == 200 and "static/app.js" in page and "http" not in page.split("<body>")[0]
                    assert "script-src 'self'" in response.headers["Content-Security-Policy"]

        asyncio.run(scenario())


def test_with_the_key_promote_and_withdraw_change_the_release(
    mosquitto: LocalBroker, fleet: str, keys: Keys, tmp_path: Path
) -> None:
    topic = Topics(fleet=fleet).fleet_release("intents")
    client = TestClient(host=mosquitto.host, port=mosquitto.port, security=None, client_id=f"{fleet}-pub")
    try:
        client.publish(topic, signed_release(fleet, keys.private, canary_percent=10), retain=True)
        signing = Signing(key=keys.private, registry=tmp_path / "registry")
        with _service(mosquitto, fleet, signing) as service:

            async def releases(session: aiohttp.ClientSession, url: str) -> list[dict[str, Any]]:
                return list((await _get(session, f"{url}api/snapshot"))["releases"])

            async def scenario() -> None:
                async with _served(service) as (url, session):
                    snapshot = await _get(session, f"{url}api/snapshot")
                    assert snapshot["writable"] is True and snapshot["token"] == service.token
                    (canary,) = snapshot["releases"]
                    assert canary["canary_percent"] == 10

                    promote = f"{url}api/actions/promote"
                    async with session.post(promote, json={"topic": topic}) as response:
                        assert response.status == 403  # no token: not the page
                    headers = {"X-Dashboard-Token": service.token}
                    async with session.post(promote, json={"topic": topic}, headers=headers) as response:
                        assert response.status == 200, await response.text()
                        assert "promoted" in (await response.json())["message"]

                    async def promoted() -> bool:
                        (now,) = await releases(session, url)
                        return bool(now["canary_percent"] is None and now["sequence"] > canary["sequence"])

                    await _until("the promoted release", promoted)
                    withdraw = f"{url}api/actions/withdraw"
                    async with session.post(withdraw, json={"topic": topic}, headers=headers) as response:
                        assert response.status == 200, await response.text()

                    async def gone() -> bool:
                        return await releases(session, url) == []

                    await _until("the release withdrawn", gone)
                    async with session.post(withdraw, json={"topic": topic}, headers=headers) as response:
                        assert response.status == 404  # nothing there any more

            asyncio.run(scenario())
    finally:
        client.close()


def test_the_cli_refuses_the_key_on_a_public_address(keys: Keys, capsys: pytest.CaptureFixture[str]) -> None:
    from cloud_trainer.cli import main

    code = main(["dashboard", "--fleet", "f", "--host", "0.0.0.0", "--key", str(keys.private)])
    assert code == 2
    assert "loopback" in capsys.readouterr().err
