"""The retraining loop end to end, on real parts: version 1 has never seen timer requests; the device
meets them, keeps them as hard examples and uploads them; they are labelled through
`cloud-train samples export/import`; version 2 is trained with them, pushed, and served; it gets
the timer requests right that version 1 could not."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cloud_trainer.demo.localbroker import LocalBroker
from cloud_trainer.samples.collect import Collector
from cloud_trainer.samples.store import SampleStore
from cloud_trainer.training.data import PACKAGED_DATASET, load_labelled
from tests.conftest import AgentProcess, Keys, http_json

pytestmark = pytest.mark.slow

SLICE = "set_timer"
AGENT_TOML = """
[sampling]
enabled = false          # the remote policy below turns it on: proof that it reached the device

[outbox]
upload_interval_s = 0.5
"""


def cloud_train(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "cloud_trainer", *args], capture_output=True, text=True,
                            timeout=900, check=False)  # fmt: skip
    assert result.returncode == 0, f"cloud-train {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def slice_accuracy(agent: AgentProcess, texts: list[str]) -> tuple[float, int]:
    status, body = agent.predict(texts)
    assert status == 200, body
    return sum(p["label"] == SLICE for p in body["predictions"]) / len(texts), body["version"]


def test_fleet_samples_teach_version_2_the_slice_version_1_missed(
    tmp_path: Path, mosquitto: LocalBroker, fleet: str, keys: Keys, agent_process: Callable[..., AgentProcess]
) -> None:
    data = load_labelled(PACKAGED_DATASET)
    truth = dict(zip(data.texts, data.labels, strict=True))
    timers = [t for t, lab in truth.items() if lab == SLICE]
    field, held_out = timers[:18], timers[18:]
    everyday = [t for t, lab in truth.items() if lab != SLICE][::12]  # in-distribution traffic too
    base = tmp_path / "base.csv"
    with base.open("w", newline="") as handle:
        csv.writer(handle).writerows([("text", "label"), *((t, lab) for t, lab in truth.items() if lab != SLICE)])
    registry, store_dir = tmp_path / "registry", tmp_path / "samples"
    broker = ["--broker", f"{mosquitto.host}:{mosquitto.port}"]
    quick = ["--max-steps", "60", "--seed", "7"]

    # Version 1: no timer requests in its data.
    cloud_train("train", "--data", str(base), "--out", str(tmp_path / "run1"), *quick)
    cloud_train("export", "--run", str(tmp_path / "run1"), "--model", "intents", "--registry", str(registry),
                "--max-accuracy-drop", "3")  # fmt: skip
    cloud_train("push", "intents:1", "--registry", str(registry), "--fleet", fleet, "--key", str(keys.private), *broker)
    cloud_train("sampling", "set", "--fleet", fleet, "--model", "intents", "--low-confidence", "0.7",
                *broker)  # fmt: skip
    store = SampleStore(store_dir)
    collector = Collector(store=store, fleet=fleet, host=mosquitto.host, port=mosquitto.port, client_id=f"c-{fleet}")
    collector.start()
    try:
        agent = agent_process(extra_toml=AGENT_TOML)
        agent.wait_version(1, timeout_s=120)

        # The field: timer requests (v1 cannot know them) and everyday commands; one app reports a label.
        status, body = agent.predict(field + everyday)
        assert status == 200
        ids = [p["id"] for p in body["predictions"]]
        assert (
            http_json(agent.http_port, "POST", "/v1/feedback", {"id": ids[-1], "label": truth[everyday[-1]]})[0] == 202
        )
        field_ids = set(ids[: len(field)])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            stored = {s.prediction_id for s in store.query(model="intents")}
            if stored and ids[-1] in stored and len(stored & field_ids) >= len(field) // 2:
                break
            time.sleep(0.5)
        kept_field = len({s.prediction_id for s in store.query(model="intents")} & field_ids)
        kept_total = store.counts()["samples"]
        assert kept_field >= len(field) // 2, f"only {kept_field} of {len(field)} timer requests were sampled"
        assert store.get(ids[-1]).label == truth[everyday[-1]]  # device feedback is a label
    finally:
        collector.stop()

    # Labelling: export what has no label, a person labels it (here: the data set's truth), import.
    todo, done = tmp_path / "todo.csv", tmp_path / "done.csv"
    cloud_train("samples", "--store", str(store_dir), "export", "--model", "intents", "--out", str(todo))
    rows = list(csv.DictReader(todo.open()))
    for row in rows:
        row["label"] = truth[row["text"]]
    with done.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert f"imported {len(rows)} labels" in cloud_train("samples", "--store", str(store_dir), "import", str(done))

    v1_accuracy, version = slice_accuracy(agent, held_out)  # measured after export: held-out texts stay unlabelled
    assert version == 1

    # Version 2: the same data plus the labelled fleet samples; pushed, served, better on the slice.
    out = cloud_train("train", "--data", str(base), "--out", str(tmp_path / "run2"), "--include-samples", "intents",
                      "--samples-store", str(store_dir), *quick)  # fmt: skip
    assert f"new labels: {SLICE}" in out
    cloud_train("export", "--run", str(tmp_path / "run2"), "--model", "intents", "--registry", str(registry),
                "--max-accuracy-drop", "3")  # fmt: skip
    cloud_train("push", "intents:2", "--registry", str(registry), "--fleet", fleet, "--key", str(keys.private), *broker)
    agent.wait_version(2, timeout_s=120)
    v2_accuracy, version = slice_accuracy(agent, held_out)
    assert version == 2
    manifest = json.loads((registry / "intents" / "2" / "bundle" / "manifest.json").read_text())
    lineage = manifest["lineage"]
    print(
        f"\nsampled {kept_total} of {len(field) + len(everyday)} field predictions ({kept_field} of {len(field)} "
        f"timer requests); {len(rows)} labelled by import, 1 by device feedback"
        f"\nversion 2 trained with {lineage['samples']['added']} fleet samples (parent v{lineage['parent_version']})"
        f"\nheld-out timer requests ({len(held_out)}): v1 accuracy {v1_accuracy:.2f} -> v2 accuracy {v2_accuracy:.2f}"
    )
    assert lineage["parent_version"] == 1 and lineage["samples"]["added"] > 0
    assert v2_accuracy > v1_accuracy
    assert v2_accuracy >= 0.5
