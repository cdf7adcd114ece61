"""The agent's unit file parses and its ExecStart command exists (systemd-analyze verify)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).parents[1] / "systemd" / "edge-agent.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_unit_verifies(tmp_path: Path) -> None:
    # Point the unit at this checkout's virtualenv, where /opt/edgeloop would be on a device.
    venv_bin = Path(sys.executable).parent
    unit = tmp_path / "edge-agent.service"
    unit.write_text(UNIT.read_text().replace("/opt/edgeloop/venv/bin", str(venv_bin)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    problems = [line for line in result.stderr.splitlines() if "edge-agent.service" in line]
    assert result.returncode == 0, result.stderr
    assert problems == [], problems
