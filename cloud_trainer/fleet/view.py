"""The fleet as its devices report it: one row per device from its retained MQTT documents.

Each agent keeps three retained documents on the broker (``docs/mqtt.md``): its state (versions,
update progress, last error, agent and host facts), its availability (online, or the broker's
last will when it vanished) and its latest telemetry (request rate, latencies, sample outbox).
:class:`FleetView` subscribes to the three for one fleet or all, and keeps a :class:`DeviceRow`
per device; ``cloud-train fleet status`` prints them once or follows them (``--watch``).

A subscription's retained messages all arrive before the answer to anything the same client
publishes after its SUBACK, so :meth:`FleetView.start` knows it holds the whole snapshot when a
probe message it sent itself comes back. Where the broker refuses the probe (an identity that
may only read), a quiet period without new messages ends the snapshot instead.

A document that does not parse is reported on its row (``problem``), never raised: one bad
device must not hide the fleet.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pydantic import ValidationError

from edge_agent.mqtt_security import MqttSecurity
from edge_agent.protocol.state import Availability, DeviceState
from edge_agent.protocol.telemetry import Telemetry
from edge_agent.protocol.topics import DEFAULT_ROOT, check_segment
from edge_agent.transport import MqttTransport, TransportError

KINDS = ("state", "availability", "telemetry")
PROBE_WAIT_S = 2.0  # a probe not back by then was dropped (3.1.1 says nothing of a refusal)


@dataclass
class DeviceRow:
    """What one device last reported; any part may be missing (a device that never sent telemetry)."""

    fleet: str
    device: str
    state: DeviceState | None = None
    availability: Availability | None = None
    telemetry: Telemetry | None = None
    received_at: dict[str, datetime] = field(default_factory=dict)  # kind -> when this view received it
    problem: str | None = None

    @property
    def online(self) -> bool | None:
        """The availability document decides (the last will says offline); else what the state says."""
        if self.availability is not None:
            return self.availability.online
        return self.state.online if self.state is not None else None

    @property
    def since(self) -> str | None:
        """When the device went online or offline, as its availability says (the will carries no time:
        then when this view received it)."""
        a = self.availability
        if a is None:
            return None
        if a.online:
            return a.connected_at
        return a.at or _iso(self.received_at.get("availability"))

    @property
    def last_seen(self) -> str | None:
        """The newest time any of the device's documents carries."""
        times = [
            self.state.updated_at if self.state else None,
            self.availability.at if self.availability else None,
            self.telemetry.sent_at if self.telemetry else None,
        ]
        return max((t for t in times if t), default=None)

    def to_json(self) -> dict[str, Any]:
        s, t = self.state, self.telemetry
        return {
            "fleet": self.fleet,
            "device": self.device,
            "online": self.online,
            "since": self.since,
            "group": s.group if s else None,
            "model": s.model if s else None,
            "active_version": s.active_version if s else None,
            "previous_version": s.previous_version if s else None,
            "update_state": s.update_state if s else None,
            "update_version": s.update_version if s else None,
            "progress": s.progress if s else None,
            "last_error": s.last_error if s else None,
            "requests_per_s": t.throughput_rps if t else None,
            "p50_ms": t.latency_ms.p50 if t else None,
            "p99_ms": t.latency_ms.p99 if t else None,
            "error_rate": round(t.errors / t.requests, 4) if t and t.requests else (0.0 if t else None),
            "outbox": t.samples.queued if t and t.samples else None,
            "agent_version": s.agent_version if s else None,
            "machine": s.host.machine if s and s.host else None,
            "last_seen": self.last_seen,
            "problem": self.problem,
        }


@dataclass(frozen=True)
class RowFilter:
    """Which rows to show; ``None`` fields match anything."""

    model: str | None = None
    group: str | None = None
    version: int | None = None
    update_state: str | None = None
    online: bool | None = None

    def __call__(self, row: DeviceRow) -> bool:
        s = row.state
        checks = [
            (self.model, s.model if s else None),
            (self.group, s.group if s else None),
            (self.version, s.active_version if s else None),
            (self.update_state, s.update_state if s else None),
            (self.online, row.online),
        ]
        return all(wanted is None or wanted == actual for wanted, actual in checks)


class FleetView:
    """Devices' retained state, availability and telemetry, kept current from one MQTT subscription.

    Args:
        host, port, security, protocol: the broker connection (the cloud or collector identity).
        fleet: one fleet, or ``None`` for every fleet under ``topic_root``.
        topic_root: the topic prefix (``edgeloop/v1``).
        on_change: called (on the network thread) with each row that changed.
        transport: an open connection to read over (its subscriptions are removed at :meth:`stop`)
            instead of one of its own: a broker that binds client ids to identities lets one
            identity hold one connection at a time (``cloud-train rollout`` publishes and watches
            over the same one).
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        fleet: str | None = None,
        security: MqttSecurity | None = None,
        topic_root: str | None = None,
        protocol: str = "5",
        on_change: Callable[[DeviceRow], None] | None = None,
        transport: MqttTransport | None = None,
    ) -> None:
        self.fleet = check_segment("fleet", fleet) if fleet is not None else None
        self.root = topic_root or DEFAULT_ROOT
        self._on_change = on_change
        self._rows: dict[tuple[str, str], DeviceRow] = {}
        self._lock = threading.Lock()
        self._probe = f"{self.root}/{self.fleet or '_fleet-view'}/views/{secrets.token_hex(8)}"
        self._probe_back = threading.Event()
        self._last_message = time.monotonic()
        self._own = transport is None
        self._transport = transport or MqttTransport(
            host=host, port=port, client_id=f"cloud-train-fleet-{secrets.token_hex(4)}", protocol=protocol,
            security=security, max_packet_bytes=1024 * 1024,
        )  # fmt: skip

    def filters(self) -> list[str]:
        fleet = self.fleet or "+"
        return [f"{self.root}/{fleet}/devices/+/{kind}" for kind in KINDS]

    def start(self, *, timeout_s: float = 10.0, quiet_s: float = 0.5) -> None:
        """Connect, subscribe, and return once the retained snapshot is in (see the module's docstring)."""
        for topic in self.filters():
            self._transport.subscribe(topic, self._on_message, qos=0)
        self._transport.subscribe(self._probe, lambda _t, _p, _r: self._probe_back.set(), qos=1)
        if self._own:
            self._transport.connect(timeout_s=timeout_s)
        deadline = time.monotonic() + timeout_s
        for topic in [*self.filters(), self._probe]:
            self._transport.wait_subscribed(topic, timeout_s=max(0.1, deadline - time.monotonic()))
        info = self._transport.publish(self._probe, b"", qos=1)
        try:  # a refusal (MQTT 5) raises; on 3.1.1 a refused probe just never comes back
            self._transport.wait_published([info], timeout_s=max(0.1, deadline - time.monotonic()))
            if self._probe_back.wait(max(0.1, min(PROBE_WAIT_S, deadline - time.monotonic()))):
                return
        except TransportError:
            pass
        while time.monotonic() < deadline and time.monotonic() - self._last_message < quiet_s:
            time.sleep(0.05)  # no probe: the snapshot ends when the broker has been quiet for quiet_s

    def stop(self) -> None:
        if self._own:
            self._transport.stop()
            return
        for topic in [*self.filters(), self._probe]:
            self._transport.unsubscribe(topic)

    def rows(self, keep: Callable[[DeviceRow], bool] | None = None) -> list[DeviceRow]:
        with self._lock:
            rows = sorted(self._rows.values(), key=lambda r: (r.fleet, r.device))
        return [r for r in rows if keep is None or keep(r)]

    def _on_message(self, topic: str, payload: bytes, _retained: bool) -> None:
        self._last_message = time.monotonic()
        parts = topic[len(self.root) + 1 :].split("/")
        if len(parts) != 4 or parts[1] != "devices" or parts[3] not in KINDS:
            return
        fleet, _, device, kind = parts
        with self._lock:
            row = self._rows.get((fleet, device))
            if row is None:
                if not payload:
                    return  # a cleared document of a device this view never saw
                row = self._rows[(fleet, device)] = DeviceRow(fleet=fleet, device=device)
            row.received_at[kind] = datetime.now(timezone.utc)
            row.problem = _apply(row, kind, payload)
            if row.state is None and row.availability is None and row.telemetry is None and row.problem is None:
                del self._rows[(fleet, device)]  # every document cleared: the device is gone
        if self._on_change is not None:
            self._on_change(row)


def _apply(row: DeviceRow, kind: str, payload: bytes) -> str | None:
    """Store one document on its row; the problem, if it does not parse."""
    model: Any = {"state": DeviceState, "availability": Availability, "telemetry": Telemetry}[kind]
    try:
        document = model.model_validate_json(payload) if payload else None
    except ValidationError as exc:
        return f"{kind}: not a valid document ({exc.errors()[0]['msg']})"
    setattr(row, kind, document)
    return None


def read_fleet(
    *,
    host: str,
    port: int,
    fleet: str | None = None,
    security: MqttSecurity | None = None,
    topic_root: str | None = None,
    protocol: str = "5",
    timeout_s: float = 10.0,
) -> list[DeviceRow]:
    """One snapshot of the fleet: connect, read the retained documents, disconnect."""
    view = FleetView(host=host, port=port, fleet=fleet, security=security, topic_root=topic_root, protocol=protocol)
    try:
        view.start(timeout_s=timeout_s)
        return view.rows()
    finally:
        view.stop()


def summary(rows: Iterable[DeviceRow]) -> str:
    """One line: devices online/offline, per active version, per update state."""
    rows = list(rows)
    online = sum(1 for r in rows if r.online)
    versions = Counter(f"v{r.state.active_version}" if r.state and r.state.active_version else "none" for r in rows)
    states = Counter(r.state.update_state if r.state else "unknown" for r in rows)
    if not rows:
        return "0 devices"
    parts = [f"{len(rows)} devices, {online} online, {len(rows) - online} offline"]
    parts.append("versions " + ", ".join(f"{v}: {n}" for v, n in sorted(versions.items())))
    parts.append("update states " + ", ".join(f"{s}: {n}" for s, n in sorted(states.items())))
    return "; ".join(parts)


def _iso(when: datetime | None) -> str | None:
    return when.isoformat(timespec="seconds") if when is not None else None


def rows_json(rows: Iterable[DeviceRow]) -> str:
    return json.dumps([r.to_json() for r in rows], indent=2)
