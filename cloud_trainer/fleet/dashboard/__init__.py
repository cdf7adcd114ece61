"""``cloud-train dashboard``: a live web view of one fleet, served on localhost.

    service.py   the data plane: one MQTT connection; rows (FleetView), releases, history, errors
    releases.py  the fleet's retained releases, kept live
    history.py   per-device telemetry history and recent errors, in memory and bounded
    actions.py   promote, pause, withdraw (only with the signing key)
    server.py    aiohttp: the page, a JSON snapshot, Server-Sent Events, the actions
    static/      the page: plain HTML, JS and CSS, nothing from a CDN
    errors.py    DashboardError and its kinds

The CLI glue is :mod:`cloud_trainer.cli.dashboard`.
"""

from cloud_trainer.fleet.dashboard.actions import ACTIONS, RolloutActions, Signing
from cloud_trainer.fleet.dashboard.errors import DashboardError, NoSuchRelease, ReadOnly
from cloud_trainer.fleet.dashboard.server import DashboardServer, make_app
from cloud_trainer.fleet.dashboard.service import DashboardService

__all__ = [
    "ACTIONS",
    "DashboardError",
    "DashboardServer",
    "DashboardService",
    "NoSuchRelease",
    "ReadOnly",
    "RolloutActions",
    "Signing",
    "make_app",
]
