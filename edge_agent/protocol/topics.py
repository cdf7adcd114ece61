"""MQTT topic names: the one place they are spelled.

Layout (``{root}`` is ``edgeloop/v1`` unless configured)::

    {root}/{fleet}/releases/{model}                          retained signed release, whole fleet
    {root}/{fleet}/groups/{group}/releases/{model}           retained signed release, one group
    {root}/{fleet}/devices/{device}/releases/{model}         retained signed release, one device
    {root}/{fleet}/devices/{device}/state                    retained reported state (survives a crash)
    {root}/{fleet}/devices/{device}/availability             retained online/offline (and the last will)
    {root}/{fleet}/devices/{device}/telemetry                periodic telemetry
    {root}/{fleet}/devices/{device}/infer                    MQTT 5 inference requests (response topic +
                                                             correlation data)
    {root}/{fleet}/devices/{device}/replies/...              MQTT 5 inference replies (the response topics
                                                             the ACLs let a device publish to)
    {root}/{fleet}/devices/{device}/samples                  sample batches for retraining (QoS 1, gzip JSON)
    {root}/{fleet}/sampling/{model}                          retained sampling policy, whole fleet
    {root}/{fleet}/devices/{device}/sampling                 retained sampling policy, one device (wins)

and, under a root of their own, so that a dashboard subscribed to ``{root}/#`` (or MQTT Explorer to
``edgeloop/#``) never pulls model bytes::

    {chunk_root}/{fleet}/{sha256}                            retained artifact chunk, content-addressed

``{chunk_root}`` is the root with ``-chunks`` after its first level: ``edgeloop-chunks/v1``.

A device reads only its fleet's releases and chunks and writes only under its own device topic,
which is what the broker ACLs (deployment) enforce.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_ROOT = "edgeloop/v1"

_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_segment(kind: str, value: str) -> str:
    """Return ``value`` if it is a safe single topic segment, else raise ``ValueError`` naming it."""
    if not _SEGMENT.fullmatch(value):
        raise ValueError(
            f"{kind} {value!r} is not a valid name: use 1-64 characters from A-Z a-z 0-9 _ . -, "
            "starting with a letter or digit"
        )
    return value


def chunk_root(root: str) -> str:
    """The root of the chunk topics: ``root`` with ``-chunks`` after its first level."""
    first, _, rest = root.partition("/")
    return f"{first}-chunks/{rest}" if rest else f"{first}-chunks"


@dataclass(frozen=True, kw_only=True)
class Topics:
    """Topic builder for one fleet.

    Args:
        fleet: the fleet name.
        root: the topic prefix shared by the whole product.
    """

    fleet: str
    root: str = DEFAULT_ROOT

    def __post_init__(self) -> None:
        check_segment("fleet", self.fleet)

    @property
    def base(self) -> str:
        return f"{self.root}/{self.fleet}"

    @property
    def chunk_base(self) -> str:
        """Where the fleet's chunks are retained: outside ``{root}/``, see the module's docstring."""
        return f"{chunk_root(self.root)}/{self.fleet}"

    def legacy_chunk_base(self) -> str:
        """Where earlier releases retained chunks (``cloud-train chunks gc --legacy`` clears them)."""
        return f"{self.base}/chunks"

    def fleet_release(self, model: str) -> str:
        return f"{self.base}/releases/{check_segment('model', model)}"

    def group_release(self, group: str, model: str) -> str:
        return f"{self.base}/groups/{check_segment('group', group)}/releases/{check_segment('model', model)}"

    def device_release(self, device: str, model: str) -> str:
        return f"{self.base}/devices/{check_segment('device', device)}/releases/{check_segment('model', model)}"

    def chunk(self, sha256: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise ValueError(f"chunk id {sha256!r} is not a lowercase hex sha256")
        return f"{self.chunk_base}/{sha256}"

    def device_state(self, device: str) -> str:
        return f"{self.base}/devices/{check_segment('device', device)}/state"

    def device_telemetry(self, device: str) -> str:
        return f"{self.base}/devices/{check_segment('device', device)}/telemetry"

    def device_infer(self, device: str) -> str:
        return f"{self.base}/devices/{check_segment('device', device)}/infer"

    def device_replies(self, device: str) -> str:
        """Where a requester's response topics live under broker ACLs: this prefix, then ``/<anything>``."""
        return f"{self.base}/devices/{check_segment('device', device)}/replies"

    def device_samples(self, device: str) -> str:
        return f"{self.base}/devices/{check_segment('device', device)}/samples"

    def all_samples(self) -> str:
        """The wildcard a collector subscribes to (behind ``$share/<group>/`` to split the load)."""
        return f"{self.base}/devices/+/samples"

    def fleet_sampling(self, model: str) -> str:
        return f"{self.base}/sampling/{check_segment('model', model)}"

    def device_sampling(self, device: str) -> str:
        return f"{self.base}/devices/{check_segment('device', device)}/sampling"

    def release_topics_for(self, *, device: str, group: str | None, model: str) -> list[str]:
        """The release topics a device subscribes to, least specific first."""
        topics = [self.fleet_release(model)]
        if group:
            topics.append(self.group_release(group, model))
        topics.append(self.device_release(device, model))
        return topics

    def device_availability(self, device: str) -> str:
        """Retained ``online``/``offline`` document; the last will goes here, so the state survives a crash."""
        return f"{self.base}/devices/{check_segment('device', device)}/availability"

    def release_target(self, topic: str) -> tuple[str, str, str] | None:
        """``(kind, name, model)`` of a release topic (kind ``fleet``, ``group`` or ``device``), else None."""
        if not topic.startswith(f"{self.base}/"):
            return None
        parts = topic[len(self.base) + 1 :].split("/")
        if len(parts) == 2 and parts[0] == "releases":
            return "fleet", self.fleet, parts[1]
        if len(parts) == 4 and parts[0] in ("groups", "devices") and parts[2] == "releases":
            return parts[0].removesuffix("s"), parts[1], parts[3]
        return None

    def specificity(self, topic: str) -> int:
        """0 for a fleet release topic, 1 for a group, 2 for a device; -1 if it is none of them."""
        target = self.release_target(topic)
        return -1 if target is None else {"fleet": 0, "group": 1, "device": 2}[target[0]]
