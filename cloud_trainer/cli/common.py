"""What several ``cloud-train`` commands share: the broker options (``--broker``, ``--mqtt-config``)
and the model registry a command names with ``--registry``.

The command modules import this and nothing else of the CLI; the parser in
:mod:`cloud_trainer.cli` imports the command modules. So the imports run one way.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.mqtt_security import MqttSecurity

DEFAULT_BROKER = "127.0.0.1:1883"
MQTT_CONFIG_ENV = "EDGELOOP_MQTT_CONFIG"


def parse_broker(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"broker {value!r} is not HOST:PORT")
    return host, int(port)


@dataclass(frozen=True)
class Connection:
    """Where and how a cloud command connects: host, port, TLS and credentials, topic root."""

    host: str
    port: int
    security: MqttSecurity | None
    topic_root: str | None


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """``--broker HOST:PORT`` and ``--mqtt-config FILE`` (an ``[mqtt]`` table: host, port, TLS, credentials)."""
    default = "default: from --mqtt-config, else 127.0.0.1:1883"
    parser.add_argument("--broker", type=parse_broker, help=f"HOST:PORT ({default})")
    parser.add_argument(
        "--mqtt-config",
        type=Path,
        default=os.environ.get(MQTT_CONFIG_ENV) or None,
        help=f"TOML with an [mqtt] table, e.g. <pki>/cloud/mqtt.toml (default: ${MQTT_CONFIG_ENV})",
    )


def connection_from_args(args: argparse.Namespace) -> Connection:
    """The connection the flags ask for; a bad ``--mqtt-config`` is a one-line :class:`CloudTrainError`."""
    from cloud_trainer.errors import CloudTrainError
    from edge_agent.config import ConfigError
    from edge_agent.mqtt_security import load_mqtt_file

    if args.mqtt_config is None:
        host, port = args.broker or parse_broker(DEFAULT_BROKER)
        return Connection(host=host, port=port, security=None, topic_root=None)
    try:
        mqtt = load_mqtt_file(Path(args.mqtt_config))
        security = MqttSecurity.from_config(mqtt)
    except ConfigError as exc:
        raise CloudTrainError(str(exc)) from None
    host, port = args.broker or (mqtt.host, mqtt.port)
    return Connection(host=host, port=port, security=security, topic_root=mqtt.topic_root)


def registry_from_args(args: argparse.Namespace) -> Any:
    """The model registry ``--registry`` names (default: ``$EDGELOOP_REGISTRY`` or ``~/.edgeloop/registry``)."""
    from cloud_trainer.releases.registry import Registry, default_registry

    return Registry(args.registry or default_registry())
