"""The dashboard's data plane: one MQTT connection, the fleet's rows, releases, history and errors.

The HTTP server (:mod:`cloud_trainer.fleet.dashboard.server`) is one front end of it; a test or a
script can read the same snapshots without one.

Everything MQTT brings arrives on the connection's network thread; listeners
(:meth:`DashboardService.add_listener`) are called there with the device that changed, or with
``None`` when a release did, and must only take note (the server wakes its event loop).
"""

from __future__ import annotations

import secrets
import threading
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from cloud_trainer.errors import BrokerError
from cloud_trainer.fleet.dashboard.actions import RolloutActions, Signing
from cloud_trainer.fleet.dashboard.history import POINTS_PER_DEVICE, ErrorLog, History
from cloud_trainer.fleet.dashboard.releases import ReleaseWatch, model_of
from cloud_trainer.fleet.rollout import CurrentRelease, progress
from cloud_trainer.fleet.view import DeviceRow, FleetView
from cloud_trainer.releases.publish import Publisher
from edge_agent.mqtt_security import MqttSecurity
from edge_agent.protocol.topics import Topics
from edge_agent.transport import TransportError

Listener = Callable[[str | None], None]
NAMES_SHOWN = 20  # device names listed per progress bucket (the counts are always whole)


class DashboardService:
    """A fleet as the dashboard shows it; :meth:`start` connects, :meth:`stop` disconnects.

    Args:
        host, port, security, protocol, topic_root: the broker connection (the cloud identity, or a
            reading one such as the collector's for a read-only dashboard).
        fleet: the fleet shown.
        signing: the release-signing key and registry; ``None`` (default): read-only.
        history_points: telemetry points kept per device.
        timeout_s: connecting and reading the retained snapshot.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        fleet: str,
        security: MqttSecurity | None = None,
        protocol: str = "5",
        topic_root: str | None = None,
        signing: Signing | None = None,
        history_points: int = POINTS_PER_DEVICE,
        timeout_s: float = 10.0,
    ) -> None:
        self.fleet = fleet
        self.topics = Topics(fleet=fleet) if topic_root is None else Topics(fleet=fleet, root=topic_root)
        self.history = History(points=history_points)
        self.errors = ErrorLog()
        self.token = secrets.token_urlsafe(24)  # what a page must send with an action (see server)
        self._timeout_s = timeout_s
        self._listeners: list[Listener] = []
        self._listeners_lock = threading.Lock()
        self._publisher = Publisher(
            host=host, port=port, client_id=f"cloud-train-dashboard-{secrets.token_hex(4)}", protocol=protocol,
            timeout_s=timeout_s, security=security,
        )  # fmt: skip
        transport = self._publisher.transport
        self._view = FleetView(
            host=host, port=port, fleet=fleet, topic_root=topic_root, on_change=self._row_changed, transport=transport
        )
        self._releases = ReleaseWatch(transport=transport, topics=self.topics, on_change=self._release_changed)
        self.actions = RolloutActions(publisher=self._publisher, releases=self._releases, signing=signing)

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Connect, then read the retained state of the fleet and its releases; :class:`BrokerError` if not."""
        self._publisher.__enter__()
        try:
            self._view.start(timeout_s=self._timeout_s)
            self._releases.start(timeout_s=self._timeout_s)
        except TransportError as exc:
            self._publisher.transport.stop()
            raise BrokerError(str(exc)) from None

    def stop(self) -> None:
        self._publisher.transport.stop()

    def add_listener(self, listener: Listener) -> None:
        with self._listeners_lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        with self._listeners_lock:
            self._listeners.remove(listener)

    # -- reading --------------------------------------------------------------------------------------
    def rows(self) -> list[DeviceRow]:
        return self._view.rows()

    def snapshot(self) -> dict[str, Any]:
        """Everything the page shows at once: rows, summary, releases with progress, recent errors."""
        rows = self._view.rows()
        return {
            "fleet": self.fleet,
            "writable": self.actions.writable,
            "generated_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "rows": [self.row_json(r) for r in rows],
            **self.overview(rows),
        }

    def overview(self, rows: list[DeviceRow] | None = None) -> dict[str, Any]:
        """What depends on the whole fleet: the summary, the releases' progress, the recent errors."""
        rows = self._view.rows() if rows is None else rows
        return {
            "summary": summary(rows), "releases": self.releases(rows), "releases_problem": self._releases.problem,
            "errors": self.errors.recent(),
        }  # fmt: skip

    def row_json(self, row: DeviceRow) -> dict[str, Any]:
        return {**row.to_json(), "history_points": self.history.count(row.device)}

    def device(self, name: str) -> dict[str, Any] | None:
        """One device's row and its telemetry history; ``None`` if the fleet has no such device."""
        for row in self._view.rows():
            if row.device == name:
                return {"row": self.row_json(row), "history": self.history.series(name)}
        return None

    def releases(self, rows: list[DeviceRow]) -> list[dict[str, Any]]:
        current = self._releases.current()
        return [self._release_json(c, current, rows) for c in current]

    def _release_json(self, c: CurrentRelease, current: list[CurrentRelease], rows: list[DeviceRow]) -> dict[str, Any]:
        r = c.release
        state = progress(c, current, rows)
        return {
            "topic": c.topic, "level": c.level, "name": c.name, "model": model_of(self.topics, c),
            "describe": c.describe(), "version": r.version if r else None, "sequence": r.sequence if r else None,
            "canary_percent": r.canary_percent if r else None, "problem": c.problem,
            "targeted": state.targeted, "active": len(state.active), "pending": len(state.pending),
            "offline": len(state.offline), "failed": len(state.failed), "failed_devices": state.failed[:NAMES_SHOWN],
            "pending_devices": state.pending[:NAMES_SHOWN],
        }  # fmt: skip

    # -- MQTT thread ----------------------------------------------------------------------------------
    def _row_changed(self, row: DeviceRow) -> None:
        if row.state is None and row.availability is None and row.telemetry is None and row.problem is None:
            self.history.forget(row.device)  # every document cleared: FleetView dropped the row
        else:
            self.history.record(row)
            self.errors.record(row)
        self._notify(row.device)

    def _release_changed(self) -> None:
        self._notify(None)

    def _notify(self, device: str | None) -> None:
        with self._listeners_lock:
            listeners = list(self._listeners)
        for listener in listeners:
            listener(device)


def summary(rows: list[DeviceRow]) -> dict[str, Any]:
    """Devices online and offline, per active version, per update state."""
    online = sum(1 for r in rows if r.online)
    versions = Counter(f"v{r.state.active_version}" if r.state and r.state.active_version else "none" for r in rows)
    states = Counter(r.state.update_state if r.state else "unknown" for r in rows)
    return {
        "devices": len(rows),
        "online": online,
        "offline": len(rows) - online,
        "versions": dict(sorted(versions.items())),
        "update_states": dict(sorted(states.items())),
    }
