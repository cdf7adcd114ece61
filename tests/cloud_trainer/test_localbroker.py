"""The demo's broker fallback: with no mosquitto binary, an embedded amqtt broker (MQTT 3.1.1)
carries the same release and chunks to an agent speaking 3.1.1."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud_trainer.demo.localbroker import start_local_broker
from cloud_trainer.releases.publish import push_bundle
from tests.conftest import AgentProcess, Keys, agent_toml
from tests.ports import start_mosquitto
from tests.tinymodel import make_tiny_bundle


def test_update_over_embedded_amqtt_broker(tmp_path: Path, keys: Keys) -> None:
    broker = start_mosquitto(prefer="amqtt", workdir=tmp_path / "amqtt")  # the same retry on a port clash
    assert broker.protocol == "3.1.1"
    agent = None
    try:
        make_tiny_bundle(tmp_path / "v1", version=1)
        push_bundle(
            tmp_path / "v1",
            host=broker.host,
            port=broker.port,
            fleet="amqtt-fleet",
            key_path=keys.private,
            protocol=broker.protocol,
        )
        config = tmp_path / "agent.toml"
        config.write_text(
            agent_toml(
                state_dir=tmp_path / "state",
                broker=broker,
                fleet="amqtt-fleet",
                public_key=keys.public,
                protocol=broker.protocol,
            )
        )
        agent = AgentProcess(config_path=config, log_path=tmp_path / "agent.log").start()
        agent.wait_version(1, timeout_s=60)
        status, body = agent.predict(["turn on the lights"])
        assert (status, body["predictions"][0]["label"]) == (200, "lights_on")
    finally:
        if agent is not None:
            agent.stop()
        broker.stop()


def test_asking_for_a_missing_broker_kind_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from cloud_trainer.demo import localbroker
    from cloud_trainer.errors import BrokerError

    monkeypatch.setattr(localbroker, "_mosquitto_binary", lambda: None)
    with pytest.raises(BrokerError, match="mosquitto is not installed"):
        start_local_broker(prefer="mosquitto")
