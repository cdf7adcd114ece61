"""The retained documents a fleet's devices publish, and a signed release, for tests that need a
fleet on the broker without running agents (the dashboard's, the fleet view's)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cloud_trainer.releases.signing import load_private_key, next_sequence, sign_release
from edge_agent.protocol import Release, Target
from edge_agent.protocol.state import Availability, DeviceState
from edge_agent.protocol.telemetry import Latency, Telemetry
from tests.mqttclient import TestClient


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def state(fleet: str, device: str, **fields: Any) -> bytes:
    """A device's state document: online, serving intents v1, unless ``fields`` say otherwise."""
    doc: dict[str, Any] = {
        "device": device, "fleet": fleet, "online": True, "model": "intents", "active_version": 1,
        "update_state": "active", "update_version": 1, "group": "line-3", "agent_version": "0.1.0",
        "updated_at": now(),
    }  # fmt: skip
    doc.update(fields)
    return DeviceState(**doc).to_bytes()


def telemetry(
    fleet: str, device: str, *, rps: float = 10.0, p50: float = 3.0, p99: float = 9.0, **fields: Any
) -> bytes:
    doc: dict[str, Any] = {
        "device": device, "fleet": fleet, "model": "intents", "active_version": 1, "window_s": 10.0,
        "requests": int(rps * 10), "errors": 0, "throughput_rps": rps, "latency_ms": Latency(p50=p50, p99=p99),
        "queue_depth": 0, "cpu_percent": 4.0, "rss_mb": 120.0, "sent_at": now(),
    }  # fmt: skip
    doc.update(fields)
    return Telemetry(**doc).to_bytes()


def signed_release(fleet: str, key: Path, *, version: int = 2, canary_percent: float | None = None) -> bytes:
    """A fleet release of intents, signed with ``key`` (the next sequence), as the broker retains it."""
    issued = datetime.now(timezone.utc)
    release = Release(
        fleet=fleet, target=Target(kind="fleet", name=fleet), model="intents", version=version,
        sequence=next_sequence(key), manifest_sha256="a" * 64, manifest_size=100, issued_at=issued,
        expires_at=issued + timedelta(days=1), canary_percent=canary_percent,
    )  # fmt: skip
    return sign_release(release, load_private_key(key)).to_bytes()


def publish_devices(client: TestClient, fleet: str, devices: list[str], *, root: str = "edgeloop/v1") -> None:
    """Retain a state, an availability and a telemetry document for each device (each acknowledged)."""
    for device in devices:
        base = f"{root}/{fleet}/devices/{device}"
        online = Availability(device=device, fleet=fleet, online=True, at=now(), connected_at=now())
        assert client.publish(f"{base}/availability", online.to_bytes(), retain=True) == "Success"
        assert client.publish(f"{base}/state", state(fleet, device), retain=True) == "Success"
        assert client.publish(f"{base}/telemetry", telemetry(fleet, device), retain=True) == "Success"
