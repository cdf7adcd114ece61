"""``cloud-train import``: an existing image classifier (an ONNX file, or a PyTorch module exported
here) checked with onnx.checker and onnxruntime, golden vectors recorded from synthetic PNGs,
registered, and (end to end) pushed to an agent that serves PNGs with PyTorch's probabilities.

The network is a ResNet built from transformers' ``ResNetConfig`` with random weights (nothing is
downloaded), a few thousand parameters at 32x32, so everything runs in seconds. No torchvision."""

from __future__ import annotations

import base64
import io
import json
import struct
import textwrap
import urllib.request
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from cloud_trainer.cli import main
from cloud_trainer.demo.localbroker import LocalBroker
from cloud_trainer.releases.publish import push_bundle
from cloud_trainer.releases.registry import Registry
from cloud_trainer.training.importer import ImportRequest, ModelImportError, import_model
from edge_agent.protocol import ImagePreprocessing
from edge_agent.runtime import ImageClassifier
from tests.conftest import AgentProcess, Keys, http_json

LABELS = ["cat", "dog", "bird"]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
PRE = ImagePreprocessing(height=32, width=32, channels=3, resize=36, scale=1 / 255, mean=MEAN, std=STD)
FACTORY = """
import torch
from transformers import ResNetConfig, ResNetForImageClassification


def build():
    torch.manual_seed(0)
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                          layer_type="basic", num_labels=3)
    return ResNetForImageClassification(config)
"""


@pytest.fixture
def tiny_resnet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """``tiny_resnet_factory:build``, importable: a random-init transformers ResNet."""
    (tmp_path / "tiny_resnet_factory.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "tiny_resnet_factory:build"


@pytest.fixture
def labels_file(tmp_path: Path) -> Path:
    path = tmp_path / "labels.txt"
    path.write_text("\n".join(LABELS) + "\n")
    return path


def torch_network(reference: str) -> Any:
    from cloud_trainer.training.importer import load_factory

    return load_factory(reference)().eval()


def torch_probabilities(network: Any, png: bytes) -> np.ndarray[Any, Any]:
    """PyTorch's softmax for ``png``, preprocessed here as torchvision would: Resize(36), CenterCrop(32),
    ToTensor, Normalize (written out with Pillow and numpy, not the agent's code)."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    width, height = image.size
    short = min(width, height)
    size = (36, int(36 * height / short)) if width <= height else (int(36 * width / short), 36)
    image = image.resize(size, Image.Resampling.BILINEAR)
    left, top = round((size[0] - 32) / 2.0), round((size[1] - 32) / 2.0)
    pixels = np.asarray(image.crop((left, top, left + 32, top + 32)), dtype=np.float32) / 255
    tensor = torch.from_numpy(((pixels - MEAN) / STD).astype(np.float32).transpose(2, 0, 1)[np.newaxis])
    with torch.inference_mode():
        return torch.softmax(network(tensor).logits, dim=-1).numpy()[0]


def make_png(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def export_onnx(path: Path, reference: str, *, batch: str | None = "batch", size: int = 32) -> Path:
    network = torch_network(reference)

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = network

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x).logits  # type: ignore[no-any-return]

    axes = {"pixel_values": {0: batch}, "logits": {0: batch}} if batch else None
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer warnings
        warnings.simplefilter("ignore")
        torch.onnx.export(Logits().eval(), (torch.zeros(1, 3, size, size),), str(path), input_names=["pixel_values"],
                          output_names=["logits"], dynamic_axes=axes, opset_version=17, dynamo=False)  # fmt: skip
    return path


# -- importing ------------------------------------------------------------------------------------
def test_import_a_module_records_golden_pngs_and_parity(tmp_path: Path, tiny_resnet: str) -> None:
    registry = Registry(tmp_path / "registry")
    request = ImportRequest(module=tiny_resnet, labels=LABELS, preprocessing=PRE, model="pets")
    entry = import_model(request, registry=registry)
    manifest = entry.manifest
    assert (entry.ref, manifest.task, manifest.quantization) == ("pets:1", "image-classification", "none")
    assert manifest.preprocessing == PRE
    assert manifest.lineage.base_model == f"module:{tiny_resnet}"
    report = manifest.metrics["import"]
    assert report["onnx_checker"] == "passed"
    assert report["input"]["shape"] == ["batch", "3", "32", "32"]
    assert report["parity_max_abs_diff"] < 1e-4
    golden = json.loads((entry.bundle_dir / "golden.json").read_text())
    assert all(i.startswith("data:image/png;base64,") for i in golden["inputs"])
    assert len(golden["inputs"]) == 4
    served = ImageClassifier(bundle_dir=entry.bundle_dir, manifest=manifest, providers=["CPUExecutionProvider"])
    served.health_check(atol=1e-5)  # what a device does before it serves the bundle
    registry.verified("pets")  # pushable


def test_import_an_onnx_file_from_the_cli(
    tmp_path: Path, tiny_resnet: str, labels_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    onnx_file = export_onnx(tmp_path / "resnet.onnx", tiny_resnet)
    code = main(["import", str(onnx_file), "--labels", str(labels_file), "--model", "pets", "--preset", "imagenet",
                 "--size", "32", "--resize", "36", "--registry", str(tmp_path / "registry")])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "registered pets:1: 3 labels, input ['batch', '3', '32', '32'], none" in out
    entry = Registry(tmp_path / "registry").get("pets")
    assert entry.manifest.preprocessing == PRE
    assert entry.manifest.lineage.base_model == "onnx:resnet.onnx"
    # the size comes from the ONNX input when no flag says it
    code = main(["import", str(onnx_file), "--labels", str(labels_file), "--model", "pets", "--mean", "0.5,0.5,0.5",
                 "--std", "0.5,0.5,0.5", "--registry", str(tmp_path / "registry")])  # fmt: skip
    assert code == 0
    second = Registry(tmp_path / "registry").get("pets", 2).manifest.preprocessing
    assert (second.height, second.width, second.resize, second.mean) == (32, 32, None, [0.5, 0.5, 0.5])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--size", "48"],
            "input 'pixel_values' has shape ['batch', 3, 32, 32] (NCHW), but the declared "
            "preprocessing gives height 48",
        ),
        (["--channels", "L", "--size", "32"], "gives channels 1"),
        (["--size", "32", "--resize", "30"], "resize 30 is smaller than the 32x32 crop"),
        (["--size", "32", "--mean", "0.5,0.5"], "mean and std need one value per channel"),
        (["--size", "32", "--layout", "NHWC"], "(NHWC)"),
    ],
    ids=["size", "channels", "resize", "mean", "layout"],
)
def test_import_refuses_a_preprocessing_the_model_does_not_take(
    tmp_path: Path, tiny_resnet: str, labels_file: Path, capsys: pytest.CaptureFixture[str],
    flags: list[str], message: str,
) -> None:  # fmt: skip
    onnx_file = export_onnx(tmp_path / "resnet.onnx", tiny_resnet)
    code = main(["import", str(onnx_file), "--labels", str(labels_file), "--model", "pets", *flags,
                 "--registry", str(tmp_path / "registry")])  # fmt: skip
    assert code == 2
    assert message in capsys.readouterr().err
    assert Registry(tmp_path / "registry").models() == []


def test_import_refuses_wrong_labels_fixed_batches_and_broken_files(tmp_path: Path, tiny_resnet: str) -> None:
    registry = Registry(tmp_path / "registry")
    good = export_onnx(tmp_path / "resnet.onnx", tiny_resnet)
    four = ImportRequest(onnx_file=good, labels=[*LABELS, "fish"], preprocessing=PRE, model="pets")
    with pytest.raises(ModelImportError, match="output 'logits' has 3 classes, but the labels file has 4 labels"):
        import_model(four, registry=registry)
    fixed = export_onnx(tmp_path / "fixed.onnx", tiny_resnet, batch=None)
    with pytest.raises(ModelImportError, match="fixed batch of 1; the device batches requests"):
        import_model(ImportRequest(onnx_file=fixed, labels=LABELS, preprocessing=PRE, model="pets"), registry=registry)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ModelImportError, match=r"broken\.onnx fails onnx\.checker"):
        import_model(ImportRequest(onnx_file=broken, labels=LABELS, preprocessing=PRE, model="pets"), registry=registry)
    with pytest.raises(ModelImportError, match="cannot import no_such_module"):
        import_model(ImportRequest(module="no_such_module:build", labels=LABELS, preprocessing=PRE, model="pets"),
                     registry=registry)  # fmt: skip
    assert registry.models() == []


def test_cli_validates_flags_and_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ncat\n")
    assert main(["import", "--module", "a:b", "--labels", str(labels), "--model", "m", "--size", "8"]) == 2
    assert "lists 'cat' more than once" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["import", "x.onnx", "--labels", str(labels), "--model", "m", "--scale", "1/0"])
    assert "scale '1/0' is not a number" in capsys.readouterr().err
    labels.write_text("cat\ndog\n")
    assert main(["import", "--labels", str(labels), "--model", "m", "--size", "8"]) == 2
    assert "give either MODEL.onnx or --module" in capsys.readouterr().err


def test_import_quantizes_with_a_labelled_folder_through_the_gate(tmp_path: Path, tiny_resnet: str) -> None:
    folder = tmp_path / "calibration"
    for index in range(12):
        label = LABELS[index % 3]
        (folder / label).mkdir(parents=True, exist_ok=True)
        (folder / label / f"{index}.png").write_bytes(make_png(index))
    request = ImportRequest(module=tiny_resnet, labels=LABELS, preprocessing=PRE, model="pets", calibration=folder,
                            max_accuracy_drop=100.0, max_f1_drop=1.0)  # fmt: skip
    entry = import_model(request, registry=Registry(tmp_path / "registry"))
    manifest = entry.manifest
    assert manifest.quantization == "static-int8"
    gate = manifest.metrics["export"]["gate"]
    assert (gate["variant"], gate["split"], gate["examples"], gate["passed"]) == (
        "static-int8", "calibration-holdout", 8, True
    )  # fmt: skip
    assert manifest.metrics["export"]["calibration_images"] == 4
    assert manifest.lineage.dataset_sha256 is not None
    served = ImageClassifier(bundle_dir=entry.bundle_dir, manifest=manifest, providers=["CPUExecutionProvider"])
    served.health_check(atol=0.02)
    strict = ImportRequest(module=tiny_resnet, labels=LABELS, preprocessing=PRE, model="pets2", calibration=folder,
                           max_accuracy_drop=-1.0)  # fmt: skip
    from export.errors import AccuracyGateFailed

    with pytest.raises(AccuracyGateFailed, match="a negative allowance"):
        import_model(strict, registry=Registry(tmp_path / "registry"))


# -- end to end -----------------------------------------------------------------------------------
def _bomb(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
        + chunk(b"IEND", b"")
    )


def _failures(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    lines = [line for line in text.splitlines() if line.startswith("edge_agent_inference_errors_total")]
    return float(lines[0].split()[-1])


def test_imported_resnet_served_with_pytorchs_probabilities(
    tmp_path: Path, tiny_resnet: str, labels_file: Path, mosquitto: LocalBroker, fleet: str, keys: Keys,
    agent_process: Callable[..., AgentProcess],
) -> None:  # fmt: skip
    onnx_file = export_onnx(tmp_path / "resnet18-tiny.onnx", tiny_resnet)
    registry = tmp_path / "registry"
    assert main(["import", str(onnx_file), "--labels", str(labels_file), "--model", "intents", "--preset",
                 "imagenet", "--size", "32", "--resize", "36", "--registry", str(registry)]) == 0  # fmt: skip
    entry = Registry(registry).verified("intents")
    push_bundle(entry.bundle_dir, host=mosquitto.host, port=mosquitto.port, fleet=fleet, key_path=keys.private)
    agent = agent_process()
    agent.wait_version(1)  # the agent checked the golden PNGs through its own decoder first

    network = torch_network(tiny_resnet)
    pngs = [make_png(seed, size) for seed, size in ((1, (48, 40)), (2, (40, 64)), (3, (36, 36)))]
    body = {"images": ["data:image/png;base64," + base64.b64encode(pngs[0]).decode()]
            + [base64.b64encode(p).decode() for p in pngs[1:]]}  # fmt: skip
    status, reply = http_json(agent.http_port, "POST", "/v1/predict", body)
    assert status == 200, reply
    for png, prediction in zip(pngs, reply["predictions"], strict=True):
        expected = torch_probabilities(network, png)
        served = np.asarray([prediction["scores"][label] for label in LABELS])
        assert np.abs(served - expected).max() < 1e-4, (served, expected)
        assert prediction["label"] == LABELS[int(expected.argmax())]

    status, reply = http_json(agent.http_port, "POST", "/v1/predict", {**body, "top_k": 1})
    assert status == 200 and all(len(p["scores"]) == 1 for p in reply["predictions"])

    before = _failures(agent.http_port)
    corrupt = base64.b64encode(pngs[0][: len(pngs[0]) // 2]).decode()
    status, reply = http_json(agent.http_port, "POST", "/v1/predict", {"images": [corrupt]})
    assert status == 400 and "images[0] is truncated or corrupt (PNG)" in reply["error"], reply
    oversized = base64.b64encode(_bomb(20_000, 20_000)).decode()
    status, reply = http_json(agent.http_port, "POST", "/v1/predict", {"images": [body["images"][1], oversized]})
    assert status == 400 and "images[1]" in reply["error"] and "pixels" in reply["error"], reply
    assert _failures(agent.http_port) == before  # the caller's mistakes never count against the model
    status, ready = http_json(agent.http_port, "GET", "/v2/health/ready")
    assert (status, ready["version"]) == (200, 1)
