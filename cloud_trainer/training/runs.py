"""A training run on disk: the split it used, the checkpoint, metrics; and its export to a bundle.

Layout of a run directory::

    train.csv, val.csv     the stratified split (the validation split is reused by export)
    checkpoint/            the fine-tuned Hugging Face model and tokenizer
    metrics.json           evaluation on the validation split
    run.json               data set hash, base model, hyperparameters
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cloud_trainer.errors import DataError
from cloud_trainer.releases.registry import ModelVersion, Registry
from cloud_trainer.training.data import LabelledTexts, file_sha256, load_labelled, stratified_split
from cloud_trainer.training.train import TrainConfig, TrainResult, train_text_classifier
from export.quantize import DEFAULT_TARGET, DEFAULT_TEXT_QUANTIZATION

if TYPE_CHECKING:
    from export import ExportResult


def write_csv(path: Path, data: LabelledTexts) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(zip(data.texts, data.labels, strict=True))


def train_run(
    data_path: Path,
    run_dir: Path,
    *,
    config: TrainConfig,
    val_path: Path | None = None,
    val_fraction: float = 0.2,
    text_column: str = "text",
    label_column: str = "label",
    samples: LabelledTexts | None = None,
) -> TrainResult:
    """Load, split (or take ``val_path`` as the validation set), fine-tune and record a run.

    ``samples`` (labelled samples from the fleet) join the training split only, so the validation
    split stays the data set's own and versions stay comparable.
    """
    data = load_labelled(data_path, text_column=text_column, label_column=label_column)
    if val_path is not None:
        train, val = data, load_labelled(val_path, text_column=text_column, label_column=label_column)
    else:
        train, val = stratified_split(data, val_fraction=val_fraction, seed=config.seed)
    samples_info = None
    if samples is not None and len(samples):
        known = {t.strip().lower() for t in train.texts + val.texts}
        fresh = [
            (t, lab) for t, lab in zip(samples.texts, samples.labels, strict=True) if t.strip().lower() not in known
        ]
        train = LabelledTexts(train.texts + [t for t, _ in fresh], train.labels + [lab for _, lab in fresh])
        digest = hashlib.sha256(json.dumps(sorted(fresh)).encode()).hexdigest()
        samples_info = {"labelled": len(samples), "added": len(fresh), "duplicates_skipped": len(samples) - len(fresh),
                        "sha256": digest, "new_labels": sorted(set(samples.labels) - set(data.labels))}  # fmt: skip
    run_dir.mkdir(parents=True, exist_ok=True)
    write_csv(run_dir / "train.csv", train)
    write_csv(run_dir / "val.csv", val)
    result = train_text_classifier(train, val, out_dir=run_dir, config=config)
    info: dict[str, Any] = {
        "data": str(data_path),
        "val_data": str(val_path) if val_path else None,
        "dataset_sha256": file_sha256(data_path),
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


def export_run(
    run_dir: Path,
    bundle_dir: Path,
    *,
    model: str,
    version: int,
    quantization: str = DEFAULT_TEXT_QUANTIZATION,
    target: str = DEFAULT_TARGET,
    max_accuracy_drop: float = 1.0,
    max_f1_drop: float = 0.02,
    parent_version: int | None = None,
) -> ExportResult:
    """Export a finished run to a bundle, through every gate."""
    from edge_agent.protocol import Lineage
    from export import ExportRequest, export_text_classifier

    try:
        info = json.loads((run_dir / "run.json").read_text())
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{run_dir} is not a finished training run ({exc})") from None
    val = load_labelled(run_dir / "val.csv")
    train = load_labelled(run_dir / "train.csv")
    hyper = info["hyperparameters"]
    lineage = Lineage(
        base_model=info["base_model"],
        dataset_sha256=info["dataset_sha256"],
        parent_version=parent_version,
        hyperparameters=hyper,
        samples=info.get("samples"),
    )
    summary = {k: metrics[k] for k in ("accuracy", "macro_f1", "train_examples", "val_examples") if k in metrics}
    request = ExportRequest(
        checkpoint=run_dir / "checkpoint",
        out_dir=bundle_dir,
        work_dir=run_dir / "export",
        model=model,
        version=version,
        labels=list(info["labels"]),
        val_texts=val.texts,
        val_labels=val.labels,
        lineage=lineage,
        metrics={"pytorch": summary},
        quantization=quantization,
        target=target,
        calibration_texts=train.texts[:256],
        max_accuracy_drop=max_accuracy_drop,
        max_f1_drop=max_f1_drop,
        **_preprocessing(info),
    )
    return export_text_classifier(request)


def _preprocessing(info: dict[str, Any]) -> dict[str, Any]:
    """How the run tokenized its texts; the device must do the same. Runs from before head+tail truncate heads."""
    pre = info.get("preprocessing") or {"max_length": int(info["hyperparameters"].get("max_length") or 64)}
    return {
        "max_length": int(pre["max_length"]),
        "truncation": str(pre.get("truncation", "head")),
        "head_tokens": int(pre.get("head_tokens", 0)),
    }


def register_run(
    registry: Registry, run_dir: Path, *, model: str, version: int | None = None, **options: Any
) -> tuple[ModelVersion, dict[str, Any]]:
    """Export ``run_dir`` into the registry as the next (or the given) version; returns it and the export report."""
    reports: list[dict[str, Any]] = []

    def build(bundle_dir: Path, number: int, parent: int | None) -> Any:
        result = export_run(run_dir, bundle_dir, model=model, version=number, parent_version=parent, **options)
        reports.append(result.report)
        return result.manifest

    entry = registry.register(model, version=version, build=build, source={"run": str(run_dir.resolve())})
    return entry, reports[0]
