"""`cloud-train pki init` and `device add|revoke`: real certificates, the broker's files, clear errors."""

from __future__ import annotations

import base64
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from cloud_trainer.fleet.provision import Pki, ProvisionError, mosquitto_password_hash
from edge_agent.mqtt_security import load_mqtt_file
from tests.conftest import Keys


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cloud_trainer", *args], capture_output=True, text=True, timeout=120)


def _edge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_agent", *args], capture_output=True, text=True, timeout=120)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_cli_provisions_a_device_ready_to_copy(tmp_path: Path, keys: Keys) -> None:
    pki = tmp_path / "pki"
    init = _cli(
        "pki", "init", "--pki", str(pki), "--broker-host", "mqtt.example.com", "--release-key", str(keys.public)
    )
    assert init.returncode == 0, init.stderr
    out = tmp_path / "cam-12"
    add = _cli(
        "device", "--pki", str(pki), "add", "cam-12", "--fleet", "plant-7", "--group", "line-3", "--out", str(out)
    )
    assert add.returncode == 0, add.stderr
    assert "device cam-12 (fleet plant-7) added" in add.stdout

    assert {p.name for p in out.iterdir()} == {"agent.toml", "ca.crt", "device.crt", "device.key", "release.pub"}
    assert _mode(out / "device.key") == 0o600
    assert (out / "release.pub").read_bytes() == keys.public.read_bytes()
    cert = x509.load_pem_x509_certificate((out / "device.crt").read_bytes())
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "cam-12"
    cert.verify_directly_issued_by(ca)

    check = _edge("check-config", str(out / "agent.toml"))
    assert check.returncode == 0, check.stderr
    assert '"device_id": "cam-12"' in check.stdout
    assert '"group": "line-3"' in check.stdout
    assert "MQTT: mqtt.example.com:8883, TLS, client certificate device.crt" in check.stdout

    acl = (pki / "broker" / "acl").read_text()
    assert "user cam-12\ntopic write edgeloop/v1/plant-7/devices/cam-12/state\n" in acl
    assert "topic read edgeloop/v1/plant-7/groups/line-3/releases/+" in acl
    assert "user edgeloop-cloud\ntopic readwrite edgeloop/v1/#" in acl
    assert "pattern" not in acl and "topic readwrite edgeloop/v1/#" not in acl.split("user cam-12")[1]

    listing = _cli("device", "--pki", str(pki), "list")
    assert listing.stdout.split()[:4] == ["cam-12", "plant-7", "line-3", "cert"]

    revoke = _cli("device", "--pki", str(pki), "revoke", "cam-12")
    assert revoke.returncode == 0, revoke.stderr
    assert "cam-12" not in (pki / "broker" / "acl").read_text()
    crl = x509.load_pem_x509_crl((pki / "broker" / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]


def test_password_devices_get_a_secret_file_and_a_mosquitto_hash(tmp_path: Path, keys: Keys) -> None:
    pki = Pki.init(tmp_path / "pki", broker_host="10.0.0.5", release_key=keys.public)
    pki.add_device("pw-1", fleet="plant-7", out=tmp_path / "pw-1", auth="password")
    out = tmp_path / "pw-1"
    assert {p.name for p in out.iterdir()} == {"agent.toml", "ca.crt", "mqtt.password", "release.pub"}
    assert _mode(out / "mqtt.password") == 0o600
    password = (out / "mqtt.password").read_text().strip()
    entries = dict(line.split(":", 1) for line in (tmp_path / "pki" / "broker" / "passwd").read_text().splitlines())
    assert set(entries) == {"pw-1", "edgeloop-collector"}  # the collector logs in by password too
    user, hashed = "pw-1", entries["pw-1"]
    salt = base64.b64decode(hashed.split("$")[3])
    assert (user, hashed) == ("pw-1", mosquitto_password_hash(password, salt=salt))
    assert password not in (tmp_path / "pki" / "broker" / "passwd").read_text()
    check = _edge("check-config", str(out / "agent.toml"))
    assert check.returncode == 0, check.stderr
    assert "MQTT: 10.0.0.5:8884, TLS, user pw-1 with password" in check.stdout
    assert password not in check.stdout


def test_provisioning_errors_are_one_line(tmp_path: Path, keys: Keys) -> None:
    pki = tmp_path / "pki"
    assert (
        _cli("pki", "init", "--pki", str(pki), "--broker-host", "b", "--release-key", str(keys.public)).returncode == 0
    )
    assert (
        _cli("device", "--pki", str(pki), "add", "cam-1", "--fleet", "f1", "--out", str(tmp_path / "a")).returncode == 0
    )
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    cases = {
        ("device", "--pki", str(pki), "add", "cam-1", "--fleet", "f2", "--out", str(tmp_path / "b")): "already exists",
        ("device", "--pki", str(pki), "add", "edgeloop-cloud", "--fleet", "f1", "--out", str(tmp_path)): "reserved",
        ("device", "--pki", str(pki), "add", "bad/name", "--fleet", "f1", "--out", str(tmp_path / "d")): "not a valid",
        ("device", "--pki", str(pki), "add", "cam-2", "--fleet", "f1", "--out", str(tmp_path / "full")): "not empty",
        ("device", "--pki", str(pki), "add", "cam-3", "--fleet", "f1", "--out", str(tmp_path / "e"),
         "--release-key", str(keys.private)): "release key",
        ("device", "--pki", str(pki), "revoke", "ghost"): "no device 'ghost'",
        ("device", "--pki", str(tmp_path / "nowhere"), "list"): "is not a PKI directory",
        ("pki", "init", "--pki", str(pki), "--broker-host", "b"): "already a PKI directory",
    }  # fmt: skip
    for args, message in cases.items():
        result = _cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_revoke_unknown_device_names_the_known_ones(tmp_path: Path, keys: Keys) -> None:
    pki = Pki.init(tmp_path / "pki", broker_host="b", release_key=keys.public)
    pki.add_device("cam-1", fleet="f", out=tmp_path / "cam-1")
    with pytest.raises(ProvisionError, match=r"no device 'cam-9' .*\(devices: cam-1\)"):
        pki.revoke_device("cam-9")


def test_a_second_collector_gets_an_identity_of_its_own(tmp_path: Path, keys: Keys) -> None:
    """The broker binds client ids to identities, so one identity holds one connection: each
    collector host gets `edgeloop-collector-<name>`, with the collector's ACL and the secret group."""
    from cloud_trainer.cli import main

    pki = Pki.init(tmp_path / "pki", broker_host="b", release_key=keys.public)
    assert main(["pki", "collector-add", "eu-2", "--pki", str(pki.root)]) == 0
    out = pki.root / "collector-eu-2"
    assert (out / "share.env").read_text() == f"EDGELOOP_SHARE_GROUP={pki.share_group}\n"
    assert "client.crt" not in {p.name for p in out.iterdir()}  # a password identity (see provision.py)
    password = (out / "mqtt.password").read_text().strip()
    passwd = dict(line.split(":", 1) for line in (pki.root / "broker" / "passwd").read_text().splitlines())
    assert set(passwd) >= {"edgeloop-collector", "edgeloop-collector-eu-2"}
    salt_b64 = passwd["edgeloop-collector-eu-2"].split("$")[3]
    assert passwd["edgeloop-collector-eu-2"] == mosquitto_password_hash(password, salt=base64.b64decode(salt_b64))
    config = load_mqtt_file(out / "mqtt.toml")
    assert (config.port, config.username, config.password()) == (
        pki.settings["password_port"],
        "edgeloop-collector-eu-2",
        password,
    )
    acl = (pki.root / "broker" / "acl").read_text()
    assert "user edgeloop-collector-eu-2\ntopic read edgeloop/v1/+/devices/+/samples\n" in acl
    assert pki.collectors() == ["edgeloop-collector", "edgeloop-collector-eu-2"]
    with pytest.raises(Exception, match="reserved"):
        pki.add_device("edgeloop-collector-x", fleet="f", out=tmp_path / "dev")
    with pytest.raises(Exception, match="exists already"):
        pki.add_collector("eu-2")
    conf = (Path(__file__).parents[2] / "deploy" / "mosquitto" / "edgeloop.conf").read_text()
    assert conf.count("use_username_as_clientid true") == 2  # both listeners
