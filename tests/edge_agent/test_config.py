"""Agent config: typed, validated, unknown keys refused, errors that name the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cloud_trainer.releases.signing import generate_keypair
from edge_agent.config import ConfigError, load_config
from edge_agent.updater import load_verified
from tests.tinymodel import make_tiny_bundle


def _write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(body)
    return path


GOOD = 'device_id = "d1"\nfleet = "f"\nstate_dir = "state"\n[update]\ntrusted_keys = ["keys/release.pub"]\n'


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, GOOD))
    assert config.state_dir == tmp_path / "state"
    assert config.update.trusted_keys == [tmp_path / "keys" / "release.pub"]
    assert config.http.host == "127.0.0.1"  # localhost only unless asked


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (GOOD + '[mqtt]\nhots = "x"\n', "mqtt.hots: unknown key"),
        (GOOD + "[mqtt]\nport = 99999\n", "mqtt.port"),
        (GOOD.replace('fleet = "f"', 'fleet = "a/b"'), "fleet"),
        ('device_id = "d1"\nfleet = "f"\nstate_dir = "s"\n', "update: Field required"),
        ("device_id = ", "not valid TOML"),
    ],
)
def test_bad_config_names_the_problem(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(_write(tmp_path, body))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.toml")


def test_check_config_command(tmp_path: Path) -> None:
    generate_keypair(tmp_path / "keys")
    path = _write(tmp_path, GOOD)
    ok = subprocess.run([sys.executable, "-m", "edge_agent", "check-config", str(path)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "trusted release keys:" in ok.stdout
    (tmp_path / "keys" / "release.pub").write_text("garbage")
    bad = subprocess.run(
        [sys.executable, "-m", "edge_agent", "check-config", str(path)], capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert "is not a PEM public key" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize(("runtime", "spinning"), [("", "0"), ("[runtime]\nallow_spinning = true\n", "1")])
def test_allow_spinning_reaches_the_session(tmp_path: Path, runtime: str, spinning: str) -> None:
    config = load_config(_write(tmp_path, GOOD + runtime))
    make_tiny_bundle(tmp_path / "b", version=1)
    model = load_verified(tmp_path / "b", config)
    options = model.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == spinning
    assert options.intra_op_num_threads == config.runtime.intra_op_threads == 1
