"""``cloud-train``: fine-tune, export, register, sign and push models; run the end-to-end demo.

The parser is built here from one module per part of :mod:`cloud_trainer`; each adds its commands:

    training.py   train, export                   evaluate.py  evaluate          importer.py  import
    releases.py   push, models, keygen            chunks.py    chunks gc         demo.py      demo
    provision.py  pki, device add|revoke|list     rollout.py   rollout, device pin|unpin
    fleet.py      fleet status                    dashboard.py dashboard
    samples.py    collect, samples, sampling      common.py    --broker/--mqtt-config, --registry

Command modules import :mod:`cloud_trainer.cli.common` and nothing else of the CLI. Heavy packages
(torch, transformers, optimum) are imported inside the commands that need them, so
``cloud-train --help`` is instant. Errors the user can act on are one line, not a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from cloud_trainer.cli.chunks import add_chunk_commands
from cloud_trainer.cli.dashboard import add_dashboard_command
from cloud_trainer.cli.demo import add_demo_command
from cloud_trainer.cli.evaluate import add_evaluate_command
from cloud_trainer.cli.fleet import add_fleet_commands
from cloud_trainer.cli.importer import add_import_command
from cloud_trainer.cli.provision import add_provision_commands
from cloud_trainer.cli.releases import add_release_commands
from cloud_trainer.cli.rollout import add_rollout_commands
from cloud_trainer.cli.samples import add_sample_commands
from cloud_trainer.cli.training import add_training_commands
from cloud_trainer.errors import BrokerError, CloudTrainError

__all__ = ["build_parser", "main"]


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
        add_training_commands, add_release_commands, add_demo_command, add_provision_commands, add_sample_commands,
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
