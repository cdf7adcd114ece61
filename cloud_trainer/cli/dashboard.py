"""``cloud-train dashboard``: a live web view of one fleet, on localhost by default.

    cloud-train dashboard --fleet plant-7                                   # read-only, http://127.0.0.1:8750/
    cloud-train dashboard --fleet plant-7 --port 0                          # any free port (printed)
    cloud-train dashboard --fleet plant-7 --key keys/release.key            # with promote, pause, withdraw

The fleet table, each device's latency and throughput over time, the rollouts' progress and the
recent errors, updated live (Server-Sent Events fed by the MQTT subscription). Ctrl-C or SIGTERM
ends it.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from cloud_trainer.cli.common import add_connection_arguments, connection_from_args

if TYPE_CHECKING:
    from cloud_trainer.fleet.dashboard import DashboardServer

DEFAULT_PORT = 8750


def _cmd_dashboard(args: argparse.Namespace) -> int:
    import asyncio

    from cloud_trainer.errors import CloudTrainError
    from cloud_trainer.fleet.dashboard import DashboardServer, DashboardService, Signing
    from cloud_trainer.fleet.dashboard.server import is_loopback
    from cloud_trainer.releases.registry import default_registry

    signing = None
    if args.key is not None:
        if not is_loopback(args.host):
            raise CloudTrainError(
                "the dashboard's actions have no login of their own: with --key it binds only a loopback "
                "address (reach it from elsewhere through an SSH tunnel)"
            )
        signing = Signing(key=args.key, registry=args.registry or default_registry())
        signing.check()
    conn = connection_from_args(args)
    try:
        service = DashboardService(
            host=conn.host, port=conn.port, fleet=args.fleet, security=conn.security, protocol=args.mqtt_protocol,
            topic_root=conn.topic_root, signing=signing, history_points=args.history, timeout_s=args.timeout,
        )  # fmt: skip
    except ValueError as exc:  # a fleet name that is no topic segment
        raise CloudTrainError(str(exc)) from None
    if not is_loopback(args.host):
        print(f"warning: serving on {args.host}: whoever reaches this port sees the fleet", file=sys.stderr)
    service.start()
    try:
        server = DashboardServer(service, host=args.host, port=args.port)
        asyncio.run(_serve(server, mode="read-write" if signing else "read-only", fleet=args.fleet))
    except KeyboardInterrupt:
        pass
    except OSError as exc:  # the port is taken, or the address is not this machine's
        raise CloudTrainError(f"cannot serve on {args.host}:{args.port}: {exc.strerror or exc}") from None
    finally:
        service.stop()
    return 0


async def _serve(server: DashboardServer, *, mode: str, fleet: str) -> None:
    import asyncio
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    url = await server.start()
    try:
        print(f"dashboard of fleet {fleet} ({mode}) on {url}", flush=True)
        await stop.wait()
    finally:
        await server.stop()


def add_dashboard_command(sub: Any) -> None:
    from pathlib import Path

    p = sub.add_parser(
        "dashboard",
        help="a live web dashboard of a fleet: devices, latency and throughput, rollouts, errors",
        description="Serves a live web dashboard of one fleet (read-only unless --key is given).",
    )
    p.add_argument("--fleet", required=True)
    p.add_argument("--host", default="127.0.0.1", help="address to serve on")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to serve on; 0: any free port (printed)")
    p.add_argument("--key", type=Path, help="ed25519 release-signing key (PEM): offer promote, pause, withdraw")
    p.add_argument("--registry", type=Path, help="registry whose rollouts/paused/ keeps paused releases")
    p.add_argument("--history", type=int, default=360, help="telemetry points kept per device")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to connect and read the snapshot")
    add_connection_arguments(p)  # --broker, --mqtt-config (the cloud identity; a reading one when read-only)
    p.add_argument("--mqtt-protocol", choices=["5", "3.1.1"], default="5", help="MQTT version")
    p.set_defaults(func=_cmd_dashboard)
