"""``cloud-train chunks gc``: clear the retained chunks that no current release of a fleet needs.

cloud-train chunks gc --fleet homes-eu --dry-run                  # what it would clear
cloud-train chunks gc --fleet homes-eu --mqtt-config cloud/mqtt.toml
"""

from __future__ import annotations

import argparse
from typing import Any

from cloud_trainer.cli.common import add_connection_arguments, connection_from_args


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive number of seconds")
    return seconds


def _mb(size: int) -> str:
    return f"{size / 1e6:.2f} MB"


def _cmd_chunks_gc(args: argparse.Namespace) -> int:
    from cloud_trainer.errors import CloudTrainError
    from cloud_trainer.releases.chunk_gc import collect_garbage

    if args.timeout <= args.quiet_period:
        raise CloudTrainError("--timeout must be longer than --quiet-period")
    conn = connection_from_args(args)
    if args.legacy:
        from cloud_trainer.releases.chunk_gc import clear_legacy_chunks

        old = clear_legacy_chunks(
            host=conn.host, port=conn.port, fleet=args.fleet, dry_run=args.dry_run, protocol=args.mqtt_protocol,
            security=conn.security, topic_root=conn.topic_root, quiet_s=args.quiet_period, timeout_s=args.timeout,
        )  # fmt: skip
        verb = "would remove" if old.dry_run else "removed"
        print(f"{verb} {len(old.removed)} chunks ({_mb(old.bytes_freed)}) left in the old place (.../chunks/)")
        return 0
    result = collect_garbage(
        host=conn.host, port=conn.port, fleet=args.fleet, dry_run=args.dry_run, protocol=args.mqtt_protocol,
        security=conn.security, topic_root=conn.topic_root, quiet_s=args.quiet_period, timeout_s=args.timeout,
    )  # fmt: skip
    print(f"kept {len(result.kept)} chunks ({_mb(result.kept_bytes)}) that {result.releases} current release(s) need")
    if result.dry_run:
        for sha, size in result.removed.items():
            print(f"  would remove {sha} ({size} bytes)")
        print(f"would remove {len(result.removed)} chunks ({_mb(result.bytes_freed)}); dry run, nothing cleared")
    else:
        print(f"removed {len(result.removed)} chunks ({_mb(result.bytes_freed)})")
    return 0


def add_chunk_commands(sub: Any) -> None:
    p = sub.add_parser("chunks", help="the retained bundle chunks on the broker: gc")
    chunks = p.add_subparsers(dest="chunks_command", required=True)
    gc = chunks.add_parser(
        "gc",
        help="clear the retained chunks that no current release of a fleet needs",
        description="Clear the retained chunks of FLEET that no current release (fleet, group or device, any "
        "model) needs. Do not run it while a push to the same fleet is in progress: that push's chunks are on "
        "the broker before its release, so they look unneeded.",
    )
    gc.add_argument("--fleet", required=True)
    gc.add_argument("--dry-run", action="store_true", help="list what would be removed; clear nothing")
    gc.add_argument(
        "--legacy", action="store_true",
        help="clear the chunks earlier releases retained under {root}/{fleet}/chunks/ (once every agent is upgraded)",
    )  # fmt: skip
    add_connection_arguments(gc)  # --broker, --mqtt-config (TLS and the cloud identity)
    gc.add_argument("--mqtt-protocol", choices=["5", "3.1.1"], default="5", help="MQTT version")
    gc.add_argument(
        "--quiet-period", type=_seconds, default=0.5, metavar="SECONDS",
        help="a read of retained messages ends after this long without one; raise it for a distant broker",
    )  # fmt: skip
    gc.add_argument(
        "--timeout", type=_seconds, default=120.0, metavar="SECONDS",
        help="the longest one read of retained messages may take (listing the chunks moves them all)",
    )  # fmt: skip
    gc.set_defaults(func=_cmd_chunks_gc)
