"""The image family: ``cloud-train train --family image`` on an image folder or a table of paths,
the model's own image processor as the bundle's preprocessing, augmentation, the text family's
metrics, early stopping and class weights, export through optimum with static int8 and fp16
behind the gates, and ``cloud-train evaluate`` on images.

The models are a tiny ResNet and a tiny ViT built from their transformers configs (random
weights, nothing downloaded, see ``tests/imagemodels.py``); the images are rendered shapes."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from cloud_trainer.cli import main
from cloud_trainer.errors import CloudTrainError, DataError
from cloud_trainer.releases.registry import Registry
from cloud_trainer.training.families import family, family_of_run, names
from cloud_trainer.training.images.data import load_images, split_images
from cloud_trainer.training.images.preprocessing import (
    Augmentation,
    augmented,
    decode,
    pixel_batch,
    preprocessing_from_processor,
    random_resized_box,
)
from cloud_trainer.training.images.runs import export_image_run, train_image_run
from cloud_trainer.training.images.train import ImageTrainConfig
from edge_agent.protocol import ImagePreprocessing, Lineage, Manifest
from edge_agent.protocol.samples import SampleBatch, SampleRecord
from edge_agent.runtime import ImageClassifier
from export.bundle import stage_bundle
from export.errors import AccuracyGateFailed
from tests.imagemodels import SHAPES, png_bytes, render_shape, save_tiny_resnet, save_tiny_vit, write_shapes

LENIENT_GATE = {"max_accuracy_drop": 100.0, "max_f1_drop": 1.0}
"""A 15-image validation split cannot judge int8 (one flipped image is 6.7 points): the gate's
verdicts are tested on their own in tests/export/test_gates.py and by the negative allowance below."""


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """Two intra-op threads on two cores shared with other jobs spin against each other (6 steps of
    the tiny ResNet: 5 s instead of 0.04 s); one thread keeps these tests fast and their timing honest."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("shapes") / "images", per_class=25)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {"resnet": save_tiny_resnet(root / "resnet"), "vit": save_tiny_vit(root / "vit")}


def quick(base: Path, **overrides: Any) -> ImageTrainConfig:
    settings: dict[str, Any] = {"base_model": str(base), "epochs": 3.0, "learning_rate": 3e-3,
                                "head_learning_rate": 3e-3, "warmup_ratio": 0.0, "batch_size": 8,
                                "min_crop_scale": 0.5, "patience": 0, "progress": False}  # fmt: skip
    return ImageTrainConfig(**{**settings, **overrides})


# -- the family registry --------------------------------------------------------------------------
def test_families_are_registered_and_runs_find_theirs(tmp_path: Path) -> None:
    assert names() == ["text", "digits", "image"]
    assert (family("image").inputs, family("image").cpu_quantization) == ("images", "static-int8")
    with pytest.raises(CloudTrainError, match="unknown family 'audio'; known: text, digits, image"):
        family("audio")
    legacy_text, digits, image, alien = (tmp_path / name for name in ("text", "digits", "image", "alien"))
    for run, info in ((legacy_text, {"labels": ["a"]}), (digits, {"family": "digits"}), (image, {"family": "image"}),
                      (alien, {"family": "audio"})):  # fmt: skip
        run.mkdir()
        (run / "run.json").write_text(json.dumps(info))
    (tmp_path / "old-digits" / "checkpoint").mkdir(parents=True)
    (tmp_path / "old-digits" / "run.json").write_text("{}")
    (tmp_path / "old-digits" / "checkpoint" / "model.pt").write_bytes(b"")
    assert [family_of_run(r).name for r in (legacy_text, digits, image, tmp_path / "old-digits")] == [
        "text", "digits", "image", "digits",
    ]  # fmt: skip
    with pytest.raises(DataError, match="a run of family 'audio', which is not registered"):
        family_of_run(alien)
    with pytest.raises(DataError, match=r"has no run\.json"):
        family_of_run(tmp_path)


# -- data -----------------------------------------------------------------------------------------
def test_an_image_folder_and_tables_of_relative_paths_load_alike(tmp_path: Path, shapes: Path) -> None:
    folder = load_images(shapes)
    assert len(folder) == 75 and folder.label_names == list(SHAPES)
    rows = [(p.relative_to(shapes.parent).as_posix(), label) for p, label in zip(folder.paths, folder.labels,
                                                                                 strict=True)]  # fmt: skip
    table = shapes.parent / "index.csv"
    table.write_text("path,kind\n" + "".join(f"{p},{label}\n" for p, label in rows))
    from_csv = load_images(table, image_column="path", label_column="kind")
    assert (from_csv.paths, from_csv.labels) == (folder.paths, folder.labels)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"image": [p for p, _ in rows], "label": [x for _, x in rows]}), shapes.parent / "i.parquet"
    )
    assert load_images(shapes.parent / "i.parquet").paths == folder.paths
    train, val = split_images(folder, val_fraction=0.2, seed=42)
    assert (len(train), len(val)) == (60, 15)
    assert sorted(val.labels) == sorted(SHAPES * 5)  # stratified
    assert set(train.paths).isdisjoint(val.paths)


def test_bad_image_data_is_named(tmp_path: Path, shapes: Path) -> None:
    table = tmp_path / "t.csv"
    ok = tmp_path / "ok.png"
    ok.write_bytes(png_bytes(render_shape("square", random.Random(0))))
    table.write_text("image,label\nok.png,square\nnope.png,circle\n")
    with pytest.raises(DataError, match=r"image .*nope\.png does not exist"):
        load_images(table)
    (tmp_path / "fake.png").write_text("not a png")
    table.write_text("image,label\nok.png,square\nfake.png,circle\n")
    with pytest.raises(DataError, match=r"fake\.png is not a readable JPEG or PNG"):
        load_images(table)
    table.write_text("file,label\nx.png,a\n")
    with pytest.raises(DataError, match=r"has no column 'image' .*--image-column"):
        load_images(table)
    (tmp_path / "one" / "only").mkdir(parents=True)
    (tmp_path / "one" / "only" / "a.png").write_bytes(png_bytes(render_shape("circle", random.Random(0))))
    with pytest.raises(DataError, match="has only one label"):
        load_images(tmp_path / "one")
    with pytest.raises(DataError, match="has no sub-folders"):
        load_images(tmp_path / "one" / "only")


# -- preprocessing --------------------------------------------------------------------------------
def test_the_bundle_preprocessing_is_the_image_processors() -> None:
    from transformers import ConvNextImageProcessor, DeiTImageProcessor, MobileNetV2ImageProcessor, ViTImageProcessor

    def pre(processor: Any) -> tuple[dict[str, Any], list[str]]:
        found, notes = preprocessing_from_processor(processor)
        return found.model_dump(), notes

    resnet, notes = pre(ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875))
    assert (resnet["resize"], resnet["height"], resnet["width"], notes) == (256, 224, 224, [])
    assert resnet["mean"] == [0.5, 0.5, 0.5] and resnet["scale"] == pytest.approx(1 / 255)
    large, _ = pre(ConvNextImageProcessor(size={"shortest_edge": 384}))
    assert (large.get("resize"), large["height"]) == (None, 384)  # ConvNeXt warps at 384 and above
    vit, _ = pre(ViTImageProcessor(size={"height": 32, "width": 48}, image_mean=[0.1, 0.2, 0.3], resample=3))
    assert (vit.get("resize"), vit["height"], vit["width"], vit["mean"], vit["resample"]) == (
        None, 32, 48, [0.1, 0.2, 0.3], "bicubic",
    )  # fmt: skip
    mobilenet, notes = pre(MobileNetV2ImageProcessor())
    assert (mobilenet["resize"], mobilenet["height"], notes) == (256, 224, [])
    deit, notes = pre(DeiTImageProcessor())
    assert (deit["resize"], deit["height"]) == (256, 224) and "the same for square images" in notes[0]
    lanczos, notes = pre(ViTImageProcessor(resample=1))
    assert lanczos["resample"] == "bicubic" and "lanczos" in notes[0]
    plain, _ = pre(ViTImageProcessor(do_normalize=False, do_rescale=False))
    assert (plain["scale"], plain["mean"], plain["std"]) == (1.0, [0.0] * 3, [1.0] * 3)


def test_training_pixels_are_the_processors_where_the_crop_is_centred_alike() -> None:
    """The device's decode (torchvision's crop offsets, round()) equals the Hugging Face processor's
    output (floor) whenever the margin is even; with an odd margin they differ by a one-pixel shift."""
    from transformers import ConvNextImageProcessor, ViTImageProcessor

    rng = random.Random(1)
    for processor in (ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875),
                      ViTImageProcessor(size={"height": 32, "width": 32})):  # fmt: skip
        pre, _ = preprocessing_from_processor(processor)
        for size in ((40, 52), (97, 61)):  # resized to 36x46 and 57x36 (ConvNeXt): even margins
            image = render_shape("circle", rng, size)
            ours = pixel_batch([decode(png_bytes(image), pre)], pre)
            theirs = processor(images=image, return_tensors="np")["pixel_values"]
            assert ours.shape == theirs.shape == (1, 3, 32, 32)
            assert np.abs(ours - theirs).max() < 1e-5


def mean_colour_bundle(bundle: Path, pre: ImagePreprocessing) -> ImageClassifier:
    """A bundle whose three logits are the mean of each channel (labels: the shapes), served by the device runtime."""
    nchw = pre.layout == "NCHW"
    dims = ["batch", 3, pre.height, pre.width] if nchw else ["batch", pre.height, pre.width, 3]
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["pixel_values"], ["logits"], axes=[2, 3] if nchw else [1, 2], keepdims=0)],
        "mean", [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    bundle.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(bundle.parent / "mean.onnx"))
    manifest = stage_bundle(bundle, model_file=bundle.parent / "mean.onnx", task="image-classification",
                            preprocessing=pre, model="m", version=1, labels=list(SHAPES), opset=17,
                            quantization="none", lineage=Lineage(base_model="test"))  # fmt: skip
    return ImageClassifier(bundle_dir=bundle, manifest=manifest, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(("layout", "order"), [("NCHW", "RGB"), ("NHWC", "BGR")])
def test_training_normalisation_equals_the_devices_feeds(tmp_path: Path, layout: str, order: str) -> None:
    pre = ImagePreprocessing(height=12, width=16, channels=3, layout=layout, scale=1 / 255, mean=[0.4, 0.5, 0.6],
                             std=[0.2, 0.3, 0.25], resize=18, resample="bicubic", channel_order=order)  # fmt: skip
    device = mean_colour_bundle(tmp_path / "b", pre)
    rng = random.Random(3)
    pngs = [png_bytes(render_shape(shape, rng, (33, 21))) for shape in SHAPES]
    (fed,) = device.feeds(device.prepare(pngs)).values()
    assert np.array_equal(pixel_batch([decode(p, pre) for p in pngs], pre), fed)


def test_random_resized_crops_follow_torchvision(tmp_path: Path) -> None:
    rng = random.Random(0)
    aug = Augmentation(min_crop_scale=0.3)
    for _ in range(200):
        left, top, right, bottom = random_resized_box(60, 40, aug, rng)
        assert 0 <= left < right <= 60 and 0 <= top < bottom <= 40
        area = (right - left) * (bottom - top) / (60 * 40)
        assert 0.25 < area <= 1.0
        assert 3 / 4 - 0.1 < (right - left) / (bottom - top) < 4 / 3 + 0.1
    assert random_resized_box(10, 200, Augmentation(min_crop_scale=1.0), random.Random(0)) == (0, 93, 10, 106)
    pre = ImagePreprocessing(height=16, width=16, channels=3, scale=1 / 255, mean=[0.0] * 3, std=[1.0] * 3, resize=18)
    path = tmp_path / "a.png"
    left_half_white = np.zeros((30, 40, 3), dtype=np.uint8)
    left_half_white[:, :20] = 255
    Image.fromarray(left_half_white).save(path)
    whole = Augmentation(min_crop_scale=1.0, max_aspect=40 / 30 + 0.01, hflip=True)
    flips = [augmented(path, pre, whole, random.Random(seed)) for seed in range(20)]
    assert all(f.shape == (16, 16, 3) and f.dtype == np.uint8 for f in flips)
    left_bright = [int(f[:, :8].mean() > f[:, 8:].mean()) for f in flips]
    assert 0 < sum(left_bright) < 20  # some flipped, some not
    unflipped = Augmentation(min_crop_scale=1.0, max_aspect=40 / 30 + 0.01, hflip=False)
    assert all(augmented(path, pre, unflipped, random.Random(s))[:, :8].mean() > 200 for s in range(10))
    with pytest.raises(CloudTrainError, match="min crop scale"):
        Augmentation(min_crop_scale=0.0)


# -- training and export --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_fine_tune_export_and_onnx_equals_pytorch(
    tmp_path: Path, shapes: Path, bases: dict[str, Path], kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForImageClassification

    run = tmp_path / "run"
    result = train_image_run(shapes, run, config=quick(bases[kind], progress=True))
    out = capsys.readouterr().out
    assert "data: 60 training images, 15 validation images, 3 classes" in out
    assert "preprocessing from the model's image processor: " in out
    assert len([line for line in out.splitlines() if line.startswith("epoch ")]) == 3  # one validation line each
    info = json.loads((run / "run.json").read_text())
    assert (info["family"], info["labels"], info["base_model"]) == ("image", list(SHAPES), str(bases[kind]))
    pre = ImagePreprocessing.model_validate(info["preprocessing"])
    assert (pre.height, pre.width, pre.resize) == ((32, 32, 36) if kind == "resnet" else (32, 32, None))
    assert (run / "checkpoint" / "preprocessor_config.json").is_file()
    history = result.metrics["history"]
    assert len(history) == 3 and result.metrics["best_epoch"] == 1 + max(
        range(3), key=lambda i: (history[i]["macro_f1"], -i)
    )  # the best epoch (the first of equals) is the one kept
    assert result.metrics["macro_f1"] == pytest.approx(history[result.metrics["best_epoch"] - 1]["macro_f1"])

    exported = export_image_run(run, tmp_path / "bundle", model="shapes", version=1, **LENIENT_GATE)
    manifest = exported.manifest
    assert (manifest.task, manifest.quantization, manifest.preprocessing) == ("image-classification", "static-int8",
                                                                              pre)  # fmt: skip
    assert exported.report["parity_max_abs_diff"] < 1e-4 and exported.report["parity_samples"] == 15
    assert manifest.metrics["export"]["gate"]["split"] == "validation"
    golden = json.loads((tmp_path / "bundle" / "golden.json").read_text())
    assert len(golden["inputs"]) == 8 and all(i.startswith("data:image/") for i in golden["inputs"])
    device = ImageClassifier(bundle_dir=tmp_path / "bundle", manifest=Manifest.read(tmp_path / "bundle"),
                             providers=["CPUExecutionProvider"])  # fmt: skip
    device.health_check(atol=1e-5)  # what a device does before it serves the bundle

    # ONNX (the fp32 export, before quantization) and PyTorch, fed the same pixels, computed here
    # with the Hugging Face processor rather than the project's code
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(run / "checkpoint", use_fast=False)
    images = [Image.open(path).convert("RGB") for path in load_images(run / "val.csv").paths]
    pixels = processor(images=images, return_tensors="np")["pixel_values"].astype(np.float32)
    session = ort.InferenceSession(str(run / "export" / "onnx-fp32" / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {"pixel_values": pixels})[0]
    network = AutoModelForImageClassification.from_pretrained(run / "checkpoint").eval()
    with torch.inference_mode():
        torch_logits = network(pixel_values=torch.from_numpy(pixels)).logits.numpy()
    assert onnx_logits.shape == (15, 3)
    assert np.abs(onnx_logits - torch_logits).max() < 1e-4


def test_fp16_export_and_the_gate_that_refuses(tmp_path: Path, shapes: Path, bases: dict[str, Path]) -> None:
    run = tmp_path / "run"
    train_image_run(shapes, run, config=quick(bases["vit"], epochs=1.0))
    fp16 = export_image_run(run, tmp_path / "fp16", model="shapes", version=1, quantization="fp16", **LENIENT_GATE)
    assert fp16.manifest.quantization == "fp16"
    assert fp16.report["bundle_model_bytes"] < fp16.report["onnx_fp32_bytes"]
    assert onnx.load(str(tmp_path / "fp16" / "model.onnx")).graph.input[0].type.tensor_type.elem_type == (
        TensorProto.FLOAT
    )  # fp32 in and out, fp16 inside
    with pytest.raises(AccuracyGateFailed, match="a negative allowance"):
        export_image_run(run, tmp_path / "refused", model="shapes", version=1, max_accuracy_drop=-1.0)
    assert not (tmp_path / "refused").exists()


def test_class_weights_when_imbalanced_and_early_stopping(
    tmp_path: Path, shapes: Path, bases: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    lopsided = tmp_path / "lopsided"
    for index, path in enumerate(sorted(shapes.rglob("*.*"))):
        if path.parent.name != "square" or index % 5 == 0:
            (lopsided / path.parent.name).mkdir(parents=True, exist_ok=True)
            (lopsided / path.parent.name / path.name).write_bytes(path.read_bytes())
    # a ViT: LayerNorm only, so at rate 0 nothing changes (a ResNet's BatchNorm statistics would)
    config = quick(bases["vit"], epochs=6.0, learning_rate=0.0, head_learning_rate=0.0, patience=2, progress=True)
    result = train_image_run(lopsided, tmp_path / "run", config=config)
    out = capsys.readouterr().out
    assert "class weights balanced: largest class over 1.5x the smallest" in out
    assert result.config.class_weights == "balanced"
    # nothing learns at rate 0: epoch 1 stays the best and training stops 2 epochs later
    assert "stopped early: no better macro_f1 for 2 epochs" in out
    assert (result.metrics["epochs_run"], result.metrics["best_epoch"]) == (3, 1)


def test_frozen_base_trains_only_a_probed_head(
    tmp_path: Path, shapes: Path, bases: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    import torch
    from transformers import AutoModelForImageClassification

    config = quick(bases["vit"], epochs=1.0, freeze_base=True, learning_rate=None, head_learning_rate=None,
                   progress=True)  # fmt: skip
    result = train_image_run(shapes, tmp_path / "run", config=config)
    out = capsys.readouterr().out
    assert "learning rate 0.002: default for a frozen base" in out
    assert "head: fitted on the frozen base's features first (linear probe, train accuracy" in out
    assert result.config.head_init == "probe"
    before = AutoModelForImageClassification.from_pretrained(bases["vit"]).state_dict()
    after = AutoModelForImageClassification.from_pretrained(result.checkpoint).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("classifier."))
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])


# -- the CLI --------------------------------------------------------------------------------------
def test_cli_train_export_evaluate(
    tmp_path: Path, shapes: Path, bases: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    run, registry = tmp_path / "run", str(tmp_path / "registry")
    test_table = tmp_path / "test.csv"
    test_table.write_text("file,shape\n" + "".join(f"{p},{p.parent.name}\n" for p in sorted(shapes.rglob("*.png"))))
    code = main(["train", "--family", "image", "--data", str(shapes), "--base-model", str(bases["resnet"]),
                 "--out", str(run), "--epochs", "2", "--learning-rate", "3e-3", "--min-crop-scale", "0.5",
                 "--no-hflip", "--test-data", str(test_table), "--image-column", "file", "--label-column",
                 "shape"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "augmentation: random resized crops (0.5 to 1 of the area, aspect 3/4 to 4/3); validation" in out
    assert "\nvalidation split (15 images, best epoch" in out
    assert f"test split (57 examples from {test_table}, never trained on)" in out  # every third image is a JPEG
    assert "ms per image (prediction only)" in out
    assert json.loads((run / "test_metrics.json").read_text())["kind"] == "run"

    assert main(["export", "--run", str(run), "--model", "shapes", "--registry", registry,
                 "--max-accuracy-drop", "100", "--max-f1-drop", "1"]) == 0  # fmt: skip
    assert "registered shapes:1" in capsys.readouterr().out
    manifest = Registry(Path(registry)).verified("shapes").manifest
    assert manifest.quantization == "static-int8"  # the image family's CPU default
    assert main(["evaluate", "shapes:1", "--data", str(run / "val.csv"), "--registry", registry, "--json", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["kind"], report["examples"], report["quantization"]) == ("registry", 15, "static-int8")
    # the device's labels on the validation split: what the export measured through the same runtime
    assert report["accuracy"] == pytest.approx(manifest.metrics["bundle"]["accuracy"])
    assert report["latency_ms_per_image"] > 0 and "latency_ms_per_text" not in report
    assert main(["evaluate", str(run), "--data", str(shapes), "--registry", registry]) == 0
    assert "75 examples" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-length", "32"], "error: --max-length: not an option of the image family"),
        (
            ["--include-samples", "nothing", "--base-model", "x", "--samples-store", "{store}"],
            "error: the sample store has no labelled image samples of model 'nothing'",
        ),
        ([], "error: the image family needs --base-model"),
    ],
    ids=["text-flag", "no-samples", "no-base"],
)
def test_cli_refuses_what_the_image_family_cannot_do(
    tmp_path: Path, shapes: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    argv = [arg.replace("{store}", str(tmp_path / "store")) for arg in argv]
    code = main(["train", "--family", "image", "--data", str(shapes), "--out", str(tmp_path / "r"), *argv])
    assert code == 2
    assert capsys.readouterr().err.startswith(message)


def _image_record(model: str, data: bytes, number: int) -> SampleRecord:
    """A kept image sample as a device uploads it: the bytes it was sent, as a ``data:`` URL."""
    from datetime import datetime, timezone

    from edge_agent.runtime.imagecodec import data_url

    mime = "image/png" if data.startswith(b"\x89PNG") else "image/jpeg"
    prediction_id = f"{number:032x}"
    return SampleRecord(id=prediction_id, prediction_id=prediction_id, device="cam-1", fleet="f", model=model,
                        version=1, created_at=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                        image=data_url(data, mime), predicted="circle", score=0.5,
                        scores={"circle": 0.5, "square": 0.5}, reasons=["random"])  # fmt: skip


def test_include_samples_adds_labelled_fleet_images_to_the_training_split(
    tmp_path: Path, shapes: Path, bases: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    import hashlib
    import io

    from cloud_trainer.samples.store import SampleStore

    rng = random.Random(7)
    jpeg = io.BytesIO()
    render_shape("square", rng).save(jpeg, format="JPEG", quality=90)
    labelled = {
        "circle": png_bytes(render_shape("circle", rng)),
        "square": jpeg.getvalue(),
        "star": png_bytes(render_shape("triangle", rng, (40, 52))),  # a label the data set does not have
    }
    duplicate = (shapes / "circle" / "0.png").read_bytes()  # the very bytes of an image in the data set
    store = SampleStore(tmp_path / "store")
    records = [_image_record("shapes", data, n) for n, data in enumerate([*labelled.values(), duplicate])]
    unlabelled = _image_record("shapes", png_bytes(render_shape("square", rng)), 10)
    elsewhere = _image_record("other", png_bytes(render_shape("circle", rng)), 11)
    batch = SampleBatch(device="cam-1", fleet="f", sent_at=records[0].created_at,
                        records=[*records, unlabelled, elsewhere])  # fmt: skip
    assert store.add_batch(batch).new_records == 6
    answers = [*labelled, "circle"]
    assert store.set_labels([(r.prediction_id, label) for r, label in zip(records, answers, strict=True)]
                            + [(elsewhere.prediction_id, "circle")]) == 5  # fmt: skip
    store.close()

    run, registry = tmp_path / "run", str(tmp_path / "registry")
    code = main(["train", "--family", "image", "--data", str(shapes), "--base-model", str(bases["resnet"]),
                 "--out", str(run), "--epochs", "1", "--max-steps", "2", "--no-augment", "--include-samples",
                 "shapes", "--samples-store", str(tmp_path / "store")])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert ("fleet samples: 4 labelled images, 3 added to the training split, 1 already in the data "
            "(same bytes); new labels: star") in out  # fmt: skip

    added = sorted(f"{hashlib.sha256(data).hexdigest()} {label}" for label, data in labelled.items())
    info = json.loads((run / "run.json").read_text())
    assert info["samples"] == {"labelled": 4, "added": 3, "duplicates_skipped": 1, "new_labels": ["star"],
                               "sha256": hashlib.sha256("\n".join(added).encode()).hexdigest()}  # fmt: skip
    assert info["labels"] == ["circle", "square", "star", "triangle"]
    train, val = load_images(run / "train.csv"), load_images(run / "val.csv")
    own_train, own_val = split_images(load_images(shapes), val_fraction=0.2, seed=42)
    assert (val.paths, val.labels) == (own_val.paths, own_val.labels)  # the validation split stays the data's own
    assert train.paths[: len(own_train)] == own_train.paths
    from_fleet = list(zip(train.paths[len(own_train) :], train.labels[len(own_train) :], strict=True))
    assert sorted((label, path.read_bytes()) for path, label in from_fleet) == sorted(
        (label, data) for label, data in labelled.items()
    )  # fmt: skip
    assert all(path.parent.parent == run / "samples" for path, _ in from_fleet)

    assert main(["export", "--run", str(run), "--model", "shapes", "--quantize", "none",
                 "--registry", registry]) == 0  # fmt: skip
    lineage = Registry(Path(registry)).verified("shapes").manifest.lineage
    assert lineage.samples == info["samples"]
    assert lineage.dataset_sha256 == info["dataset_sha256"]  # the data set's own hash, samples beside it


def test_cli_refuses_foreign_flags_for_digits_and_dynamic_int8_for_images(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "--family", "digits", "--out", str(tmp_path / "d"), "--data", "x.csv"]) == 2
    assert capsys.readouterr().err.strip() == "error: --data: not an option of the digits family"
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"family": "image"}))
    assert main(["export", "--run", str(run), "--quantize", "dynamic-int8", "--registry", str(tmp_path)]) == 2
    assert "error: --quantize dynamic-int8: the image family ships static-int8, fp16, none" in capsys.readouterr().err


def test_evaluate_names_an_image_the_device_cannot_decode(tmp_path: Path) -> None:
    from cloud_trainer.training.evaluate import evaluate_file

    pre = ImagePreprocessing(height=12, width=16, channels=3, scale=1 / 255, mean=[0.5] * 3, std=[0.5] * 3)
    mean_colour_bundle(tmp_path / "bundle", pre)
    folder = tmp_path / "images"
    (folder / "circle").mkdir(parents=True)
    (folder / "square").mkdir()
    png = png_bytes(render_shape("circle", random.Random(0)))
    (folder / "circle" / "ok.png").write_bytes(png)
    (folder / "square" / "cut.png").write_bytes(png[:80])  # a readable header, the pixels cut off
    with pytest.raises(DataError, match=r"test inputs 0 to 1: images\[1\] is truncated or corrupt \(PNG\)"):
        evaluate_file(str(tmp_path / "bundle"), folder, registry_root=tmp_path)
    (folder / "square" / "cut.png").write_bytes(png)
    report = evaluate_file(str(tmp_path / "bundle"), folder, registry_root=tmp_path)
    assert (report["kind"], report["examples"], report["data"]) == ("bundle", 2, str(folder))
