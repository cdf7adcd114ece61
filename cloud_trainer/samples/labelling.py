"""Labelling collected samples: export them for people (CSV, Label Studio) and import their labels.

CSV export columns: ``id, text, predicted, score, reasons, device, version, day, label`` (``label``
empty for unlabelled samples; an image sample's ``text`` cell holds its image as JSON). A labelled
CSV comes back with at least ``id`` and ``label``; rows with an empty label are skipped.

Label Studio: the export is a JSON list of tasks in Label Studio's import format,
``{"id": n, "data": {"sample_id", "text" | "image", "device", "version"}, "predictions": [...]}``,
the model's guess pre-annotated as a choice of the ``label`` control. An image sample's ``image`` is
a ``data:image/jpeg;base64,...`` (or PNG) URL: the bytes the device kept, as it was sent them; an
image that came as a raw pixel array is drawn as a PNG, its largest value white. Beside the tasks
goes the project's labelling config (:func:`label_studio_config`): ``<Text name="text" .../>`` or
``<Image name="image" value="$image"/>``, and ``<Choices name="label">`` with the model's labels.
One export holds one kind of input: text and image samples together are refused.

The import reads Label Studio's JSON export (each task's latest non-cancelled annotation) or its
JSON-MIN export (``{"sample_id": ..., "label": ...}`` rows). :func:`labelled_texts` and
:func:`labelled_images` give the labelled samples of a model to training.
"""

from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from cloud_trainer.errors import DataError
from cloud_trainer.samples.store import SampleStore, StoredSample
from cloud_trainer.training.data import LabelledTexts

log = logging.getLogger(__name__)

CONTROL = "label"
"""The name of the Choices control in the labelling config; an import reads the choices made in it."""

CSV_COLUMNS = ["id", "text", "predicted", "score", "reasons", "device", "version", "day", "label"]


def _cell(text: str | None) -> str:
    """A cell a spreadsheet shows as text: a leading = + - @ would run as a formula (CSV injection)."""
    value = text or ""
    return "'" + value if value[:1] in ("=", "+", "-", "@") else value


def export_csv(samples: list[StoredSample], path: Path) -> int:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for s in samples:
            writer.writerow([s.prediction_id, _cell(s.text or s.image_json), _cell(s.predicted), f"{s.score:.4f}",
                             s.reasons, s.device, s.version, s.day, _cell(s.label)])  # fmt: skip
    return len(samples)


def export_label_studio(samples: list[StoredSample], path: Path, *, config_path: Path | None = None) -> int:
    """Write ``samples`` as Label Studio tasks to ``path`` (and the labelling config to ``config_path``)."""
    kinds = {"image" if s.text is None else "text" for s in samples}
    if len(kinds) > 1:
        raise DataError("the samples are texts and images; export one model at a time (--model) for Label Studio")
    kind = kinds.pop() if kinds else "text"
    tasks = []
    for number, s in enumerate(samples, start=1):
        data: dict[str, Any] = {"sample_id": s.prediction_id}
        data[kind] = s.text if kind == "text" else _image_url(s)
        data |= {"device": s.device, "version": s.version}
        tasks.append({
            "id": number,
            "data": data,
            "predictions": [{
                "model_version": str(s.version),
                "score": s.score,
                "result": [{"from_name": CONTROL, "to_name": kind, "type": "choices",
                            "value": {"choices": [s.predicted]}}],
            }],
        })  # fmt: skip
    path.write_text(json.dumps(tasks, indent=1, ensure_ascii=False), encoding="utf-8")
    if config_path is not None:
        config_path.write_text(label_studio_config(sample_labels(samples), kind=kind), encoding="utf-8")
    return len(tasks)


def config_path_for(tasks_path: Path) -> Path:
    """Where ``samples export --format label-studio`` writes the labelling config: beside the tasks."""
    return tasks_path.with_name(f"{tasks_path.stem}.label-config.xml")


def label_studio_config(labels: list[str], *, kind: str) -> str:
    """Label Studio's labelling config for ``kind`` (``text``, ``image``) samples: one ``label`` choice each."""
    if kind not in ("text", "image"):
        raise ValueError(f"no Label Studio config for {kind!r} samples")
    tag = "Text" if kind == "text" else "Image"
    choices = "".join(f"    <Choice value={quoteattr(label)}/>\n" for label in labels)
    return (
        "<View>\n"
        f'  <{tag} name="{kind}" value="${kind}"/>\n'
        f'  <Choices name="{CONTROL}" toName="{kind}" choice="single" showInline="true">\n'
        f"{choices}"
        "  </Choices>\n"
        "</View>\n"
    )


def sample_labels(samples: list[StoredSample]) -> list[str]:
    """The labels the samples' model knows (its scores' keys, in its order), then any other given label."""
    labels: dict[str, None] = {}
    for s in samples:
        labels.update(dict.fromkeys(json.loads(s.scores_json)))
    for s in samples:
        for extra in (s.predicted, s.label):
            if extra:
                labels.setdefault(extra)
    return list(labels)


def _image_url(sample: StoredSample) -> str:
    """The sample's image as a ``data:`` URL people can see: as the device kept it, or a raw array drawn."""
    image = json.loads(sample.image_json or "null")
    if isinstance(image, str):
        return image
    if isinstance(image, list):
        try:
            return "data:image/png;base64," + base64.b64encode(_png(image, stretch=True)).decode("ascii")
        except ValueError as exc:
            raise DataError(f"sample {sample.prediction_id}: its image cannot be drawn: {exc}") from None
    raise DataError(f"sample {sample.prediction_id} has no image")


def _png(image: list[Any], *, stretch: bool) -> bytes:
    """A raw pixel array (H x W, H x W x 1 or H x W x 3) as PNG; ``stretch``: its largest value white
    (for people), else its values as they are, which must be whole numbers from 0 to 255."""
    import numpy as np
    from PIL import Image

    array = np.asarray(image, dtype=np.float64)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3) or not np.isfinite(array).all():
        raise ValueError(f"an array of shape {list(array.shape)} is not a grey or RGB image")
    if stretch:
        top = float(array.max())
        array = np.clip(array, 0, None) * (255.0 / top if top > 0 else 1.0)
        array = np.round(array)
    elif array.min() < 0 or array.max() > 255 or not (array == np.round(array)).all():
        raise ValueError("its values are not whole numbers from 0 to 255")
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def read_labels(path: Path) -> list[tuple[str, str]]:
    """``(sample id, label)`` pairs from a labelled CSV, or a Label Studio JSON or JSON-MIN export."""
    if not path.is_file():
        raise DataError(f"label file {path} does not exist")
    if path.suffix.lower() == ".json":
        return _read_label_studio(path)
    if path.suffix.lower() != ".csv":
        raise DataError(f"label file {path}: use a .csv (id,label columns) or a Label Studio .json export")
    with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: spreadsheets write a BOM
        reader = csv.DictReader(handle)
        missing = {"id", "label"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"label file {path} has no column {', '.join(sorted(missing))}")
        return [(row["id"].strip(), row["label"].strip()) for row in reader if (row.get("label") or "").strip()]


def _read_label_studio(path: Path) -> list[tuple[str, str]]:
    try:
        tasks = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"label file {path} is not JSON: {exc}") from None
    if not isinstance(tasks, list):
        raise DataError(f"label file {path} is not a Label Studio export (a JSON list of tasks)")
    pairs = []
    for index, task in enumerate(tasks):
        if isinstance(task, dict) and "data" not in task and "sample_id" in task:  # the JSON-MIN export
            label = _min_choice(task.get(CONTROL))
            if not isinstance(task["sample_id"], str):
                raise DataError(f"label file {path}: row {index} has no sample_id")
            if label is not None:
                pairs.append((task["sample_id"], label))
            continue
        sample_id = _get(task, "data", "sample_id")
        if not isinstance(sample_id, str):
            raise DataError(f"label file {path}: task {index} has no data.sample_id")
        annotations = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
        if not annotations:
            continue
        choices = [r for r in annotations[-1].get("result") or [] if r.get("type") == "choices"]
        labels = _get(choices[0], "value", "choices") if choices else None
        if isinstance(labels, list) and labels and isinstance(labels[0], str):
            pairs.append((sample_id, labels[0]))
    return pairs


def _min_choice(value: Any) -> str | None:
    """A choice as JSON-MIN writes it: the label, or ``{"choices": [...]}`` when several may be chosen."""
    if isinstance(value, dict):
        value = value.get("choices")
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, str) and value else None


def _get(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def labelled_texts(store: SampleStore, model: str) -> LabelledTexts:
    """Every labelled text sample of ``model``, for training."""
    latest: dict[str, str] = {}  # one label per text: the latest labelled wins
    for s in sorted(store.query(model=model, labelled=True), key=lambda s: s.labelled_at or ""):
        if s.text and s.label:
            latest[s.text] = s.label
    return LabelledTexts(texts=list(latest), labels=list(latest.values()))


def labelled_images(store: SampleStore, model: str) -> list[tuple[bytes, str]]:
    """Every labelled image sample of ``model``, for training: ``(encoded image, label)`` pairs.

    The image is the JPEG or PNG the device kept (the bytes it was sent, or, for an image too large
    to travel in a sample, the model-sized pixels it classified as JPEG); an image sent as a raw
    pixel array comes back as a lossless PNG of its values, when they are whole numbers from 0 to 255
    (others are skipped, and counted in a warning). One label per image: the same bytes labelled
    twice keep the latest label.
    """
    latest: dict[str, tuple[bytes, str]] = {}
    skipped = 0
    for s in sorted(store.query(model=model, labelled=True), key=lambda s: s.labelled_at or ""):
        if s.image_json is None or not s.label:
            continue
        image = json.loads(s.image_json)
        try:
            data = _data_url_bytes(image) if isinstance(image, str) else _png(image, stretch=False)
        except (ValueError, TypeError) as exc:
            skipped += 1
            log.warning("sample %s: its image cannot be used for training: %s", s.prediction_id, exc)
            continue
        latest[hashlib.sha256(data).hexdigest()] = (data, s.label)
    if skipped:
        log.warning("%d labelled image samples of %s skipped: raw arrays that are not 8-bit pixels", skipped, model)
    return list(latest.values())


def _data_url_bytes(url: str) -> bytes:
    head, _, payload = url.partition(",")
    if not head.startswith("data:image/") or not head.endswith(";base64"):
        raise ValueError(f"{head[:40]!r} is not a base64 image data URL")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"its base64 is broken: {exc}") from None


IMAGE_EXTENSIONS = {b"\xff\xd8\xff": ".jpg", b"\x89PNG\r\n\x1a\n": ".png"}


def write_image_folder(images: list[tuple[bytes, str]], folder: Path) -> list[Path]:
    """Write ``(image, label)`` pairs as an image folder (``folder/<label>/<sha256>.jpg|png``), the
    layout ``cloud-train train --family image`` and ``cloud-train import --calibration`` read.
    Returns the files written (an image already there is not written again)."""
    written = []
    for data, label in images:
        if not label or label.startswith(".") or "/" in label or "\\" in label or "\x00" in label:
            raise DataError(f"label {label!r} cannot name a folder (image folder readers skip dot-folders)")
        suffix = next((ext for magic, ext in IMAGE_EXTENSIONS.items() if data.startswith(magic)), None)
        if suffix is None:
            raise DataError(f"an image labelled {label!r} is neither JPEG nor PNG")
        target = folder / label / f"{hashlib.sha256(data).hexdigest()[:32]}{suffix}"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        written.append(target)
    return written
