"""The image family: a Hugging Face image classifier (``AutoModelForImageClassification``: ResNet,
MobileNetV2, ViT, ConvNeXt...) fine-tuned on an image folder or a table of image paths.

The work is :mod:`cloud_trainer.training.images` (data, preprocessing, fine-tuning, the run on disk) and
:mod:`export.image` (optimum, the gates, the bundle); this module connects them to the CLI.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

from cloud_trainer.errors import CloudTrainError
from cloud_trainer.training.families.base import ExportOptions, Family, report_test

if TYPE_CHECKING:
    from cloud_trainer.training.evaluate import SourceModel
    from export import ExportResult

HYPERPARAMETERS = (
    "base_model", "epochs", "batch_size", "learning_rate", "weight_decay", "warmup_ratio", "class_weights",
    "select_metric", "patience", "max_minutes", "keep", "head_learning_rate", "head_init", "seed", "max_steps",
    "freeze_base", "augment", "min_crop_scale", "hflip",
)  # fmt: skip
"""``cloud-train train`` flags that are :class:`cloud_trainer.training.images.train.ImageTrainConfig` fields."""


class ImageFamily(Family):
    name: ClassVar[str] = "image"
    summary: ClassVar[str] = (
        "a Hugging Face image classifier (ResNet, MobileNetV2, ViT, ConvNeXt...; --base-model) on an image "
        "folder or a table of image paths"
    )
    inputs: ClassVar[Literal["texts", "images"]] = "images"
    quantizations: ClassVar[tuple[str, ...]] = ("static-int8", "fp16", "none")
    cpu_quantization: ClassVar[str] = "static-int8"
    train_options: ClassVar[frozenset[str]] = frozenset(
        {*HYPERPARAMETERS, "data", "val_data", "val_fraction", "image_column", "label_column", "test_data", "config",
         "include_samples", "samples_store"}
    )  # fmt: skip

    def train(self, args: argparse.Namespace) -> None:
        from cloud_trainer.training.images.runs import train_image_run
        from cloud_trainer.training.images.train import ImageTrainConfig
        from cloud_trainer.training.metrics import format_metrics
        from cloud_trainer.training.train import load_train_config

        if args.data is None:
            raise CloudTrainError("--data is required for the image family: an image folder or a table of paths")
        settings = load_train_config(args.config) if args.config else {}
        settings.update({k: getattr(args, k) for k in HYPERPARAMETERS if getattr(args, k) is not None})
        config = ImageTrainConfig.from_mapping(settings, origin=str(args.config or "flags"))
        image_column, label_column = args.image_column or "image", args.label_column or "label"
        samples = None
        if args.include_samples:
            from cloud_trainer.samples.labelling import labelled_images
            from cloud_trainer.samples.store import SampleStore, default_store

            samples = labelled_images(SampleStore(args.samples_store or default_store()), args.include_samples)
            if not samples:
                raise CloudTrainError(
                    f"the sample store has no labelled image samples of model {args.include_samples!r}"
                )
        result = train_image_run(
            args.data, args.out, config=config, val_path=args.val_data,
            val_fraction=0.2 if args.val_fraction is None else args.val_fraction,
            image_column=image_column, label_column=label_column, samples=samples,
        )  # fmt: skip
        metrics = result.metrics
        if samples is not None:
            info = metrics["samples"]
            new_labels = ", ".join(info["new_labels"]) or "-"
            print(
                f"fleet samples: {info['labelled']} labelled images, {info['added']} added to the training split, "
                f"{info['duplicates_skipped']} already in the data (same bytes); new labels: {new_labels}"
            )
        print(f"\nvalidation split ({metrics['val_examples']} images, best epoch {metrics['best_epoch']}):")
        print(format_metrics(metrics))
        print(f"trained in {metrics['training_minutes']:.1f} min; metrics: {args.out / 'metrics.json'}")
        print(f"checkpoint: {result.checkpoint}")
        if args.test_data is not None:
            report_test(args.out, args.test_data, image_column=image_column, label_column=label_column)

    def export(self, run_dir: Path, bundle_dir: Path, *, model: str, version: int, parent_version: int | None,
               options: ExportOptions) -> ExportResult:  # fmt: skip
        from cloud_trainer.training.images.runs import export_image_run

        return export_image_run(
            run_dir, bundle_dir, model=model, version=version, parent_version=parent_version,
            quantization=options.quantization, max_accuracy_drop=options.max_accuracy_drop,
            max_f1_drop=options.max_f1_drop,
        )  # fmt: skip

    def open_run(self, run_dir: Path) -> SourceModel:
        from cloud_trainer.training.images.runs import open_image_run

        return open_image_run(run_dir)
