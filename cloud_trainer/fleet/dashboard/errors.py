"""Errors of the dashboard; the server answers each with a status code and the message.

CloudTrainError             (cloud_trainer.errors)
└── DashboardError          an action the dashboard cannot do
    ├── ReadOnly            started without the signing key: no action changes the fleet (403)
    └── NoSuchRelease       the release an action names is not (or no longer) on the broker (404)
"""

from __future__ import annotations

from cloud_trainer.errors import CloudTrainError


class DashboardError(CloudTrainError):
    """An action the dashboard cannot do; the message says why."""


class ReadOnly(DashboardError):
    pass


class NoSuchRelease(DashboardError):
    pass
