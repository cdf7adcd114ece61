"""Errors of the cloud side, each shown to the user as one line.

CloudTrainError          base: the CLI prints ``error: <message>`` and exits 2
├── DataError            a data set that is missing, empty, or lacks a column
├── KeyFileError         a signing key that is missing or not an ed25519 key
├── BrokerError          the MQTT broker cannot be reached or refused us
└── BundleError          a bundle that is incomplete or fails verification
"""

from __future__ import annotations


class CloudTrainError(Exception):
    """A user-facing error; the message is the whole story."""


class DataError(CloudTrainError):
    pass


class KeyFileError(CloudTrainError):
    pass


class BrokerError(CloudTrainError):
    pass


class BundleError(CloudTrainError):
    pass
