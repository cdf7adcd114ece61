"""Errors of the cloud side, each shown to the user as one line.

CloudTrainError          base: the CLI prints ``error: <message>`` and exits 2
├── DataError            a data set that is missing, empty, or lacks a column
├── KeyFileError         a signing key that is missing or not an ed25519 key
├── BrokerError          the MQTT broker cannot be reached or refused us
├── BundleError          a bundle that is incomplete or fails verification
└── UnreadableRelease    a retained release (or its manifest) chunk GC cannot read, so it clears nothing
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


class UnreadableRelease(CloudTrainError):
    """Chunk GC cannot tell which chunks some current releases need, so it cleared nothing.

    Attributes:
        topics: the release topics it could not read (or whose manifest it could not read).
    """

    def __init__(self, message: str, *, topics: list[str]) -> None:
        super().__init__(message)
        self.topics = topics
