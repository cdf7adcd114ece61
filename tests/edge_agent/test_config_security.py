"""[mqtt] TLS and credentials in the agent's config: files must exist, secrets come from files or the
environment, and every mistake is named by its key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cloud_trainer.fleet.pki import CertificateAuthority, write_private
from edge_agent.config import ConfigError, load_config
from edge_agent.mqtt_security import MqttSecurity, load_mqtt_file
from tests.conftest import Keys

BASE = 'device_id = "d1"\nfleet = "f"\nstate_dir = "state"\n[update]\ntrusted_keys = ["{key}"]\n'


def _write(tmp_path: Path, keys: Keys, mqtt: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(BASE.format(key=keys.public) + mqtt)
    return path


@pytest.fixture
def tls_files(tmp_path: Path) -> Path:
    ca = CertificateAuthority.create(tmp_path / "ca", name="test CA")
    issued = ca.issue("d1")
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    (tmp_path / "device.crt").write_bytes(issued.cert_pem)
    write_private(tmp_path / "device.key", issued.key_pem)
    other = ca.issue("d2")
    write_private(tmp_path / "other.key", other.key_pem)
    return tmp_path


def test_tls_paths_resolve_against_the_config_directory(tmp_path: Path, keys: Keys, tls_files: Path) -> None:
    tls = '[mqtt]\nhost = "b.example"\nport = 8883\n[mqtt.tls]\nca_file = "ca.crt"\ncert_file = "device.crt"\n'
    config = load_config(_write(tmp_path, keys, tls + 'key_file = "device.key"\n'))
    assert config.mqtt.tls is not None
    assert config.mqtt.tls.cert_file == tmp_path / "device.crt"
    security = MqttSecurity.from_config(config.mqtt)
    assert security.tls and security.username is None
    security.ssl_context()  # loads the CA and the certificate with its key


@pytest.mark.parametrize(
    ("mqtt", "message"),
    [
        ('[mqtt.tls]\nca_file = "missing.crt"\n', "mqtt.tls.ca_file: file "),
        ('[mqtt.tls]\ncert_file = "device.crt"\n', "mqtt.tls: cert_file and key_file go together"),
        ("[mqtt.tls]\nverify = false\n", "mqtt.tls.verify: unknown key (not allowed)"),
        ('[mqtt]\npassword = "inline"\n', "mqtt.password: unknown key (not allowed)"),
        ('[mqtt]\npassword_file = "secret"\n', "mqtt: a password (password_file or password_env) needs a username"),
        ('[mqtt]\nusername = "u"\npassword_file = "nope"\n', "mqtt.password_file: file "),
        ('[mqtt]\nusername = "u"\npassword_env = "EDGELOOP_TEST_UNSET"\n', "EDGELOOP_TEST_UNSET is not set"),
        ('[mqtt]\nusername = "u"\npassword_env = "A"\npassword_file = "secret"\n', "not both"),
        ('[mqtt]\nhost = "b.example"\nusername = "u"\npassword_file = "secret"\n', "would travel in clear text"),
    ],
)
def test_mistakes_are_named(tmp_path: Path, keys: Keys, tls_files: Path, mqtt: str, message: str) -> None:
    (tmp_path / "secret").write_text("s3cret\n")
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, keys, mqtt))
    assert message in str(err.value)


def test_secrets_come_from_a_file_or_the_environment(
    tmp_path: Path, keys: Keys, tls_files: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "secret").write_text("from-file\n")
    tls = '[mqtt.tls]\nca_file = "ca.crt"\n'
    from_file = load_config(
        _write(tmp_path, keys, f'[mqtt]\nhost = "b"\nusername = "u"\npassword_file = "secret"\n{tls}')
    )
    assert MqttSecurity.from_config(from_file.mqtt).password == "from-file"
    monkeypatch.setenv("EDGELOOP_TEST_PASSWORD", "from-env")
    from_env = load_config(
        _write(tmp_path, keys, f'[mqtt]\nhost = "b"\nusername = "u"\npassword_env = "EDGELOOP_TEST_PASSWORD"\n{tls}')
    )
    security = MqttSecurity.from_config(from_env.mqtt)
    assert security.password == "from-env"
    assert "from-env" not in repr(security)
    (tmp_path / "secret").write_text("")
    with pytest.raises(ConfigError, match=r"mqtt\.password_file: .* is empty"):
        MqttSecurity.from_config(from_file.mqtt)


def test_check_config_reports_a_key_that_does_not_match_its_certificate(
    tmp_path: Path, keys: Keys, tls_files: Path
) -> None:
    path = _write(tmp_path, keys, '[mqtt.tls]\nca_file = "ca.crt"\ncert_file = "device.crt"\nkey_file = "other.key"\n')
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent", "check-config", "--quiet", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: mqtt.tls: cannot use client certificate")
    assert result.stdout == ""


def test_cloud_mqtt_file_holds_only_an_mqtt_table(tmp_path: Path, tls_files: Path) -> None:
    good = tmp_path / "mqtt.toml"
    good.write_text('[mqtt]\nhost = "b"\nport = 8883\n[mqtt.tls]\nca_file = "ca.crt"\n')
    assert load_mqtt_file(good).tls is not None
    bad = tmp_path / "bad.toml"
    bad.write_text('[mqtt]\nhost = "b"\nprot = 1\n')
    with pytest.raises(ConfigError, match=r"mqtt.prot: unknown key"):
        load_mqtt_file(bad)
    bad.write_text('device_id = "x"\n')
    with pytest.raises(ConfigError, match="must hold one \\[mqtt\\] table"):
        load_mqtt_file(bad)
