"""``cloud-train demo``: the whole loop on this machine. The demo and its embedded broker
(:mod:`cloud_trainer.demo`) are imported only when the command runs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cloud_trainer.cli.common import parse_broker


def _cmd_demo(args: argparse.Namespace) -> int:
    from cloud_trainer.demo.loop import DemoOptions, run_demo

    return run_demo(
        DemoOptions(
            broker=args.broker, workdir=args.workdir, epochs=args.epochs, max_steps=args.max_steps,
            broker_kind=args.broker_kind,
        )
    )  # fmt: skip


def add_demo_command(sub: Any) -> None:
    demo = sub.add_parser("demo", help="the whole loop on this machine: train, export, push, serve")
    demo.add_argument("--broker", type=parse_broker, help="use this broker (HOST:PORT) instead of starting one")
    demo.add_argument("--broker-kind", choices=["auto", "mosquitto", "amqtt"], default="auto",
                      help="which broker to start when --broker is not given")  # fmt: skip
    demo.add_argument("--workdir", type=Path, default=Path("demo-run"), help="scratch directory (wiped first)")
    demo.add_argument("--epochs", type=float, default=8.0, help="most training epochs")
    demo.add_argument("--max-steps", type=int, default=-1, help="cap training steps (quick runs)")
    demo.set_defaults(func=_cmd_demo)
