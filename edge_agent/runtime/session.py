"""onnxruntime sessions: execution providers from config, threads sized for a small device."""

from __future__ import annotations

import logging
from pathlib import Path

import onnxruntime as ort

log = logging.getLogger(__name__)


class ModelLoadError(Exception):
    """onnxruntime could not load the model; the message says which file and why."""


def choose_providers(preferred: list[str]) -> list[str]:
    """Keep the preferred providers that this onnxruntime build has, in order; CPU is always last."""
    available = set(ort.get_available_providers())
    chosen = [p for p in preferred if p in available]
    skipped = [p for p in preferred if p not in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    if skipped:
        log.info("execution providers not available here, skipped: %s", ", ".join(skipped))
    return chosen


def open_session(
    path: Path, *, providers: list[str], intra_op_threads: int, inter_op_threads: int, allow_spinning: bool = False
) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Off by default: spinning threads burn a small device's cores that the MQTT loop and the HTTP server need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=choose_providers(providers))
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises many unrelated types; translate at this seam
        raise ModelLoadError(f"onnxruntime cannot load {path.name}: {exc}") from None
    log.info("loaded %s with providers %s", path.name, session.get_providers())
    return session
