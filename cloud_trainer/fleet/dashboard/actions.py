"""The rollout actions the dashboard offers when it holds the signing key: promote, pause, withdraw.

They are the operations of ``cloud-train rollout`` (:mod:`cloud_trainer.fleet.rollout`), done over the
dashboard's one connection: a broker that binds client ids to identities lets the cloud identity
hold one connection at a time.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cloud_trainer.fleet.dashboard.errors import NoSuchRelease, ReadOnly
from cloud_trainer.fleet.dashboard.releases import ReleaseWatch
from cloud_trainer.fleet.rollout import CurrentRelease, resign, save_paused
from cloud_trainer.releases.publish import Publisher
from cloud_trainer.releases.signing import load_private_key

Action = Literal["promote", "pause", "withdraw"]
ACTIONS: tuple[Action, ...] = ("promote", "pause", "withdraw")


@dataclass(frozen=True)
class Signing:
    """What the actions need beyond the connection: the release-signing key, and the registry whose
    ``rollouts/paused/`` keeps paused releases for ``cloud-train rollout resume``."""

    key: Path
    registry: Path

    def check(self) -> None:
        """Fail now (:class:`~cloud_trainer.errors.KeyFileError`) rather than at the first click."""
        load_private_key(self.key)


class RolloutActions:
    """Promote, pause and withdraw releases; every one refused (:class:`ReadOnly`) without ``signing``.

    Args:
        publisher: the open connection to publish on.
        releases: the fleet's current releases (an action names one by its topic).
        signing: the key and registry; ``None`` for a read-only dashboard.
    """

    def __init__(self, *, publisher: Publisher, releases: ReleaseWatch, signing: Signing | None) -> None:
        self._publisher = publisher
        self._releases = releases
        self._signing = signing
        self._lock = threading.Lock()  # one action at a time: the publisher's pending list is not shared

    @property
    def writable(self) -> bool:
        return self._signing is not None

    def run(self, action: str, topic: str) -> str:
        """Do ``action`` on the release retained on ``topic``; a line saying what was done."""
        with self._lock:
            return self._run(action, topic)

    def _run(self, action: str, topic: str) -> str:
        signing = self._signing
        if signing is None:
            raise ReadOnly("this dashboard is read-only: start it with --key to change rollouts")
        current = self._releases.get(topic)
        if current is None:
            raise NoSuchRelease(f"no release on {topic}")
        if action == "promote":
            return self._promote(current, signing)
        if action == "pause":
            self._withdraw(current)
            if current.release is None:
                return f"withdrew {current.describe()}"
            path = save_paused(signing.registry, current)
            return f"paused {current.describe()}: withdrawn, kept in {path} for `cloud-train rollout resume`"
        if action == "withdraw":
            self._withdraw(current)
            return f"withdrew {current.describe()}"
        raise NoSuchRelease(f"no action {action!r}; the actions are {', '.join(ACTIONS)}")

    def _promote(self, current: CurrentRelease, signing: Signing) -> str:
        release = current.release
        if release is None:
            raise NoSuchRelease(f"{current.topic} holds no readable release ({current.problem})")
        if release.canary_percent is None:
            return f"{current.describe()} is not a canary: nothing to promote"
        fresh, envelope = resign(release, signing.key, canary_percent=None)
        self._publisher.publish(current.topic, envelope)
        self._publisher.flush()
        promoted = CurrentRelease(current.topic, current.level, current.name, fresh)
        return f"promoted {current.describe()} to every targeted device: {promoted.describe()}"

    def _withdraw(self, current: CurrentRelease) -> None:
        self._publisher.publish(current.topic, b"")
        self._publisher.flush()
