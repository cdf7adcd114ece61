"""The arm64 checks that ``scripts/test-arm64`` runs from the host, once the arm64 root is ready.

The agent runs inside the arm64 root (``chroot``, emulated by qemu-user; the root shares the
host's network, so the host's broker is 127.0.0.1 to it). From the host, this script:

1. builds (once, cached) a MiniLM int8 bundle: a few fine-tuning steps on the packaged data, then
   the normal export (optimum, int8, gates) into a registry;
2. starts a Mosquitto and a sample collector, pushes the bundle to fleet ``arm64``;
3. starts ``edge-agent run`` in the root, and waits until it serves version 1 (it received the
   release, fetched and verified every chunk, passed the golden vectors, under emulation);
4. checks that the agent says it runs on aarch64 (its state document's ``host.machine``);
5. sends texts to ``/v1/predict`` and compares labels and probabilities with the same bundle
   loaded by the x86 runtime here;
6. waits until the collector has stored the agent's samples;
7. runs ``deploy/install-device --destdir`` in the root (user, venv from the aarch64 wheels,
   config directory of ``cloud-train device add``, unit enabled).

Prints each step's time and a PASS/FAIL line per check; exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parents[2]))  # run as a script from scripts/test-arm64

TEXTS = [
    "turn on the lights in the kitchen", "what's the weather like tomorrow in berlin", "play some jazz",
    "set a timer for ten minutes", "lock the front door please", "turn the music down a bit",
    "is it going to rain this afternoon", "switch off every light", "remind me to call mum at six",
    "skip this song",
]  # fmt: skip
TOLERANCE = 0.02  # largest |probability difference| allowed between the aarch64 and x86 int8 kernels
T0 = time.monotonic()


def say(text: str) -> None:
    print(f"check-arm64: {text} (t+{time.monotonic() - T0:.0f}s)", flush=True)


def bundle(cache: Path) -> Path:
    """A MiniLM int8 bundle from a short fine-tune, built once per cache."""
    from cloud_trainer.releases.registry import Registry
    from cloud_trainer.training.data import PACKAGED_DATASET
    from cloud_trainer.training.runs import register_run, train_run
    from cloud_trainer.training.train import TrainConfig

    registry = Registry(cache / "registry")
    if registry.versions("intents"):
        return registry.verified("intents").bundle_dir
    say("building the MiniLM int8 bundle (first run)")
    run = cache / "run"
    shutil.rmtree(run, ignore_errors=True)
    train_run(PACKAGED_DATASET, run, config=TrainConfig(epochs=1, max_steps=20, progress=False))
    entry, _ = register_run(registry, run, model="intents")
    return entry.bundle_dir


def post(port: int, texts: list[str]) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/predict", body=json.dumps({"texts": texts}), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    body: dict[str, Any] = json.loads(response.read())
    conn.close()
    if response.status != 200:
        raise RuntimeError(f"/v1/predict answered {response.status}: {body}")
    return body


SERVING_ON = re.compile(r"serving on http://127\.0\.0\.1:(\d+)")


def wait_serving(agent: subprocess.Popen[bytes], log: Path, timeout_s: float = 900) -> int:
    """The agent's HTTP port (it binds port 0 itself and logs the port), once it serves v1."""
    deadline = time.monotonic() + timeout_s
    port = None
    while time.monotonic() < deadline:
        if agent.poll() is not None:
            raise RuntimeError(f"the agent exited ({agent.returncode}):\n{log.read_text()[-3000:]}")
        if port is None:
            found = SERVING_ON.search(log.read_text(errors="replace"))
            port = int(found.group(1)) if found else None
            if port is None:
                time.sleep(1)
                continue
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/v2/health/ready")
            ready = json.loads(conn.getresponse().read())
            conn.close()
            if ready.get("version") == 1:
                return port
        except (OSError, ValueError):
            pass
        time.sleep(1)
    raise RuntimeError(f"the agent did not serve v1 within {timeout_s:g}s:\n{log.read_text()[-3000:]}")


def main() -> int:
    from cloud_trainer.demo.localbroker import start_local_broker
    from cloud_trainer.fleet.provision import Pki
    from cloud_trainer.releases.publish import push_bundle
    from cloud_trainer.releases.signing import generate_keypair
    from cloud_trainer.samples.collect import Collector
    from cloud_trainer.samples.store import SampleStore
    from edge_agent.protocol.manifest import Manifest
    from edge_agent.runtime import load_classifier
    from edge_agent.transport import MqttTransport

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--wheel", required=True, help="the edgeloop wheel's path inside the root")
    args = parser.parse_args()
    root: Path = args.root
    work = args.cache / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    bundle_dir = bundle(args.cache)
    results: dict[str, bool] = {}
    broker = start_local_broker(prefer="mosquitto", workdir=work / "broker")
    private, public = generate_keypair(work / "keys")
    etc = root / "etc" / "edge-agent"
    shutil.rmtree(etc, ignore_errors=True)
    shutil.rmtree(root / "var" / "lib" / "edge-agent", ignore_errors=True)
    etc.mkdir(parents=True)
    shutil.copy(public, etc / "release.pub")
    (etc / "agent.toml").write_text(
        f'device_id = "arm-1"\nfleet = "arm64"\nstate_dir = "/var/lib/edge-agent"\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\n[http]\nport = 0\n'
        '[update]\ntrusted_keys = ["release.pub"]\n'
        "[serving]\ntelemetry_interval_s = 5\n[sampling]\nrandom_rate = 1.0\n[outbox]\nupload_interval_s = 0.5\n"
    )
    store = SampleStore(work / "samples", collector=True)
    collector = Collector(store=store, fleet="arm64", host=broker.host, port=broker.port, share_group=None)
    collector.start()
    log = work / "agent.log"
    agent = None
    try:
        push_bundle(bundle_dir, host=broker.host, port=broker.port, fleet="arm64", key_path=private)
        say("pushed the MiniLM int8 bundle to fleet arm64; starting edge-agent in the arm64 root")
        with log.open("wb") as out:
            command = ["/opt/edgeloop/venv/bin/edge-agent", "run", "--config", "/etc/edge-agent/agent.toml"]
            agent = subprocess.Popen(["chroot", str(root), *command], stdout=out, stderr=subprocess.STDOUT)
        port = wait_serving(agent, log)
        say("the arm64 agent received, verified and activated v1")
        results["release received, verified and activated"] = True

        states: list[dict[str, Any]] = []
        watch = MqttTransport(host=broker.host, port=broker.port, client_id="arm64-check-state")
        watch.subscribe("edgeloop/v1/arm64/devices/arm-1/state", lambda _t, p, _r: states.append(json.loads(p)))
        watch.connect()
        deadline = time.monotonic() + 30
        while not states and time.monotonic() < deadline:
            time.sleep(0.1)
        watch.stop()
        machine = states[-1]["host"]["machine"] if states and states[-1].get("host") else None
        results[f"the agent reports host.machine aarch64 (got {machine})"] = machine == "aarch64"

        started = time.monotonic()
        served = post(port, TEXTS)["predictions"]
        arm_seconds = time.monotonic() - started
        manifest = Manifest.read(bundle_dir)
        local = load_classifier(bundle_dir, manifest, providers=["CPUExecutionProvider"]).predict(TEXTS)
        labels_equal = [p["label"] for p in served] == [p.label for p in local]
        worst = max(abs(p["scores"][k] - q.scores[k]) for p, q in zip(served, local, strict=True) for k in q.scores)
        say(f"{len(TEXTS)} texts in one request took {arm_seconds:.2f}s emulated; max |p_arm64 - p_x86| = {worst:.2e}")
        results["labels equal the x86 runtime's"] = labels_equal
        results[f"probabilities within {TOLERANCE} of x86 (max diff {worst:.2e})"] = worst <= TOLERANCE

        deadline = time.monotonic() + 120
        while store.counts()["samples"] == 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        results[f"samples uploaded and stored ({store.counts()['samples']})"] = store.counts()["samples"] > 0
    finally:
        if agent is not None and agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(60)
            except subprocess.TimeoutExpired:
                agent.kill()
        collector.stop()
        broker.stop()

    say("deploy/install-device in the arm64 root (--destdir)")
    pki = Pki.init(work / "pki", broker_host="127.0.0.1", release_key=public)
    pki.add_device("arm-2", fleet="arm64", out=work / "arm-2")
    shutil.rmtree(root / "tmp" / "arm-2", ignore_errors=True)
    shutil.rmtree(root / "tmp" / "staged", ignore_errors=True)
    shutil.copytree(work / "arm-2", root / "tmp" / "arm-2")
    pip_opts = "--no-index --find-links /wheels --constraint /wheels/emulated-constraints.txt"
    install = subprocess.run(
        ["chroot", str(root), "/tmp/edgeloop-src/deploy/install-device", "--config-dir", "/tmp/arm-2",
         "--wheel", args.wheel, "--pip-opts", pip_opts, "--destdir", "/tmp/staged"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    staged = root / "tmp" / "staged"
    installed = (
        install.returncode == 0
        and (staged / "opt/edgeloop/venv/bin/edge-agent").exists()
        and (staged / "etc/systemd/system/multi-user.target.wants/edge-agent.service").is_symlink()  # to /etc/...
        and "edge-agent:" in (staged / "etc/passwd").read_text()
    )
    if not installed:
        print(install.stdout[-3000:], install.stderr[-3000:])
    results["deploy/install-device staged the agent in the arm64 root"] = installed

    for what, ok in results.items():
        print(f"{'PASS' if ok else 'FAIL'}  {what}")
    say(f"agent log: {log}")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
