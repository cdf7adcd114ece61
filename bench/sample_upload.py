"""Sample upload, side by side in one run:

1. the outbox: writes per second, one record per transaction vs grouped (what the agent's writer
   thread does), and disk use per sample next to the sample's JSON and its gzip'd wire size;
2. upload throughput through a real Mosquitto at QoS 1: the agent's uploader draining an outbox of
   N samples into a collector's store, at several batch sizes; samples per second acknowledged by
   the broker (outbox empty) and stored by the collector, with each rate's ratio to batch size 1.

    .venv/bin/python bench/sample_upload.py [--samples 2000] [--batches 1 50 200]
"""

from __future__ import annotations

import argparse
import gzip
import tempfile
import time
from pathlib import Path

from cloud_trainer.demo.localbroker import start_local_broker
from cloud_trainer.samples.collect import Collector
from cloud_trainer.samples.store import SampleStore
from edge_agent.outbox import Outbox
from edge_agent.protocol import Topics
from edge_agent.protocol.samples import SampleRecord, SamplingRules
from edge_agent.runtime import Prediction
from edge_agent.sampling import Sampler
from edge_agent.transport import MqttTransport
from edge_agent.uploader import SampleUploader

LABELS = ["lights_on", "lights_off", "set_timer", "play_music", "volume_up", "volume_down", "lock_door",
          "get_weather", "set_temperature", "stop_playback"]  # fmt: skip


def make_records(n: int) -> list[SampleRecord]:
    kept: list[SampleRecord] = []
    sampler = Sampler(rules=SamplingRules(random_rate=1.0, per_hour=10**9, per_class_per_hour=10**9),
                      device="bench-1", fleet="bench", model="intents", sink=kept.extend, seed=0)  # fmt: skip
    scores = {label: round(0.5 if i == 0 else 0.5 / 9, 4) for i, label in enumerate(LABELS)}
    prediction = Prediction(label=LABELS[0], score=0.5, scores=scores)
    texts = [f"could you please turn on the lights in room number {i} before I get home" for i in range(n)]
    for start in range(0, n, 100):
        chunk = texts[start : start + 100]
        sampler.observe(chunk, [prediction] * len(chunk), 3, task="text-classification")
    return kept


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def bench_outbox(records: list[SampleRecord], work: Path) -> None:
    bodies = [(r.id, r.model_dump_json(by_alias=True).encode()) for r in records]
    print(f"\n== outbox: {len(records)} samples ==")
    print(f"{'writes':<26}{'samples/s':>12}{'ratio':>8}")
    base = None
    for group in (1, 50):
        box = Outbox(work / f"outbox-{group}.sqlite", max_bytes=1 << 30)
        start = time.perf_counter()
        for i in range(0, len(bodies), group):
            box.put(bodies[i : i + group])
        rate = len(bodies) / (time.perf_counter() - start)
        base = base or rate
        print(f"{f'{group} per transaction':<26}{rate:>12.0f}{rate / base:>7.1f}x")
        box.close()
    size = disk_bytes(work / "outbox-50.sqlite")
    json_bytes = sum(len(b) for _, b in bodies) / len(bodies)
    wire = len(gzip.compress(b"[" + b",".join(b for _, b in bodies[:200]) + b"]")) / 200
    print(f"disk per queued sample: {size / len(bodies):.0f} B (JSON {json_bytes:.0f} B, gzip on the wire "
          f"{wire:.0f} B in batches of 200)")  # fmt: skip


def bench_upload(records: list[SampleRecord], batches: list[int], work: Path) -> None:
    broker = start_local_broker(prefer="mosquitto", workdir=work / "broker")
    topics = Topics(fleet="bench")
    print(f"\n== upload through Mosquitto at QoS 1: {len(records)} samples ==")
    print(f"{'batch size':<12}{'acked/s':>10}{'stored/s':>10}{'ratio':>8}{'messages':>10}")
    base = None
    try:
        for size in batches:
            box = Outbox(work / f"up-{size}.sqlite", max_bytes=1 << 30)
            box.put([(r.id, r.model_dump_json(by_alias=True).encode()) for r in records])
            store = SampleStore(work / f"store-{size}")
            collector = Collector(store=store, fleet="bench", host=broker.host, port=broker.port,
                                  client_id=f"bench-collect-{size}")  # fmt: skip
            collector.start()
            transport = MqttTransport(host=broker.host, port=broker.port, client_id=f"bench-agent-{size}")
            uploader = SampleUploader(outbox=box, transport=transport, topic=topics.device_samples("bench-1"),
                                      device="bench-1", fleet="bench", batch_records=size, interval_s=0.05)  # fmt: skip
            transport.start(wait_s=10)
            start = time.perf_counter()
            uploader.start()
            uploader.wake()
            acked = stored = None
            while stored is None:
                now = time.perf_counter() - start
                if acked is None and box.stats().queued == 0:
                    acked = now
                if collector.stats.new_records >= len(records):
                    stored = now
                time.sleep(0.005)
            assert acked is not None
            acked_rate, stored_rate = len(records) / acked, len(records) / stored
            base = base or stored_rate
            print(f"{size:<12}{acked_rate:>10.0f}{stored_rate:>10.0f}{stored_rate / base:>7.1f}x"
                  f"{uploader.batches_sent:>10}")  # fmt: skip
            uploader.stop()
            transport.stop()
            collector.stop(end_session=True)  # or its session stays a member of the shared group
            box.close()
            store.close()
    finally:
        broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 50, 200])
    args = parser.parse_args()
    records = make_records(args.samples)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bench_outbox(records, work)
        bench_upload(records, args.batches, work)


if __name__ == "__main__":
    main()
