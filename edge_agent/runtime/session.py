"""onnxruntime sessions: execution providers from config, threads sized for a small device."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnxruntime as ort

log = logging.getLogger(__name__)


class ModelLoadError(Exception):
    """onnxruntime could not load the model; the message says which file and why."""


ProviderSpec = str | tuple[str, dict[str, Any]]
"""A provider as onnxruntime takes it: its name, or its name and its options."""

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def provider_name(spec: ProviderSpec) -> str:
    return spec if isinstance(spec, str) else spec[0]


def choose_providers(preferred: Sequence[ProviderSpec]) -> list[ProviderSpec]:
    """Keep the preferred providers that this onnxruntime build has, in order; CPU is always last."""
    available = set(ort.get_available_providers())
    chosen = [p for p in preferred if provider_name(p) in available]
    skipped = [provider_name(p) for p in preferred if provider_name(p) not in available]
    if CPU not in {provider_name(p) for p in chosen}:
        chosen.append(CPU)
    if skipped:
        log.info("execution providers not available here, skipped: %s", ", ".join(skipped))
    return chosen


def provider_specs(
    names: Sequence[str], *, engine_cache: Path | None = None, trt_fp16: bool = False, device_id: int = 0
) -> list[ProviderSpec]:
    """The providers ``names`` with the options a Jetson (or any NVIDIA GPU) needs.

    TensorRT builds an engine per model and input shape when a session starts, which takes from
    seconds to minutes on a Jetson: with ``engine_cache`` (a directory per model version in the
    state directory) the engines and the timing cache are written there and reused by every later
    start or re-activation of that version. ``trt_fp16`` lets TensorRT run fp32 layers in fp16
    (an fp16 bundle is fp16 already). CUDA and TensorRT run on GPU ``device_id``.
    """
    specs: list[ProviderSpec] = []
    for name in names:
        if name == TENSORRT:
            options: dict[str, Any] = {"device_id": device_id, "trt_fp16_enable": trt_fp16}
            if engine_cache is not None:
                options |= {
                    "trt_engine_cache_enable": True, "trt_engine_cache_path": str(engine_cache),
                    "trt_timing_cache_enable": True, "trt_timing_cache_path": str(engine_cache),
                }  # fmt: skip
            specs.append((name, options))
        elif name == CUDA:
            specs.append((name, {"device_id": device_id}))
        else:
            specs.append(name)
    return specs


def available_providers() -> list[str]:
    """What this onnxruntime build offers (``check-config`` prints it)."""
    return list(ort.get_available_providers())


def open_session(
    path: Path,
    *,
    providers: Sequence[ProviderSpec],
    intra_op_threads: int,
    inter_op_threads: int,
    allow_spinning: bool = False,
) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Off by default: spinning threads burn a small device's cores that the MQTT loop and the HTTP server need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    chosen = choose_providers(providers)
    cache = next((spec[1].get("trt_engine_cache_path") for spec in chosen if isinstance(spec, tuple)), None)
    if cache:
        Path(cache).mkdir(parents=True, exist_ok=True)
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=chosen)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises many unrelated types; translate at this seam
        raise ModelLoadError(f"onnxruntime cannot load {path.name}: {exc}") from None
    log.info("loaded %s with providers %s", path.name, session.get_providers())
    return session
