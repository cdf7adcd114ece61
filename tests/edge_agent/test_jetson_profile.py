"""The GPU (Jetson) profile on a CPU-only machine: provider order and options from config, the
per-model override, the TensorRT engine cache location, what check-config reports, and fp16 as
the precision of GPU bundles. (`scripts/gpu-check` runs the providers themselves on a GPU.)"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

from cloud_trainer.cli.training import _export_precision
from cloud_trainer.errors import CloudTrainError
from edge_agent.config import load_config
from edge_agent.runtime.session import CPU, CUDA, TENSORRT, choose_providers, open_session, provider_specs
from edge_agent.updater import engine_cache_dir
from tests.conftest import Keys
from tests.tinymodel import make_tiny_bundle

JETSON = f'[runtime]\nproviders = ["{TENSORRT}", "{CUDA}", "{CPU}"]\ntrt_fp16 = true\ndevice_id = 1\n'


def _config(tmp_path: Path, extra: str, keys: Keys) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        f'device_id = "jet-1"\nfleet = "f"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[update]\ntrusted_keys = ["{keys.public}"]\n{extra}'
    )
    return path


def test_tensorrt_gets_its_engine_cache_and_cuda_its_device(tmp_path: Path) -> None:
    cache = tmp_path / "state" / "trt-engines" / "intents" / "v3"
    specs = provider_specs([TENSORRT, CUDA, CPU], engine_cache=cache, trt_fp16=True, device_id=1)
    assert specs[0] == (TENSORRT, {
        "device_id": 1, "trt_fp16_enable": True, "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache), "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache),
    })  # fmt: skip
    assert specs[1:] == [(CUDA, {"device_id": 1}), CPU]
    no_cache = provider_specs([TENSORRT], engine_cache=None)
    assert no_cache == [(TENSORRT, {"device_id": 0, "trt_fp16_enable": False})]


def test_providers_this_build_lacks_are_skipped_and_cpu_serves(tmp_path: Path) -> None:
    specs = provider_specs([TENSORRT, CUDA, CPU], engine_cache=tmp_path / "engines")
    available = set(ort.get_available_providers())
    expected = [s for s in specs if (s if isinstance(s, str) else s[0]) in available]
    assert choose_providers(specs) == expected
    make_tiny_bundle(tmp_path / "v1", version=1)
    session = open_session(tmp_path / "v1" / "model.onnx", providers=specs, intra_op_threads=1, inter_op_threads=1)
    assert session.get_providers()[-1] == CPU
    if TENSORRT not in available:  # the cache directory is only made for a TensorRT session
        assert not (tmp_path / "engines").exists()


def test_the_engine_cache_is_per_model_version_in_the_state_directory(tmp_path: Path, keys: Keys) -> None:
    config = load_config(_config(tmp_path, JETSON, keys))
    assert engine_cache_dir(config, 7) == tmp_path / "state" / "trt-engines" / "intents" / "v7"
    assert (config.runtime.trt_engine_cache, config.runtime.trt_fp16, config.runtime.device_id) == (True, True, 1)


def test_check_config_says_which_providers_this_build_has_and_which_the_model_gets(tmp_path: Path, keys: Keys) -> None:
    override = JETSON + f'\n[runtime.model_providers]\nintents = ["{CUDA}", "{CPU}"]\n'
    out = subprocess.run(
        [sys.executable, "-m", "edge_agent", "check-config", str(_config(tmp_path, override, keys))],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    available = ort.get_available_providers()
    assert f"onnxruntime providers in this build: {', '.join(available)}" in out
    # the per-model override wins over `providers`: TensorRT is not in it
    used = [p for p in (CUDA, CPU) if p in available]
    assert f"model intents will run on: {' > '.join(used)}" in out
    if CUDA not in available:
        assert f"configured but not in this build (skipped): {CUDA}" in out


def _args(**kw: object) -> argparse.Namespace:
    return argparse.Namespace(**{"quantize": None, "target": None, **kw})


def test_gpu_bundles_are_fp16_by_default_and_dynamic_int8_is_refused_for_them() -> None:
    assert _export_precision(_args()) == ("weight-int8", "avx2")
    assert _export_precision(_args(target="arm64")) == ("dynamic-int8", "arm64")  # a named preset: dynamic int8
    assert _export_precision(_args(target="arm64", quantize="weight-int8")) == ("weight-int8", "arm64")
    assert _export_precision(_args(target="gpu")) == ("fp16", "avx2")
    assert _export_precision(_args(target="gpu", quantize="static-int8")) == ("static-int8", "avx2")
    with pytest.raises(CloudTrainError, match="no CUDA or TensorRT kernel"):
        _export_precision(_args(target="gpu", quantize="dynamic-int8"))
