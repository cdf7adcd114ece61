"""``cloud-train pki init|collector-add|viewer-add`` and ``cloud-train device add|revoke|list``
(``device pin|unpin`` come from :mod:`cloud_trainer.cli.rollout`).

    cloud-train pki init --broker-host mqtt.example.com --release-key keys/release.pub
    cloud-train device add cam-12 --fleet plant-7 --group line-3 --out cam-12/
    cloud-train device revoke cam-12
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cloud_trainer.cli.common import parse_broker
from cloud_trainer.cli.rollout import add_pin_commands


def _pki(args: argparse.Namespace) -> Any:
    from cloud_trainer.fleet.provision import Pki, default_pki

    return Pki(args.pki or default_pki())


def _cmd_pki_init(args: argparse.Namespace) -> int:
    from cloud_trainer.fleet.provision import Pki, default_pki

    root = args.pki or default_pki()
    pki = Pki.init(
        root,
        broker_host=args.broker_host,
        extra_names=args.broker_name,
        cert_port=args.cert_port,
        password_port=args.password_port,
        topic_root=args.topic_root,
        release_key=args.release_key,
    )
    print(f"PKI in {pki.root}")
    print(f"  broker files (copy to /etc/mosquitto/edgeloop/): {pki.root / 'broker'}")
    print(f"  cloud identity for push:      --mqtt-config {pki.root / 'cloud' / 'mqtt.toml'}")
    print(f"  collector identity for collect: --mqtt-config {pki.root / 'collector' / 'mqtt.toml'}")
    return 0


def _cmd_pki_collector_add(args: argparse.Namespace) -> int:
    pki = _pki(args)
    identity = pki.add_collector(args.name)
    print(f"collector identity {identity}: --mqtt-config {pki.root / f'collector-{args.name}' / 'mqtt.toml'}")
    print(f"broker files changed: copy {pki.root / 'broker'}/{{acl,passwd,crl.pem}} and reload mosquitto")
    return 0


def _cmd_pki_viewer_add(args: argparse.Namespace) -> int:
    pki = _pki(args)
    identity = pki.add_viewer(args.name)
    print(f"viewer identity {identity} (read-only): --mqtt-config {pki.root / f'viewer-{args.name}' / 'mqtt.toml'}")
    print(f"broker files changed: copy {pki.root / 'broker'}/{{acl,passwd,crl.pem}} and reload mosquitto")
    return 0


def _cmd_device(args: argparse.Namespace) -> int:
    pki = _pki(args)
    if args.device_command == "add":
        record = pki.add_device(
            args.name,
            fleet=args.fleet,
            group=args.group,
            out=args.out,
            model=args.model,
            auth=args.auth,
            release_key=args.release_key,
            state_dir=args.state_dir,
            broker=args.broker,
        )
        what = f"certificate serial {record.serial:x}" if record.serial is not None else "password entry"
        print(f"device {record.name} (fleet {record.fleet}) added: {what}; config directory {args.out}")
        print(f"broker files changed: copy {pki.root / 'broker'}/{{acl,passwd,crl.pem}} and reload mosquitto")
        return 0
    if args.device_command == "revoke":
        record = pki.revoke_device(args.name)
        how = "certificate on the CRL" if record.serial is not None else "password removed"
        print(f"device {record.name} (fleet {record.fleet}) revoked: {how}, ACL entries removed")
        print(f"broker files changed: copy {pki.root / 'broker'}/{{acl,passwd,crl.pem}} and reload mosquitto")
        return 0
    for record in pki.devices():
        print(f"{record.name:<24} {record.fleet:<16} {record.group or '-':<12} {record.auth:<9} {record.issued_at}")
    return 0


def add_provision_commands(sub: Any) -> None:
    pki_help = "PKI directory (default: $EDGELOOP_PKI or ~/.edgeloop/pki)"
    p = sub.add_parser("pki", help="the broker's certificate authority and the cloud's identities")
    pki_sub = p.add_subparsers(dest="pki_command", required=True)
    init = pki_sub.add_parser("init", help="create the CA, the broker's certificate and files, the cloud identities")
    init.add_argument("--pki", type=Path, help=pki_help)
    init.add_argument("--broker-host", required=True, help="the broker's host name as devices will reach it")
    init.add_argument("--broker-name", action="append", default=[], help="another name or address of the broker")
    init.add_argument("--cert-port", type=int, default=8883, help="TLS listener with client certificates")
    init.add_argument("--password-port", type=int, default=8884, help="TLS listener with passwords")
    init.add_argument("--topic-root", default="edgeloop/v1", help="MQTT topic prefix the ACLs allow")
    init.add_argument("--release-key", type=Path, help="release.pub that devices will trust (default for device add)")
    init.set_defaults(func=_cmd_pki_init)
    coll = pki_sub.add_parser(
        "collector-add", help="another collector identity (one connection per identity: one per collector host)"
    )
    coll.add_argument("name", help="a suffix: the identity is edgeloop-collector-NAME")
    coll.add_argument("--pki", type=Path, help=pki_help)
    coll.set_defaults(func=_cmd_pki_collector_add)
    view = pki_sub.add_parser(
        "viewer-add", help="a read-only identity for fleet status --watch, rollout status and dashboards"
    )
    view.add_argument("name", help="a suffix: the identity is edgeloop-viewer-NAME")
    view.add_argument("--pki", type=Path, help=pki_help)
    view.set_defaults(func=_cmd_pki_viewer_add)

    d = sub.add_parser("device", help="devices: add (identity + config directory), revoke, list, pin, unpin")
    d.add_argument("--pki", type=Path, help=pki_help)
    dev = d.add_subparsers(dest="device_command", required=True)
    add = dev.add_parser("add", help="issue a device identity and write its ready-to-copy config directory")
    add.add_argument("name", help="device id (also its MQTT user name; unique on the broker)")
    add.add_argument("--fleet", required=True)
    add.add_argument("--group")
    add.add_argument("--out", type=Path, required=True, help="directory to write (becomes /etc/edge-agent)")
    add.add_argument("--model", default="intents", help="the model slot the device serves (default intents)")
    add.add_argument("--auth", choices=["cert", "password"], default="cert", help="client certificate (default)")
    add.add_argument("--release-key", type=Path, help="release.pub to trust (default: the one given at pki init)")
    add.add_argument("--state-dir", default="/var/lib/edge-agent", help="the agent's state directory on the device")
    add.add_argument("--broker", type=parse_broker, help="HOST:PORT devices connect to (default: from pki init)")
    revoke = dev.add_parser("revoke", help="revoke a device: CRL, password and ACL entries")
    revoke.add_argument("name")
    dev.add_parser("list", help="the provisioned devices")
    d.set_defaults(func=_cmd_device)
    add_pin_commands(dev)  # device pin|unpin: releases, not identities
