"""``cloud-train train`` and ``cloud-train export``: a training run of one family, and its export
through the gates into the model registry (:mod:`cloud_trainer.training`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cloud_trainer.cli.common import registry_from_args
from cloud_trainer.errors import CloudTrainError


def _cmd_train(args: argparse.Namespace) -> int:
    from cloud_trainer.training.families import family, train_options

    chosen = family(args.family)
    chosen.refuse_foreign_options(args, train_options())
    chosen.train(args)
    return 0


def _export_precision(args: argparse.Namespace, family: Any = None) -> tuple[str, str]:
    """``(quantization, CPU preset)`` for ``--quantize`` and ``--target``: a GPU target (a Jetson's
    CUDA and TensorRT providers) ships fp16 unless told otherwise; dynamic int8 is CPU-only there.
    On a CPU, a family (:class:`cloud_trainer.training.families.Family`) ships its ``cpu_quantization``
    unless told otherwise (a named CPU preset asks for dynamic int8 where the family has it), and
    refuses what is not among its ``quantizations``."""
    if args.target == "gpu" and args.quantize == "dynamic-int8":
        raise CloudTrainError(
            "--target gpu: dynamic int8 (MatMulInteger) has no CUDA or TensorRT kernel and would run on the "
            "device's CPU; use --quantize fp16 (the default for gpu), static-int8 (QDQ, which TensorRT runs) or none"
        )
    if family is not None and args.quantize is not None and args.quantize not in family.quantizations:
        raise CloudTrainError(
            f"--quantize {args.quantize}: the {family.name} family ships {', '.join(family.quantizations)}"
        )
    preset = "avx2" if args.target in (None, "gpu") else args.target  # export.quantize.DEFAULT_TARGET
    if args.target == "gpu":
        return args.quantize or "fp16", preset  # the preset is unused without dynamic int8
    if args.quantize is not None:
        return args.quantize, preset
    default = family.cpu_quantization if family is not None else "weight-int8"
    dynamic_here = family is None or "dynamic-int8" in family.quantizations
    return ("dynamic-int8" if args.target is not None and dynamic_here else default), preset


def _cmd_export(args: argparse.Namespace) -> int:
    from cloud_trainer.training.families import ExportOptions, family_of_run

    registry = registry_from_args(args)
    run_family = family_of_run(args.run)
    quantization, target = _export_precision(args, run_family)
    options = ExportOptions(quantization=quantization, target=target, max_accuracy_drop=args.max_accuracy_drop,
                            max_f1_drop=args.max_f1_drop)  # fmt: skip
    entry, report = run_family.register(registry, args.run, model=args.model, version=args.version, options=options)
    print(json.dumps(report, indent=2))
    print(f"registered {entry.ref} in {registry.root} ({entry.manifest.total_bytes} bytes)")
    return 0


def _add_train(sub: Any) -> None:
    from cloud_trainer.training.families import family, names

    families = "; ".join(f"{name}: {family(name).summary}" for name in names())
    p = sub.add_parser("train", help="fine-tune a classifier of one family (text, image, digits)")
    p.add_argument("--family", choices=names(), default="text", help=f"default text. {families}")
    p.add_argument("--data", type=Path,
                   help="text: CSV, TSV, JSONL or Parquet with text and label columns; image: an image folder (one "
                        "sub-folder of JPEG/PNG per label) or such a table of image paths")  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="run directory to write")
    p.add_argument("--val-data", type=Path, help="explicit validation set (default: a stratified split of --data)")
    p.add_argument("--val-fraction", type=float, help="share of --data held out (default 0.2)")
    p.add_argument("--text-column", help="text: the column of texts (default text)")
    p.add_argument("--image-column", help="image tables: the column of image paths (default image)")
    p.add_argument("--label-column", help="default label")
    p.add_argument("--test-data", type=Path, help="labelled test file: scored at the end, never trained on")
    p.add_argument("--config", type=Path, help="TOML file whose [train] table sets any hyperparameter below")
    p.add_argument("--base-model",
                   help="hub id or local directory (text default: the packaged MiniLM; image: required, e.g. "
                        "microsoft/resnet-50 or a save_pretrained directory with its image processor)")  # fmt: skip
    p.add_argument("--epochs", type=float, help="most epochs; early stopping may end sooner (default: 8; 30 frozen)")
    p.add_argument("--batch-size", type=int, help="default 16")
    p.add_argument("--learning-rate", type=float, help="peak AdamW rate (default: 1e-4; 2e-3 with --freeze-base)")
    p.add_argument("--weight-decay", type=float, help="default 0.01")
    p.add_argument("--warmup-ratio", type=float, help="share of steps warming up (default: 0.1; 0 frozen)")
    p.add_argument("--max-length", type=int,
                   help="text: tokens per text (default: p95 of the training texts, at most 256)")  # fmt: skip
    p.add_argument("--truncation", choices=["auto", "head", "head+tail"],
                   help="text: what a long text keeps (default auto: head+tail if over 1%% are cut)")  # fmt: skip
    p.add_argument("--class-weights", choices=["auto", "balanced", "none"],
                   help="inverse-frequency loss weights (default auto: balanced when imbalanced)")  # fmt: skip
    p.add_argument("--select-metric", choices=["macro_f1", "accuracy", "loss"],
                   help="validation metric that picks the best epoch (default macro_f1)")  # fmt: skip
    p.add_argument("--patience", type=int, help="epochs without improvement before stopping; 0: never (default 3)")
    p.add_argument("--max-minutes", type=float, help="training-time budget; epochs are fitted to it (default: none)")
    p.add_argument("--no-group-by-length", dest="group_by_length", action="store_false", default=None,
                   help="text: batch texts in random order instead of by similar length")  # fmt: skip
    p.add_argument("--pooling", choices=["auto", "mean", "cls"],
                   help="text: classify the mean of the token states or the [CLS] token (default auto: mean for "
                        "sentence-transformer bases such as the packaged MiniLM)")  # fmt: skip
    p.add_argument("--keep", choices=["best", "last"], help="which epoch's model to save (default best)")
    p.add_argument("--head-learning-rate", type=float,
                   help="peak rate of the head (default: 10x --learning-rate; the same if frozen)")  # fmt: skip
    p.add_argument("--head-init", choices=["auto", "probe", "random"],
                   help="fit the head on frozen features first (probe) or start it at random "
                        "(default auto: probe with --freeze-base, else random)")  # fmt: skip
    p.add_argument("--max-steps", type=int, help="stop after N steps (default: no limit)")
    p.add_argument("--seed", type=int, help="default 42; the same seed reproduces the model")
    p.add_argument("--freeze-base", action="store_true", default=None, help="train only the classification head")
    p.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                   help="image: no random resized crops or flips while training")  # fmt: skip
    p.add_argument("--min-crop-scale", type=float,
                   help="image: smallest share of an image's area a random crop keeps (default 0.08)")  # fmt: skip
    p.add_argument("--no-hflip", dest="hflip", action="store_false", default=None,
                   help="image: no horizontal flips (for digits, text, arrows: anything a mirror changes)")  # fmt: skip
    p.add_argument(
        "--include-samples",
        metavar="MODEL",
        help="text, image: add MODEL's labelled fleet samples to the training split",
    )
    p.add_argument(
        "--samples-store", type=Path, help="sample store (default: $EDGELOOP_SAMPLES or ~/.edgeloop/samples)"
    )
    p.set_defaults(func=_cmd_train)


def _add_export(sub: Any) -> None:
    from_registry = "registry directory (default: $EDGELOOP_REGISTRY or ~/.edgeloop/registry)"
    p = sub.add_parser("export", help="export a training run through the gates into the model registry")
    p.add_argument("--run", type=Path, required=True, help="run directory from `cloud-train train`")
    p.add_argument("--model", default="intents", help="model name in the fleet (default intents)")
    p.add_argument("--version", type=int, help="default: the next version")
    p.add_argument("--quantize", choices=["dynamic-int8", "static-int8", "weight-int8", "fp16", "none"],
                   help="precision of the shipped model (default on a CPU: weight-int8 for text, static-int8 "
                        "calibrated on training images for image and digits; fp16 for --target gpu). "
                        "weight-int8 (text): int8 weights in blocks of 64, each text's activations quantized "
                        "per block, so its answer does not depend on its batch; dynamic-int8: one activation "
                        "scale per batch, about as fast, several times as many changed answers")  # fmt: skip
    # no default: _export_precision resolves it (export.quantize is not imported here: --help stays instant)
    p.add_argument("--target", choices=["avx2", "avx512_vnni", "arm64", "gpu"],
                   help="where the bundle runs (default: a CPU, with the --quantize default; dynamic int8 there "
                        "uses preset avx2). A CPU preset asks for dynamic int8 with it: avx2, unsigned 8-bit "
                        "weights, computed right by every CPU kernel; arm64 and avx512_vnni, signed 8-bit weights, "
                        "faster where the device computes them right, which its health check verifies. gpu: "
                        "a Jetson's CUDA and TensorRT providers, fp16 by default")  # fmt: skip
    p.add_argument("--max-accuracy-drop", type=float, default=1.0,
                   help="quantization gate: accuracy points the bundle may lose against fp32 (default 1.0); "
                        "a larger drop fails if significant (McNemar p < 0.05) or over 3x this")  # fmt: skip
    p.add_argument("--max-f1-drop", type=float, default=0.02,
                   help="quantization gate: macro-F1 the bundle may lose against fp32 (default 0.02); "
                        "a larger drop fails if significant (bootstrap p < 0.05) or over 3x this")  # fmt: skip
    p.add_argument("--registry", type=Path, help=from_registry)
    p.set_defaults(func=_cmd_export)


def add_training_commands(sub: Any) -> None:
    _add_train(sub)
    _add_export(sub)
