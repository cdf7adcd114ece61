"""``cloud-train evaluate``: score a bundle, a registered version or a training run on a labelled test file.

cloud-train evaluate intents:2 --data test.csv               # the newest version without :VERSION
cloud-train evaluate runs/r1 --data test.jsonl --json report.json
cloud-train evaluate path/to/bundle --data test.parquet --json -   # JSON on stdout, the table on stderr
cloud-train evaluate birds:3 --data test-images/             # an image model: an image folder (or a table of paths)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from cloud_trainer.releases.registry import default_registry
    from cloud_trainer.training.evaluate import evaluate_file, format_report

    report = evaluate_file(
        args.source, args.data, registry_root=args.registry or default_registry(), text_column=args.text_column,
        image_column=args.image_column, label_column=args.label_column,
    )  # fmt: skip
    text = format_report(report)
    if args.json == "-":
        print(text, file=sys.stderr)
        print(json.dumps(report, indent=2))
        return 0
    print(text)
    if args.json is not None:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"report: {args.json}")
    return 0


def add_evaluate_command(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="score a model on a labelled test file, against the majority baseline")
    p.add_argument(
        "source",
        metavar="SOURCE",
        help="a bundle directory, a training run directory (`cloud-train train --out`), "
        "or MODEL[:VERSION] from the registry (default version: the newest)",
    )
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        metavar="PATH",
        help="labelled test data: CSV, TSV, JSONL or Parquet (texts, or image paths relative to the file), "
        "or for an image model an image folder with one sub-folder per label",
    )
    p.add_argument("--text-column", default="text", help="default: text")
    p.add_argument("--image-column", default="image", help="image models: the column of image paths (default: image)")
    p.add_argument("--label-column", default="label", help="default: label")
    p.add_argument(
        "--registry",
        type=Path,
        metavar="DIR",
        help="registry directory (default: $EDGELOOP_REGISTRY or ~/.edgeloop/registry)",
    )
    p.add_argument("--json", metavar="OUT", help="also write the report as JSON to OUT ('-': stdout; default: none)")
    p.set_defaults(func=_cmd_evaluate)
