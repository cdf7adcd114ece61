"""Home Assistant MQTT discovery: the device and its sensors appear in Home Assistant by themselves.

Opt-in (``[homeassistant] discovery = true``). After every connect the agent publishes, retained,
one discovery config per entity to ``{prefix}/{component}/edgeloop_{device}/{key}/config``
(Home Assistant's ``<discovery_prefix>/<component>/<node_id>/<object_id>/config``). The entities
read the documents the agent publishes anyway (``docs/mqtt.md``), so discovery adds no traffic:

- ``binary_sensor`` connectivity, from the availability document (the MQTT last will included);
- ``sensor`` model version and update state, from the state document;
- ``sensor`` latency p50 and p99, requests per second, model failures and samples queued, from
  the telemetry document.

Every sensor but connectivity carries the availability topic, so it shows "unavailable" when the
device is offline instead of a stale value.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from edge_agent import __version__
from edge_agent.protocol.topics import Topics

ONLINE = "{{ 'online' if value_json.online else 'offline' }}"


@dataclass(frozen=True)
class _Entity:
    component: str
    key: str
    name: str
    source: str  # "state", "availability" or "telemetry"
    template: str
    extra: tuple[tuple[str, Any], ...] = ()


ENTITIES = (
    _Entity("binary_sensor", "online", "Online", "availability",
            "{{ 'ON' if value_json.online else 'OFF' }}", (("device_class", "connectivity"),)),
    _Entity("sensor", "model_version", "Model version", "state", "{{ value_json.active_version }}"),
    _Entity("sensor", "update_state", "Update state", "state", "{{ value_json.update_state }}"),
    _Entity("sensor", "latency_p50", "Latency p50", "telemetry", "{{ value_json.latency_ms.p50 }}",
            (("unit_of_measurement", "ms"), ("state_class", "measurement"))),
    _Entity("sensor", "latency_p99", "Latency p99", "telemetry", "{{ value_json.latency_ms.p99 }}",
            (("unit_of_measurement", "ms"), ("state_class", "measurement"))),
    _Entity("sensor", "requests_per_s", "Requests per second", "telemetry", "{{ value_json.throughput_rps }}",
            (("unit_of_measurement", "req/s"), ("state_class", "measurement"))),
    _Entity("sensor", "model_failures", "Model failures", "telemetry", "{{ value_json.errors }}",
            (("state_class", "measurement"),)),
    _Entity("sensor", "samples_queued", "Samples queued", "telemetry",
            "{{ value_json.samples.queued if value_json.samples else 0 }}", (("state_class", "measurement"),)),
)  # fmt: skip


def node_id(device: str) -> str:
    """Home Assistant's node id for a device: ``edgeloop_`` and the id with anything but [a-zA-Z0-9_-] as ``_``."""
    return "edgeloop_" + re.sub(r"[^a-zA-Z0-9_-]", "_", device)


def discovery_messages(*, topics: Topics, device: str, model: str, prefix: str) -> dict[str, bytes]:
    """Topic -> retained discovery config, for every entity of ``device``."""
    node = node_id(device)
    sources = {
        "state": topics.device_state(device),
        "availability": topics.device_availability(device),
        "telemetry": topics.device_telemetry(device),
    }
    ha_device = {
        "identifiers": [f"{node}_{topics.fleet}"],
        "name": device,
        "manufacturer": "edgeloop",
        "model": f"edge-agent ({model})",
        "sw_version": __version__,
    }
    out = {}
    for entity in ENTITIES:
        config: dict[str, Any] = {
            "name": entity.name,
            "unique_id": f"{node}_{topics.fleet}_{entity.key}",
            "object_id": f"{node}_{entity.key}",
            "state_topic": sources[entity.source],
            "value_template": entity.template,
            "device": ha_device,
            **dict(entity.extra),
        }
        if entity.source != "availability":
            config["availability_topic"] = sources["availability"]
            config["availability_template"] = ONLINE
        out[f"{prefix}/{entity.component}/{node}/{entity.key}/config"] = json.dumps(config).encode()
    return out
