"""The fleet's current releases, kept live from a subscription to its release topics.

``cloud-train rollout status`` reads the retained releases once; the dashboard subscribes to the
same topics (fleet, group and device releases of every model) on its one connection and keeps the
latest per topic, so a promote, pause or push anywhere shows within a message's delay.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from cloud_trainer.fleet.rollout import CurrentRelease, Level
from cloud_trainer.releases.chunk_gc import parse_release
from edge_agent.protocol import MalformedPayload
from edge_agent.protocol.topics import Topics
from edge_agent.transport import MqttTransport, TransportError

LEVELS: dict[str, Level] = {"fleet": "fleet", "group": "group", "device": "device"}


def release_filters(topics: Topics) -> list[str]:
    """The wildcard forms of ``Topics.fleet_release``, ``group_release`` and ``device_release``."""
    return [f"{topics.base}/releases/+", f"{topics.base}/groups/+/releases/+", f"{topics.base}/devices/+/releases/+"]


class ReleaseWatch:
    """Every release retained for one fleet, by topic; thread-safe.

    Args:
        transport: the open connection to subscribe on (the dashboard's one connection).
        topics: the fleet's topics.
        on_change: called (on the network thread) after a release appeared, changed or went.
    """

    def __init__(
        self, *, transport: MqttTransport, topics: Topics, on_change: Callable[[], None] | None = None
    ) -> None:
        self._transport = transport
        self._topics = topics
        self._on_change = on_change
        self._releases: dict[str, CurrentRelease] = {}
        self.problem: str | None = None  # why the releases cannot be shown (an identity that may not read them)
        self._lock = threading.Lock()

    def start(self, *, timeout_s: float = 10.0) -> None:
        """Subscribe and wait for the broker to grant it (the retained releases follow the SUBACK).

        A refused subscription is noted in :attr:`problem`, not raised: a reading identity (the
        collector's) may see the devices but not the releases; a silent broker raises."""
        for topic_filter in release_filters(self._topics):
            self._transport.subscribe(topic_filter, self._on_message, qos=1)
        for topic_filter in release_filters(self._topics):
            try:
                self._transport.wait_subscribed(topic_filter, timeout_s=timeout_s)
            except TransportError:
                refusal = self._transport.subscription_error(topic_filter)
                if refusal is None:
                    raise
                self.problem = f"the broker refused this identity the releases ({refusal})"

    def stop(self) -> None:
        for topic_filter in release_filters(self._topics):
            self._transport.unsubscribe(topic_filter)

    def current(self) -> list[CurrentRelease]:
        """Fleet releases first, then groups, then devices; by model and name within each."""
        order = {"fleet": 0, "group": 1, "device": 2}
        with self._lock:
            releases = list(self._releases.values())
        return sorted(releases, key=lambda c: (order[c.level], c.name, c.topic))

    def get(self, topic: str) -> CurrentRelease | None:
        with self._lock:
            return self._releases.get(topic)

    def _on_message(self, topic: str, payload: bytes, _retained: bool) -> None:
        target = self._topics.release_target(topic)
        if target is None:
            return
        kind, name, _model = target
        with self._lock:
            if not payload:
                if self._releases.pop(topic, None) is None:
                    return
            else:
                try:
                    current = CurrentRelease(topic, LEVELS[kind], name, parse_release(payload))
                except MalformedPayload as exc:
                    current = CurrentRelease(topic, LEVELS[kind], name, None, str(exc))
                self._releases[topic] = current
        if self._on_change is not None:
            self._on_change()


def model_of(topics: Topics, current: CurrentRelease) -> str | None:
    """The model slot a release topic is for."""
    target = topics.release_target(current.topic)
    return target[2] if target else None
