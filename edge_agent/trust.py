"""The persisted trust state of one model: what protects the device against replays and rollbacks.

It holds the **sequence floor** (the highest release sequence accepted for this fleet and model on
any topic level), the release last accepted on each topic, the versions rolled back on this
device, the previous version and the update in progress. Nothing may lower it: not a crash, not a
corrupt file, not a message on another topic.

On disk it is written twice, ``state.json`` and then ``state.backup.json``, each atomically
(temporary name, fsync, rename), with a revision number that grows with every write. Loading
takes the valid copy with the highest revision, so:

- a crash between the two writes leaves both readable (one a revision behind): nothing lost;
- a copy that cannot be read or parsed is copied aside (``*.corrupt-<sha256 prefix>``), the
  problem is logged and reported on the state topic, and the other copy is used (the next write
  replaces the bad one);
- if no copy can be read although one exists, the store is **locked**: every release is refused
  with the reason, nothing is written, and so a restart finds the same files and stays locked,
  until an operator runs ``edge-agent reset-trust``. A device that cannot prove its floor must not
  accept an old release; it keeps serving what it has.

State written by agents before this format (one ``state.json`` with per-topic ``sequences``) is
migrated: its floor is the highest sequence it held.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_agent.store import atomic_write

log = logging.getLogger(__name__)

TRUST_SCHEMA = "edgeloop.agent-state/1"
PRIMARY = "state.json"
BACKUP = "state.backup.json"

RecordedState = Literal[
    "idle", "downloading", "verifying", "staged", "health-checking", "active", "rejected", "rolled-back", "rolling-back"
]


class TopicRecord(BaseModel):
    """The release last accepted on one release topic."""

    model_config = ConfigDict(extra="forbid")

    sequence: int = Field(ge=0)
    payload_sha256: str | None = Field(default=None, description="of the signed envelope; None after a migration")
    withdrawn: bool = Field(default=False, description="the cloud cleared this topic since")
    refused: bool = Field(default=False, description="its bundle was refused: a redelivery is not fetched again")


class UpdateRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    state: RecordedState
    version: int | None = None
    previous: int | None = Field(default=None, description="the version active before this update's switch")


class TrustState(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_: Literal["edgeloop.agent-state/1"] = Field(default=TRUST_SCHEMA, alias="schema")  # type: ignore[arg-type]
    revision: int = Field(default=0, ge=0, description="grows with every write; the newer copy wins")
    floor: int = Field(default=0, ge=0, description="highest release sequence accepted for this fleet and model")
    topics: dict[str, TopicRecord] = Field(default_factory=dict)
    rolled_back: list[int] = Field(default_factory=list)
    previous_version: int | None = None
    update: UpdateRecord | None = None
    health_crashes: dict[int, int] = Field(
        default_factory=dict, description="version -> crashes during its health check (a crash loop is refused)"
    )


class TrustStore:
    """Loads and saves :class:`TrustState` under a model's directory.

    After construction, :attr:`state` is the state to use, :attr:`problem` a description of what
    was wrong with the files (None if nothing), and :attr:`locked` the reason releases must be
    refused (None if they may be accepted).
    """

    def __init__(self, root: Path) -> None:
        self.primary = root / PRIMARY
        self.backup = root / BACKUP
        self.problem: str | None = None
        self.locked: str | None = None
        self.state = self._load()

    # -- loading ----------------------------------------------------------------------------------
    def _load(self) -> TrustState:
        problems: list[str] = []
        found: list[TrustState] = []
        for path in (self.primary, self.backup):
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            except OSError as exc:
                problems.append(f"{path.name} cannot be read ({exc.strerror})")
                continue
            try:
                found.append(_parse(data))
            except ValueError as exc:
                aside = _copy_aside(path, data)
                problems.append(f"{path.name} is corrupt ({exc}); a copy is kept as {aside}")
        if problems:
            self.problem = "; ".join(problems)
        if found:
            state = _merge(found)
            if problems:
                self.problem = f"{self.problem}; recovered revision {state.revision} from the other copy"
                log.error("trust state: %s", self.problem)
            return state
        if problems:
            self.locked = (
                f"the trust state (sequence floor, rolled-back versions) is unreadable: {self.problem}; "
                "releases are refused until an operator runs `edge-agent reset-trust`"
            )
            log.error("trust state: %s", self.locked)
        return TrustState()

    # -- saving -----------------------------------------------------------------------------------
    def save(self) -> None:
        """Write both copies; the revision grows by one. Locked: nothing is written (see the module doc)."""
        if self.locked is not None:
            log.debug("trust state locked; not saved")
            return
        self.state.revision += 1
        data = self.state.model_dump_json(by_alias=True, indent=1).encode()
        atomic_write(self.primary, data)
        atomic_write(self.backup, data)

    def reset(self, *, floor: int) -> None:
        """Start over with a fresh state at ``floor`` (the operator's ``edge-agent reset-trust``)."""
        for path in (self.primary, self.backup):
            with contextlib.suppress(OSError):
                _copy_aside(path, path.read_bytes(), tag="reset")
        self.state = TrustState(floor=floor)
        self.problem = self.locked = None
        self.save()


def _merge(copies: list[TrustState]) -> TrustState:
    """The newest copy, with the protection of every copy: the highest floor and per-topic
    sequence, every rolled-back version. Whatever the revisions say, nothing is lowered."""
    state = max(copies, key=lambda s: s.revision).model_copy(deep=True)
    for other in copies:
        state.floor = max(state.floor, other.floor)
        state.rolled_back = sorted({*state.rolled_back, *other.rolled_back})
        for topic, record in other.topics.items():
            mine = state.topics.get(topic)
            if mine is None or record.sequence > mine.sequence:
                state.topics[topic] = record.model_copy()
        for version, crashes in other.health_crashes.items():
            state.health_crashes[version] = max(crashes, state.health_crashes.get(version, 0))
    return state


_OLD_KEYS = {"sequences", "previous_version", "rolled_back", "update"}


def _parse(data: bytes) -> TrustState:
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(raw, dict) or not raw:
        raise ValueError("not a JSON object with the trust state")
    if "schema" not in raw:
        if not set(raw) <= _OLD_KEYS:
            raise ValueError(f"no schema, and not the state of an older agent (keys {', '.join(sorted(raw))})")
        return _migrate(raw)
    try:
        return TrustState.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "document"
        raise ValueError(f"{where}: {err['msg']}") from None


def _migrate(old: dict[str, Any]) -> TrustState:
    """The format before the trust state: ``{"sequences": {topic: n}, "previous_version", "rolled_back", "update"}``."""
    sequences = old.get("sequences") or {}
    if not isinstance(sequences, dict) or not all(isinstance(v, int) for v in sequences.values()):
        raise ValueError("sequences is not a map of integers")
    update = old.get("update")
    try:
        return TrustState(
            floor=max(sequences.values(), default=0),
            topics={topic: TopicRecord(sequence=n) for topic, n in sequences.items()},
            rolled_back=list(old.get("rolled_back") or []),
            previous_version=old.get("previous_version"),
            update=UpdateRecord.model_validate(update) if isinstance(update, dict) else None,
        )
    except ValidationError as exc:
        raise ValueError(f"old-format state does not validate: {exc.errors()[0]['msg']}") from None


def _copy_aside(path: Path, data: bytes, *, tag: str = "corrupt") -> str:
    """Keep ``data`` (the content of ``path``) beside it, named by its hash: once per distinct content."""
    aside = path.with_name(f"{path.name}.{tag}-{hashlib.sha256(data).hexdigest()[:12]}")
    try:
        if not aside.exists():
            atomic_write(aside, data)
    except OSError as exc:
        log.error("cannot keep a copy of %s: %s", path, exc.strerror)
        return "(no copy: cannot write)"
    return aside.name
