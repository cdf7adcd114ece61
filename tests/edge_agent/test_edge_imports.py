"""The edge stays light: importing and starting edge_agent, and decoding images on its vision path
(Pillow), loads no torch, torchvision, transformers, optimum, onnx, export or cloud_trainer, and no
cryptography (the cloud's signing library; a device verifies with libsodium). Checked
in a fresh interpreter, through ``sys.modules``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import tomllib

from tests.ports import refused_port

FORBIDDEN = [
    "torch", "torchvision", "timm", "transformers", "optimum", "onnx", "export", "cloud_trainer",
    "sentence_transformers",
    "cryptography",  # 9 MB of a device's memory: releases are verified with libsodium (PyNaCl)
]  # fmt: skip

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

# the vision path: a PNG and a JPEG decoded, resized and cropped as a device does it
import io
from PIL import Image
from edge_agent.protocol import ImagePreprocessing
from edge_agent.runtime.imagecodec import decode_image
pre = ImagePreprocessing(height=8, width=8, channels=3, resize=10, scale=1 / 255, mean=[0.5] * 3, std=[0.5] * 3)
shapes = []
for fmt in ("PNG", "JPEG"):
    buffer = io.BytesIO()
    Image.new("RGB", (20, 12), (200, 10, 10)).save(buffer, format=fmt)
    shapes.append(list(decode_image(buffer.getvalue(), pre).pixels.shape))

forbidden = json.loads(sys.argv[2])
loaded = sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in forbidden))
print(json.dumps({"live": live, "loaded": loaded, "modules": len(sys.modules), "shapes": shapes,
                  "pillow": "PIL.PngImagePlugin" in sys.modules and "PIL.JpegImagePlugin" in sys.modules}))
"""


def test_importing_and_starting_the_agent_loads_nothing_heavy(tmp_path: Path) -> None:
    from cloud_trainer.releases.signing import generate_keypair

    _, public = generate_keypair(tmp_path)
    config = tmp_path / "agent.toml"
    with refused_port() as no_broker:  # the agent starts without a broker; nothing else can be there
        config.write_text(
            f'device_id = "d"\nfleet = "f"\nstate_dir = "{tmp_path / "state"}"\n'
            f'[mqtt]\nport = {no_broker}\n[http]\nport = 0\n[update]\ntrusted_keys = ["{public}"]\n'
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
    assert report["shapes"] == [[8, 8, 3], [8, 8, 3]] and report["pillow"]  # the vision path ran
    assert report["loaded"] == [], f"edge_agent pulled in {report['loaded']}"


def test_the_probe_would_see_a_forbidden_import(tmp_path: Path) -> None:
    """The check above is not vacuous: the same sys.modules test catches onnx when it is imported."""
    code = "import sys, onnx; print([m for m in sys.modules if m == 'onnx' or m.startswith('onnx.')][:1])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "onnx" in out


def test_edge_extra_declares_no_heavy_dependency() -> None:
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    edge = pyproject["project"]["optional-dependencies"]["edge"]
    names = {dep.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower() for dep in edge}
    assert names.isdisjoint({"torch", "transformers", "optimum", "optimum-onnx", "onnx", "accelerate"}), names
    assert "cryptography" not in names, names
