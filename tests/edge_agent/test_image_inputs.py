"""Images on the device: JPEG and PNG (base64, data URLs, multipart, inference-protocol BYTES) decoded
with Pillow, resized and cropped as the manifest says, every decode failure a 400 naming the
problem, ``top_k``, and sampling that keeps the encoded bytes. A tiny ONNX graph stands in for a
real network (mean colour -> linear layer), so these run in milliseconds and without torch."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import zlib
from http import HTTPStatus
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from edge_agent.config import HttpConfig
from edge_agent.protocol import ImagePreprocessing, Lineage
from edge_agent.protocol.samples import SampleRecord, SamplingRules
from edge_agent.runtime import ImageClassifier, InputError, ModelHolder
from edge_agent.runtime.imagecodec import base64_image, decode_image, resized_size
from edge_agent.sampling import Sampler
from edge_agent.serving import kserve
from edge_agent.serving.service import InferenceService, RequestError
from export.bundle import record_golden, stage_bundle

LABELS = ["red", "green", "blue"]
PRE = ImagePreprocessing(height=16, width=16, channels=3, resize=20, scale=1 / 255,
                         mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])  # fmt: skip


def _mean_colour_model(path: Path) -> None:
    """logits = mean over H, W of each channel, times 4: the channel with the most colour wins."""
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["pixel_values"], ["pooled"], axes=[2, 3], keepdims=0),
            helper.make_node("MatMul", ["pooled", "w"], ["logits"]),
        ],
        "mean_colour",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(np.eye(3, dtype=np.float32) * 4, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def png(array: np.ndarray[Any, Any]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(array: np.ndarray[Any, Any]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def solid(colour: tuple[int, int, int], size: tuple[int, int] = (30, 24)) -> np.ndarray[Any, Any]:
    return np.broadcast_to(np.asarray(colour, dtype=np.uint8), (size[1], size[0], 3)).copy()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` and carries almost nothing: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> ImageClassifier:
    tmp = tmp_path_factory.mktemp("image-model")
    _mean_colour_model(tmp / "model.onnx")
    staged = stage_bundle(
        tmp / "bundle", model_file=tmp / "model.onnx", task="image-classification", preprocessing=PRE,
        model="colours", version=1, labels=LABELS, opset=17, quantization="none", lineage=Lineage(base_model="test"),
    )  # fmt: skip
    golden = ["data:image/png;base64," + b64(png(solid((200, 10, 10)))), solid((0, 0, 250))[:16, :16].tolist()]
    manifest = record_golden(tmp / "bundle", staged, golden, metrics={})
    model = ImageClassifier(bundle_dir=tmp / "bundle", manifest=manifest, providers=["CPUExecutionProvider"])
    model.health_check(atol=1e-5)  # golden vectors hold a data URL and a raw array; both reproduce
    return model


@pytest.fixture
def service(classifier: ImageClassifier) -> InferenceService:
    holder = ModelHolder()
    holder.swap(classifier)
    return InferenceService(limits=HttpConfig(port=0, max_body_bytes=4 << 20), holder=holder, model_name="colours")


# -- decoding -------------------------------------------------------------------------------------
def test_resize_and_crop_follow_torchvision_rules() -> None:
    assert resized_size(30, 24, PRE) == (25, 20)  # shorter side to 20, longer int(20 * 30 / 24)
    assert resized_size(24, 30, PRE) == (20, 25)
    pixels = np.random.default_rng(0).integers(0, 256, size=(24, 30, 3), dtype=np.uint8)
    decoded = decode_image(png(pixels), PRE)
    reference = Image.fromarray(pixels).resize((25, 20), Image.Resampling.BILINEAR)
    left, top = round((25 - 16) / 2.0), round((20 - 16) / 2.0)
    expected = np.asarray(reference.crop((left, top, left + 16, top + 16)))
    assert decoded.pixels.shape == (16, 16, 3)
    assert np.array_equal(decoded.pixels, expected)
    assert (decoded.format, decoded.size) == ("PNG", (30, 24))


def test_grayscale_and_palette_images_are_converted() -> None:
    gray = ImagePreprocessing(height=8, width=8, channels=1, mean=[0.0], std=[1.0])
    assert decode_image(png(solid((90, 90, 90))), gray).pixels.shape == (8, 8, 1)
    palette = Image.fromarray(solid((10, 200, 30))).convert("P")
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG")
    assert decode_image(buffer.getvalue(), PRE).pixels.shape == (16, 16, 3)


def test_png_jpeg_base64_and_data_urls_classify_alike(classifier: ImageClassifier) -> None:
    red = solid((220, 20, 20))
    inputs = [png(red), b64(png(red)), "data:image/png;base64," + b64(png(red)), jpeg(red),
              "data:image/jpeg;base64," + b64(jpeg(red)), red[:16, :16]]  # fmt: skip
    predictions = classifier.predict(inputs)
    assert [p.label for p in predictions] == ["red"] * len(inputs)
    exact = [p.scores["red"] for p in predictions[:3]] + [predictions[5].scores["red"]]
    assert max(exact) - min(exact) < 1e-6  # PNG is lossless: the same pixels as the raw array


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("not base64!", "images[0] is not base64"),
        (b64(b"GIF89a" + b"\0" * 40), "images[0] is not a JPEG or PNG image"),
        ("data:image/gif;base64,R0lGODlh", "images[0] is a data URL of image/gif"),
        (b64(png(solid((1, 2, 3)))[:60]), "images[0] is"),
        (b64(png_header(100_000, 100_000)), "pixels"),
        (b64(png_header(7000, 7000)), "is 7000x7000 pixels; the limit is 40000000 pixels"),
        ("", "images[0] is empty"),
    ],
    ids=["not-base64", "gif", "gif-data-url", "truncated", "bomb", "over-limit", "empty"],
)
def test_every_decode_failure_is_a_400_naming_it(service: InferenceService, item: str, message: str) -> None:
    model = service.model()
    with pytest.raises(RequestError) as caught:
        service.parse_predict(f'{{"images": ["{item}"]}}'.encode(), model)
    assert caught.value.status == HTTPStatus.BAD_REQUEST
    assert message in str(caught.value)


def test_truncated_jpeg_is_refused_not_guessed(classifier: ImageClassifier) -> None:
    data = jpeg(np.random.default_rng(1).integers(0, 256, size=(64, 64, 3)))
    with pytest.raises(InputError, match=r"images\[0\] is truncated or corrupt \(JPEG\)"):
        classifier.prepare([data[: len(data) // 2]])


def test_base64_image_takes_whitespace_and_refuses_other_data_urls() -> None:
    assert base64_image("  " + b64(b"abc") + "\n") == b"abc"
    with pytest.raises(InputError, match="without ;base64"):
        base64_image("data:image/png,abc")


# -- the predict request --------------------------------------------------------------------------
def test_top_k_keeps_the_best_scores_in_order(service: InferenceService) -> None:
    model = service.model()
    body = f'{{"images": ["{b64(png(solid((10, 30, 240))))}"], "top_k": 2}}'.encode()
    parsed = service.parse_predict(body, model)
    assert parsed.top_k == 2
    from edge_agent.serving.service import prediction_dicts

    (prediction,) = prediction_dicts(model.predict(parsed.inputs), None, top_k=parsed.top_k)
    assert list(prediction["scores"]) == ["blue", "green"]
    assert prediction["label"] == "blue"
    (everything,) = prediction_dicts(model.predict(parsed.inputs), None)
    assert set(everything["scores"]) == set(LABELS)
    for bad in ("0", "4", '"two"', "true"):
        with pytest.raises(RequestError, match="top_k"):
            service.parse_predict(f'{{"images": [], "top_k": {bad}}}'.encode(), model)


def test_multipart_form_images(service: InferenceService) -> None:
    boundary = "xyzBOUNDARY"
    disposition = b"Content-Disposition: form-data; "
    parts = [
        (disposition + b'name="image"; filename="a.png"\r\nContent-Type: image/png', png(solid((0, 250, 0)))),
        (disposition + b'name="images"; filename="b.jpg"\r\nContent-Type: image/jpeg', jpeg(solid((250, 0, 0)))),
        (disposition + b'name="top_k"', b"1"),
    ]
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + head + b"\r\n\r\n" + data + b"\r\n" for head, data in parts)
    body += b"--" + boundary.encode() + b"--\r\n"
    model = service.model()
    parsed = service.parse_predict(body, model, content_type=f"multipart/form-data; boundary={boundary}")
    assert [p.label for p in model.predict(parsed.inputs)] == ["green", "red"]
    assert parsed.top_k == 1
    with pytest.raises(RequestError, match="boundary"):
        service.parse_predict(body, model, content_type="multipart/form-data")


def test_raw_arrays_still_work_and_mix_with_encoded(service: InferenceService) -> None:
    model = service.model()
    raw = solid((5, 5, 200))[:16, :16].tolist()
    body = f'{{"images": [{raw}, "{b64(png(solid((200, 5, 5))))}"]}}'.encode()
    parsed = service.parse_predict(body, model)
    assert [p.label for p in model.predict(parsed.inputs)] == ["blue", "red"]
    with pytest.raises(RequestError, match=r"images have shape \[15, 16, 3\]"):
        service.parse_predict(f'{{"images": [{raw[:15]}]}}'.encode(), model)


def test_inference_protocol_bytes_images(classifier: ImageClassifier, service: InferenceService) -> None:
    images = [png(solid((250, 0, 0))), jpeg(solid((0, 0, 250)))]
    blob = b"".join(struct.pack("<I", len(i)) + i for i in images)
    head = (
        '{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], '
        f'"parameters": {{"binary_data_size": {len(blob)}}}}}]}}'
    ).encode()
    decoded = kserve.decode_request(head + blob, str(len(head)), classifier.manifest, max_items=8)
    inputs = service.check_inputs(decoded.inputs, classifier)
    assert [p.label for p in classifier.predict(inputs)] == ["red", "blue"]
    as_json = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(images[0])]}]}
    import json

    decoded = kserve.decode_request(json.dumps(as_json).encode(), None, classifier.manifest, max_items=8)
    assert classifier.predict(service.check_inputs(decoded.inputs, classifier))[0].label == "red"
    bad = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["@@@"]}]}
    decoded = kserve.decode_request(json.dumps(bad).encode(), None, classifier.manifest, max_items=8)
    with pytest.raises(RequestError, match="not base64"):
        service.check_inputs(decoded.inputs, classifier)


# -- sampling -------------------------------------------------------------------------------------
def test_sampling_keeps_the_encoded_bytes(classifier: ImageClassifier) -> None:
    kept: list[SampleRecord] = []
    sampler = Sampler(rules=SamplingRules(low_confidence=1.0), device="d", fleet="f", model="colours",
                      sink=kept.extend, seed=0)  # fmt: skip
    small = png(solid((30, 200, 30)))
    big = png(np.random.default_rng(2).integers(0, 256, size=(200, 200, 3)))  # noise: ~120 KB of PNG
    inputs = classifier.prepare([small, big, solid((0, 0, 9))[:16, :16].tolist()])
    ids = sampler.observe(inputs, classifier.predict(inputs), 1, task="image-classification")
    assert len(kept) == 3
    assert kept[0].image == "data:image/png;base64," + b64(small)  # the bytes as they came
    assert isinstance(kept[1].image, str) and kept[1].image.startswith("data:image/jpeg;base64,")
    recompressed = Image.open(io.BytesIO(base64.b64decode(kept[1].image.split(",", 1)[1])))
    assert recompressed.size == (16, 16)  # too large to travel: the pixels the model saw, as JPEG
    assert isinstance(kept[2].image, list)  # raw arrays stay numbers, as before
    for record in kept:
        assert record.size_problem() is None
        SampleRecord.model_validate_json(record.model_dump_json(by_alias=True))
    feedback = sampler.feedback(ids[0], "green")
    assert feedback.image == kept[0].image
    count, held = sampler.remembered
    assert count == 3 and held < 60_000


def test_sample_records_refuse_strings_that_are_not_image_data_urls() -> None:
    fields = {"id": "a" * 32, "prediction_id": "b" * 32, "device": "d", "fleet": "f", "model": "m", "version": 1,
              "created_at": "2026-11-25T10:00:00.000+00:00", "predicted": "x", "score": 0.5,
              "scores": {"x": 0.5, "y": 0.5}, "reasons": ["random"]}  # fmt: skip
    SampleRecord(**fields, image="data:image/png;base64,iVBORw0KGgo=")
    with pytest.raises(ValueError, match="data:image/png;base64"):
        SampleRecord(**fields, image="data:text/html;base64,PGI+")


def test_the_service_answers_over_http_shape(service: InferenceService) -> None:
    """``infer`` takes what ``parse_predict`` prepared (decoded images), on the event loop."""
    model = service.model()
    parsed = service.parse_predict(f'{{"images": ["{b64(jpeg(solid((0, 240, 0))))}"]}}'.encode(), model)
    service.start()
    try:
        version, predictions = asyncio.run(service.infer(parsed.inputs))
    finally:
        service.stop()
    assert (version, predictions[0].label) == (1, "green")
