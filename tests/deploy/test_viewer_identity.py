"""A read-only viewer identity (`cloud-train pki viewer-add`) on the project's secure broker: it sees
the fleet and its releases, may write nothing, and the cloud identity's commands do not kick it."""

from __future__ import annotations

import json
import time
from pathlib import Path

from cloud_trainer.demo.localbroker import free_port
from cloud_trainer.fleet.provision import Pki
from cloud_trainer.fleet.view import FleetView
from edge_agent.config import load_config
from edge_agent.mqtt_security import MqttSecurity, load_mqtt_file
from edge_agent.protocol.topics import Topics
from tests.conftest import Keys
from tests.mqttclient import TestClient
from tests.ports import retry_on_port_clash
from tests.securebroker import SecureBroker, start_secure_broker


def test_a_viewer_reads_the_fleet_writes_nothing_and_is_not_kicked_by_the_cloud(tmp_path: Path, keys: Keys) -> None:
    def start(cert_port: int) -> tuple[Pki, SecureBroker]:
        """The PKI names the broker's ports, so a port taken before the broker bound it means a new PKI."""
        root = tmp_path / f"try-{cert_port}"
        pki = Pki.init(
            root / "pki", broker_host="127.0.0.1", cert_port=cert_port, password_port=free_port(),
            release_key=keys.public,
        )  # fmt: skip
        pki.add_device("cam-v", fleet="plant-v", out=root / "cam-v")
        assert pki.add_viewer("ops") == "edgeloop-viewer-ops"
        return pki, start_secure_broker(pki, root / "broker")

    pki, broker = retry_on_port_clash(start)
    acl = (pki.root / "broker" / "acl").read_text()
    assert "user edgeloop-viewer-ops\ntopic read edgeloop/v1/+/devices/+/state\n" in acl
    topics = Topics(fleet="plant-v")
    viewer_mqtt = load_mqtt_file(pki.root / "viewer-ops" / "mqtt.toml")
    viewer_security = MqttSecurity.from_config(viewer_mqtt)
    device_security = MqttSecurity.from_config(load_config(pki.root.parent / "cam-v" / "agent.toml").mqtt)
    device = TestClient(host="127.0.0.1", port=broker.port, client_id="cam-v", security=device_security)
    view = FleetView(host="127.0.0.1", port=broker.port, fleet="plant-v", security=viewer_security)
    cloud = None
    try:
        state = {"schema": "edgeloop.state/1", "device": "cam-v", "fleet": "plant-v", "online": True,
                 "model": "intents", "active_version": 4, "updated_at": "2026-11-26T06:00:00+00:00"}  # fmt: skip
        assert device.publish(topics.device_state("cam-v"), json.dumps(state).encode(), retain=True) == "Success"
        view.start(timeout_s=10)  # its probe is refused (read-only): the quiet period ends the snapshot
        (row,) = view.rows()
        assert (row.device, row.state.active_version if row.state else None) == ("cam-v", 4)

        # the cloud identity connects (as a push would): a connection of another identity, so no takeover
        cloud_security = MqttSecurity.from_config(load_mqtt_file(pki.root / "cloud" / "mqtt.toml"))
        cloud = TestClient(host="127.0.0.1", port=broker.port, client_id="cloud", security=cloud_security)
        assert cloud.accepted, cloud.refusal
        state["active_version"] = 5
        assert device.publish(topics.device_state("cam-v"), json.dumps(state).encode(), retain=True) == "Success"
        deadline = time.monotonic() + 30
        while (view.rows()[0].state or row.state).active_version != 5:  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the viewer missed the new state"
            time.sleep(0.05)
        view.stop()  # one connection per identity: the writer below takes the viewer's place

        writer = TestClient(host="127.0.0.1", port=broker.port, client_id="viewer-w", security=viewer_security)
        try:
            assert writer.publish(topics.fleet_release("intents"), b"{}", retain=True) == "Not authorized"
            assert writer.publish(topics.device_state("cam-v"), b"{}", retain=True) == "Not authorized"
        finally:
            writer.close()
    finally:
        view.stop()
        device.close()
        if cloud is not None:
            cloud.close()
        broker.stop()
