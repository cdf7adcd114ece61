"""deploy/install-device: the device install, staged into a directory as its root file system.

The staged install is real: systemd-sysusers creates the user in the staged /etc/passwd, pip
installs the wheel with its `edge` extra into a fresh virtualenv, the config directory of
`cloud-train device add` is installed root:edge-agent 0640 and validated by the installed
`edge-agent check-config`, and `systemctl --root` enables the unit. Only starting the service
needs a running systemd, which this machine does not have.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cloud_trainer.fleet.provision import Pki
from tests.conftest import Keys

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "deploy" / "install-device"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


@pytest.fixture
def config_dir(tmp_path: Path, keys: Keys) -> Path:
    pki = Pki.init(tmp_path / "pki", broker_host="mqtt.example.com", release_key=keys.public)
    pki.add_device("cam-12", fleet="plant-7", group="line-3", out=tmp_path / "cam-12")
    return tmp_path / "cam-12"


def test_bad_invocations_fail_with_one_line(tmp_path: Path) -> None:
    cases = {
        ("--bogus",): "unknown option --bogus",
        ("--destdir", str(tmp_path)): "--config-dir is required",
        ("--config-dir", str(tmp_path / "nope"), "--destdir", str(tmp_path)): "agent.toml does not exist",
    }
    for args, message in cases.items():
        result = _run(*args)
        assert result.returncode == 2
        assert message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_dry_run_shows_the_whole_install(config_dir: Path, tmp_path: Path) -> None:
    result = _run("--config-dir", str(config_dir), "--wheel", str(SCRIPT), "--dry-run")
    assert result.returncode == 0, result.stderr
    plan = result.stdout
    for step in (
        "systemd-sysusers /usr/lib/sysusers.d/edge-agent.conf",
        "-m venv /opt/edgeloop/venv",
        "[edge]",
        "install -m 0640 -o 0 -g edge-agent",
        "/etc/edge-agent/device.key",
        "edge-agent check-config --quiet /etc/edge-agent/agent.toml",
        "/etc/systemd/system/edge-agent.service",
        "systemctl enable --now edge-agent.service",
    ):
        assert step in plan, step
    assert not (tmp_path / "opt").exists()


@pytest.mark.slow
def test_staged_install_into_a_root_directory(config_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    result = _run("--config-dir", str(config_dir), "--destdir", str(root), "--python", sys.executable)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    passwd = (root / "etc" / "passwd").read_text()
    user = next(line.split(":") for line in passwd.splitlines() if line.startswith("edge-agent:"))
    assert user[5] == "/var/lib/edge-agent"
    assert user[6].endswith("nologin")
    gid = int(user[3])

    etc = root / "etc" / "edge-agent"
    assert {p.name for p in etc.iterdir()} == {"agent.toml", "ca.crt", "device.crt", "device.key", "release.pub"}
    for path in [etc, *etc.iterdir()]:
        info = path.stat()
        assert (info.st_uid, info.st_gid) == (0, gid), path
        assert stat.S_IMODE(info.st_mode) == (0o750 if path == etc else 0o640), path

    venv = root / "opt" / "edgeloop" / "venv"
    check = subprocess.run(
        [str(venv / "bin" / "edge-agent"), "check-config", str(etc / "agent.toml")], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
    assert "MQTT: mqtt.example.com:8883, TLS, client certificate device.crt" in check.stdout
    # The edge extra brought the runtime and nothing of the cloud's.
    modules = "('onnxruntime', 'paho', 'torch', 'transformers')"
    probe = f"import importlib.util as u; print([m for m in {modules} if u.find_spec(m)])"
    found = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "['onnxruntime', 'paho']"

    unit = root / "etc" / "systemd" / "system" / "edge-agent.service"
    assert unit.read_text() == (ROOT / "systemd" / "edge-agent.service").read_text()
    wanted = root / "etc" / "systemd" / "system" / "multi-user.target.wants" / "edge-agent.service"
    assert wanted.is_symlink()
    assert os.readlink(wanted) == "/etc/systemd/system/edge-agent.service"
