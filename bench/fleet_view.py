"""How long the fleet view takes over a large fleet: ``cloud-train fleet status`` against simulated devices.

Starts a Mosquitto, then "devices" that are light publishers, not agents: for each of ``--devices``
devices, the retained state, availability and telemetry documents an agent keeps on the broker
(valid ``edgeloop.state/1``, ``edgeloop.availability/1`` and ``edgeloop.telemetry/1``, a mix of
versions, update states, groups and offline devices), published over ``--publishers`` connections.
Then, side by side in one run:

1. ``read_fleet`` (the library call under ``fleet status``): connect, read the retained snapshot,
   build the rows; ``--repeat`` times;
2. ``cloud-train fleet status --json`` as a user runs it (a new Python process: imports included);
3. ``cloud-train fleet status`` (the rich table), the same way;
4. while a ``FleetView`` follows the fleet: the time from a device publishing a new state to the
   view's row showing it, for ``--changes`` changes.

Prints each time (min / median / max) and a PASS/FAIL line for issue 16's target: ``fleet status``
in 2 s or less with 1,000 devices.

    .venv/bin/python bench/fleet_view.py [--devices 1000] [--repeat 5] [--changes 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from cloud_trainer.demo.localbroker import start_local_broker
from cloud_trainer.fleet.view import DeviceRow, FleetView, read_fleet
from edge_agent.protocol.topics import Topics
from edge_agent.transport import MqttTransport

TARGET_S = 2.0
STATES = ["active"] * 8 + ["downloading", "idle", "rolled-back"]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def documents(fleet: str, i: int, *, version: int | None = None) -> dict[str, bytes]:
    device = f"sim-{i:05d}"
    online = i % 17 != 0
    update = STATES[i % len(STATES)]
    state = {
        "schema": "edgeloop.state/1", "device": device, "fleet": fleet, "online": online, "model": "intents",
        "active_version": version or (3 if i % 5 else 2), "previous_version": 2, "update_state": update,
        "update_version": 3, "progress": 0.4 if update == "downloading" else None,
        "last_error": "v3 breached the error-rate watch" if update == "rolled-back" else None,
        "updated_at": now(), "group": f"line-{i % 4}", "agent_version": "0.1.0", "started_at": now(),
        "host": {"machine": "aarch64", "system": "Linux 5.15.136-tegra", "python": "3.10.12",
                 "onnxruntime": "1.19.0", "providers": ["CPUExecutionProvider"]},
    }  # fmt: skip
    availability = {"schema": "edgeloop.availability/1", "device": device, "fleet": fleet, "online": online,
                    "at": now() if online else None, "connected_at": now()}  # fmt: skip
    telemetry = {
        "schema": "edgeloop.telemetry/1", "device": device, "fleet": fleet, "model": "intents",
        "active_version": state["active_version"], "window_s": 30.0, "requests": 300 + i % 50, "errors": i % 3,
        "throughput_rps": 10.0 + i % 7, "latency_ms": {"p50": 1.2, "p95": 2.0, "p99": 3.4}, "queue_depth": 0,
        "cpu_percent": 12.5, "rss_mb": 131.0, "samples": {"queued": i % 9, "queued_bytes": 1000 * (i % 9),
        "dropped": 0, "uploaded": 42}, "sent_at": now(),
    }  # fmt: skip
    topics = Topics(fleet=fleet)
    return {
        topics.device_state(device): json.dumps(state).encode(),
        topics.device_availability(device): json.dumps(availability).encode(),
        topics.device_telemetry(device): json.dumps(telemetry).encode(),
    }


def publish_fleet(host: str, port: int, fleet: str, devices: int, publishers: int) -> float:
    start = time.perf_counter()
    clients = []
    for p in range(publishers):
        t = MqttTransport(host=host, port=port, client_id=f"sim-publisher-{p}", max_inflight=200)
        t.connect()
        clients.append(t)
    infos = []
    for i in range(devices):
        for topic, payload in documents(fleet, i).items():
            infos.append(clients[i % publishers].publish(topic, payload, qos=1, retain=True))
    clients[0].wait_published(infos, timeout_s=120)  # waits on each message's own acknowledgement
    for t in clients:
        t.stop()
    return time.perf_counter() - start


def timed(call: object, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()  # type: ignore[operator]
        out.append(time.perf_counter() - start)
    return out


def row(name: str, seconds: list[float]) -> str:
    ms = [s * 1000 for s in seconds]
    return f"{name:<52} {min(ms):>9.1f} {statistics.median(ms):>9.1f} {max(ms):>9.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--publishers", type=int, default=4, help="connections the simulated devices publish over")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-fleet-view"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    broker = start_local_broker(prefer="mosquitto", workdir=args.workdir / "broker")
    fleet = "bench-fleet"
    try:
        took = publish_fleet(broker.host, broker.port, fleet, args.devices, args.publishers)
        print(f"{args.devices} simulated devices ({3 * args.devices} retained documents) published in {took:.1f} s")
        rows = read_fleet(host=broker.host, port=broker.port, fleet=fleet)
        assert len(rows) == args.devices, f"read {len(rows)} rows of {args.devices}"
        assert all(r.problem is None for r in rows)
        where = ["--fleet", fleet, "--broker", f"{broker.host}:{broker.port}"]
        cli = [sys.executable, "-m", "cloud_trainer", "fleet", "status", *where]
        library = timed(lambda: read_fleet(host=broker.host, port=broker.port, fleet=fleet), args.repeat)
        as_json = timed(lambda: subprocess.run([*cli, "--json"], check=True, capture_output=True), args.repeat)
        as_table = timed(lambda: subprocess.run(cli, check=True, capture_output=True), args.repeat)

        # live: a device's new state reaching a view that follows the fleet
        seen: dict[str, float] = {}
        cond = threading.Condition()

        def on_change(r: DeviceRow) -> None:
            if r.state is not None and r.state.active_version == 9:
                with cond:
                    seen.setdefault(r.device, time.perf_counter())
                    cond.notify_all()

        view = FleetView(host=broker.host, port=broker.port, fleet=fleet, on_change=on_change)
        view.start()
        changer = MqttTransport(host=broker.host, port=broker.port, client_id="sim-changer")
        changer.connect()
        live = []
        try:
            for i in range(args.changes):
                (topic, payload), *_ = documents(fleet, i, version=9).items()
                sent = time.perf_counter()
                changer.publish(topic, payload, qos=1, retain=True)
                device = f"sim-{i:05d}"
                with cond:
                    assert cond.wait_for(lambda d=device: d in seen, timeout=10), f"{device} not seen"
                live.append(seen[device] - sent)
        finally:
            changer.stop()
            view.stop()
    finally:
        broker.stop()
    print(f"\n{'':<52} {'min ms':>9} {'median ms':>9} {'max ms':>9}")
    print(row(f"read_fleet ({args.devices} devices, library)", library))
    print(row("cloud-train fleet status --json (new process)", as_json))
    print(row("cloud-train fleet status, table (new process)", as_table))
    print(row("a state change to a following view's row", live))
    worst = max(statistics.median(as_json), statistics.median(as_table))
    verdict = "PASS" if worst <= TARGET_S else "FAIL"
    print(f"\n{verdict}  fleet status with {args.devices} devices in {TARGET_S:g} s or less: median {worst:.3f} s")
    (args.workdir / "fleet_view.json").write_text(json.dumps({
        "devices": args.devices, "library_s": library, "cli_json_s": as_json, "cli_table_s": as_table,
        "live_update_s": live, "pass": verdict == "PASS",
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
