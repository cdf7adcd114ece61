"""``cloud-train``: fine-tune, export, register, sign and push models; run the end-to-end demo.

Heavy packages (torch, transformers, optimum) are imported inside the commands that need them,
so ``cloud-train --help`` is instant. Errors the user can act on are one line, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from cloud_trainer.cli_chunks import add_chunk_commands
from cloud_trainer.cli_dashboard import add_dashboard_command
from cloud_trainer.cli_deploy import add_connection_arguments, add_deploy_commands, connection_from_args
from cloud_trainer.cli_evaluate import add_evaluate_command
from cloud_trainer.cli_fleet import add_fleet_commands
from cloud_trainer.cli_import import add_import_command
from cloud_trainer.cli_rollout import add_rollout_commands
from cloud_trainer.cli_samples import add_sample_commands
from cloud_trainer.errors import BrokerError, CloudTrainError

DEFAULT_BROKER = "127.0.0.1:1883"


def parse_broker(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"broker {value!r} is not HOST:PORT")
    return host, int(port)


def _registry(args: argparse.Namespace) -> Any:
    from cloud_trainer.registry import Registry, default_registry

    return Registry(args.registry or default_registry())


# -- commands ------------------------------------------------------------------------------------
def _cmd_train(args: argparse.Namespace) -> int:
    from cloud_trainer.families import family, train_options

    chosen = family(args.family)
    chosen.refuse_foreign_options(args, train_options())
    chosen.train(args)
    return 0


def _export_precision(args: argparse.Namespace, family: Any = None) -> tuple[str, str]:
    """``(quantization, CPU preset)`` for ``--quantize`` and ``--target``: a GPU target (a Jetson's
    CUDA and TensorRT providers) ships fp16 unless told otherwise; dynamic int8 is CPU-only there.
    On a CPU, a family (:class:`cloud_trainer.families.Family`) ships its ``cpu_quantization``
    unless told otherwise, and refuses what is not among its ``quantizations``."""
    if args.target == "gpu" and args.quantize == "dynamic-int8":
        raise CloudTrainError(
            "--target gpu: dynamic int8 (MatMulInteger) has no CUDA or TensorRT kernel and would run on the "
            "device's CPU; use --quantize fp16 (the default for gpu), static-int8 (QDQ, which TensorRT runs) or none"
        )
    if family is not None and args.quantize is not None and args.quantize not in family.quantizations:
        raise CloudTrainError(
            f"--quantize {args.quantize}: the {family.name} family ships {', '.join(family.quantizations)}"
        )
    if args.target != "gpu":
        return args.quantize or (family.cpu_quantization if family is not None else "dynamic-int8"), args.target
    return args.quantize or "fp16", "avx2"  # the preset is unused without dynamic int8


def _cmd_export(args: argparse.Namespace) -> int:
    from cloud_trainer.families import ExportOptions, family_of_run

    registry = _registry(args)
    run_family = family_of_run(args.run)
    quantization, target = _export_precision(args, run_family)
    options = ExportOptions(quantization=quantization, target=target, max_accuracy_drop=args.max_accuracy_drop,
                            max_f1_drop=args.max_f1_drop)  # fmt: skip
    entry, report = run_family.register(registry, args.run, model=args.model, version=args.version, options=options)
    print(json.dumps(report, indent=2))
    print(f"registered {entry.ref} in {registry.root} ({entry.manifest.total_bytes} bytes)")
    return 0


def _cmd_keygen(args: argparse.Namespace) -> int:
    from cloud_trainer.signing import generate_keypair

    private, public = generate_keypair(args.out, name=args.name)
    print(f"signing key (keep secret): {private}\npublic key (copy to devices): {public}")
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from cloud_trainer.publish import push_bundle
    from cloud_trainer.registry import parse_ref
    from edge_agent.protocol import Target

    model, version = parse_ref(args.ref)
    entry = _registry(args).verified(model, version)
    target = None
    if args.group:
        target = Target(kind="group", name=args.group)
    elif args.device:
        target = Target(kind="device", name=args.device)
    conn = connection_from_args(args)
    result = push_bundle(
        entry.bundle_dir, host=conn.host, port=conn.port, fleet=args.fleet, key_path=args.key, target=target,
        protocol=args.mqtt_protocol, canary_percent=args.canary, artifact_url=args.artifact_url,
        security=conn.security, topic_root=conn.topic_root, gc=args.gc,
    )  # fmt: skip
    r = result.release
    canary = f", canary {r.canary_percent:g}%" if r.canary_percent else ""
    print(
        f"pushed {r.model} v{r.version} (sequence {r.sequence}{canary}) to {result.topic}: "
        f"{result.chunks} chunks, {result.bytes} bytes"
    )
    if result.chunks_cleared:
        print(f"cleared {result.chunks_cleared} chunks of the release it replaced that no current release needs")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from cloud_trainer.registry import diff, parse_ref, summary

    registry = _registry(args)
    if args.models_command == "list":
        rows = [summary(registry.get(m, v)) for m in registry.models() for v in registry.versions(m)]
        if not rows:
            print(f"no models in {registry.root}")
            return 0
        print(
            f"{'model:version':<20} {'registered':<26} {'quantization':<13} {'accuracy':>8} {'macro-F1':>8} "
            f"{'split':<18} {'MB':>7} {'parent':>6}"
        )
        for row in rows:
            accuracy = f"{row['accuracy']:.3f}" if row["accuracy"] is not None else "-"
            macro_f1 = f"{row['macro_f1']:.3f}" if row["macro_f1"] is not None else "-"
            split = f"{row['split']} n={row['examples']}" if row["split"] and row["examples"] is not None else "-"
            print(
                f"{row['ref']:<20} {row['registered']:<26} {row['quantization']:<13} {accuracy:>8} {macro_f1:>8} "
                f"{split:<18} {row['bytes'] / 1e6:>7.1f} {row['parent'] or '-':>6}"
            )
        return 0
    if args.models_command == "show":
        entry = registry.get(*parse_ref(args.ref))
        manifest = entry.manifest.model_dump(by_alias=True, exclude={"files"})
        manifest["files"] = [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in entry.manifest.files]
        # stdout stays one JSON document; "summary" names the split and size the metrics were measured on
        shown = {"summary": summary(entry), "record": entry.record, "manifest": manifest}
        print(json.dumps(shown, indent=2, default=str))
        return 0
    a, b = (registry.get(*parse_ref(ref)) for ref in (args.a, args.b))
    changes = diff(a, b)
    print(f"{a.ref} -> {b.ref}: {len(changes)} difference(s)")
    for key, value in changes.items():
        print(f"  {key}: {json.dumps(value, default=str)}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from cloud_trainer.demo import DemoOptions, run_demo

    return run_demo(
        DemoOptions(
            broker=args.broker, workdir=args.workdir, epochs=args.epochs, max_steps=args.max_steps,
            broker_kind=args.broker_kind,
        )
    )  # fmt: skip


# -- parser --------------------------------------------------------------------------------------
def _add_train(sub: Any) -> None:
    from cloud_trainer.families import family, names

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
        "--include-samples", metavar="MODEL", help="text: add MODEL's labelled fleet samples to the training split"
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
                   help="precision of the shipped model (default on a CPU: dynamic-int8 for text, static-int8 "
                        "calibrated on training images for image and digits; fp16 for --target gpu). "
                        "weight-int8 (text): int8 weights with fp32 activations, as small as dynamic-int8 and "
                        "within a few thousandths of fp32's probabilities, but slower")  # fmt: skip
    p.add_argument("--target", choices=["avx2", "avx512_vnni", "arm64", "gpu"], default="avx2",
                   help="where the bundle runs: a CPU preset for dynamic int8, or gpu (a Jetson's CUDA and "
                        "TensorRT providers: fp16 by default)")  # fmt: skip
    p.add_argument("--max-accuracy-drop", type=float, default=1.0,
                   help="quantization gate: accuracy points the bundle may lose against fp32 (default 1.0); "
                        "a larger drop fails if significant (McNemar p < 0.05) or over 3x this")  # fmt: skip
    p.add_argument("--max-f1-drop", type=float, default=0.02,
                   help="quantization gate: macro-F1 the bundle may lose against fp32 (default 0.02); "
                        "a larger drop fails if significant (bootstrap p < 0.05) or over 3x this")  # fmt: skip
    p.add_argument("--registry", type=Path, help=from_registry)
    p.set_defaults(func=_cmd_export)


def _add_push(sub: Any) -> None:
    p = sub.add_parser("push", help="publish a registered version to a fleet as a signed, retained release")
    p.add_argument("ref", help="MODEL or MODEL:VERSION from the registry (default version: the newest)")
    p.add_argument("--fleet", required=True)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--group", help="only this group of the fleet")
    where.add_argument("--device", help="only this device")
    p.add_argument("--canary", type=float, metavar="PERCENT", help="only this share of the targeted devices")
    p.add_argument("--artifact-url", help="devices fetch the bundle from this http(s) directory, not MQTT chunks")
    p.add_argument("--key", type=Path, required=True, help="ed25519 signing key (PEM)")
    add_connection_arguments(p)  # --broker, --mqtt-config (TLS and the cloud identity)
    p.add_argument("--mqtt-protocol", choices=["5", "3.1.1"], default="5", help="MQTT version")
    p.add_argument("--registry", type=Path, help="registry directory")
    p.add_argument("--no-gc", dest="gc", action="store_false",
                   help="keep the chunks of the release this push replaces (by default those no current "
                        "release needs are cleared)")  # fmt: skip
    p.set_defaults(func=_cmd_push)


def _add_models(sub: Any) -> None:
    from_registry = "registry directory (default: $EDGELOOP_REGISTRY or ~/.edgeloop/registry)"
    p = sub.add_parser("models", help="the model registry: list, show, diff")
    p.add_argument("--registry", type=Path, help=from_registry)
    # accepted after the sub-command too; SUPPRESS keeps a value given before it
    after = argparse.ArgumentParser(add_help=False)
    after.add_argument("--registry", type=Path, default=argparse.SUPPRESS, help=from_registry)
    models = p.add_subparsers(dest="models_command", required=True)
    models.add_parser("list", help="every registered version", parents=[after])
    show = models.add_parser("show", help="one version's record and manifest", parents=[after])
    show.add_argument("ref", help="MODEL[:VERSION]")
    compare = models.add_parser("diff", help="what changed between two versions", parents=[after])
    compare.add_argument("a", help="MODEL:VERSION")
    compare.add_argument("b", help="MODEL:VERSION")
    p.set_defaults(func=_cmd_models)


def _add_misc(sub: Any) -> None:
    keygen = sub.add_parser("keygen", help="create an ed25519 release-signing key pair")
    keygen.add_argument("--out", type=Path, required=True, help="directory for the key files")
    keygen.add_argument("--name", default="release", help="file name stem of the key pair")
    keygen.set_defaults(func=_cmd_keygen)

    demo = sub.add_parser("demo", help="the whole loop on this machine: train, export, push, serve")
    demo.add_argument("--broker", type=parse_broker, help="use this broker (HOST:PORT) instead of starting one")
    demo.add_argument("--broker-kind", choices=["auto", "mosquitto", "amqtt"], default="auto",
                      help="which broker to start when --broker is not given")  # fmt: skip
    demo.add_argument("--workdir", type=Path, default=Path("demo-run"), help="scratch directory (wiped first)")
    demo.add_argument("--epochs", type=float, default=8.0, help="most training epochs")
    demo.add_argument("--max-steps", type=int, default=-1, help="cap training steps (quick runs)")
    demo.set_defaults(func=_cmd_demo)


class _ShowDefaults(argparse.HelpFormatter):
    """Adds "(default: X)" to an option's help unless it already names its default or has none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default in (None, False, argparse.SUPPRESS)
            or not action.option_strings
            or isinstance(action, argparse._HelpAction)
        ):
            return action.help
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """Every parser and sub-parser of ``cloud-train`` shows its defaults in ``--help``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _ShowDefaults)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cloud-train", description="Train, export, sign and push edge models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_train, _add_export, _add_push, _add_models, _add_misc, add_deploy_commands, add_sample_commands,
        add_evaluate_command, add_chunk_commands, add_fleet_commands, add_rollout_commands,
        add_dashboard_command, add_import_command,
    ):  # fmt: skip
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        code: int = args.func(args)
    except BrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except CloudTrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from export.errors import ExportError

        if isinstance(exc, ExportError):
            print(f"error: export failed: {exc}", file=sys.stderr)
            return 2
        raise
    return code


if __name__ == "__main__":
    raise SystemExit(main())
