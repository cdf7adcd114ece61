"""The edge stays light: importing and starting edge_agent loads no torch, transformers, optimum,
onnx, export or cloud_trainer. Checked in a fresh interpreter, through ``sys.modules``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import tomllib

from cloud_trainer.localbroker import free_port

FORBIDDEN = ["torch", "transformers", "optimum", "onnx", "export", "cloud_trainer", "sentence_transformers"]

PROBE = r"""
import importlib, json, pkgutil, sys, time, urllib.request
from pathlib import Path

import edge_agent
for info in pkgutil.walk_packages(edge_agent.__path__, "edge_agent."):
    if info.name not in ("edge_agent.__main__",):
        importlib.import_module(info.name)

from edge_agent.app import Agent
from edge_agent.config import load_config

agent = Agent(load_config(Path(sys.argv[1])))
agent.start()
port = agent.server.address[1]
live = urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/live").status
agent.stop()
forbidden = json.loads(sys.argv[2])
loaded = sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in forbidden))
print(json.dumps({"live": live, "loaded": loaded, "modules": len(sys.modules)}))
"""


def test_importing_and_starting_the_agent_loads_nothing_heavy(tmp_path: Path) -> None:
    from cloud_trainer.signing import generate_keypair

    _, public = generate_keypair(tmp_path)
    config = tmp_path / "agent.toml"
    config.write_text(
        f'device_id = "d"\nfleet = "f"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[mqtt]\nport = {free_port()}\n[http]\nport = 0\n[update]\ntrusted_keys = ["{public}"]\n'
    )
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(config), json.dumps(FORBIDDEN)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["live"] == 200
    assert report["loaded"] == [], f"edge_agent pulled in {report['loaded']}"


def test_the_probe_would_see_a_forbidden_import(tmp_path: Path) -> None:
    """The check above is not vacuous: the same sys.modules test catches onnx when it is imported."""
    code = "import sys, onnx; print([m for m in sys.modules if m == 'onnx' or m.startswith('onnx.')][:1])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "onnx" in out


def test_edge_extra_declares_no_heavy_dependency() -> None:
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    edge = pyproject["project"]["optional-dependencies"]["edge"]
    names = {dep.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower() for dep in edge}
    assert names.isdisjoint({"torch", "transformers", "optimum", "optimum-onnx", "onnx", "accelerate"}), names
