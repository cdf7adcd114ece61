"""Fleet updates: time from `cloud-train push` until N agents serve the new version, and bytes
transferred for a full update versus one whose fine-tune changed only the classifier head.

Everything is real: a Mosquitto broker started here, N `edge-agent` processes, the int8 MiniLM
bundles from the real training and export pipeline, pushes through `cloud-train push`.

    .venv/bin/python bench/fleet_update.py [--agents 1 10 20] [--epochs 8] [--workdir runs/bench-fleet]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from cloud_trainer.demo.localbroker import LocalBroker, free_port, start_local_broker

GATE = 1.5  # accuracy points: one of the 70 validation texts; the versions here are measured, not judged


def ready_version(port: int) -> int | None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/v2/health/ready")
        body = json.loads(conn.getresponse().read())
        conn.close()
        return body.get("version")  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


def start_agents(
    count: int, *, work: Path, broker: LocalBroker, fleet: str, public: Path
) -> list[tuple[int, subprocess.Popen[bytes]]]:
    agents = []
    for i in range(count):
        port = free_port()
        config = work / f"agent-{i}.toml"
        config.write_text(textwrap.dedent(f"""\
            device_id = "dev-{i}"
            fleet = "{fleet}"
            state_dir = "{work / f'state-{i}'}"
            [mqtt]
            port = {broker.port}
            [http]
            port = {port}
            [update]
            trusted_keys = ["{public}"]
            chunk_timeout_s = 120
            """))  # fmt: skip
        log = (work / f"agent-{i}.log").open("wb")
        process = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
                                   stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        agents.append((port, process))
    deadline = time.monotonic() + 120
    while any(ready_version(p) is None and not _live(p) for p, _ in agents):
        if time.monotonic() > deadline:
            raise SystemExit("agents did not start")
        time.sleep(0.2)
    return agents


def _live(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/v2/health/live")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


def push(registry: Path, ref: str, fleet: str, key: Path, broker: LocalBroker) -> None:
    command = [sys.executable, "-m", "cloud_trainer", "push", ref, "--registry", str(registry), "--fleet", fleet]
    command += ["--key", str(key), "--broker", f"{broker.host}:{broker.port}"]
    subprocess.run(command, check=True, capture_output=True)


def bytes_transferred(work: Path, agent: int) -> int:
    """What the agent reported for its last update (its log line carries the number its state message does)."""
    for line in reversed((work / f"agent-{agent}.log").read_text().splitlines()):
        if "bytes transferred" in line:
            return int(line.rsplit(";", 1)[1].split()[0])
    raise SystemExit(f"agent {agent} reported no transfer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[1, 10, 20])
    parser.add_argument("--epochs", type=float, default=8.0)
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-fleet"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from cloud_trainer.releases.registry import Registry
    from cloud_trainer.releases.signing import generate_keypair
    from cloud_trainer.training.data import PACKAGED_DATASET
    from cloud_trainer.training.runs import register_run, train_run
    from cloud_trainer.training.train import TrainConfig

    work = args.workdir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    registry = Registry(work / "registry")
    t0 = time.monotonic()
    train_run(PACKAGED_DATASET, work / "run-v1", config=TrainConfig(epochs=args.epochs, progress=False))
    register_run(registry, work / "run-v1", model="intents", max_accuracy_drop=GATE)  # v1
    # v2: the whole network fine-tuned again (another seed); v3: only the head moved, from v1's checkpoint
    train_run(PACKAGED_DATASET, work / "run-full", config=TrainConfig(epochs=args.epochs, seed=7, progress=False))
    register_run(registry, work / "run-full", model="intents", max_accuracy_drop=GATE)  # v2
    head = TrainConfig(base_model=str(work / "run-v1" / "checkpoint"), epochs=2, freeze_base=True, progress=False)
    train_run(PACKAGED_DATASET, work / "run-head", config=head)
    register_run(registry, work / "run-head", model="intents", max_accuracy_drop=GATE)  # v3
    print(f"trained and exported 3 versions in {time.monotonic() - t0:.0f}s")
    private, public = generate_keypair(work / "keys")
    bundle_bytes = registry.get("intents", 1).manifest.total_bytes

    broker = start_local_broker(prefer="mosquitto", workdir=work / "broker")
    rows = []
    try:
        for count in args.agents:
            fleet = f"bench-{count}"
            (work / fleet).mkdir()
            agents = start_agents(count, work=work / fleet, broker=broker, fleet=fleet, public=public)
            start = time.monotonic()
            push(registry.root, "intents:1", fleet, private, broker)
            pushed = time.monotonic() - start
            while any(ready_version(p) != 1 for p, _ in agents):
                time.sleep(0.05)
            rows.append((count, pushed, time.monotonic() - start))
            for _, process in agents:
                process.terminate()
            for _, process in agents:
                process.wait()

        sizes = {}
        for ref, name in (("intents:2", "full fine-tune"), ("intents:3", "head-only fine-tune")):
            fleet = f"delta-{ref[-1]}"
            (work / fleet).mkdir()
            [(port, process)] = start_agents(1, work=work / fleet, broker=broker, fleet=fleet, public=public)
            push(registry.root, "intents:1", fleet, private, broker)
            while ready_version(port) != 1:
                time.sleep(0.05)
            push(registry.root, ref, fleet, private, broker)
            while ready_version(port) != int(ref[-1]):
                time.sleep(0.05)
            time.sleep(0.5)
            sizes[name] = bytes_transferred(work / fleet, 0)
            process.terminate()
            process.wait()
    finally:
        broker.stop()

    print(
        f"\nfleet update of the int8 MiniLM bundle ({bundle_bytes / 1e6:.1f} MB) through one Mosquitto on this machine"
    )
    print(f"{'agents':>6} {'push s':>7} {'all serving s':>14} {'per agent s':>12}")
    for count, pushed, total in rows:
        print(f"{count:>6} {pushed:>7.2f} {total:>14.2f} {total / count:>12.2f}")
    print(f"\nbytes transferred for an update from v1 (the update's own bundle is {bundle_bytes / 1e6:.1f} MB)")
    full = sizes["full fine-tune"]
    for name, size in sizes.items():
        print(f"{name:<22} {size / 1e6:>8.2f} MB  ({size / full:.1%} of the full update)")
    (work / "results.json").write_text(json.dumps({"fleet": rows, "bytes": sizes}, indent=2))


if __name__ == "__main__":
    main()
