"""The text family: a Hugging Face sequence classifier fine-tuned on labelled texts.

The work is :mod:`cloud_trainer.training.train` (fine-tuning) and :mod:`cloud_trainer.training.runs` (the run on
disk and its export through :mod:`export.pipeline`); this module connects them to the CLI.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from cloud_trainer.errors import CloudTrainError
from cloud_trainer.training.families.base import ExportOptions, Family, report_test
from export.quantize import DEFAULT_TEXT_QUANTIZATION

if TYPE_CHECKING:
    from cloud_trainer.training.evaluate import SourceModel
    from export import ExportResult

HYPERPARAMETERS = (
    "base_model", "epochs", "batch_size", "learning_rate", "weight_decay", "warmup_ratio",
    "max_length", "truncation", "class_weights", "select_metric", "patience", "max_minutes", "group_by_length",
    "pooling", "keep", "head_learning_rate", "head_init",
    "seed", "max_steps", "freeze_base",
)  # fmt: skip
"""``cloud-train train`` flags that are :class:`cloud_trainer.training.train.TrainConfig` fields."""


class TextFamily(Family):
    name: ClassVar[str] = "text"
    summary: ClassVar[str] = "a Hugging Face text classifier (default: the packaged MiniLM) on labelled texts"
    inputs: ClassVar[Literal["texts", "images"]] = "texts"
    quantizations: ClassVar[tuple[str, ...]] = ("weight-int8", "dynamic-int8", "static-int8", "fp16", "none")
    cpu_quantization: ClassVar[str] = DEFAULT_TEXT_QUANTIZATION
    train_options: ClassVar[frozenset[str]] = frozenset(
        {*HYPERPARAMETERS, "data", "val_data", "val_fraction", "text_column", "label_column", "test_data", "config",
         "include_samples", "samples_store"}
    )  # fmt: skip

    def owns_run(self, info: dict[str, Any], run_dir: Path) -> bool:
        # runs from before families were recorded carry no "family"; digits runs have a model.pt
        return info.get("family", self.name) == self.name and not (run_dir / "checkpoint" / "model.pt").is_file()

    def train(self, args: argparse.Namespace) -> None:
        from cloud_trainer.training.metrics import format_metrics
        from cloud_trainer.training.runs import train_run
        from cloud_trainer.training.train import TrainConfig, load_train_config

        if args.data is None:
            raise CloudTrainError("--data is required for the text family")
        settings = load_train_config(args.config) if args.config else {}
        settings.update({k: getattr(args, k) for k in HYPERPARAMETERS if getattr(args, k) is not None})
        config = TrainConfig.from_mapping(settings, origin=str(args.config or "flags"))
        text_column, label_column = args.text_column or "text", args.label_column or "label"
        val_fraction = 0.2 if args.val_fraction is None else args.val_fraction
        samples = None
        if args.include_samples:
            from cloud_trainer.samples.labelling import labelled_texts
            from cloud_trainer.samples.store import SampleStore, default_store

            samples = labelled_texts(SampleStore(args.samples_store or default_store()), args.include_samples)
            if not len(samples):
                raise CloudTrainError(f"the sample store has no labelled samples of model {args.include_samples!r}")
        result = train_run(
            args.data, args.out, config=config, val_path=args.val_data, val_fraction=val_fraction,
            text_column=text_column, label_column=label_column, samples=samples,
        )  # fmt: skip
        if samples is not None:
            info = result.metrics["samples"]
            new_labels = ", ".join(info["new_labels"]) or "-"
            print(
                f"fleet samples: {info['labelled']} labelled, {info['added']} added to the training split, "
                f"{info['duplicates_skipped']} already in the data; new labels: {new_labels}"
            )
        print(f"\nvalidation split ({result.metrics['val_examples']} examples, "
              f"best epoch {result.metrics['best_epoch']}):")  # fmt: skip
        print(format_metrics(result.metrics))
        print(f"trained in {result.metrics['training_minutes']:.1f} min; metrics: {args.out / 'metrics.json'}")
        print(f"checkpoint: {result.checkpoint}")
        if args.test_data is not None:
            report_test(args.out, args.test_data, text_column=text_column, label_column=label_column)

    def export(self, run_dir: Path, bundle_dir: Path, *, model: str, version: int, parent_version: int | None,
               options: ExportOptions) -> ExportResult:  # fmt: skip
        from cloud_trainer.training.runs import export_run

        return export_run(
            run_dir, bundle_dir, model=model, version=version, parent_version=parent_version,
            quantization=options.quantization, target=options.target, max_accuracy_drop=options.max_accuracy_drop,
            max_f1_drop=options.max_f1_drop,
        )  # fmt: skip

    def open_run(self, run_dir: Path) -> SourceModel:
        from cloud_trainer.training.evaluate import open_run

        return open_run(run_dir)
