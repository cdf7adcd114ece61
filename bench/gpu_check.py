"""GPU check: the agent's runtime on a real bundle with TensorRT, CUDA and CPU providers, side by side.

Loads the bundle the way the agent does (``edge_agent.updater.load_verified``: every file
verified, golden vectors reproduced) once per provider order, with the TensorRT engine cache in a
scratch state directory, then serves the same texts one at a time and prints p50/p99 latency, the
ratio to CPU, and which providers onnxruntime really used. A second TensorRT load shows what the
engine cache saves at a restart.

    scripts/gpu-check BUNDLE_DIR [--requests 300]       # e.g. a registry version's bundle/ directory

Without a CUDA-capable onnxruntime (``onnxruntime-gpu``) it says so and exits 0: nothing to check.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort

from edge_agent.config import parse_config
from edge_agent.runtime.session import CPU, CUDA, TENSORRT
from edge_agent.updater import load_verified

TEXTS = [
    "turn on the lights in the kitchen", "what's the weather tomorrow", "play some jazz",
    "set a timer for ten minutes", "lock the front door", "turn the volume down a bit",
]  # fmt: skip


def load(bundle: Path, providers: list[str], state: Path) -> tuple[object, float]:
    key = state / "keys" / "release.pub"  # the config needs a trusted key; a bundle on disk is no release
    if not key.exists():
        from cloud_trainer.releases.signing import generate_keypair

        key = generate_keypair(state / "keys")[1]
    config = parse_config(
        {"device_id": "gpu-check", "fleet": "check", "state_dir": str(state), "update": {"trusted_keys": [str(key)]},
         "runtime": {"providers": providers, "trt_engine_cache": True}},
        base_dir=state,
    )  # fmt: skip
    start = time.perf_counter()
    model = load_verified(bundle, config)
    return model, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    available = ort.get_available_providers()
    print(f"onnxruntime {ort.__version__}, providers in this build: {', '.join(available)}")
    if CUDA not in available:
        print("no CUDA provider in this onnxruntime build (install onnxruntime-gpu): nothing to check here")
        return 0
    orders = {"TensorRT > CUDA > CPU": [TENSORRT, CUDA, CPU], "CUDA > CPU": [CUDA, CPU], "CPU": [CPU]}
    rows = {}
    with tempfile.TemporaryDirectory() as state:
        for name, providers in orders.items():
            model, seconds = load(args.bundle, providers, Path(state))
            used = model.session.get_providers()  # type: ignore[attr-defined]
            for text in TEXTS:  # warm-up
                model.predict([text])  # type: ignore[attr-defined]
            latencies = []
            for i in range(args.requests):
                t = time.perf_counter()
                model.predict([TEXTS[i % len(TEXTS)]])  # type: ignore[attr-defined]
                latencies.append((time.perf_counter() - t) * 1000)
            latencies.sort()
            rows[name] = (statistics.median(latencies), latencies[int(0.99 * (len(latencies) - 1))], seconds, used)
            del model
        _, again = load(args.bundle, orders["TensorRT > CUDA > CPU"], Path(state))
    cpu = rows["CPU"][0]
    print(f"\n{'providers':<24} {'p50 ms':>8} {'p99 ms':>8} {'vs CPU':>8} {'load s':>8}  used")
    for name, (p50, p99, seconds, used) in rows.items():
        print(f"{name:<24} {p50:>8.3f} {p99:>8.3f} {cpu / p50:>7.2f}x {seconds:>8.2f}  {', '.join(used)}")
    print(
        f"\nTensorRT load again with the engine cache: {again:.2f} s (first: {rows['TensorRT > CUDA > CPU'][2]:.2f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
