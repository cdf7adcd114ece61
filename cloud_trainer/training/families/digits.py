"""The digits family: a small CNN trained from scratch on scikit-learn's 8x8 digits
(:mod:`cloud_trainer.training.digits`), exported with torch.onnx through :mod:`export.image`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from cloud_trainer.errors import DataError
from cloud_trainer.training.families.base import ExportOptions, Family

if TYPE_CHECKING:
    from cloud_trainer.training.evaluate import SourceModel
    from export import ExportResult


class DigitsFamily(Family):
    name: ClassVar[str] = "digits"
    summary: ClassVar[str] = "a small CNN trained from scratch on scikit-learn's 8x8 digits (no --data)"
    inputs: ClassVar[Literal["texts", "images"]] = "images"
    quantizations: ClassVar[tuple[str, ...]] = ("static-int8", "fp16", "none")
    cpu_quantization: ClassVar[str] = "static-int8"
    train_options: ClassVar[frozenset[str]] = frozenset({"epochs", "batch_size", "learning_rate", "seed"})

    def owns_run(self, info: dict[str, Any], run_dir: Path) -> bool:
        return info.get("family") == self.name or (run_dir / "checkpoint" / "model.pt").is_file()

    def train(self, args: argparse.Namespace) -> None:
        from cloud_trainer.training.digits import DigitsConfig, train_digits
        from cloud_trainer.training.metrics import format_metrics

        given = {k: getattr(args, k) for k in sorted(self.train_options) if getattr(args, k) is not None}
        config = DigitsConfig(**{k: (int(v) if k == "epochs" else v) for k, v in given.items()})
        digits = train_digits(args.out, config=config, progress=True)
        print(format_metrics(digits.metrics))
        print(f"checkpoint: {digits.checkpoint}")

    def export(self, run_dir: Path, bundle_dir: Path, *, model: str, version: int, parent_version: int | None,
               options: ExportOptions) -> ExportResult:  # fmt: skip
        from cloud_trainer.training.digits import export_digits

        result: ExportResult = export_digits(
            run_dir, bundle_dir, model=model, version=version, quantization=options.quantization,
            max_accuracy_drop=options.max_accuracy_drop, max_f1_drop=options.max_f1_drop, parent_version=parent_version,
        )  # fmt: skip
        return result

    def open_run(self, run_dir: Path) -> SourceModel:
        raise DataError(
            f"{run_dir} is a digits run, scored on sklearn's held-out digits when it was trained (metrics.json); "
            "evaluate scores its exported bundle, or text and image runs"
        )
