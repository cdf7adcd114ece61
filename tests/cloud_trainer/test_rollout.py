"""Rollouts as operations, with a real broker and real agent processes: canary then promote,
withdraw of a stalled rollout, revert with a new sequence, pause and resume, pin and unpin."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud_trainer.cli import main
from cloud_trainer.demo.localbroker import LocalBroker
from cloud_trainer.fleet.rollout import RolloutSession
from cloud_trainer.releases.publish import push_bundle
from cloud_trainer.releases.registry import Registry
from edge_agent.protocol.release import in_canary
from tests.conftest import AgentProcess, Keys, agent_toml, http_json
from tests.tinymodel import make_tiny_bundle


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    reg = Registry(tmp_path / "registry")
    for version in (1, 2):
        reg.register("intents", version=version, build=lambda d, v, _parent: make_tiny_bundle(d, version=v))
    return reg


@pytest.fixture
def start_agent(tmp_path: Path, mosquitto: LocalBroker, fleet: str, keys: Keys) -> Iterator[object]:
    started: list[AgentProcess] = []

    def start(device: str, *, group: str | None = None) -> AgentProcess:
        home = tmp_path / device
        home.mkdir(exist_ok=True)
        config = home / "agent.toml"
        text = agent_toml(state_dir=home / "state", broker=mosquitto, fleet=fleet, public_key=keys.public, group=group)
        config.write_text(text.replace('device_id = "dev-1"', f'device_id = "{device}"'))
        agent = AgentProcess(config_path=config, log_path=home / "agent.log")
        started.append(agent)
        return agent.start()

    try:
        yield start
    finally:
        for agent in started:
            if agent.process is not None:
                agent.stop()


def _cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(args))
    return code, out.getvalue()


def _where(mosquitto: LocalBroker, fleet: str) -> list[str]:
    return ["--fleet", fleet, "--broker", f"{mosquitto.host}:{mosquitto.port}"]


def _push(registry: Registry, version: int, mosquitto: LocalBroker, fleet: str, keys: Keys, **kw: object) -> int:
    entry = registry.verified("intents", version)
    result = push_bundle(
        entry.bundle_dir, host=mosquitto.host, port=mosquitto.port, fleet=fleet, key_path=keys.private, **kw
    )  # type: ignore[arg-type]
    return result.release.sequence


def _canary_pair(fleet: str, percent: float) -> tuple[str, str]:
    """Two device names: the first in a ``percent`` canary of this fleet, the second not."""
    names = [f"cam-{i}" for i in range(200)]
    inside = next(n for n in names if in_canary(fleet=fleet, device=n, model="intents", percent=percent))
    outside = next(n for n in names if not in_canary(fleet=fleet, device=n, model="intents", percent=percent))
    return inside, outside


def _fleet_release(mosquitto: LocalBroker, fleet: str) -> tuple[int, int] | None:
    with RolloutSession(host=mosquitto.host, port=mosquitto.port, fleet=fleet, model="intents") as session:
        for current in session.releases():
            if current.level == "fleet" and current.release is not None:
                return current.release.version, current.release.sequence
    return None


def test_a_canary_then_promote_reaches_every_targeted_device(
    mosquitto: LocalBroker, fleet: str, keys: Keys, registry: Registry, start_agent: object
) -> None:
    inside, outside = _canary_pair(fleet, 50)
    agents = {name: start_agent(name) for name in (inside, outside)}  # type: ignore[operator]
    _push(registry, 1, mosquitto, fleet, keys)
    for agent in agents.values():
        agent.wait_version(1)
    _push(registry, 2, mosquitto, fleet, keys, canary_percent=50)
    agents[inside].wait_version(2)
    agents[outside].wait_log(r"release v2 is a 50(\.0)?% canary this device is not in")  # it decided not to

    code, out = _cli("rollout", "status", *_where(mosquitto, fleet), "--json")
    (line,) = [json.loads(x) for x in out.splitlines()]
    assert (line["version"], line["canary_percent"], line["active"], line["pending"]) == (2, 50, [inside], [])

    code, out = _cli("rollout", "promote", *_where(mosquitto, fleet), "--key", str(keys.private), "--wait", "60")
    assert code == 0, out
    assert "promoted intents v2" in out and "2 active, 0 pending, 0 failed of 2 targeted" in out
    for agent in agents.values():
        agent.wait_version(2)
    code, out = _cli("rollout", "promote", *_where(mosquitto, fleet), "--key", str(keys.private))
    assert "is not a canary: nothing to promote" in out


def test_withdraw_stops_a_stalled_rollout(
    mosquitto: LocalBroker, fleet: str, keys: Keys, registry: Registry, start_agent: object
) -> None:
    agent = start_agent("cam-w")  # type: ignore[operator]
    _push(registry, 1, mosquitto, fleet, keys)
    agent.wait_version(1)
    # v2's bundle is "served" from a port nobody listens on: the device retries and never gets it
    _push(registry, 2, mosquitto, fleet, keys, artifact_url="http://127.0.0.1:9/bundles/intents-2/")
    agent.wait_log(r"v2", count=1)
    code, out = _cli("rollout", "withdraw", *_where(mosquitto, fleet))
    assert code == 0 and "withdrew intents v2" in out, out
    agent.wait_log(r"release v2 on .* withdrawn")
    assert _fleet_release(mosquitto, fleet) is None
    code, out = _cli("fleet", "status", *_where(mosquitto, fleet), "--json")
    (row,) = json.loads(out)
    assert (row["active_version"], row["update_state"]) == (1, "idle")
    assert "withdrawn" in row["last_error"]


def test_revert_brings_the_fleet_back_to_the_old_version_with_a_new_sequence(
    mosquitto: LocalBroker, fleet: str, keys: Keys, registry: Registry, start_agent: object
) -> None:
    agents = [start_agent(name) for name in ("cam-r1", "cam-r2")]  # type: ignore[operator]
    _push(registry, 1, mosquitto, fleet, keys)
    v2_sequence = _push(registry, 2, mosquitto, fleet, keys)
    for agent in agents:
        agent.wait_version(2)
    code, out = _cli(
        "rollout", "revert", *_where(mosquitto, fleet), "--to", "1", "--key", str(keys.private),
        "--registry", str(registry.root), "--wait", "60",
    )  # fmt: skip
    assert code == 0, out
    assert "2 active, 0 pending, 0 failed of 2 targeted" in out
    for agent in agents:
        agent.wait_version(1)
    release = _fleet_release(mosquitto, fleet)
    assert release is not None and release[0] == 1 and release[1] > v2_sequence


def test_pause_keeps_new_devices_off_and_resume_signs_it_anew(
    mosquitto: LocalBroker, fleet: str, keys: Keys, registry: Registry, start_agent: object
) -> None:
    first, late = start_agent("cam-p1"), start_agent("cam-p2")  # type: ignore[operator]
    _push(registry, 1, mosquitto, fleet, keys)
    first.wait_version(1)
    late.wait_version(1)
    late.stop()  # away while v2 goes out
    v2_sequence = _push(registry, 2, mosquitto, fleet, keys)
    first.wait_version(2)
    code, out = _cli("rollout", "pause", *_where(mosquitto, fleet), "--registry", str(registry.root))
    assert code == 0 and "paused intents v2" in out, out
    late.start()  # comes back to no fleet release: it stays on v1
    assert _fleet_release(mosquitto, fleet) is None
    late.wait_log(r"edge-agent .* serving on", count=2)
    assert http_json(late.http_port, "GET", "/v2/health/ready")[1]["version"] == 1
    code, out = _cli(
        "rollout", "resume", *_where(mosquitto, fleet), "--key", str(keys.private), "--registry", str(registry.root),
    )  # fmt: skip
    assert code == 0 and "resumed intents v2" in out, out
    late.wait_version(2)
    release = _fleet_release(mosquitto, fleet)
    assert release is not None and release[0] == 2 and release[1] > v2_sequence
    code, out = _cli("rollout", "resume", *_where(mosquitto, fleet), "--key", str(keys.private),
                     "--registry", str(registry.root))  # fmt: skip
    assert code != 0  # nothing paused any more


def test_a_pin_holds_a_device_while_the_fleet_moves_and_unpin_lets_it_follow(
    mosquitto: LocalBroker, fleet: str, keys: Keys, registry: Registry, start_agent: object
) -> None:
    pinned, free = start_agent("cam-pin"), start_agent("cam-free")  # type: ignore[operator]
    _push(registry, 1, mosquitto, fleet, keys)
    pinned.wait_version(1)
    free.wait_version(1)
    code, out = _cli(
        "device", "pin", "cam-pin", "intents:1", *_where(mosquitto, fleet), "--key", str(keys.private),
        "--registry", str(registry.root), "--wait", "30",
    )  # fmt: skip
    assert code == 0 and "on device cam-pin" in out, out
    _push(registry, 2, mosquitto, fleet, keys)
    free.wait_version(2)
    pinned.wait_log(r"release v2 on .* is shadowed by a more specific release")
    code, out = _cli("fleet", "status", *_where(mosquitto, fleet), "--json")
    assert {r["device"]: r["active_version"] for r in json.loads(out)} == {"cam-pin": 1, "cam-free": 2}
    code, out = _cli("device", "unpin", "cam-pin", *_where(mosquitto, fleet))
    assert code == 0 and "unpinned cam-pin" in out, out
    pinned.wait_version(2)
