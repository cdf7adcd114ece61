"""``cloud-train push``, ``cloud-train models list|show|diff`` and ``cloud-train keygen``: the model
registry, release keys and signed releases (:mod:`cloud_trainer.releases`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cloud_trainer.cli.common import add_connection_arguments, connection_from_args, registry_from_args


def _cmd_keygen(args: argparse.Namespace) -> int:
    from cloud_trainer.releases.signing import generate_keypair

    private, public = generate_keypair(args.out, name=args.name)
    print(f"signing key (keep secret): {private}\npublic key (copy to devices): {public}")
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from cloud_trainer.releases.publish import push_bundle
    from cloud_trainer.releases.registry import parse_ref
    from edge_agent.protocol import Target

    model, version = parse_ref(args.ref)
    entry = registry_from_args(args).verified(model, version)
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
    from cloud_trainer.releases.registry import diff, parse_ref, summary

    registry = registry_from_args(args)
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


def _add_keygen(sub: Any) -> None:
    keygen = sub.add_parser("keygen", help="create an ed25519 release-signing key pair")
    keygen.add_argument("--out", type=Path, required=True, help="directory for the key files")
    keygen.add_argument("--name", default="release", help="file name stem of the key pair")
    keygen.set_defaults(func=_cmd_keygen)


def add_release_commands(sub: Any) -> None:
    _add_push(sub)
    _add_models(sub)
    _add_keygen(sub)
