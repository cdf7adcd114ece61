"""Labelling image samples: Label Studio image tasks and their labelling config out, labels back in
(Label Studio's JSON and JSON-MIN exports), and the labelled images handed to training as the bytes
the device was sent (``labelling.labelled_images``) or as an image folder (``write_image_folder``).
The records are the agent's own: its sampler, fed by the device runtime's decoding."""

from __future__ import annotations

import base64
import io
import json
import logging
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cloud_trainer.cli import main
from cloud_trainer.errors import DataError
from cloud_trainer.samples.labelling import (
    export_label_studio,
    label_studio_config,
    labelled_images,
    read_labels,
    write_image_folder,
)
from cloud_trainer.samples.store import SampleStore
from edge_agent.protocol.samples import SampleBatch, SampleRecord, SamplingRules
from edge_agent.runtime import ImageClassifier
from edge_agent.sampling import Sampler
from tests.tinyimage import LABELS, encode, make_colour_bundle, solid


@pytest.fixture(scope="module")
def colours(tmp_path_factory: pytest.TempPathFactory) -> ImageClassifier:
    bundle = tmp_path_factory.mktemp("colours") / "bundle"
    manifest = make_colour_bundle(bundle, model="colours")
    return ImageClassifier(bundle_dir=bundle, manifest=manifest, providers=["CPUExecutionProvider"])


def sampled(classifier: ImageClassifier, inputs: list[Any], *, model: str = "colours") -> list[SampleRecord]:
    """Records exactly as an agent keeps them: prepared by the device runtime, kept by its sampler."""
    kept: list[SampleRecord] = []
    sampler = Sampler(rules=SamplingRules(random_rate=1.0), device="cam-1", fleet="f", model=model,
                      sink=kept.extend, seed=1)  # fmt: skip
    prepared = classifier.prepare(inputs)
    sampler.observe(prepared, classifier.predict(prepared), 1, task="image-classification")
    return kept


def stored(tmp_path: Path, records: list[SampleRecord]) -> SampleStore:
    store = SampleStore(tmp_path / "store")
    batch = SampleBatch(device="cam-1", fleet="f", sent_at="2026-11-25T00:00:00Z", records=records)
    assert store.add_batch(batch).new_records == len(records)
    return store


def decoded(url: str) -> bytes:
    head, _, payload = url.partition(",")
    assert head in ("data:image/jpeg;base64", "data:image/png;base64"), head
    return base64.b64decode(payload)


def test_image_samples_export_as_label_studio_image_tasks_with_their_config(
    tmp_path: Path, colours: ImageClassifier
) -> None:
    jpeg = encode(solid((20, 20, 230)), "JPEG")
    png = encode(solid((20, 220, 20), (40, 60)))
    digits = [[0, 4, 16], [8, 16, 2], [1, 0, 12]]  # a raw array, as a digits-like model is sent them
    raw = np.kron(np.asarray(digits), np.ones((11, 11), dtype=int))[:32, :32]
    records = sampled(colours, [jpeg, png, np.stack([raw * 15] * 3, axis=-1).tolist()])
    store = stored(tmp_path, records)

    count = export_label_studio(store.query(model="colours"), tmp_path / "ls.json",
                                config_path=tmp_path / "ls.label-config.xml")  # fmt: skip
    assert count == 3
    tasks = json.loads((tmp_path / "ls.json").read_text())
    by_id = {task["data"]["sample_id"]: task for task in tasks}
    first, second, third = (by_id[r.prediction_id] for r in records[:3])
    assert decoded(first["data"]["image"]) == jpeg  # the bytes the device was sent, not a re-encoding
    assert decoded(second["data"]["image"]) == png
    shown = np.asarray(Image.open(io.BytesIO(decoded(third["data"]["image"]))))
    assert shown.shape == (32, 32, 3) and shown.max() == 255  # a raw array is drawn, its largest value white
    assert "text" not in first["data"] and (first["data"]["device"], first["data"]["version"]) == ("cam-1", 1)
    (prediction,) = first["predictions"]
    assert prediction["result"] == [{"from_name": "label", "to_name": "image", "type": "choices",
                                     "value": {"choices": [records[0].predicted]}}]  # fmt: skip
    assert records[0].predicted == "blue"

    view = ET.fromstring((tmp_path / "ls.label-config.xml").read_text())
    image, choices = list(view)
    assert (image.tag, image.attrib) == ("Image", {"name": "image", "value": "$image"})
    assert (choices.tag, choices.get("name"), choices.get("toName")) == ("Choices", "label", "image")
    assert [c.get("value") for c in choices] == LABELS  # the model's labels, in its order


def test_a_label_studio_export_holds_one_kind_of_input(tmp_path: Path, colours: ImageClassifier) -> None:
    kept: list[SampleRecord] = []
    texts = Sampler(rules=SamplingRules(random_rate=1.0), device="cam-1", fleet="f", model="intents",
                    sink=kept.extend, seed=1)  # fmt: skip
    prediction = colours.predict(colours.prepare([encode(solid((200, 0, 0)))]))
    texts.observe(["a text"], prediction, 1, task="text-classification")
    store = stored(tmp_path, [*kept, *sampled(colours, [encode(solid((200, 0, 0)))])])
    with pytest.raises(DataError, match=r"texts and images; export one model at a time \(--model\)"):
        export_label_studio(store.query(), tmp_path / "ls.json")
    export_label_studio(store.query(model="intents"), tmp_path / "ls.json")
    assert json.loads((tmp_path / "ls.json").read_text())[0]["data"]["text"] == "a text"
    text_view = ET.fromstring(label_studio_config(["a", "b & c"], kind="text"))
    assert text_view[0].attrib == {"name": "text", "value": "$text"}
    assert [c.get("value") for c in text_view[1]] == ["a", "b & c"]  # escaped in XML, read back whole


def test_labels_come_back_from_label_studio_and_feed_training_as_images(
    tmp_path: Path, colours: ImageClassifier, caplog: pytest.LogCaptureFixture
) -> None:
    red, green = encode(solid((230, 10, 10)), "JPEG"), encode(solid((10, 230, 10), (30, 50)))
    raw = solid((5, 5, 240), (32, 32))
    floats = (np.asarray(raw, dtype=np.float32) / 255).tolist()  # not 8-bit pixels: cannot go to training
    records = sampled(colours, [red, green, raw.tolist(), floats, red])
    store = stored(tmp_path, records)
    export_label_studio(store.query(model="colours"), tmp_path / "ls.json")
    tasks = json.loads((tmp_path / "ls.json").read_text())
    answers = {records[0].prediction_id: "red", records[1].prediction_id: "green", records[2].prediction_id: "blue",
               records[3].prediction_id: "blue", records[4].prediction_id: "maroon"}  # fmt: skip
    first_three = [t for t in tasks if t["data"]["sample_id"] in {r.prediction_id for r in records[:3]}]
    for task in first_three:  # Label Studio's JSON export: each task with its annotations
        task["annotations"] = [
            {"was_cancelled": False, "result": [{"from_name": "label", "to_name": "image", "type": "choices",
                                                 "value": {"choices": [answers[task["data"]["sample_id"]]]}}]},
        ]  # fmt: skip
    (tmp_path / "done.json").write_text(json.dumps(first_three))
    assert store.set_labels(read_labels(tmp_path / "done.json")) == 3
    json_min = [{"id": 9, "image": "data:...", "sample_id": r.prediction_id, "label": answers[r.prediction_id]}
                for r in records[3:]]  # fmt: skip
    json_min[1]["label"] = {"choices": ["maroon"]}  # a Choices control that allows several
    (tmp_path / "min.json").write_text(json.dumps([*json_min, {"sample_id": "x" * 32}]))  # unlabelled: skipped
    assert read_labels(tmp_path / "min.json") == [(r.prediction_id, answers[r.prediction_id]) for r in records[3:]]
    assert store.set_labels(read_labels(tmp_path / "min.json")) == 2

    with caplog.at_level(logging.WARNING, logger="cloud_trainer.samples.labelling"):
        pairs = labelled_images(store, "colours")
    assert "1 labelled image samples of colours skipped" in caplog.text
    as_dict = dict(pairs)
    assert len(pairs) == 3 and as_dict[red] == "maroon"  # the same bytes labelled twice: the latest label
    assert as_dict[green] == "green"
    (raw_png,) = [data for data, label in pairs if label == "blue"]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(raw_png))), raw)  # lossless, values as sent
    assert labelled_images(store, "other-model") == []

    files = write_image_folder(pairs, tmp_path / "folder")
    assert sorted(f.relative_to(tmp_path / "folder").parts[0] for f in files) == ["blue", "green", "maroon"]
    assert sorted(f.suffix for f in files) == [".jpg", ".png", ".png"]
    assert sorted((f.parent.name, f.read_bytes()) for f in files) == sorted((label, data) for data, label in pairs)
    assert write_image_folder(pairs * 2, tmp_path / "folder") == files * 2  # named by content: no duplicates
    assert len([p for p in (tmp_path / "folder").rglob("*") if p.is_file()]) == 3
    with pytest.raises(DataError, match="cannot name a folder"):
        write_image_folder([(red, "../up")], tmp_path / "folder")


def test_samples_export_on_the_command_line_writes_the_labelling_config(
    tmp_path: Path, colours: ImageClassifier, capsys: pytest.CaptureFixture[str]
) -> None:
    stored(tmp_path, sampled(colours, [encode(solid((230, 10, 10)), "JPEG")]))
    out = tmp_path / "to-label.json"
    code = main(["samples", "--store", str(tmp_path / "store"), "export", "--model", "colours", "--format",
                 "label-studio", "--out", str(out)])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert f"exported 1 unlabelled samples to {out}" in printed
    assert f"labelling config: {tmp_path / 'to-label.label-config.xml'}" in printed
    assert '<Image name="image" value="$image"/>' in (tmp_path / "to-label.label-config.xml").read_text()
    assert json.loads(out.read_text())[0]["data"]["image"].startswith("data:image/jpeg;base64,")
