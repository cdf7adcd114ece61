"""The end-to-end demo on one machine: the whole loop, twice round.

Broker, fine-tune, export, push v1, edge-agent, predictions; then the agent's samples go back to
a collector, are labelled from the packaged data, and go into the fine-tune of v2, which is
pushed as a canary, promoted, and served. ``fleet status`` shows the fleet along the way.

Every step says what it does. The agent and the ``cloud-train`` commands run as separate
processes, exactly as a user would run them; everything started here is stopped at the end.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloud_trainer.demo.localbroker import LocalBroker, broker_reachable, free_port, start_local_broker
from cloud_trainer.errors import CloudTrainError

DEMO_TEXTS = [
    "hey could you switch on the lights in the garage",
    "it's way too loud, bring it down a bit",
    "put on some relaxing jazz",
    "will i need an umbrella in seattle this afternoon",
    "remind me in fifteen minutes that the pasta is ready",
    "make sure the back door is locked",
]
FLEET, DEVICE, MODEL = "demo", "demo-device-1", "intents"
PHRASINGS = ["hey,", "please", "ok so", "could you", "quick one:"]


@dataclass(frozen=True, kw_only=True)
class DemoOptions:
    broker: tuple[str, int] | None = None
    broker_kind: str = "auto"
    workdir: Path = Path("demo-run")
    epochs: float = 8.0
    max_steps: int = -1


class _Steps:
    def __init__(self, total: int) -> None:
        self.total, self.n, self.t0 = total, 0, time.monotonic()

    def __call__(self, title: str) -> None:
        self.n += 1
        print(f"\n[{self.n}/{self.total}] {title}  (t+{time.monotonic() - self.t0:.0f}s)", flush=True)


def say(text: str) -> None:
    print(textwrap.indent(text, "      "), flush=True)


def agent_config(*, workdir: Path, host: str, port: int, http_port: int, public_key: Path, protocol: str) -> str:
    return textwrap.dedent(
        f"""\
        device_id = "{DEVICE}"
        fleet = "{FLEET}"
        model = "{MODEL}"
        state_dir = "{workdir / "agent-state"}"

        [mqtt]
        host = "{host}"
        port = {port}
        protocol = "{protocol}"

        [http]
        host = "127.0.0.1"
        port = {http_port}

        [update]
        trusted_keys = ["{public_key}"]

        [serving]
        telemetry_interval_s = 2

        [sampling]
        random_rate = 0.5           # the demo keeps half of all predictions (plus the unsure ones)

        [outbox]
        upload_interval_s = 0.5
        """
    )


class StateWatcher:
    """Prints the agent's reported state as it changes (what a fleet dashboard would show)."""

    def __init__(self, host: str, port: int, protocol: str) -> None:
        from edge_agent.protocol import Topics
        from edge_agent.transport import MqttTransport

        self.latest: dict[str, Any] = {}
        self._seen: set[tuple[Any, ...]] = set()
        self._lock = threading.Lock()
        self._transport = MqttTransport(host=host, port=port, client_id="demo-watcher", protocol=protocol)
        self._transport.connect()
        self._transport.subscribe(Topics(fleet=FLEET).device_state(DEVICE), self._on_message)

    def _on_message(self, _topic: str, payload: bytes, _retained: bool) -> None:
        try:
            state = json.loads(payload)
        except ValueError:
            return
        key = (
            state.get("online"),
            state.get("update_state"),
            state.get("progress"),
            state.get("active_version"),
        )
        with self._lock:
            self.latest = state
            if key in self._seen:
                return
            self._seen.add(key)
        line = f"agent state: online={state.get('online')} update={state.get('update_state')}"
        if state.get("update_version") is not None:
            line += f" v{state['update_version']}"
        if state.get("progress") is not None and state.get("update_state") == "downloading":
            line += f" {state['progress']:.0%}"
        if state.get("bytes_transferred"):
            line += f" ({state['bytes_transferred'] / 1e6:.1f} MB transferred)"
        if state.get("last_error"):
            line += f" error: {state['last_error']}"
        say(line)

    def stop(self) -> None:
        self._transport.stop()


def wait_ready(port: int, version: int, agent: subprocess.Popen[bytes], timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if agent.poll() is not None:
            raise CloudTrainError(f"edge-agent exited with code {agent.returncode}; see its log")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/v2/health/ready")
            body = json.loads(conn.getresponse().read())
            conn.close()
            if body.get("version") == version:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise CloudTrainError(f"edge-agent did not serve version {version} within {timeout_s:g}s")


def query(port: int, texts: list[str]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(
        "POST",
        "/v1/predict",
        body=json.dumps({"texts": [texts[0]]}),
        headers={"Content-Type": "application/json"},
    )
    conn.getresponse().read()  # one warm-up request, not shown
    say(f"{'text':<52} {'label':<16} {'score':>6} {'latency':>9} {'model':>7}")
    for text in texts:
        start = time.perf_counter()
        conn.request(
            "POST",
            "/v1/predict",
            body=json.dumps({"texts": [text]}),
            headers={"Content-Type": "application/json"},
        )
        response = conn.getresponse()
        body = json.loads(response.read())
        latency_ms = (time.perf_counter() - start) * 1000
        if response.status != 200:
            raise CloudTrainError(f"inference request failed with HTTP {response.status}: {body}")
        p = body["predictions"][0]
        say(f"{text[:50]:<52} {p['label']:<16} {p['score']:>6.3f} {latency_ms:>7.2f}ms {body['inference_ms']:>5.2f}ms")
    conn.close()
    say("latency = HTTP round trip on localhost; model = onnxruntime time inside the agent")


class _Demo:
    """The demo's steps; :meth:`close` stops whatever was started."""

    def __init__(self, options: DemoOptions) -> None:
        self.options = options
        self.workdir = options.workdir.resolve()
        self.broker: LocalBroker | None = None
        self.agent: subprocess.Popen[bytes] | None = None
        self.watcher: StateWatcher | None = None
        self.collector: Any = None
        self.key = Path()
        self.host, self.port, self.protocol = "127.0.0.1", 0, "5"

    def start_broker(self) -> None:
        if self.workdir.exists():
            shutil.rmtree(self.workdir)
        self.workdir.mkdir(parents=True)
        if self.options.broker:
            self.host, self.port = self.options.broker
            if not broker_reachable(self.host, self.port):
                raise CloudTrainError(f"no MQTT broker answers on {self.host}:{self.port}")
            say(f"using the broker at {self.host}:{self.port}")
            return
        self.broker = start_local_broker(prefer=self.options.broker_kind, workdir=self.workdir / "broker")
        self.host, self.port, self.protocol = self.broker.host, self.broker.port, self.broker.protocol
        say(f"started {self.broker.kind} on {self.host}:{self.port} (MQTT {self.protocol})")

    def train(self, run: str = "run", *, with_samples: bool = False) -> None:
        from cloud_trainer.samples.labelling import labelled_texts
        from cloud_trainer.samples.store import SampleStore
        from cloud_trainer.training.data import PACKAGED_DATASET
        from cloud_trainer.training.runs import train_run
        from cloud_trainer.training.train import TrainConfig

        config = TrainConfig(epochs=self.options.epochs, max_steps=self.options.max_steps, progress=False)
        samples = labelled_texts(SampleStore(self.workdir / "samples"), MODEL) if with_samples else None
        say(f"data: {PACKAGED_DATASET.name}; base model: {config.base_model}")
        if samples is not None:
            say(f"$ cloud-train train ... --include-samples {MODEL}   # {len(samples)} labelled fleet samples")
        started = time.monotonic()
        result = train_run(PACKAGED_DATASET, self.workdir / run, config=config, samples=samples)
        m = result.metrics
        if samples is not None:
            info = m["samples"]
            say(f"fleet samples: {info['added']} added to the training split, {info['duplicates_skipped']} were in it")
        say(
            f"trained on {m['train_examples']} examples in {time.monotonic() - started:.0f}s; "
            f"held-out accuracy {m['accuracy']:.1%}, macro-F1 {m['macro_f1']:.3f} ({m['val_examples']} examples, "
            f"{len(result.labels)} intents)"
        )

    def export(self, run: str = "run") -> None:
        from cloud_trainer.releases.registry import Registry
        from cloud_trainer.training.runs import register_run

        entry, r = register_run(Registry(self.workdir / "registry"), self.workdir / run, model=MODEL)
        say(
            f"ONNX fp32 vs PyTorch: max |logit diff| {r['parity_max_abs_diff']:.1e} on {r['parity_samples']} texts\n"
            f"accuracy fp32 {r['onnx_fp32_accuracy']:.1%} -> {r['quantization']} {r['bundle_model_accuracy']:.1%}; "
            f"size {r['onnx_fp32_bytes'] / 1e6:.1f} MB -> {r['bundle_model_bytes'] / 1e6:.1f} MB"
        )
        say(f"registered {entry.ref} in {self.workdir / 'registry'}:")
        for file in entry.manifest.files:
            say(f"  {file.path:<16} {file.size:>10} bytes  sha256 {file.sha256[:16]}…  {len(file.chunks)} chunk(s)")

    def push(self) -> Path:
        from cloud_trainer.releases.signing import generate_keypair

        self.key, public = generate_keypair(self.workdir / "keys")
        self.cloud_train("push", f"{MODEL}:1", "--registry", str(self.workdir / "registry"), "--key", str(self.key))
        return public

    def cloud_train(self, *args: str) -> str:
        """Run ``cloud-train`` as a user would (for this fleet and broker), show the command and its output."""
        args = (*args, "--fleet", FLEET, "--broker", f"{self.host}:{self.port}", "--mqtt-protocol", self.protocol)
        say("$ cloud-train " + " ".join(args))
        done = subprocess.run(
            [sys.executable, "-m", "cloud_trainer", *args], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise CloudTrainError(f"cloud-train {args[0]} failed: {(done.stderr or done.stdout).strip()[-2000:]}")
        say(done.stdout.rstrip())
        return done.stdout

    def start_collector(self) -> None:
        from cloud_trainer.samples.collect import Collector
        from cloud_trainer.samples.store import SampleStore

        self.collector = Collector(
            store=SampleStore(self.workdir / "samples", collector=True), fleet=FLEET, host=self.host,
            port=self.port, protocol=self.protocol, share_group=None, client_id="demo-collector",
        )  # fmt: skip
        self.collector.start()
        say(f"collector subscribed to {self.collector.topic}; samples go to {self.workdir / 'samples'}")

    def collect_and_label(self, http_port: int, minimum: int = 10) -> None:
        """Serve the validation texts, wait for the agent's samples to arrive, label them from the data."""
        from cloud_trainer.samples.store import SampleStore
        from cloud_trainer.training.data import load_labelled

        seen = load_labelled(self.workdir / "run" / "train.csv")
        # What users say in the field: requests of the training split as people phrase them, so that
        # each is new to the data set, and its label is the one the packaged data gives the original.
        # From the training split, not the validation one: v2's held-out score stays honest.
        labels = {f"{PHRASINGS[i % len(PHRASINGS)]} {t}": label
                  for i, (t, label) in enumerate(zip(seen.texts[:80], seen.labels[:80], strict=True))}  # fmt: skip
        conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=30)
        for text in labels:  # the device in use: each request is one prediction the sampler sees
            conn.request("POST", "/v1/predict", body=json.dumps({"texts": [text]}),
                         headers={"Content-Type": "application/json"})  # fmt: skip
            conn.getresponse().read()
        conn.close()
        say(f"served {len(labels)} more requests; the agent keeps some and uploads them over MQTT")
        store = SampleStore(self.workdir / "samples")
        deadline = time.monotonic() + 60
        while store.counts()["samples"] < minimum:
            if time.monotonic() > deadline:
                raise CloudTrainError(f"only {store.counts()['samples']} samples arrived within 60 s")
            time.sleep(0.2)
        time.sleep(1.0)  # let the batch in flight land too
        samples = store.query(model=MODEL, labelled=False)
        known = [(s.prediction_id, labels[s.text]) for s in samples if s.text in labels]
        store.set_labels(known, source="demo: the packaged data's labels")
        wrong = sum(1 for s in samples if s.text in labels and s.predicted != labels[s.text])
        say(f"collected {len(samples)} samples; labelled {len(known)} from the packaged data "
            f"(the model had {wrong} of them wrong)")  # fmt: skip
        store.close()

    def fleet_status(self) -> None:
        self.cloud_train("fleet", "status")

    def start_agent(self, public_key: Path) -> int:
        self.watcher = StateWatcher(self.host, self.port, self.protocol)
        http_port = free_port()
        config_path = self.workdir / "agent.toml"
        config_path.write_text(
            agent_config(
                workdir=self.workdir,
                host=self.host,
                port=self.port,
                http_port=http_port,
                public_key=public_key,
                protocol=self.protocol,
            )
        )
        say(f"$ edge-agent run --config {config_path}")
        with (self.workdir / "agent.log").open("wb") as agent_log:
            self.agent = subprocess.Popen(
                [sys.executable, "-m", "edge_agent", "run", "--config", str(config_path)],
                stdout=agent_log,
                stderr=subprocess.STDOUT,
            )
        wait_ready(http_port, 1, self.agent)
        time.sleep(0.3)  # let the last state message print
        say(f"agent serves version 1 on http://127.0.0.1:{http_port} (its log: {self.workdir / 'agent.log'})")
        return http_port

    def close(self) -> None:
        if self.agent is not None and self.agent.poll() is None:
            self.agent.terminate()
            try:
                self.agent.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.agent.kill()
            say(f"edge-agent stopped (exit code {self.agent.returncode})")
        if self.watcher is not None:
            self.watcher.stop()
        if self.collector is not None:
            self.collector.stop()
        if self.broker is not None:
            self.broker.stop()
            say(f"{self.broker.kind} stopped")


def run_demo(options: DemoOptions) -> int:
    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing downloads weights: the base model ships in a package
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    steps = _Steps(12)
    demo = _Demo(options)
    t0 = time.monotonic()
    try:
        steps("MQTT broker")
        demo.start_broker()
        steps("fine-tune MiniLM on the packaged voice-command intents")
        demo.train()
        steps("export with optimum to ONNX, validate against PyTorch, quantize to int8, write the bundle")
        demo.export()
        steps("sign and push version 1 over MQTT (cloud-train push)")
        public_key = demo.push()
        steps("start edge-agent; it receives the release, fetches and verifies the bundle, and serves it")
        demo.start_collector()
        http_port = demo.start_agent(public_key)
        steps("ask the agent for predictions")
        query(http_port, DEMO_TEXTS)
        steps("samples back: the agent uploads what it kept, the collector stores them, we label them")
        demo.collect_and_label(http_port)
        demo.fleet_status()
        steps("fine-tune version 2 with the labelled fleet samples")
        demo.train("run-v2", with_samples=True)
        steps("export and register version 2")
        demo.export("run-v2")
        steps("push version 2 as a 50 % canary, then promote it to the whole fleet")
        demo.cloud_train("push", f"{MODEL}:2", "--canary", "50", "--registry", str(demo.workdir / "registry"),
                         "--key", str(demo.key))  # fmt: skip
        demo.cloud_train("rollout", "promote", "--key", str(demo.key), "--wait", "180")
        wait_ready(http_port, 2, demo.agent)  # type: ignore[arg-type]
        steps("version 2 serves; the fleet as `cloud-train fleet status` shows it")
        query(http_port, DEMO_TEXTS)
        demo.fleet_status()
        steps("stop everything")
    finally:
        demo.close()
    print(f"\ndemo finished in {time.monotonic() - t0:.0f}s; artifacts in {demo.workdir}")
    return 0
