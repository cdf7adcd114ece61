"""The device's side of the sample path on its own: sampling rules and caps, remembered inputs,
the remote policy, the batch wire format, the outbox. The uploader is tests/edge_agent/test_uploader.py;
the cloud's side is tests/cloud_trainer/test_labelling.py. All of it with a real broker and agent:
tests/end_to_end/test_sample_upload.py and tests/end_to_end/test_retraining_loop.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_agent.outbox import Outbox
from edge_agent.protocol.errors import MalformedPayload
from edge_agent.protocol.samples import SampleBatch, SampleRecord, SamplingPolicy, SamplingRules
from edge_agent.runtime import Prediction
from edge_agent.sampling import Sampler, UnknownPrediction, reasons_for


def prediction(scores: dict[str, float]) -> Prediction:
    label = max(scores, key=scores.__getitem__)
    return Prediction(label=label, score=scores[label], scores=scores)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_sampler(rules: SamplingRules, kept: list[SampleRecord], clock: Clock | None = None) -> Sampler:
    return Sampler(rules=rules, device="dev-1", fleet="f", model="intents", sink=kept.extend, remember=8,
                   clock=clock or Clock(), seed=1)  # fmt: skip


# -- rules --------------------------------------------------------------------------------------
def test_each_rule_fires_on_its_own_kind_of_hard_example() -> None:
    import random

    rng = random.Random(0)
    confident = prediction({"a": 0.95, "b": 0.04, "c": 0.01})
    unsure = prediction({"a": 0.45, "b": 0.40, "c": 0.15})
    assert reasons_for(confident, SamplingRules(low_confidence=0.6), rng) == []
    assert reasons_for(unsure, SamplingRules(low_confidence=0.6), rng) == ["low_confidence"]
    assert reasons_for(unsure, SamplingRules(low_confidence=None, min_margin=0.1), rng) == ["small_margin"]
    assert reasons_for(confident, SamplingRules(low_confidence=None, min_margin=0.1), rng) == []
    assert reasons_for(unsure, SamplingRules(low_confidence=None, max_entropy=0.8), rng) == ["high_entropy"]
    assert reasons_for(confident, SamplingRules(low_confidence=None, max_entropy=0.8), rng) == []
    always = SamplingRules(low_confidence=None, random_rate=1.0)
    assert reasons_for(confident, always, rng) == ["random"]
    share = SamplingRules(low_confidence=None, random_rate=0.25)
    hits = sum(bool(reasons_for(confident, share, rng)) for _ in range(4000))
    assert 800 < hits < 1200


def test_a_record_the_wire_contract_refuses_is_skipped_not_the_request() -> None:
    kept: list[SampleRecord] = []
    sampler = make_sampler(SamplingRules(random_rate=1.0), kept)
    odd = prediction({"bell\x07": 0.6, "ok": 0.4})  # a model label with a control character
    ids = sampler.observe(["ring"], [odd], 1, task="text-classification")
    assert len(ids) == 1 and sampler.remembers(ids[0])  # the prediction and its id are unaffected
    assert (kept, sampler.invalid) == ([], 1)
    sampler.observe(["fine"], [prediction({"ok": 0.7, "no": 0.3})], 1, task="text-classification")
    assert len(kept) == 1


def test_sampler_keeps_hard_examples_within_hourly_caps() -> None:
    kept: list[SampleRecord] = []
    clock = Clock()
    sampler = make_sampler(SamplingRules(low_confidence=0.6, per_class_per_hour=3, per_hour=5), kept, clock)
    unsure_a = prediction({"a": 0.5, "b": 0.5})
    unsure_b = prediction({"b": 0.55, "a": 0.45})
    sure = prediction({"a": 0.99, "b": 0.01})
    ids = sampler.observe(["x"] * 6, [unsure_a] * 5 + [sure], 3, task="text-classification")
    assert len(set(ids)) == 6
    assert [r.prediction_id for r in kept] == ids[:3]  # per class cap: 3 of class a
    sampler.observe(["y"] * 4, [unsure_b] * 4, 3, task="text-classification")
    assert len(kept) == 5  # overall cap: 5 an hour
    clock.now += 3601  # the window slides
    sampler.observe(["z"], [unsure_a], 3, task="text-classification")
    assert len(kept) == 6
    record = kept[0]
    assert (record.text, record.version, record.reasons, record.kind) == ("x", 3, ["low_confidence"], "sample")
    assert record.id == record.prediction_id and record.label is None


def test_feedback_names_a_recent_prediction_and_carries_its_input() -> None:
    kept: list[SampleRecord] = []
    sampler = make_sampler(SamplingRules(enabled=False), kept)
    ids = sampler.observe(["turn it up", "dim"], [prediction({"a": 0.9, "b": 0.1})] * 2, 2, task="text-classification")
    assert kept == []  # sampling off: nothing kept, but predictions are remembered for feedback
    record = sampler.feedback(ids[1], "lights_dim")
    assert (record.kind, record.label, record.text, record.prediction_id) == ("feedback", "lights_dim", "dim", ids[1])
    assert record.id != ids[1] and kept == [record]
    sampler.observe(["more"] * 8, [prediction({"a": 0.9, "b": 0.1})] * 8, 2, task="text-classification")  # remembers 8
    with pytest.raises(UnknownPrediction, match="unknown or too old"):
        sampler.feedback(ids[0], "x")


def test_remembered_images_stay_within_the_byte_bound_and_feedback_still_carries_them() -> None:
    import tracemalloc

    import numpy as np

    rng = np.random.default_rng(0)
    bound = 512 * 1024
    kept: list[SampleRecord] = []
    sampler = Sampler(rules=SamplingRules(enabled=False), device="dev-1", fleet="f", model="digits",
                      sink=kept.extend, remember=4096, remember_bytes=bound, seed=1)  # fmt: skip
    unsure = prediction({"a": 0.5, "b": 0.3, "c": 0.2})
    ids: list[str] = []
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(1000):  # as JSON gives them (nested int lists) and as KServe does (float32 arrays)
        pixels = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
        ids += sampler.observe(
            [pixels.tolist() if i % 2 else pixels.astype(np.float32)], [unsure], 4, task="image-classification"
        )
        assert sampler.remembered[1] <= bound
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    count, accounted = sampler.remembered
    assert bound - 4096 < accounted <= bound and 100 < count < 1000  # the byte bound binds, not the count
    assert held < bound * 1.25  # and the accounting is honest (measured: 0.98 of it)
    for old in (ids[0], ids[-count - 1]):
        assert not sampler.remembers(old)
        with pytest.raises(UnknownPrediction):
            sampler.feedback(old, "a")
    assert sampler.remembers(ids[-count])

    later = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
    as_json, as_array = later.tolist(), later.astype(np.float32) + 0.5
    pair = sampler.observe([as_json, as_array], [unsure] * 2, 5, task="image-classification")
    from_json, from_array = sampler.feedback(pair[0], "b"), sampler.feedback(pair[1], "c")
    assert from_json.image == as_json and from_array.image == as_array.tolist()  # as the inputs were before
    assert json.dumps(from_json.image) == json.dumps(as_json)  # ints stay ints
    assert json.dumps(from_array.image) == json.dumps(as_array.tolist())  # floats stay floats
    assert (from_json.text, from_json.version, from_json.label, from_json.predicted) == (None, 5, "b", "a")
    assert kept == [from_json, from_array]


def test_remembered_inputs_are_held_compactly_and_exactly() -> None:
    import numpy as np

    from edge_agent.runtime.image import HeldPixels

    cases = [
        ([[0, 17], [255, 3]], "uint8"),
        ([[-1, 300]], "int16"),
        (np.float32([[0.0, 12.0], [255.0, 1.0]]), "uint8"),  # whole floats: ints inside, floats outside
        (np.float32([[0.5, 12.0]]), "float16"),
        (np.float32([[0.1, 70000.0]]), "float32"),
        ([[0.1, 0.2]], "float64"),
        (np.float64([[-0.0, 1.0]]), "float16"),  # -0.0 is kept
        (np.float64([[np.nan, 1e10]]), "float32"),
    ]
    for value, dtype in cases:
        pixels = HeldPixels.of(value)
        original = value.tolist() if isinstance(value, np.ndarray) else value
        assert (str(pixels.array.dtype), json.dumps(pixels.tolist())) == (dtype, json.dumps(original))
    texts = make_sampler(SamplingRules(enabled=False), [])
    texts.observe(["x" * 1000], [prediction({"a": 0.9, "b": 0.1})], 1, task="text-classification")
    assert 1000 < texts.remembered[1] < 1000 + 1024


def test_a_many_class_models_predictions_are_remembered_compactly_with_their_exact_scores() -> None:
    """Scores are kept as float32 in the model's label order: a 1,000-class prediction costs about
    4.5 KB (a dict of floats cost 50 KB), so 16 MB remembers thousands of them, not 300."""
    import tracemalloc

    import numpy as np

    labels = [f"class-{i}" for i in range(1000)]
    rows = np.random.default_rng(0).random((400, 1000)).astype(np.float32)
    sampler = Sampler(rules=SamplingRules(enabled=False), device="dev-1", fleet="f", model="imagenet",
                      sink=lambda _records: None, remember=4096, remember_bytes=16 * 1024 * 1024)  # fmt: skip
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    ids: list[str] = []
    for row in rows:
        scores = dict(zip(labels, row, strict=True))  # as the classifier builds them (numpy float32 values)
        best = int(row.argmax())
        ids += sampler.observe(
            [f"text {len(ids)}"], [Prediction(labels[best], row[best], scores)], 1, task="text-classification"
        )
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    count, accounted = sampler.remembered
    assert count == 400 and held / count < 6000  # measured: about 4,600 bytes each
    assert 0.8 < held / accounted < 1.25  # the accounting is honest
    record = sampler.feedback(ids[7], "class-3")
    assert list(record.scores) == labels  # the label order is kept
    assert record.scores == {label: float(value) for label, value in zip(labels, rows[7], strict=True)}
    assert record.score == float(rows[7].max()) and record.predicted == labels[int(rows[7].argmax())]


def test_sampling_config_bounds_remembered_memory() -> None:
    from pydantic import ValidationError

    from edge_agent.config import SamplingConfig

    assert SamplingConfig().remember_bytes == 16 * 1024 * 1024
    assert SamplingConfig(remember_mb=0.5).remember_bytes == 512 * 1024
    for bad in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValidationError, match="remember_mb"):
            SamplingConfig(remember_mb=bad)


def test_remote_policy_round_trip_and_bad_policy() -> None:
    policy = SamplingPolicy(low_confidence=0.8, random_rate=0.1)
    assert SamplingPolicy.from_bytes(policy.to_bytes()).rules() == SamplingRules(low_confidence=0.8, random_rate=0.1)
    with pytest.raises(MalformedPayload, match="random_rate"):
        SamplingPolicy.from_bytes(b'{"random_rate": 2}')
    with pytest.raises(MalformedPayload):
        SamplingPolicy.from_bytes(b"not json")


def test_batch_wire_format_is_gzip_json_and_refuses_garbage() -> None:
    kept: list[SampleRecord] = []
    make_sampler(SamplingRules(random_rate=1.0), kept).observe(
        ["hi"], [prediction({"a": 1.0})], 1, task="text-classification"
    )
    batch = SampleBatch(device="dev-1", fleet="f", sent_at="2026-11-25T00:00:00+00:00", records=kept)
    wire = batch.to_bytes()
    assert wire[:2] == b"\x1f\x8b"
    assert SampleBatch.from_bytes(wire) == batch
    with pytest.raises(MalformedPayload, match="not gzip JSON"):
        SampleBatch.from_bytes(b"\x1f\x8b broken")
    with pytest.raises(MalformedPayload, match="does not validate"):
        SampleBatch.from_bytes(b'{"schema": "edgeloop.samples/1", "records": []}')
    import gzip as gz

    with pytest.raises(MalformedPayload, match="not gzip JSON"):  # a corrupt deflate stream (zlib.error)
        SampleBatch.from_bytes(wire[:10] + bytes(b ^ 0xFF for b in wire[10:]))
    with pytest.raises(MalformedPayload, match="not gzip JSON"):
        SampleBatch.from_bytes(gz.compress(b"[" * 100_000))  # nesting past the recursion limit
    lone = batch.model_dump_json(by_alias=True).replace('"hi"', '"\\ud800"').encode()
    with pytest.raises(MalformedPayload, match="not valid Unicode"):
        SampleBatch.from_bytes(lone)
    evil = batch.model_dump_json(by_alias=True).replace('"model":"intents"', '"model":"../../x"').encode()
    with pytest.raises(MalformedPayload, match="model"):
        SampleBatch.from_bytes(evil)


# -- outbox ---------------------------------------------------------------------------------------
def test_outbox_is_fifo_durable_and_ignores_repeated_ids(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite", max_bytes=1 << 20)
    box.put([("a", b"1" * 10), ("b", b"2" * 10)])
    box.put([("b", b"2" * 10), ("c", b"3" * 10)])
    assert [i.id for i in box.peek(max_items=10)] == ["a", "b", "c"]
    box.ack(box.peek(max_items=1))
    box.close()
    box = Outbox(tmp_path / "o.sqlite", max_bytes=1 << 20)  # as after a restart
    assert [i.id for i in box.peek(max_items=10)] == ["b", "c"]
    stats = box.stats()
    assert (stats.queued, stats.bytes, stats.dropped, stats.uploaded) == (2, 20, 0, 1)


def test_full_outbox_drops_the_oldest_and_counts_them(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite", max_bytes=4096)
    for i in range(100):
        box.put([(f"r{i:03d}", b"x" * 100)])
    stats = box.stats()
    assert stats.queued == 40 and stats.bytes == 4000
    assert stats.dropped == 60
    assert [i.id for i in box.peek(max_items=100)] == [f"r{i:03d}" for i in range(60, 100)]
    box.close()
    assert Outbox(tmp_path / "o.sqlite", max_bytes=4096).stats().dropped == 60  # the count survives restarts


def test_a_corrupt_outbox_is_set_aside_and_the_agent_goes_on(tmp_path: Path) -> None:
    (tmp_path / "o.sqlite").write_bytes(b"this is not a database" * 100)
    box = Outbox(tmp_path / "o.sqlite", max_bytes=4096)
    box.put([("a", b"1")])
    assert box.stats().queued == 1
    assert [p.name.split("-")[0] for p in tmp_path.glob("o.sqlite.corrupt-*")] == ["o.sqlite.corrupt"]


def test_an_unopenable_outbox_path_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "o.sqlite").mkdir()
    with pytest.raises(OSError, match="cannot open the sample outbox"):
        Outbox(tmp_path / "o.sqlite", max_bytes=4096)
