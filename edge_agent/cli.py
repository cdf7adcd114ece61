"""``edge-agent``: run the daemon, or check a config file.

    edge-agent run --config /etc/edge-agent/agent.toml
    edge-agent check-config /etc/edge-agent/agent.toml
    edge-agent reset-trust --config /etc/edge-agent/agent.toml --floor 41

Signals are handled here and only here: SIGTERM and SIGINT stop the agent cleanly.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from edge_agent import __version__


def _setup_logging(level: str) -> None:
    # Under systemd, journald adds its own timestamps and reads <N> priority prefixes; elsewhere a
    # terminal wants timestamps.
    if "JOURNAL_STREAM" in os.environ:
        from edge_agent.service import JournalFormatter

        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JournalFormatter())
        logging.basicConfig(level=level.upper(), handlers=[handler])
        return
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr)


if TYPE_CHECKING:
    from edge_agent.config import AgentConfig


def _cmd_check_config(args: argparse.Namespace) -> int:
    from edge_agent.app import load_trusted_keys
    from edge_agent.config import ConfigError, load_config
    from edge_agent.mqtt_security import MqttSecurity

    try:
        config = load_config(args.config)
        keys = load_trusted_keys(config)
        security = MqttSecurity.from_config(config.mqtt)  # reads the password; loads the TLS files below
        if security.tls:
            security.ssl_context()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.quiet:
        return 0
    print(config.model_dump_json(indent=2))
    print(f"trusted release keys: {', '.join(sorted(keys))}")
    print(f"MQTT: {config.mqtt.host}:{config.mqtt.port}, {security.describe()}")
    print(providers_report(config))
    return 0


def providers_report(config: AgentConfig) -> str:
    """Which of the configured execution providers this onnxruntime build has, and what it will use."""
    from edge_agent.runtime.session import available_providers, choose_providers, provider_name

    available = available_providers()
    wanted = config.providers
    used = [provider_name(p) for p in choose_providers(wanted)]
    missing = [p for p in wanted if p not in available]
    lines = [
        f"onnxruntime providers in this build: {', '.join(available)}",
        f"model {config.model} will run on: {' > '.join(used)}",
    ]
    if missing:
        lines.append(f"configured but not in this build (skipped): {', '.join(missing)}; on a Jetson install "
                     "the onnxruntime-gpu wheel for your JetPack (docs/operations.md)")  # fmt: skip
    return "\n".join(lines)


def _cmd_run(args: argparse.Namespace) -> int:
    from edge_agent.app import Agent
    from edge_agent.config import ConfigError, load_config

    _setup_logging(args.log_level)
    log = logging.getLogger("edge_agent")
    try:
        config = load_config(args.config)
        agent = Agent(config)
        agent.start()
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    host, port = agent.server.address
    log.info(
        "edge-agent %s serving on http://%s:%s (device %s, fleet %s)",
        __version__,
        host,
        port,
        config.device_id,
        config.fleet,
    )
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    from edge_agent.service import serve_until

    serve_until(agent, stop)  # READY, STATUS and watchdog pings to systemd; STOPPING, then agent.stop()
    log.info("stopped")
    return 0


def _cmd_reset_trust(args: argparse.Namespace) -> int:
    from edge_agent.config import ConfigError, load_config
    from edge_agent.store import ModelStore
    from edge_agent.trust import TrustStore

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    trust = TrustStore(ModelStore(state_dir=config.state_dir, model=config.model).root)
    if trust.locked is None and not args.force:
        print(
            f"the trust state of {config.model} is readable (floor {trust.state.floor}); "
            "nothing to reset (--force resets it anyway)",
            file=sys.stderr,
        )
        return 1
    trust.reset(floor=args.floor)
    print(
        f"trust state of {config.model} reset: sequence floor {args.floor}, no rolled-back versions; "
        f"old files kept beside {trust.primary}. Restart the agent."
    )
    if args.floor == 0:
        print("warning: floor 0 accepts any release the broker still holds; pass --floor with the last "
              "sequence you pushed (cloud-train keeps it in <key>.seq)", file=sys.stderr)  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description="edgeloop on-device inference agent")
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the agent until SIGTERM")
    run.add_argument("--config", type=Path, required=True, help="agent TOML config")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.set_defaults(func=_cmd_run)
    check = sub.add_parser("check-config", help="validate a config file and print what will be used")
    check.add_argument("config", type=Path)
    check.add_argument("--quiet", action="store_true", help="print only problems (systemd's ExecStartPre)")
    check.set_defaults(func=_cmd_check_config)
    reset = sub.add_parser(
        "reset-trust", help="start a fresh trust state (sequence floor) after it was found unreadable"
    )
    reset.add_argument("--config", type=Path, required=True, help="agent TOML config")
    reset.add_argument("--floor", type=int, default=0, help="the lowest release sequence to accept is above this")
    reset.add_argument("--force", action="store_true", help="reset even a readable trust state")
    reset.set_defaults(func=_cmd_reset_trust)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
