"""Serving latency side by side, in one run, on the same int8 bundle and the same texts:

1. raw ``InferenceSession.run`` on pre-tokenized inputs (the floor)
2. tokenizers + ``InferenceSession.run`` (what hand-written code would do)
3. the agent over HTTP, batch 1, sequential (``POST /v1/predict``, keep-alive, Python client)
4. the agent over HTTP, 1 and 16 concurrent connections driven by ``wrk`` (a C load generator,
   so the client does not take the CPU the server needs on a small machine); dynamic batching
5. optimum ``ORTModelForSequenceClassification`` in a transformers pipeline (same int8 model)
6. a transformers pipeline on PyTorch fp32

Prints p50/p99 latency, throughput, each p50's ratio to the floor, and the agent's peak RSS.

    .venv/bin/python bench/serving.py [--requests 500] [--rounds 5] [--threads 1] [--workdir runs/bench-serving]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cloud_trainer.localbroker import free_port


def measure(call: Callable[[str], Any], texts: list[str], requests: int) -> dict[str, float]:
    return interleaved({"": call}, texts, requests, rounds=1)[""]


def interleaved(
    calls: dict[str, Callable[[str], Any]], texts: list[str], requests: int, rounds: int
) -> dict[str, dict[str, float]]:
    """Measure each call in turn, ``requests`` calls each in ``rounds`` alternating slices.

    On a shared machine the load drifts over seconds; alternating puts the engines compared
    against each other (the floor and the agent) under the same drift.
    """
    samples: dict[str, list[float]] = {name: [] for name in calls}
    elapsed = dict.fromkeys(calls, 0.0)
    for call in calls.values():
        for text in texts[:20]:
            call(text)
    for r in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            for i in range(r * requests // rounds, (r + 1) * requests // rounds):
                t = time.perf_counter()
                call(texts[i % len(texts)])
                samples[name].append((time.perf_counter() - t) * 1000)
            elapsed[name] += time.perf_counter() - start
    return {name: summary(samples[name], len(samples[name]) / elapsed[name]) for name in calls}


def summary(samples: list[float], throughput: float) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50": statistics.median(ordered), "p99": ordered[int(0.99 * (len(ordered) - 1))], "rps": throughput}


def post(conn: http.client.HTTPConnection, text: str) -> None:
    conn.request(
        "POST", "/v1/predict", body=json.dumps({"texts": [text]}), headers={"Content-Type": "application/json"}
    )
    response = conn.getresponse()
    response.read()
    if response.status != 200:
        raise RuntimeError(f"agent answered {response.status}")


def batch_counts(port: int) -> tuple[float, float]:
    """The agent's ``edge_agent_batch_size`` histogram from ``/metrics``: (onnxruntime runs, inputs)."""
    conn = http.client.HTTPConnection("127.0.0.1", port)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    value = lambda name: next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))  # noqa: E731
    return value("edge_agent_batch_size_count"), value("edge_agent_batch_size_sum")


def concurrent(port: int, texts: list[str], clients: int, per_client: int) -> dict[str, float]:
    samples: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def run(offset: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port)
        post(conn, texts[0])
        barrier.wait()
        mine = []
        for i in range(per_client):
            t = time.perf_counter()
            post(conn, texts[(offset + i) % len(texts)])
            mine.append((time.perf_counter() - t) * 1000)
        with lock:
            samples.extend(mine)

    threads = [threading.Thread(target=run, args=(i * 7,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    return summary(samples, len(samples) / (time.perf_counter() - start))


def wrk(port: int, texts: list[str], connections: int, seconds: int, work: Path) -> dict[str, float]:
    """Drive the agent with wrk, cycling through ``texts``; p50/p99 from wrk's latency distribution."""
    import re

    bodies = ",".join(json.dumps(json.dumps({"texts": [t]})) for t in texts)
    script = work / "wrk.lua"
    script.write_text(textwrap.dedent(f"""\
        local bodies = {{{bodies}}}
        local i = 0
        request = function()
          i = i % #bodies + 1
          return wrk.format("POST", "/v1/predict", {{["Content-Type"] = "application/json"}}, bodies[i])
        end
        done = function(summary, latency, requests)
          io.write(string.format("P50 %f\\nP99 %f\\nERRORS %d\\n", latency:percentile(50) / 1000,
            latency:percentile(99) / 1000, summary.errors.status + summary.errors.connect + summary.errors.read))
        end
        """))  # fmt: skip
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script)]
    command.append(f"http://127.0.0.1:{port}/v1/predict")
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    number = lambda name: float(re.search(rf"{name}\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]  # noqa: E731
    if number("ERRORS"):
        raise SystemExit(f"wrk saw errors:\n{out}")
    return {"p50": number("P50"), "p99": number("P99"), "rps": number("Requests/sec:")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for every engine")
    parser.add_argument("--epochs", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=5, help="alternating slices for the floor and the agent")
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-serving"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    import numpy as np
    import onnxruntime as ort
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    from cloud_trainer.data import PACKAGED_DATASET, load_labelled
    from cloud_trainer.registry import Registry
    from cloud_trainer.runs import register_run, train_run
    from cloud_trainer.train import TrainConfig
    from edge_agent.store import ModelStore

    work = args.workdir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    train_run(PACKAGED_DATASET, work / "run", config=TrainConfig(epochs=args.epochs, progress=False))
    entry, _ = register_run(Registry(work / "registry"), work / "run", model="intents", max_accuracy_drop=1.5)
    bundle = entry.bundle_dir
    texts = load_labelled(work / "run" / "val.csv").texts
    rows: dict[str, dict[str, float]] = {}

    # 1-2: onnxruntime by hand
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(bundle / "model.onnx"), options, providers=["CPUExecutionProvider"])
    tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=64)

    def feeds(text: str) -> dict[str, Any]:
        enc = tokenizer.encode(text)
        ids = np.asarray([enc.ids], dtype=np.int64)
        return {"input_ids": ids, "attention_mask": np.asarray([enc.attention_mask], dtype=np.int64),
                "token_type_ids": np.asarray([enc.type_ids], dtype=np.int64)}  # fmt: skip

    pretokenized = {t: feeds(t) for t in texts}

    # 3-4: the agent, a separate process with the bundle installed
    state = work / "agent-state"
    store = ModelStore(state_dir=state, model="intents")
    staging = store.fresh_staging(1)
    shutil.copytree(bundle, staging, dirs_exist_ok=True)
    store.install(staging, 1)
    store.activate(1)
    from cloud_trainer.signing import generate_keypair

    _, public = generate_keypair(work / "keys")
    port = free_port()
    config = work / "agent.toml"
    config.write_text(textwrap.dedent(f"""\
        device_id = "bench"
        fleet = "bench"
        state_dir = "{state}"
        [mqtt]
        port = {free_port()}
        [http]
        port = {port}
        [runtime]
        intra_op_threads = {args.threads}
        [serving]
        telemetry_interval_s = 0
        [update]
        trusted_keys = ["{public}"]
        """))  # fmt: skip
    agent = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port)
                post(conn, texts[0])
                break
            except (OSError, RuntimeError):
                if time.monotonic() > deadline:
                    raise SystemExit("agent did not come up") from None
                time.sleep(0.2)
        # 1-3 in alternating rounds, so that drifting load on a shared machine weighs on each alike
        rows.update(interleaved({
            "onnxruntime session.run (floor)": lambda t: session.run(None, pretokenized[t]),
            "tokenizers + session.run": lambda t: session.run(None, feeds(t)),
            "agent HTTP, sequential": lambda t: post(conn, t),
        }, texts, args.requests, args.rounds))  # fmt: skip
        if shutil.which("wrk"):
            rows["agent HTTP, 1 connection (wrk)"] = wrk(port, texts, 1, 5, work)
            runs_before, inputs_before = batch_counts(port)
            rows["agent HTTP, 16 connections (wrk)"] = wrk(port, texts, 16, 5, work)
            runs_after, inputs_after = batch_counts(port)
            mean_batch = (inputs_after - inputs_before) / max(runs_after - runs_before, 1)
        else:
            print("wrk not installed (apt-get install wrk): 16 Python client threads drive the load instead")
            rows["agent HTTP, 16 clients (Python)"] = concurrent(port, texts, 16, max(20, args.requests // 16))
        with open(f"/proc/{agent.pid}/status") as status:
            peak_rss = next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM"))
    finally:
        agent.terminate()
        agent.wait()

    # 5-6: optimum and PyTorch pipelines
    torch.set_num_threads(args.threads)
    from optimum.onnxruntime import ORTModelForSequenceClassification

    ort_dir = work / "optimum-model"
    shutil.copytree(work / "run" / "checkpoint", ort_dir, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    shutil.copy(bundle / "model.onnx", ort_dir / "model.onnx")
    hf_tokenizer = AutoTokenizer.from_pretrained(str(work / "run" / "checkpoint"))  # type: ignore[no-untyped-call]
    optimum_model = ORTModelForSequenceClassification.from_pretrained(str(ort_dir), file_name="model.onnx",
                                                                      session_options=options)  # fmt: skip
    optimum_pipe = pipeline("text-classification", model=optimum_model, tokenizer=hf_tokenizer)
    rows["optimum ORTModel + pipeline"] = measure(optimum_pipe, texts, args.requests)
    torch_model = AutoModelForSequenceClassification.from_pretrained(str(work / "run" / "checkpoint")).eval()
    torch_pipe = pipeline("text-classification", model=torch_model, tokenizer=hf_tokenizer)
    rows["transformers pipeline, PyTorch fp32"] = measure(torch_pipe, texts, args.requests)

    floor = rows["onnxruntime session.run (floor)"]
    sequential = rows["agent HTTP, sequential"]
    print(f"\nserving the int8 MiniLM bundle ({(bundle / 'model.onnx').stat().st_size / 1e6:.1f} MB), "
          f"{len(texts)} distinct texts, {args.requests} requests each, {args.threads} intra-op thread(s), "
          f"{os.cpu_count()} cores")  # fmt: skip
    print(f"{'':<38} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'p50 / floor':>12}")
    for name, r in rows.items():
        print(f"{name:<38} {r['p50']:>8.3f} {r['p99']:>8.3f} {r['rps']:>8.0f} {r['p50'] / floor['p50']:>11.2f}x")
    print(f"\nagent sequential p50 - floor p50: {sequential['p50'] - floor['p50']:+.3f} ms (target <= +0.5 ms)")
    if "agent HTTP, 1 connection (wrk)" in rows:
        gap = rows["agent HTTP, 1 connection (wrk)"]["p50"] - floor["p50"]
        print(f"agent 1 connection (wrk, a C client) p50 - floor p50: {gap:+.3f} ms")
    if "agent HTTP, 16 connections (wrk)" in rows:
        ratio = rows["agent HTTP, 16 connections (wrk)"]["rps"] / rows["agent HTTP, 1 connection (wrk)"]["rps"]
        print(f"agent throughput, 16 connections / 1 connection (wrk): {ratio:.2f}x (target >= 1.3x)")
        print(f"agent inputs per onnxruntime run under 16 connections: {mean_batch:.2f}")
    else:
        ratio = rows["agent HTTP, 16 clients (Python)"]["rps"] / sequential["rps"]
        print(f"agent throughput, 16 Python clients / sequential: {ratio:.2f}x (target >= 1.3x)")
    print(f"agent peak RSS while serving: {peak_rss:.0f} MB (target < 200 MB)")
    (work / "results.json").write_text(json.dumps({"rows": rows, "peak_rss_mb": peak_rss}, indent=2))


if __name__ == "__main__":
    main()
