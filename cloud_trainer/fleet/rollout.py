"""Rollouts as operations: a release's progress across the fleet, and the changes an operator makes.

A rollout is a signed release retained on a fleet, group or device topic
(``docs/mqtt.md``); a device applies the most specific release that targets it, if its canary
bucket is in. So every operation here is a release message:

- **promote** re-signs the release on a topic without its canary share (100 %), with a new
  sequence: the devices outside the canary take it too;
- **pause** withdraws it (an empty retained message: downloads stop, nobody new starts, devices
  that switched keep running it) and keeps the release in the registry's ``rollouts/paused/``;
  **resume** re-signs that release with a new sequence (a device never takes a withdrawn
  envelope back: its sequence is spent);
- **withdraw** withdraws it for good;
- **revert** and **pin** publish a registered version as a new release (``push``), with a
  higher sequence than anything before, on the fleet or group topic, or on one device's topic.

:class:`RolloutSession` does all of it over one MQTT connection (a broker that binds client ids
to identities lets an identity hold one connection at a time): it reads the current releases,
publishes, and then follows what the devices report (:class:`~cloud_trainer.fleet.view.FleetView`)
until every targeted device is active or failed, or the wait is over.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

from cloud_trainer.errors import CloudTrainError
from cloud_trainer.fleet.view import DeviceRow, FleetView
from cloud_trainer.releases.chunk_gc import QUIET_S, _Broker, _read_retained, _release_filters, parse_release
from cloud_trainer.releases.publish import Publisher
from cloud_trainer.releases.signing import load_private_key, next_sequence, sign_release
from edge_agent.mqtt_security import MqttSecurity
from edge_agent.protocol import MalformedPayload, Target
from edge_agent.protocol.release import Release, in_canary
from edge_agent.protocol.topics import Topics

Level = Literal["fleet", "group", "device"]
FAILED_STATES = ("rejected", "rolled-back")
RANK = {"fleet": 0, "group": 1, "device": 2}  # the more specific release wins, as on the device
RELEASE_TTL = timedelta(days=30)  # as `cloud-train push`


class RolloutError(CloudTrainError):
    """No release where the operation needs one, or a paused release that is not there."""


@dataclass(frozen=True)
class CurrentRelease:
    """A release retained on one topic (``release`` None: the topic holds something unreadable)."""

    topic: str
    level: Level
    name: str  # the fleet's, group's or device's name
    release: Release | None
    problem: str | None = None

    def describe(self) -> str:
        if self.release is None:
            return f"{self.topic}: unreadable ({self.problem})"
        r = self.release
        canary = f", canary {r.canary_percent:g}%" if r.canary_percent else ""
        return f"{r.model} v{r.version} (sequence {r.sequence}{canary}) on {self.level} {self.name}"


@dataclass
class Progress:
    """Where a release's targeted devices are: each device in exactly one of active, failed, pending."""

    active: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    offline: list[str] = field(default_factory=list)  # of the pending ones

    @property
    def targeted(self) -> int:
        return len(self.active) + len(self.failed) + len(self.pending)

    @property
    def done(self) -> bool:
        return not self.pending

    def line(self) -> str:
        offline = f" ({len(self.offline)} offline)" if self.offline else ""
        failed = f": {', '.join(self.failed)}" if self.failed else ""
        return (
            f"{len(self.active)} active, {len(self.pending)} pending{offline}, {len(self.failed)} failed{failed} "
            f"of {self.targeted} targeted"
        )


def _winner(row: DeviceRow, releases: list[CurrentRelease]) -> CurrentRelease | None:
    """The most specific readable release that targets the device (as its updater judges it)."""
    state = row.state
    best: CurrentRelease | None = None
    for current in releases:
        r = current.release
        if r is None or r.fleet != row.fleet or (state is not None and state.model != r.model):
            continue
        matches = (
            current.level == "fleet"
            or (current.level == "group" and state is not None and state.group == current.name)
            or (current.level == "device" and row.device == current.name)
        )
        if matches and (best is None or RANK[current.level] > RANK[best.level]):
            best = current
    return best


def progress(current: CurrentRelease, releases: list[CurrentRelease], rows: list[DeviceRow]) -> Progress:
    """The devices ``current`` targets (it is their most specific release and they are in its canary)."""
    out = Progress()
    release = current.release
    if release is None:
        return out
    for row in rows:
        winner = _winner(row, releases)
        if winner is None or winner.topic != current.topic:
            continue
        if not in_canary(fleet=row.fleet, device=row.device, model=release.model, percent=release.canary_percent):
            continue
        state = row.state
        if state is not None and state.active_version == release.version:
            out.active.append(row.device)
        elif state is not None and state.update_version == release.version and state.update_state in FAILED_STATES:
            out.failed.append(row.device)
        else:
            out.pending.append(row.device)
            if not row.online:
                out.offline.append(row.device)
    return out


class RolloutSession:
    """One connection for reading releases, publishing release messages and following the fleet.

    Args:
        host, port, security, protocol, topic_root: the broker connection (the cloud identity).
        fleet: the fleet.
        model: the model slot the releases are for.
        timeout_s: connecting, each acknowledgement, each read of retained messages.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        fleet: str,
        model: str,
        security: MqttSecurity | None = None,
        protocol: str = "5",
        topic_root: str | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self.fleet, self.model = fleet, model
        self.topics = Topics(fleet=fleet) if topic_root is None else Topics(fleet=fleet, root=topic_root)
        self._broker = _Broker(
            host=host, port=port, protocol=protocol, security=security, quiet_s=QUIET_S, timeout_s=timeout_s
        )
        self._publisher = Publisher(host=host, port=port, protocol=protocol, security=security, timeout_s=timeout_s)
        self._topic_root = topic_root

    def __enter__(self) -> RolloutSession:
        self._publisher.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._publisher.__exit__(*exc)

    # -- reading ----------------------------------------------------------------------------------
    def releases(self) -> list[CurrentRelease]:
        """Every release retained for this fleet and model (fleet, group and device topics)."""
        snapshot = _read_retained(
            self._broker, _release_filters(self.topics), keep_payloads=True, transport=self._publisher.transport
        )
        out = []
        for topic, payload in sorted(snapshot.payloads.items()):
            target = self.topics.release_target(topic)
            if target is None or target[2] != self.model:
                continue
            level: Level = "fleet" if target[0] == "fleet" else "group" if target[0] == "group" else "device"
            name = target[1]
            try:
                out.append(CurrentRelease(topic, level, name, parse_release(payload)))
            except MalformedPayload as exc:
                out.append(CurrentRelease(topic, level, name, None, str(exc)))
        return out

    def release_on(self, level: Level, name: str) -> CurrentRelease:
        topic = self.topic(level, name)
        for current in self.releases():
            if current.topic == topic:
                return current
        raise RolloutError(f"no release of {self.model} on {topic}")

    def topic(self, level: Level, name: str) -> str:
        if level == "fleet":
            return self.topics.fleet_release(self.model)
        if level == "group":
            return self.topics.group_release(name, self.model)
        return self.topics.device_release(name, self.model)

    def rows(self) -> list[DeviceRow]:
        """What every device of the fleet reports now (over this session's connection)."""
        view = self._view()
        view.start(timeout_s=self._broker.timeout_s)
        try:
            return view.rows()
        finally:
            view.stop()

    def _view(self) -> FleetView:
        return FleetView(
            host=self._broker.host, port=self._broker.port, fleet=self.fleet, topic_root=self._topic_root,
            transport=self._publisher.transport,
        )  # fmt: skip

    # -- changing ---------------------------------------------------------------------------------
    def publish(self, release: Release, key_path: Path, *, ttl: timedelta = RELEASE_TTL) -> CurrentRelease:
        """Sign ``release`` anew (next sequence, issued now) and retain it on its target's topic."""
        fresh, envelope = resign(release, key_path, ttl=ttl)
        topic = self.topic(fresh.target.kind, fresh.target.name)
        self._publisher.publish(topic, envelope)
        self._publisher.flush()
        return CurrentRelease(topic, fresh.target.kind, fresh.target.name, fresh)

    def withdraw(self, current: CurrentRelease) -> None:
        self._publisher.publish(current.topic, b"")
        self._publisher.flush()

    # -- following --------------------------------------------------------------------------------
    def follow(
        self, current: CurrentRelease, *, wait_s: float, on_line: Callable[[str], None], poll_s: float = 0.2
    ) -> Progress:
        """Report ``current``'s progress (a line at each change) until it is done or ``wait_s`` is over."""
        view = self._view()
        view.start(timeout_s=self._broker.timeout_s)
        try:
            deadline = time.monotonic() + wait_s
            releases = self.releases()  # the targets are judged against every current release
            last = None
            while True:
                state = progress(current, releases, view.rows())
                if state.line() != last:
                    last = state.line()
                    on_line(last)
                if state.done or time.monotonic() >= deadline:
                    return state
                time.sleep(poll_s)
        finally:
            view.stop()


def resign(release: Release, key_path: Path, *, ttl: timedelta = RELEASE_TTL, **changes: Any) -> tuple[Release, bytes]:
    """``release`` with ``changes``, the key's next sequence and a fresh issue time; and its signed envelope."""
    now = datetime.now(timezone.utc)
    fresh = release.model_copy(
        update={**changes, "sequence": next_sequence(key_path), "issued_at": now, "expires_at": now + ttl}
    )
    return fresh, sign_release(fresh, load_private_key(key_path)).to_bytes()


def paused_path(registry_root: Path, topic: str) -> Path:
    return registry_root / "rollouts" / "paused" / (topic.replace("/", "__") + ".json")


def save_paused(registry_root: Path, current: CurrentRelease) -> Path:
    assert current.release is not None
    path = paused_path(registry_root, current.topic)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(current.release.to_json())
    tmp.replace(path)
    return path


def load_paused(registry_root: Path, topic: str) -> tuple[Path, Release]:
    path = paused_path(registry_root, topic)
    try:
        return path, Release.model_validate_json(path.read_text())
    except FileNotFoundError:
        raise RolloutError(f"no paused release for {topic} in {path.parent} (pause one first)") from None
    except ValueError as exc:
        raise RolloutError(f"paused release {path} is unreadable: {exc}") from None


def target_of(level: Level, name: str) -> Target:
    return Target(kind=level, name=name)


def dump_progress(current: CurrentRelease, state: Progress) -> str:
    release = current.release
    return json.dumps({
        "topic": current.topic, "level": current.level, "name": current.name,
        "version": release.version if release else None, "sequence": release.sequence if release else None,
        "canary_percent": release.canary_percent if release else None, "problem": current.problem,
        "active": state.active, "failed": state.failed, "pending": state.pending, "offline": state.offline,
    })  # fmt: skip
