"""An image training run on disk, its export to a bundle, and its checkpoint for ``cloud-train evaluate``.

Layout of a run directory (as the text family's, with image paths for texts)::

    train.csv, val.csv     the split it used: absolute image paths and labels (export reuses both:
                           calibration from train, the gates on val)
    samples/               labelled fleet samples added to the training split (``--include-samples``),
                           as an image folder (``<label>/<sha256>.jpg|png``)
    checkpoint/            the fine-tuned model and its image processor (save_pretrained)
    metrics.json           evaluation on the validation split
    run.json               family "image", data set hash, base model, hyperparameters,
                           the bundle's preprocessing, labels
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cloud_trainer.errors import DataError
from cloud_trainer.training.images.data import (
    LabelledImages,
    check_image,
    images_sha256,
    load_images,
    split_images,
    write_image_table,
)
from cloud_trainer.training.images.train import ImageTrainConfig, ImageTrainResult, train_image_classifier
from edge_agent.protocol import sha256_file

if TYPE_CHECKING:
    from cloud_trainer.training.evaluate import SourceModel
    from export import ExportResult

FAMILY = "image"
CALIBRATION_IMAGES = 128
"""Training images that calibrate static int8 (seeded choice); MinMax ranges settle long before this."""
GOLDEN_VALIDATION_IMAGES = 4
GOLDEN_MAX_BYTES = 256 * 1024
"""Validation images larger than this are not copied into the golden vectors (the synthetic ones still are)."""
SAMPLES = "samples"
"""The run directory's folder of the fleet samples added to the training split."""


def train_image_run(
    data_path: Path,
    run_dir: Path,
    *,
    config: ImageTrainConfig,
    val_path: Path | None = None,
    val_fraction: float = 0.2,
    image_column: str = "image",
    label_column: str = "label",
    samples: Sequence[tuple[bytes, str]] | None = None,
) -> ImageTrainResult:
    """Load, split (or take ``val_path`` as the validation set), fine-tune and record a run.

    ``samples`` (labelled image samples from the fleet, ``(encoded image, label)`` pairs as
    :func:`cloud_trainer.samples.labelling.labelled_images` gives them) join the training split only,
    so the validation split stays the data set's own and versions stay comparable; an image whose
    bytes are already in the data (by sha256) is skipped.
    """
    data = load_images(data_path, image_column=image_column, label_column=label_column)
    if val_path is not None:
        train, val = data, load_images(val_path, image_column=image_column, label_column=label_column)
    else:
        train, val = split_images(data, val_fraction=val_fraction, seed=config.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    samples_info = None
    if samples:
        train, samples_info = _with_samples(train, val, samples, data_labels=set(data.labels), folder=run_dir / SAMPLES)
    write_image_table(run_dir / "train.csv", train)
    write_image_table(run_dir / "val.csv", val)
    result = train_image_classifier(train, val, out_dir=run_dir, config=config)
    info: dict[str, Any] = {
        "family": FAMILY,
        "data": str(data_path),
        "val_data": str(val_path) if val_path else None,
        "dataset_sha256": images_sha256(data),
        "samples": samples_info,
        "base_model": config.base_model,
        "hyperparameters": asdict(result.config),
        "preprocessing": result.preprocessing.model_dump(),
        "labels": result.labels,
    }
    (run_dir / "run.json").write_text(json.dumps(info, indent=2))
    if samples_info is not None:
        result.metrics["samples"] = samples_info
    return result


def _with_samples(
    train: LabelledImages, val: LabelledImages, samples: Sequence[tuple[bytes, str]], *, data_labels: set[str],
    folder: Path,
) -> tuple[LabelledImages, dict[str, Any]]:  # fmt: skip
    """The training split with the samples whose bytes the data set does not hold, written to ``folder``
    as an image folder (each checked as training images are); and the counts for the run's lineage."""
    from cloud_trainer.samples.labelling import write_image_folder
    from edge_agent.protocol import sha256_bytes

    known = {sha256_file(path) for path in train.paths + val.paths}
    fresh = [(data, label) for data, label in samples if sha256_bytes(data) not in known]
    written = write_image_folder(fresh, folder)
    for path in written:
        check_image(path)
    digest = hashlib.sha256("\n".join(sorted(f"{sha256_bytes(d)} {label}" for d, label in fresh)).encode()).hexdigest()
    info = {"labelled": len(samples), "added": len(fresh), "duplicates_skipped": len(samples) - len(fresh),
            "sha256": digest, "new_labels": sorted({label for _, label in samples} - data_labels)}  # fmt: skip
    return LabelledImages(train.paths + written, train.labels + [label for _, label in fresh]), info


def read_run(run_dir: Path) -> tuple[dict[str, Any], Any, list[str]]:
    """``run.json``, the bundle's :class:`ImagePreprocessing` and the labels of a finished image run."""
    from edge_agent.protocol import ImagePreprocessing

    try:
        info = json.loads((run_dir / "run.json").read_text())
        pre = ImagePreprocessing.model_validate(info["preprocessing"])
        labels = [str(label) for label in info["labels"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{run_dir} is not a finished image training run: run.json: {exc!r}") from None
    if not (run_dir / "checkpoint" / "config.json").is_file():
        raise DataError(f"{run_dir} has no checkpoint/config.json; is the run finished?")
    return info, pre, labels


def export_image_run(
    run_dir: Path,
    bundle_dir: Path,
    *,
    model: str,
    version: int,
    quantization: str = "static-int8",
    max_accuracy_drop: float = 1.0,
    max_f1_drop: float = 0.02,
    parent_version: int | None = None,
) -> ExportResult:
    """Export a finished image run to a bundle, through every gate (:func:`export.image.export_image_classifier`)."""
    import random

    from cloud_trainer.training.importer import synthetic_images
    from edge_agent.protocol import Lineage
    from edge_agent.runtime.imagecodec import data_url
    from export.image import ImageExportRequest, export_image_classifier

    info, pre, labels = read_run(run_dir)
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{run_dir} is not a finished training run ({exc})") from None
    val = load_images(run_dir / "val.csv")
    train = load_images(run_dir / "train.csv")
    chosen = sorted(random.Random(0).sample(range(len(train)), min(CALIBRATION_IMAGES, len(train))))
    val_images = val.read()
    golden = [data_url(png, "image/png") for png in synthetic_images(pre)]  # larger than the crop, both ways
    golden += [_as_data_url(data) for data in val_images if len(data) <= GOLDEN_MAX_BYTES][:GOLDEN_VALIDATION_IMAGES]
    lineage = Lineage(base_model=info["base_model"], dataset_sha256=info["dataset_sha256"],
                      parent_version=parent_version, hyperparameters=info["hyperparameters"],
                      samples=info.get("samples"))  # fmt: skip
    summary = {k: metrics[k] for k in ("accuracy", "macro_f1", "train_examples", "val_examples") if k in metrics}
    request = ImageExportRequest(
        checkpoint=run_dir / "checkpoint", preprocessing=pre, labels=labels, val_images=val_images,
        val_labels=val.labels, calibration_images=[train.paths[i].read_bytes() for i in chosen],
        golden_inputs=golden, bundle_dir=bundle_dir, work_dir=run_dir / "export", model=model, version=version,
        lineage=lineage, pytorch_metrics=summary, quantization=quantization, max_accuracy_drop=max_accuracy_drop,
        max_f1_drop=max_f1_drop,
    )  # fmt: skip
    return export_image_classifier(request)


def _as_data_url(data: bytes) -> str:
    from edge_agent.runtime.imagecodec import data_url

    return data_url(data, "image/png" if data.startswith(b"\x89PNG") else "image/jpeg")


def open_image_run(run_dir: Path) -> SourceModel:
    """A run's checkpoint in torch (eval mode), fed by the device's decoder and normalisation."""
    from cloud_trainer.training.evaluate import BATCH_SIZE, SourceModel
    from cloud_trainer.training.images.preprocessing import decode, pixel_batch
    from export.image import load_hf_image_classifier

    _, pre, labels = read_run(run_dir)
    network = load_hf_image_classifier(run_dir / "checkpoint")
    if network.config.num_labels != len(labels):
        raise DataError(f"{run_dir}/checkpoint has {network.config.num_labels} outputs; run.json lists {len(labels)}")

    def predict(images: Sequence[bytes]) -> list[str]:
        import torch

        predicted: list[str] = []
        with torch.inference_mode():
            for start in range(0, len(images), BATCH_SIZE):
                pixels = pixel_batch([decode(data, pre) for data in images[start : start + BATCH_SIZE]], pre)
                logits = network(pixel_values=torch.from_numpy(pixels)).logits
                predicted += [labels[i] for i in logits.argmax(dim=-1).tolist()]
        return predicted

    return SourceModel(labels=labels, predict=predict, inputs="images")
