"""``cloud-train import --task tensor``: an ONNX model that is not a classifier (tests/tensormodel.py:
FP32 and INT64 in, a MatMul's scores and an ArgMax out) checked with onnx.checker and onnxruntime,
given golden cases (seeded random ones, or ``.npz`` files), registered; then, end to end, pushed to
a real agent process and called through ``tritonclient.http``, ``/v1/predict`` and MQTT 5, with
outputs equal to plain onnxruntime's. Bad names, datatypes and shapes are 400s that leave the new
version active; onnxruntime failing on valid input is a 500 that counts, and rolls it back."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import tritonclient.http as triton
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

from cloud_trainer.cli import main
from cloud_trainer.demo.localbroker import LocalBroker
from cloud_trainer.releases.publish import push_bundle
from cloud_trainer.releases.registry import Registry
from edge_agent.protocol import NoPreprocessing, Topics
from edge_agent.runtime import TensorModel
from tests.conftest import AgentProcess, Keys, StateListener, http_json
from tests.edge_agent.test_mqtt_inference import Requester
from tests.tensormodel import example_feeds, ranker_model, reference


def _tiny(path: Path, nodes: list[Any], inputs: list[Any], outputs: list[Any]) -> Path:
    model = helper.make_model(helper.make_graph(nodes, "tiny", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 17)])  # fmt: skip
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _import(*argv: str) -> int:
    return main(["import", "--task", "tensor", *argv])


# -- importing ------------------------------------------------------------------------------------
def test_import_records_random_golden_cases_through_the_device_runtime(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = ranker_model(tmp_path / "ranker.onnx")
    registry = tmp_path / "registry"
    assert _import(str(source), "--model", "ranker", "--registry", str(registry)) == 0
    out = capsys.readouterr().out
    assert "registered ranker:1: tensor model" in out
    assert "inputs: features FP32 ['batch', 4], offsets INT64 ['batch', 3]" in out
    assert "outputs: scores FP32 ['batch', 3], best INT64 ['batch']" in out
    assert "golden vectors: 2 case(s) from random, seed 0, dynamic axes 1, 2" in out
    entry = Registry(registry).verified("ranker")  # pushable
    manifest = entry.manifest
    assert (manifest.task, manifest.labels, manifest.preprocessing, manifest.quantization) == (
        "tensor", [], NoPreprocessing(), "none"
    )  # fmt: skip
    assert manifest.lineage.base_model == "onnx:ranker.onnx"
    assert manifest.metrics["import"]["onnx_checker"] == "passed"
    golden = json.loads((entry.bundle_dir / "golden.json").read_text())
    assert [case["inputs"]["features"]["shape"] for case in golden["cases"]] == [[1, 4], [2, 4]]
    for case in golden["cases"]:
        feeds = {
            name: np.asarray(t["data"], dtype=t["dtype"]).reshape(t["shape"]) for name, t in case["inputs"].items()
        }
        assert feeds["offsets"].min() >= 0 and feeds["offsets"].max() <= 3  # indices any table takes
        expected = reference(source, feeds)
        for name, record in case["outputs"].items():
            assert record["dtype"] == expected[name].dtype.name
            assert np.array_equal(np.asarray(record["data"], dtype=record["dtype"]).reshape(record["shape"]),
                                  expected[name])  # fmt: skip
    model = TensorModel(bundle_dir=entry.bundle_dir, manifest=manifest, providers=["CPUExecutionProvider"])
    model.health_check(atol=1e-6)  # what a device does before it serves the bundle


def test_golden_inputs_can_come_from_npz_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = ranker_model(tmp_path / "ranker.onnx")
    np.savez(tmp_path / "three.npz", **example_feeds(3))
    registry = str(tmp_path / "registry")
    assert _import(str(source), "--model", "ranker", "--golden-inputs", str(tmp_path / "three.npz"),
                   "--registry", registry) == 0  # fmt: skip
    assert f"golden vectors: 1 case(s) from ['{tmp_path / 'three.npz'}']" in capsys.readouterr().out
    golden = json.loads((Registry(Path(registry)).get("ranker").bundle_dir / "golden.json").read_text())
    (case,) = golden["cases"]
    assert case["inputs"]["features"]["shape"] == [3, 4]
    assert case["inputs"]["features"]["data"] == example_feeds(3)["features"].reshape(-1).tolist()
    feeds = example_feeds(3)
    np.savez(tmp_path / "fp64.npz", features=feeds["features"].astype(np.float64), offsets=feeds["offsets"])
    assert _import(str(source), "--model", "ranker", "--golden-inputs", str(tmp_path / "fp64.npz"),
                   "--registry", registry) == 2  # fmt: skip
    assert (f"golden inputs {tmp_path / 'fp64.npz'}: input 'features' is FP64; the model takes FP32"
            in capsys.readouterr().err)  # fmt: skip
    assert Registry(Path(registry)).versions("ranker") == [1]


def _refusals(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    strings = _tiny(tmp_path / "strings.onnx", [helper.make_node("Identity", ["text"], ["same"])],
                    [helper.make_tensor_value_info("text", TensorProto.STRING, ["n"])],
                    [helper.make_tensor_value_info("same", TensorProto.STRING, ["n"])])  # fmt: skip
    nan = _tiny(tmp_path / "log.onnx", [helper.make_node("Log", ["x"], ["y"])],
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])])  # fmt: skip
    reshape = _tiny(tmp_path / "pairs.onnx",
                    [helper.make_node("Constant", [], ["to"], value=onnx.numpy_helper.from_array(np.array([-1, 2]))),
                     helper.make_node("Reshape", ["x", "to"], ["y"])],
                    [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", 2])])  # fmt: skip
    ranker = str(ranker_model(tmp_path / "ranker.onnx"))
    return {
        "strings": ([str(strings)], "strings.onnx: input 'text' is tensor(string); tensor models carry FP32, FP16"),
        "nan": ([str(nan)], "log.onnx gives NaN or infinite values in output 'y' on random golden case 0 "
                            "(random inputs: give real ones with --golden-inputs FILE.npz)"),
        "onnxruntime": ([str(reshape)], "onnxruntime cannot run pairs.onnx on random golden case 0: "),
        "labels": ([ranker, "--labels", ranker], "--labels: not for --task tensor"),
        "preprocessing": ([ranker, "--preset", "imagenet", "--resample", "nearest"],
                          "--preset, --resample: not for --task tensor"),
        "module": (["--module", "pkg.mod:build"], "--module: not for --task tensor"),
        "no-file": ([], "--task tensor takes an ONNX file"),
        "missing": ([str(tmp_path / "nowhere.onnx")], "does not exist"),
    }  # fmt: skip


@pytest.mark.parametrize(
    "case",
    ["strings", "nan", "onnxruntime", "labels", "preprocessing", "module", "no-file", "missing"],
)
def test_import_refuses_what_a_device_could_not_serve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    argv, message = _refusals(tmp_path)[case]
    assert _import(*argv, "--model", "m", "--registry", str(tmp_path / "registry")) == 2
    assert message in capsys.readouterr().err
    assert Registry(tmp_path / "registry").models() == []


def test_an_import_whose_golden_cases_a_fresh_session_does_not_reproduce_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last check runs the finished bundle as a device would. A model whose outputs change from
    one session to the next (onnxruntime's random ops are seeded per session, so none here) is
    simulated by recording outputs that are off by 1e-3."""
    import export.bundle

    real = export.bundle.write_tensor_golden

    def drifting(bundle_dir: Path, manifest: Any, cases: list[Any], **kwargs: Any) -> Any:
        shifted = [(inputs, {n: a + 1e-3 if a.dtype.kind == "f" else a for n, a in outputs.items()})
                   for inputs, outputs in cases]  # fmt: skip
        return real(bundle_dir, manifest, shifted, **kwargs)

    monkeypatch.setattr(export.bundle, "write_tensor_golden", drifting)
    source = ranker_model(tmp_path / "ranker.onnx")
    assert _import(str(source), "--model", "m", "--registry", str(tmp_path / "registry")) == 2
    err = capsys.readouterr().err
    assert "ranker.onnx does not reproduce its own outputs (is it deterministic?): golden case 0 output 'scores'" in err
    assert Registry(tmp_path / "registry").models() == []


def test_image_flags_keep_their_rules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = str(ranker_model(tmp_path / "ranker.onnx"))
    assert main(["import", source, "--model", "m", "--size", "8"]) == 2
    assert "--labels FILE is required for an image classifier" in capsys.readouterr().err
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\n")
    assert main(["import", source, "--labels", str(labels), "--model", "m", "--golden-inputs", "x.npz"]) == 2
    assert "--golden-inputs: only for --task tensor" in capsys.readouterr().err


# -- end to end -----------------------------------------------------------------------------------
def _failures(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return float(next(line for line in text.splitlines()
                      if line.startswith("edge_agent_inference_errors_total")).split()[-1])  # fmt: skip


def _infer_inputs(feeds: dict[str, np.ndarray[Any, Any]], *, names: tuple[str, str] = ("features", "offsets"),
                  types: tuple[str, str] = ("FP32", "INT64")) -> list[triton.InferInput]:  # fmt: skip
    inputs = []
    for (key, array), name, datatype in zip(feeds.items(), names, types, strict=True):
        assert key in ("features", "offsets")
        tensor = triton.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array.astype(triton.triton_to_np_dtype(datatype)), binary_data=True)
        inputs.append(tensor)
    return inputs


def test_an_imported_tensor_model_served_by_an_agent(
    tmp_path: Path, mosquitto: LocalBroker, fleet: str, keys: Keys, agent_process: Callable[..., AgentProcess],
    state_listener: StateListener,
) -> None:  # fmt: skip
    registry = tmp_path / "registry"
    sources = [ranker_model(tmp_path / f"ranker-v{v}.onnx", seed=v) for v in (1, 2)]
    for source in sources:
        assert _import(str(source), "--model", "intents", "--registry", str(registry)) == 0
    bundles = [Registry(registry).verified("intents", v).bundle_dir for v in (1, 2)]
    push_bundle(bundles[0], host=mosquitto.host, port=mosquitto.port, fleet=fleet, key_path=keys.private)
    agent = agent_process(watch_s=300, min_requests=4, max_error_rate=0.2)
    agent.wait_version(1)  # the golden cases reproduced by the agent's own runtime first
    push_bundle(bundles[1], host=mosquitto.host, port=mosquitto.port, fleet=fleet, key_path=keys.private)
    agent.wait_version(2)
    state_listener.wait_for(
        lambda s: s["online"] and s.get("active_version") == 2 and s.get("update_state") == "active"
    )
    port, v2 = agent.http_port, sources[1]

    client = triton.InferenceServerClient(url=f"127.0.0.1:{port}")
    requester = Requester(mosquitto, Topics(fleet=fleet).device_infer("dev-1"))
    try:
        assert [i["datatype"] for i in client.get_model_metadata("intents")["inputs"]] == ["FP32", "INT64"]
        feeds = example_feeds(5, seed=3)
        result = client.infer("intents", _infer_inputs(feeds))
        expected = reference(v2, feeds)
        assert result.as_numpy("scores").dtype == np.float32 and result.as_numpy("best").dtype == np.int64
        assert np.array_equal(result.as_numpy("scores"), expected["scores"])
        assert np.array_equal(result.as_numpy("best"), expected["best"])

        body = {"inputs": {name: array.tolist() for name, array in feeds.items()}}
        status, reply = http_json(port, "POST", "/v1/predict", body)
        assert (status, reply["version"]) == (200, 2), reply
        assert reply["predictions"][0]["outputs"]["best"] == expected["best"].tolist()
        answer = requester.ask(json.dumps(body).encode(), b"tensors-1")
        assert (answer["status"], answer["version"]) == (200, 2), answer
        assert answer["predictions"][0]["outputs"]["best"] == expected["best"].tolist()
        assert np.array_equal(np.asarray(answer["predictions"][0]["outputs"]["scores"], np.float32), expected["scores"])

        before = _failures(port)
        bad_calls: list[dict[str, Any]] = [
            {"names": ("feature", "offsets")},  # a name the model does not have
            {"types": ("FP64", "INT64")},  # a datatype it does not take
            {"types": ("FP32", "INT32")},
        ]
        for bad in bad_calls:
            with pytest.raises(InferenceServerException) as caught:
                client.infer("intents", _infer_inputs(feeds, **bad))
            assert caught.value.status() == "400", caught.value.message()
        for shapes in ({"features": (5, 3), "offsets": (5, 3)}, {"features": (5, 4), "offsets": (4, 3)}):
            wrong = {name: np.zeros(shape, feeds[name].dtype) for name, shape in shapes.items()}
            with pytest.raises(InferenceServerException) as caught:
                client.infer("intents", _infer_inputs(wrong))
            assert caught.value.status() == "400", caught.value.message()
        refused = requester.ask(json.dumps({"inputs": {"features": [[1, 2, 3, 4]]}}).encode(), b"tensors-2")
        assert (refused["status"], refused["error"]) == (400, "missing input(s) ['offsets']; this model takes "
                                                              "'features', 'offsets'")  # fmt: skip
        assert _failures(port) == before  # the caller's mistakes never count against the model
        status, ready = http_json(port, "GET", "/v2/health/ready")
        assert (status, ready["version"]) == (200, 2)

        assert not [s for s in state_listener.states if s.get("update_state") == "rolled-back"]

        # The watch window is live (3 good requests so far, 4 needed to judge, 20 % allowed): one
        # valid request on which onnxruntime fails (an INT64 offset past the model's table) is a
        # 500 counted against v2, and rolls it back. Any of the seven 400s, counted, would have too.
        failing = {"features": feeds["features"][:1], "offsets": np.asarray([[0, 1, 9]], np.int64)}
        with pytest.raises(InferenceServerException) as caught:
            client.infer("intents", _infer_inputs(failing))
        assert caught.value.status() == "500", caught.value.message()
    finally:
        client.close()
        requester.close()
    state = state_listener.wait_for(lambda s: s.get("update_state") == "rolled-back")
    assert "1 of 4 requests failed" in state["last_error"]
    agent.wait_version(1)
