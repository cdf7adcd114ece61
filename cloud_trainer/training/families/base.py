"""What a model family is on the cloud side: how its models are trained, exported and evaluated.

A family is a :class:`Family` subclass in a module of its own; :mod:`cloud_trainer.training.families`
registers it. Modules import nothing heavy at the top (``cloud-train --help`` lists the families
without loading torch): each method imports what it needs.
"""

from __future__ import annotations

import abc
import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from export.quantize import DEFAULT_TARGET

if TYPE_CHECKING:
    from cloud_trainer.releases.registry import ModelVersion, Registry
    from cloud_trainer.training.evaluate import SourceModel
    from export import ExportResult


@dataclass(frozen=True, kw_only=True)
class ExportOptions:
    """How a run is exported, resolved from ``--quantize`` and ``--target``.

    Args:
        quantization: the shipped precision (one of the family's :attr:`Family.quantizations`).
        target: the CPU preset for dynamic int8 (avx2, avx512_vnni, arm64).
        max_accuracy_drop, max_f1_drop: the quantization gate's allowances.
    """

    quantization: str
    target: str = DEFAULT_TARGET
    max_accuracy_drop: float = 1.0
    max_f1_drop: float = 0.02


class Family(abc.ABC):
    """A kind of model ``cloud-train`` can train, export and evaluate.

    Class attributes:
        name: the ``--family`` value and the ``family`` that its runs record in ``run.json``.
        summary: one line for ``cloud-train train --help``.
        inputs: what its models classify, ``texts`` or ``images``; ``cloud-train evaluate`` reads
            its test data accordingly.
        quantizations: the ``--quantize`` values its export accepts.
        cpu_quantization: what a CPU target ships without ``--quantize``.
        train_options: the ``cloud-train train`` flags (argparse ``dest`` names) it reads; a flag
            of another family given to it is refused by name rather than ignored.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    inputs: ClassVar[Literal["texts", "images"]]
    quantizations: ClassVar[tuple[str, ...]]
    cpu_quantization: ClassVar[str]
    train_options: ClassVar[frozenset[str]] = frozenset()

    @abc.abstractmethod
    def train(self, args: argparse.Namespace) -> None:
        """``cloud-train train --family NAME``: train from the parsed flags into ``args.out``, printing progress."""

    @abc.abstractmethod
    def export(self, run_dir: Path, bundle_dir: Path, *, model: str, version: int, parent_version: int | None,
               options: ExportOptions) -> ExportResult:  # fmt: skip
        """Export a finished run to a bundle in ``bundle_dir``, through every gate."""

    @abc.abstractmethod
    def open_run(self, run_dir: Path) -> SourceModel:
        """A finished run's checkpoint, ready to label test inputs (``cloud-train evaluate RUN_DIR``)."""

    def owns_run(self, info: dict[str, Any], run_dir: Path) -> bool:
        """Whether the run whose ``run.json`` is ``info`` belongs to this family."""
        return info.get("family") == self.name

    def register(self, registry: Registry, run_dir: Path, *, model: str, version: int | None,
                 options: ExportOptions) -> tuple[ModelVersion, dict[str, Any]]:  # fmt: skip
        """Export ``run_dir`` into the registry as the next (or the given) version; returns it and the export report."""
        reports: list[dict[str, Any]] = []

        def build(bundle_dir: Path, number: int, parent: int | None) -> Any:
            result = self.export(run_dir, bundle_dir, model=model, version=number, parent_version=parent,
                                 options=options)  # fmt: skip
            reports.append(result.report)
            return result.manifest

        entry = registry.register(model, version=version, build=build, source={"run": str(run_dir.resolve())})
        return entry, reports[0]

    def refuse_foreign_options(self, args: argparse.Namespace, every_option: set[str]) -> None:
        """Refuse, by flag name, a ``cloud-train train`` option that another family reads and this one does not."""
        from cloud_trainer.errors import CloudTrainError

        foreign = sorted(name for name in every_option - self.train_options if getattr(args, name, None) is not None)
        if foreign:
            flags = ", ".join("--" + name.replace("_", "-") for name in foreign)
            raise CloudTrainError(f"{flags}: not an option of the {self.name} family")


def read_run_info(run_dir: Path) -> dict[str, Any]:
    """A run directory's ``run.json`` (empty when it has none or it is not a JSON object)."""
    try:
        info = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def report_test(run_dir: Path, test_data: Path, **columns: str) -> None:
    """Score the finished run on ``test_data``, which training never saw, as ``cloud-train evaluate`` would;
    print the report and write it to ``test_metrics.json``. ``columns``: the data's column flags."""
    from cloud_trainer.releases.registry import default_registry
    from cloud_trainer.training.evaluate import evaluate_file, format_report

    report = evaluate_file(str(run_dir), test_data, registry_root=default_registry(), **columns)
    (run_dir / "test_metrics.json").write_text(json.dumps(report, indent=2))
    print(f"\ntest split ({report['examples']} examples from {test_data}, never trained on):")
    print(format_report(report))
