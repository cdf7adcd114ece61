"""The ``tensor`` task on the device: a model that is not a classifier, served by its own signature.

The manifest's contract for it, the checks every request passes before onnxruntime sees it (names,
datatypes, ranks, fixed sizes, named dynamic axes, bytes, JSON values), the golden-vector health
check, and the front ends over a real ``InferenceServer``: the Open Inference Protocol through
``tritonclient.http`` (FP32 and INT64 in, every output out, equal to plain onnxruntime's), its
errors as 4xx that never count against the model, an onnxruntime failure on valid input as a 500
that does, ``/v1/predict`` with ``{"inputs": ...}``, no sampling, and the batcher running several
requests of different shapes in one pass. The model is ``tests/tensormodel.py`` (onnx.helper)."""

from __future__ import annotations

import json
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton

from edge_agent.config import AgentConfig, HttpConfig
from edge_agent.protocol import Manifest, NoPreprocessing
from edge_agent.protocol.errors import MalformedPayload
from edge_agent.protocol.samples import SampleRecord, SamplingRules
from edge_agent.runtime import (
    HealthCheckError,
    InputError,
    InputTooLarge,
    ModelHolder,
    TensorModel,
    TensorOutputs,
    load_classifier,
    task_for,
)
from edge_agent.sampling import Sampler
from edge_agent.serving import InferenceServer
from edge_agent.serving.batcher import Batcher, ModelFailure
from edge_agent.updater import load_verified
from export.bundle import GOLDEN_FILE, write_manifest
from tests.conftest import Keys, http_json
from tests.tensormodel import example_feeds, make_tensor_bundle, reference


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ranker") / "bundle"
    make_tensor_bundle(path, version=3)
    return path


@pytest.fixture(scope="module")
def ranker(bundle: Path) -> TensorModel:
    model = load_classifier(bundle, Manifest.read(bundle), providers=["CPUExecutionProvider"])
    assert isinstance(model, TensorModel)
    return model


# -- the manifest ---------------------------------------------------------------------------------
def test_a_tensor_manifest_declares_its_signature_and_nothing_else(bundle: Path) -> None:
    manifest = Manifest.read(bundle)
    assert (manifest.task, manifest.labels, manifest.preprocessing, manifest.quantization) == (
        "tensor", [], NoPreprocessing(), "none"
    )  # fmt: skip
    assert [(s.name, s.dtype, s.shape) for s in manifest.inputs] == [
        ("features", "float32", ["batch", 4]), ("offsets", "int64", ["batch", 3]),
    ]  # fmt: skip
    assert [(s.name, s.dtype, s.shape) for s in manifest.outputs] == [
        ("scores", "float32", ["batch", 3]), ("best", "int64", ["batch"]),
    ]  # fmt: skip
    data = manifest.model_dump(by_alias=True)

    def refused(change: dict[str, Any], message: str) -> None:
        with pytest.raises(MalformedPayload, match=message):
            Manifest.parse(json.dumps({**data, **change}).encode())

    refused({"labels": ["a", "b"]}, "task tensor has no labels")
    refused({"inputs": [{**data["inputs"][0], "dtype": "string"}, data["inputs"][1]]},
            "input 'features' has dtype string")  # fmt: skip
    refused({"inputs": [{**data["inputs"][0], "shape": ["batch", 0]}, data["inputs"][1]]}, "fixed sizes are >= 1")
    refused({"outputs": [data["outputs"][0], data["outputs"][0]]}, "output names must be unique")
    refused({"preprocessing": {"kind": "text", "tokenizer": "model.onnx", "max_length": 8}},
            "task tensor needs none preprocessing, not text")  # fmt: skip
    refused({"task": "image-classification"}, "task image-classification needs image preprocessing, not none")
    text = {**data, "task": "text-classification", "labels": ["only"],
            "preprocessing": {"kind": "text", "tokenizer": "model.onnx", "max_length": 8}}  # fmt: skip
    with pytest.raises(MalformedPayload, match="task text-classification needs at least 2 labels, not 1"):
        Manifest.parse(json.dumps(text).encode())


# -- the checks before onnxruntime ----------------------------------------------------------------
FEATURES = [[0.5, -1.0, 2.0, 0.25], [1.0, 1.0, 1.0, 1.0]]
OFFSETS = [[0, 1, 2], [3, 3, 0]]


@pytest.mark.parametrize(
    ("request_inputs", "message"),
    [
        ({"features": FEATURES}, "missing input(s) ['offsets']; this model takes 'features', 'offsets'"),
        ({"features": FEATURES, "offsets": OFFSETS, "mask": [1]}, "unknown input(s) ['mask']"),
        ({"feature": FEATURES, "offsets": OFFSETS}, "missing input(s) ['features'], unknown input(s) ['feature']"),
        ({"features": np.asarray(FEATURES, dtype=np.float64), "offsets": OFFSETS},
         "input 'features' is FP64; the model takes FP32"),
        ({"features": FEATURES, "offsets": np.asarray(OFFSETS, dtype=np.int32)},
         "input 'offsets' is INT32; the model takes INT64"),
        ({"features": [row[:3] for row in FEATURES], "offsets": OFFSETS},
         "input 'features' has shape [2, 3]; the model takes [-1, 4] (axis 1)"),
        ({"features": FEATURES[0], "offsets": OFFSETS},
         "input 'features' has shape [4]; the model takes [-1, 4] (rank 2)"),
        ({"features": FEATURES[:1], "offsets": OFFSETS},
         "input 'offsets' axis 0 is 2, but input 'features' axis 0 is 1: both are the model's axis 'batch'"),
        ({"features": np.zeros((0, 4), np.float32), "offsets": np.zeros((0, 3), np.int64)}, "it is empty"),
        ({"features": FEATURES, "offsets": [[0, 0.5, 1], [0, 0, 0]]},
         "'offsets' must hold integers for INT64, not floats"),
        ({"features": FEATURES, "offsets": [[0, 1, 2], [0, 1]]}, "'offsets' is not a rectangular array"),
        ({"features": [["a", "b", "c", "d"]], "offsets": OFFSETS[:1]}, "must hold numbers for FP32, not strings"),
        ({"features": [[True, False, True, True]], "offsets": OFFSETS[:1]}, "must hold numbers for FP32, not booleans"),
        ({"features": [[None, 0, 0, 0]], "offsets": OFFSETS[:1]}, "not nulls or values of mixed types"),
        ({"features": FEATURES[:1], "offsets": [[2**63, 0, 0]]}, "holds 9223372036854775808, out of range for INT64"),
        ({"features": [[1e39, 0, 0, 0]], "offsets": OFFSETS[:1]}, "a number too large for FP32"),
        ([FEATURES, OFFSETS], "inputs must be an object of the model's input names"),
    ],
    ids=["missing", "unknown", "misspelt", "fp64", "int32", "size", "rank", "axis", "empty", "float-for-int",
         "ragged", "strings", "bools", "null", "int-range", "fp32-range", "not-named"],
)  # fmt: skip
def test_every_request_is_checked_against_the_declared_inputs(
    ranker: TensorModel, request_inputs: Any, message: str
) -> None:
    with pytest.raises(InputError) as caught:
        ranker.check(request_inputs)
    assert message in str(caught.value)


def test_json_values_become_the_declared_dtypes_and_size_is_bounded(ranker: TensorModel) -> None:
    checked = ranker.check({"features": FEATURES, "offsets": OFFSETS})
    assert checked["features"].dtype == np.float32 and checked["offsets"].dtype == np.int64
    assert checked["features"].tolist() == FEATURES and checked["offsets"].tolist() == OFFSETS
    assert ranker.check({"features": [[1, 2, 3, 4]], "offsets": [[0, 1, 2]]})["features"].dtype == np.float32
    with pytest.raises(InputTooLarge, match="the limit is 40"):  # 2x4 float32 + 2x3 int64 = 80 bytes
        ranker.check({"features": FEATURES, "offsets": OFFSETS}, max_bytes=40)
    assert ranker.check({"features": FEATURES, "offsets": OFFSETS}, max_bytes=80)["offsets"].shape == (2, 3)


# -- golden vectors -------------------------------------------------------------------------------
def _config(tmp_path: Path, keys: Keys) -> AgentConfig:
    return AgentConfig.model_validate({"device_id": "d", "fleet": "f", "state_dir": tmp_path / "state",
                                       "update": {"trusted_keys": [keys.public]}})  # fmt: skip


def _tamper(bundle: Path, change: Any) -> None:
    golden = json.loads((bundle / GOLDEN_FILE).read_text())
    change(golden)
    (bundle / GOLDEN_FILE).write_text(json.dumps(golden))
    manifest = Manifest.read(bundle)
    write_manifest(bundle, manifest.model_dump(by_alias=False, exclude={"files"}))  # files verify; only golden fails


def _shift_score(golden: dict[str, Any]) -> None:
    golden["cases"][1]["outputs"]["scores"]["data"][2] += 0.5


def _flip_best(golden: dict[str, Any]) -> None:
    golden["cases"][0]["outputs"]["best"]["data"][0] = (golden["cases"][0]["outputs"]["best"]["data"][0] + 1) % 3


def _retype(golden: dict[str, Any]) -> None:
    golden["cases"][0]["outputs"]["best"]["dtype"] = "int32"


def _fp64_input(golden: dict[str, Any]) -> None:
    golden["cases"][0]["inputs"]["features"]["dtype"] = "float64"


def _bad_offset(golden: dict[str, Any]) -> None:
    golden["cases"][0]["inputs"]["offsets"]["data"][0] = 9


def _no_cases(golden: dict[str, Any]) -> None:
    golden["cases"] = []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_shift_score, "golden case 1 output 'scores' differs by up to 0.5 (tolerance 0.02 absolute + 0.02 relative)"),
        (_flip_best, "golden case 0 output 'best' differs in 1 of 1 values (integers must be equal)"),
        (_retype, "golden case 0 output 'best' is int64 [1]; golden is int32 [1]"),
        (_fp64_input, "golden case 0 does not fit this model: input 'features' is FP64; the model takes FP32"),
        (_bad_offset, "the model fails on golden case 0"),
        (_no_cases, "golden vectors hold no cases"),
    ],
    ids=["float", "integer", "dtype", "input-dtype", "onnxruntime", "empty"],
)
def test_a_tensor_bundle_must_reproduce_its_golden_outputs(
    tmp_path: Path, keys: Keys, change: Any, message: str
) -> None:
    make_tensor_bundle(tmp_path / "bundle")
    model = load_verified(tmp_path / "bundle", _config(tmp_path, keys))  # as imported: passes
    assert isinstance(model, TensorModel)
    _tamper(tmp_path / "bundle", change)
    with pytest.raises(HealthCheckError) as caught:
        load_verified(tmp_path / "bundle", _config(tmp_path, keys))
    assert message in str(caught.value)


def test_a_float_output_within_the_tolerance_passes(tmp_path: Path, keys: Keys) -> None:
    make_tensor_bundle(tmp_path / "bundle")

    def nudge(golden: dict[str, Any]) -> None:  # 1 % of a large value: inside 0.02 relative, past 0.02 absolute
        golden["cases"][0]["inputs"]["features"]["data"] = [50.0, 50.0, 50.0, 50.0]
        scores = reference_scores(tmp_path / "bundle", golden["cases"][0]["inputs"])
        assert max(abs(v) for v in scores) * 0.01 > 0.05  # past the absolute tolerance alone
        golden["cases"][0]["outputs"]["scores"]["data"] = [v * 1.01 for v in scores]
        golden["cases"][0]["outputs"]["best"]["data"] = [int(np.argmax(scores))]

    _tamper(tmp_path / "bundle", nudge)
    load_verified(tmp_path / "bundle", _config(tmp_path, keys))


def reference_scores(bundle: Path, inputs: dict[str, Any]) -> list[float]:
    feeds = {name: np.asarray(t["data"], dtype=t["dtype"]).reshape(t["shape"]) for name, t in inputs.items()}
    return [float(v) for v in reference(bundle / "model.onnx", feeds)["scores"].reshape(-1)]


# -- the front ends -------------------------------------------------------------------------------
class Served:
    """An in-process server for the ranker, recording what the watch window would see."""

    def __init__(self, bundle: Path) -> None:
        self.results: list[tuple[int, bool]] = []
        self.kept: list[SampleRecord] = []
        self.sampler = Sampler(rules=SamplingRules(random_rate=1.0), device="d", fleet="f", model="intents",
                               sink=self.kept.extend, seed=0)  # fmt: skip
        holder = ModelHolder()
        holder.swap(load_classifier(bundle, Manifest.read(bundle), providers=["CPUExecutionProvider"]))
        self.server = InferenceServer(config=HttpConfig(port=0, max_body_bytes=4096), holder=holder,
                                      model_name="intents", on_result=lambda v, ok: self.results.append((v, ok)),
                                      sampler=self.sampler)  # fmt: skip
        self.port = self.server.address[1]
        self.client = triton.InferenceServerClient(url=f"127.0.0.1:{self.port}")

    def failures(self) -> list[tuple[int, bool]]:
        return [r for r in self.results if not r[1]]

    def successes(self, count: int, timeout_s: float = 5.0) -> list[tuple[int, bool]]:
        """The successes, once ``count`` are in (the service counts one on the loop's turn after its reply)."""
        deadline = time.monotonic() + timeout_s
        while len([r for r in self.results if r[1]]) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return [r for r in self.results if r[1]]


@pytest.fixture
def served(bundle: Path) -> Iterator[Served]:
    s = Served(bundle)
    s.server.start()
    try:
        yield s
    finally:
        s.client.close()
        s.server.stop()


def _infer_inputs(feeds: dict[str, np.ndarray[Any, Any]], *, binary: bool) -> list[triton.InferInput]:
    inputs = []
    for name, array in feeds.items():
        tensor = triton.InferInput(name, list(array.shape), "FP32" if array.dtype == np.float32 else "INT64")
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    return inputs


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_gets_every_output_as_onnxruntime_gives_it(bundle: Path, served: Served, binary: bool) -> None:
    client = served.client
    assert client.is_model_ready("intents")
    metadata = client.get_model_metadata("intents")
    assert metadata["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 4]},
                                  {"name": "offsets", "datatype": "INT64", "shape": [-1, 3]}]  # fmt: skip
    assert metadata["outputs"] == [{"name": "scores", "datatype": "FP32", "shape": [-1, 3]},
                                   {"name": "best", "datatype": "INT64", "shape": [-1]}]  # fmt: skip
    assert metadata["parameters"]["task"] == "tensor"
    config = client.get_model_config("intents")
    assert config["max_batch_size"] == 0 and "dynamic_batching" not in config
    assert config["input"][1] == {"name": "offsets", "data_type": "TYPE_INT64", "dims": [-1, 3]}
    for batch in (1, 5):
        feeds = example_feeds(batch, seed=batch)
        expected = reference(bundle / "model.onnx", feeds)
        outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in ("scores", "best")]
        result = client.infer("intents", _infer_inputs(feeds, binary=binary), outputs=outputs, request_id="r")
        scores, best = result.as_numpy("scores"), result.as_numpy("best")
        assert scores.dtype == np.float32 and best.dtype == np.int64
        assert np.array_equal(scores, expected["scores"]) and np.array_equal(best, expected["best"])
        assert result.get_response()["id"] == "r"
    only = client.infer("intents", _infer_inputs(example_feeds(2), binary=binary),
                        outputs=[triton.InferRequestedOutput("best", binary_data=binary)])  # fmt: skip
    assert [o["name"] for o in only.get_response()["outputs"]] == ["best"]
    assert served.successes(3) == [(3, True)] * 3 and served.failures() == []


def _raw(port: int, body: dict[str, Any], binary: bytes = b"") -> tuple[int, Any]:
    import http.client

    head = json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}
    conn.request("POST", "/v2/models/intents/infer", body=head + binary, headers=headers if binary else {})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, json.loads(data)


def _tensor(name: str, datatype: str, shape: list[int], data: Any) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


GOOD_OFFSETS = _tensor("offsets", "INT64", [1, 3], [0, 1, 2])


@pytest.mark.parametrize(
    ("body", "binary", "message"),
    [
        ({"inputs": [_tensor("features", "FP32", [1, 4], [1, 2, 3, 4])]}, b"", "missing input(s) ['offsets']"),
        ({"inputs": [_tensor("feature", "FP32", [1, 4], [1, 2, 3, 4]), GOOD_OFFSETS]}, b"",
         "unknown input(s) ['feature']"),
        ({"inputs": [_tensor("features", "FP16", [1, 4], [1, 2, 3, 4]), GOOD_OFFSETS]}, b"",
         "input 'features' is FP16; the model takes FP32"),
        ({"inputs": [_tensor("features", "STRING", [1, 4], [1, 2, 3, 4]), GOOD_OFFSETS]}, b"",
         "datatype STRING is not one of FP32"),
        ({"inputs": [_tensor("features", "FP32", [1, 2, 2], [1, 2, 3, 4]), GOOD_OFFSETS]}, b"",
         "input 'features' has shape [1, 2, 2]; the model takes [-1, 4] (rank 2)"),
        ({"inputs": [_tensor("features", "FP32", [1, 4], [1, 2, 3]), GOOD_OFFSETS]}, b"",
         "input 'features': shape [1, 4] needs 4 values, got 3"),
        ({"inputs": [_tensor("features", "FP32", [1, 4], [[1, 2], [3, 4], [5, 6]]), GOOD_OFFSETS]}, b"",
         "needs 4 values, got 6"),
        ({"inputs": [_tensor("features", "FP32", [1000000, 4], []), GOOD_OFFSETS]}, b"",
         "input 'features': shape [1000000, 4] needs 4000000 values, got 0"),
        ({"inputs": [_tensor("features", "FP32", [0, 4], []), _tensor("offsets", "INT64", [0, 3], [])]}, b"",
         "input 'features' has shape [0, 4]: it is empty"),
        ({"inputs": [{"datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}, GOOD_OFFSETS]}, b"",
         "every input must be an object with a unique name"),
        ({"inputs": [_tensor("features", "FP32", [1, 4], [1, 2, 3, 4]),
                     _tensor("offsets", "INT64", [1, 3], [0, 1.5, 2])]}, b"",
         "input 'offsets' data must hold integers for INT64, not floats"),
        ({"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4], "parameters": {"binary_data_size": 12}},
                     GOOD_OFFSETS]}, struct.pack("<3f", 1, 2, 3),
         "input 'features': shape [1, 4] of FP32 needs 16 bytes, binary_data_size is 12"),
        ({"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4], "parameters": {"binary_data_size": 16}},
                     GOOD_OFFSETS]}, struct.pack("<5f", 1, 2, 3, 4, 5), "4 bytes of binary data belong to no input"),
        ({"inputs": [_tensor("features", "FP32", [1, 4], [1, 2, 3, 4]), GOOD_OFFSETS],
          "outputs": [{"name": "label"}]}, b"", "unknown output(s) ['label']; this model has scores, best"),
        ({"inputs": [_tensor("features", "FP32", [1, 4], [1, 2, 3, 4]), GOOD_OFFSETS],
          "outputs": [{"name": "scores", "parameters": {"classification": 2}}]}, b"",
         "classification is for classifier outputs"),
    ],
    ids=["missing", "unknown", "dtype", "not-a-dtype", "rank", "count", "nested-count", "no-data", "empty",
         "no-name", "json-value", "binary-short", "binary-extra", "output-name", "classification"],
)  # fmt: skip
def test_bad_requests_are_4xx_and_never_count_against_the_model(
    served: Served, body: dict[str, Any], binary: bytes, message: str
) -> None:
    status, reply = _raw(served.port, body, binary)
    assert status == 400, reply
    assert message in reply["error"]
    assert served.results == [] and served.server.service.stats.fail_count == 0


def test_tensors_past_the_body_limit_are_413(served: Served) -> None:
    rows = 150  # 150x3 int64 = 3,600 bytes + 2,400 of features: over the 4,096-byte limit, as tensors only
    body = {"inputs": [_tensor("features", "FP32", [rows, 4], [0] * rows * 4),
                       _tensor("offsets", "INT64", [rows, 3], [0] * rows * 3)]}  # fmt: skip
    assert len(json.dumps(body)) < 4096
    status, reply = _raw(served.port, body)
    assert status == 413 and "the limit is 4096" in reply["error"], reply
    assert served.results == []


def test_an_onnxruntime_failure_on_valid_input_is_the_models_500(served: Served) -> None:
    body = {
        "inputs": [_tensor("features", "FP32", [1, 4], [1, 2, 3, 4]), _tensor("offsets", "INT64", [1, 3], [0, 1, 9])]
    }  # valid INT64; the model's table has 4 rows
    status, reply = _raw(served.port, body)
    assert status == 500 and reply["error"].startswith("inference failed:"), reply
    assert served.failures() == [(3, False)]  # counted against v3: the watch window sees it
    assert served.server.service.stats.fail_count == 1


def test_v1_predict_takes_named_nested_lists_and_nothing_is_sampled(bundle: Path, served: Served) -> None:
    status, reply = http_json(
        served.port, "POST", "/v1/predict", {"inputs": {"features": FEATURES, "offsets": OFFSETS}}
    )
    assert status == 200, reply
    expected = reference(bundle / "model.onnx", {"features": np.asarray(FEATURES, np.float32),
                                                  "offsets": np.asarray(OFFSETS, np.int64)})  # fmt: skip
    (prediction,) = reply["predictions"]
    assert prediction == {"outputs": {"scores": expected["scores"].tolist(), "best": expected["best"].tolist()}}
    assert reply["version"] == 3
    status, reply = http_json(served.port, "POST", "/v1/predict",
                              {"inputs": {"features": FEATURES, "offsets": OFFSETS}, "top_k": 1})  # fmt: skip
    assert (status, reply["error"]) == (400, '"top_k" is for classifiers; this model answers tensors')
    status, reply = http_json(served.port, "POST", "/v1/predict", {"texts": ["hello"]})
    assert (status, reply["error"]) == (400, 'body must be a JSON object with an "inputs" object')
    status, reply = http_json(served.port, "POST", "/v1/predict", {"inputs": [FEATURES]})
    assert status == 400 and reply["error"].startswith('"inputs" must be an object of the model\'s input names')
    status, reply = http_json(served.port, "POST", "/v1/predict", {"inputs": {"features": FEATURES}})
    assert (status, reply["error"]) == (400, "missing input(s) ['offsets']; this model takes 'features', 'offsets'")
    # the sampler (random_rate 1: it would keep every classifier prediction) never saw a tensor request
    assert served.sampler.remembered == (0, 0) and served.kept == []
    assert served.failures() == []


def test_a_v1_reply_is_json_even_for_non_finite_outputs() -> None:
    outputs = TensorOutputs({"y": np.asarray([[1.5, np.nan], [np.inf, -2.0]], np.float32),
                             "n": np.asarray([3, 4], np.int64), "ok": np.asarray(True)})  # fmt: skip
    (reply,) = task_for("tensor").reply([outputs], ["ignored-id"], top_k=None)
    assert reply == {"outputs": {"y": [[1.5, None], [None, -2.0]], "n": [3, 4], "ok": True}}
    json.dumps(reply, allow_nan=False)


def test_the_batcher_runs_each_request_with_its_own_shapes(bundle: Path, ranker: TensorModel) -> None:
    holder = ModelHolder()
    holder.swap(ranker)
    batches: list[int] = []
    batcher = Batcher(model=holder.get, max_batch=8, max_delay_ms=0, queue_size=8, on_batch=batches.append)
    task = task_for("tensor")
    requests = [example_feeds(batch, seed=batch) for batch in (1, 4, 2)]
    futures = [batcher.submit(task.request_items(r)) for r in requests]  # queued before the worker starts
    failing = {"features": np.zeros((1, 4), np.float32), "offsets": np.asarray([[7, 0, 0]], np.int64)}
    futures.insert(1, batcher.submit([failing]))
    batcher.start()
    try:
        outcomes = [future.exception(timeout=10) or future.result(timeout=10) for future in futures]
    finally:
        batcher.stop()
    assert batches[0] == 4  # one pass over the four queued requests; it failed, so each ran again alone
    assert isinstance(outcomes[1], ModelFailure) and outcomes[1].version == 3
    for request, outcome in zip(requests, [outcomes[0], *outcomes[2:]], strict=True):
        assert isinstance(outcome, tuple)
        version, (result,) = outcome
        assert version == 3 and isinstance(result, TensorOutputs)
        expected = reference(bundle / "model.onnx", request)
        assert all(np.array_equal(result.outputs[name], expected[name]) for name in ("scores", "best"))


def test_concurrent_tensor_requests_over_http_each_get_their_own_outputs(bundle: Path, served: Served) -> None:
    answers: dict[int, Any] = {}

    def ask(batch: int) -> None:
        feeds = example_feeds(batch, seed=10 + batch)
        body = {"inputs": {name: array.tolist() for name, array in feeds.items()}}
        answers[batch] = (feeds, http_json(served.port, "POST", "/v1/predict", body))

    threads = [threading.Thread(target=ask, args=(batch,)) for batch in range(1, 7)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert sorted(answers) == list(range(1, 7))
    for feeds, (status, reply) in answers.values():
        assert status == 200, reply
        expected = reference(bundle / "model.onnx", feeds)
        assert reply["predictions"][0]["outputs"]["best"] == expected["best"].tolist()
        assert np.array_equal(np.asarray(reply["predictions"][0]["outputs"]["scores"], np.float32), expected["scores"])
