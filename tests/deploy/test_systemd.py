"""The unit files parse and their commands exist (systemd-analyze verify), and they ask for what a
months-unattended service needs. scripts/test installs systemd's tools when they are missing
(scripts/ensure-system-packages); a missing systemd-analyze fails here rather than skipping."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SYSTEMD = Path(__file__).parents[2] / "systemd"
UNITS = ["edge-agent.service", "cloud-train-collect.service"]


def _directives(unit: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in (SYSTEMD / unit).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def verify(unit_text: str, name: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze verify`` a unit, pointed at this checkout's virtualenv instead of /opt/edgeloop."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: run scripts/ensure-system-packages (apt-get install systemd)"
    unit = tmp_path / name
    unit.write_text(unit_text.replace("/opt/edgeloop/venv/bin", str(Path(sys.executable).parent)))
    return subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)


@pytest.mark.parametrize("name", UNITS)
def test_unit_verifies(name: str, tmp_path: Path) -> None:
    result = verify((SYSTEMD / name).read_text(), name, tmp_path)
    problems = [line for line in result.stderr.splitlines() if name in line]
    assert result.returncode == 0, result.stderr
    assert problems == [], problems


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    broken = (SYSTEMD / "edge-agent.service").read_text().replace("WatchdogSec=30s", "WatchdogSec=soon")
    result = verify(broken, "edge-agent.service", tmp_path)
    assert "edge-agent.service:" in result.stderr  # the check above is not vacuous
    assert "Failed to parse sec value" in result.stderr


def test_agent_unit_is_a_watched_hardened_notify_service() -> None:
    unit = _directives("edge-agent.service")
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "30s",
        "Restart": "on-failure",
        "StateDirectory": "edge-agent",
        "ConfigurationDirectory": "edge-agent",
        "User": "edge-agent",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "MemoryMax": "512M",
        "CapabilityBoundingSet": "",
        "LimitNOFILE": "1024",
    }
    assert {key: unit.get(key, ["(missing)"])[0] for key in expected} == expected
    from edge_agent.config import HttpConfig

    assert HttpConfig().max_connections + 256 <= int(unit["LimitNOFILE"][0])  # the cap bites before EMFILE
    assert "check-config --quiet /etc/edge-agent/agent.toml" in unit["ExecStartPre"][0]
    assert "DynamicUser" not in unit  # a fixed user, so the config directory can be group-readable to it


def test_collector_unit_is_hardened() -> None:
    unit = _directives("cloud-train-collect.service")
    assert "cloud-train collect" in unit["ExecStart"][0]
    for key, value in {
        "Restart": "on-failure",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "StateDirectory": "edgeloop-collect",
        "User": "edgeloop",
    }.items():
        assert unit[key] == [value], key
