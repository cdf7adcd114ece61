"""The update path: release → verify → download → assemble → install → health-check → activate.

Releases arrive on the MQTT thread and are queued; one worker thread runs each update to the end,
so the MQTT loop and the inference server never wait on it. Every refusal is reported with its
reason and the model that serves keeps serving.

The rules a release must pass (each refusal names the rule):

- signed by a trusted key, for this fleet and model, unexpired;
- its target (fleet, group or device) is the topic it arrived on: a release signed for the fleet
  cannot be replayed on a device topic, nor one for another device;
- its sequence is above the **floor**, the highest sequence accepted for this fleet and model on
  any topic level, unless it is the very release already accepted on that topic (the retained
  copy redelivered after a reconnect). A release shadowed by a more specific one only has to be
  newer than what its own topic carried before: it is not applied while it is shadowed.

Only the latest message on each topic counts. A retry re-reads the desired state instead of
resubmitting an old payload, and is dropped when the release it was for is no longer the one to
apply. A new message on the topic being applied, or on a more specific one, cancels the download
in progress; a withdrawal (an empty retained message) falls back to the next most specific release.

The trust state (:mod:`edge_agent.trust`) survives crashes; before the active pointer switches,
the update in progress is recorded with the version it replaces, so start-up can reconcile a crash
between the switch and the final state write: the active pointer is the truth.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from edge_agent.config import AgentConfig
from edge_agent.fetch import ChunkFetcher, FetchCancelled, FetchRefused, FetchTimeout, assemble_bundle
from edge_agent.fetch_http import HttpChunkFetcher, HttpFetchError
from edge_agent.protocol.chunks import CHUNK_SIZE
from edge_agent.protocol.errors import ProtocolError
from edge_agent.protocol.manifest import MANIFEST_NAME, Manifest, sha256_bytes, verify_bundle_files
from edge_agent.protocol.release import PublicKey, Release, in_canary, open_release
from edge_agent.protocol.state import UpdateState
from edge_agent.protocol.topics import Topics
from edge_agent.runtime import Classifier, HealthCheckError, ModelHolder, ModelLoadError, load_classifier
from edge_agent.runtime.memory import release_freed_memory
from edge_agent.runtime.session import CUDA, TENSORRT, provider_specs
from edge_agent.store import ModelStore
from edge_agent.trust import TopicRecord, TrustStore, UpdateRecord

log = logging.getLogger(__name__)


class UpdateRefused(Exception):
    """A release or bundle was refused; the message is the reason reported to the fleet."""


class UpdateDeferred(Exception):
    """A transient failure (the broker stopped delivering, the disk is full): the update is retried."""


class UpdateCancelled(Exception):
    """A newer message on the release's topic, or a more specific one, arrived during the update."""


FAILPOINT_ENV = "EDGELOOP_FAILPOINT"
"""Fault injection for the crash tests: ``crash-after:<point>`` SIGKILLs the agent right after it
has persisted and reported that update state, or (``switch``) right after the active pointer moved
and before the state says so. Unset in production."""


@dataclass(frozen=True)
class StateChange:
    state: UpdateState
    version: int | None
    progress: float | None = None
    bytes_transferred: int | None = None
    error: str | None = None
    active: int | None = None  # the version serving after this change, when it changed


Reporter = Callable[[StateChange], None]


@dataclass(frozen=True)
class Rollback:
    version: int
    reason: str


@dataclass(frozen=True)
class _Work:
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    in_snapshot: bool = False
    rollback: Rollback | None = None
    retry: bool = False


@dataclass(frozen=True)
class _Desired:
    topic: str
    release: Release
    payload: bytes
    digest: str  # sha256 of the signed envelope
    refused: bool = False  # its bundle was refused: it still shadows, but is not fetched again


SNAPSHOT_QUIET_S = 0.3
"""After the broker granted the release subscriptions, the retained snapshot is complete once no
release message has come for this long."""
SNAPSHOT_CAP_S = 10.0
"""A snapshot is evaluated after this long whatever happens (a SUBACK that never came)."""
HEALTH_CHECK_CRASHES = 2
"""A version whose health check was cut short by this many crashes is refused (a crash loop)."""


def load_verified(bundle_dir: Path, config: AgentConfig) -> Classifier:
    """Verify every file of an installed bundle, load it and pass its golden vectors, or raise."""
    manifest = Manifest.read(bundle_dir)
    verify_bundle_files(bundle_dir, manifest)
    runtime = config.runtime
    model = load_classifier(
        bundle_dir,
        manifest,
        providers=provider_specs(
            config.providers,
            engine_cache=engine_cache_dir(config, manifest.version) if runtime.trt_engine_cache else None,
            trt_fp16=runtime.trt_fp16,
            device_id=runtime.device_id,
        ),
        intra_op_threads=config.runtime.intra_op_threads,
        inter_op_threads=config.runtime.inter_op_threads,
        allow_spinning=config.runtime.allow_spinning,
    )
    model.health_check(atol=config.update.golden_atol)
    on_gpu = {TENSORRT, CUDA} & set(model.session.get_providers())
    if on_gpu and manifest.quantization == "dynamic-int8":
        log.warning(
            "v%s is dynamic int8: %s have no kernel for its MatMulInteger nodes, which run on the CPU; "
            "export GPU bundles with `cloud-train export --target gpu` (fp16)",
            manifest.version,
            ", ".join(on_gpu),
        )
    return model


def engine_cache_dir(config: AgentConfig, version: int) -> Path:
    """Where TensorRT keeps the engines of one installed version (removed with the version)."""
    return config.state_dir / "trt-engines" / config.model / f"v{version}"


class Updater:
    """Runs updates for one model on a worker thread.

    Messages are coalesced per topic: the MQTT thread records the latest payload of each release
    topic and marks it dirty; the worker evaluates dirty topics most specific first, so a burst of
    messages (the retained snapshot after a (re)connect, a replay flood) is judged as one state.
    After every (re)connect (:meth:`begin_snapshot`) nothing is evaluated until the broker has
    granted the release subscriptions and delivered what it retains (:meth:`end_snapshot` plus a
    quiet period): a topic that delivered nothing was cleared while the device was away.

    Args:
        config: the agent's config.
        store: the model store.
        fetcher: chunk downloader.
        holder: the serving model, swapped on activation.
        trusted_keys: release-signing keys by key id.
        report: called at every state change.
        on_activated: called with the version that just took traffic (the watch window starts).
    """

    def __init__(
        self,
        *,
        config: AgentConfig,
        store: ModelStore,
        fetcher: ChunkFetcher,
        holder: ModelHolder,
        trusted_keys: Mapping[str, PublicKey],
        report: Reporter,
        on_activated: Callable[[int], None] = lambda _version: None,
    ) -> None:
        self._config = config
        self._store = store
        self._fetcher = fetcher
        self._holder = holder
        self._trusted = dict(trusted_keys)
        self._report = report
        self._on_activated = on_activated
        self._topics = Topics(fleet=config.fleet, root=config.mqtt.topic_root)
        self.release_topics = self._topics.release_topics_for(
            device=config.device_id, group=config.group, model=config.model
        )
        self.trust = TrustStore(store.root)
        self._desired: dict[int, _Desired] = {}  # by specificity: 0 fleet, 1 group, 2 device
        self._retry: tuple[float, str, int] | None = None  # (due, digest of the release, attempt)
        self._attempts: dict[str, int] = {}
        self._cancel = threading.Event()
        # Shared with the MQTT thread, guarded by _cond:
        self._cond = threading.Condition()
        self._heard: dict[str, bytes] = {}  # the latest payload per release topic
        self._dirty: set[str] = set()
        self._rollbacks: list[Rollback] = []
        self._inflight: tuple[str, bytes, int] | None = None  # (topic, payload, specificity) being applied
        self._snapshot: dict[str, float] | None = None  # opened, granted, last (monotonic); None: closed
        self._snapshot_seen: set[str] = set()
        self._snapshot_ready = False
        self._stopping = False
        self._failpoint = os.environ.get(FAILPOINT_ENV, "").removeprefix("crash-after:")
        self._thread = threading.Thread(target=self._run, name="updater", daemon=True)
        self.idle = threading.Event()
        self.idle.set()

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cancel.set()
            self._cond.notify_all()
        self._thread.join(timeout=10)

    @property
    def trust_problem(self) -> str | None:
        """What was wrong with the persisted trust state at start-up (None if nothing)."""
        return self.trust.locked or self.trust.problem

    @property
    def previous_version(self) -> int | None:
        return self.trust.state.previous_version

    # -- the MQTT side (network thread) -------------------------------------------------------------
    def begin_snapshot(self) -> None:
        """A (re)connect: the broker is about to deliver every retained release again."""
        with self._cond:
            now = time.monotonic()
            self._snapshot = {"opened": now, "granted": 0.0, "last": now}
            self._snapshot_seen = set()
            self.idle.clear()
            self._cond.notify_all()

    def end_snapshot(self) -> None:
        """The broker granted the release subscriptions: what it retains follows right away."""
        with self._cond:
            if self._snapshot is not None:
                self._snapshot["granted"] = time.monotonic()
                self._cond.notify_all()

    def submit(self, topic: str, payload: bytes, _retained: bool = True) -> None:
        """Record a release message (called on the MQTT thread); an empty one withdraws that topic's release."""
        level = self._topics.specificity(topic)
        if level < 0 or topic not in self.release_topics:
            log.warning("ignored a message on %s: not one of this device's release topics", topic)
            return
        with self._cond:
            changed = self._heard.get(topic) != payload
            self._heard[topic] = payload
            self._dirty.add(topic)
            if self._snapshot is not None:
                self._snapshot_seen.add(topic)
                self._snapshot["last"] = time.monotonic()
            if self._inflight is not None and changed:
                busy_topic, _busy_payload, busy_level = self._inflight
                if topic == busy_topic or level > busy_level:
                    log.info("a new message on %s cancels the update in progress", topic)
                    self._cancel.set()
            self.idle.clear()
            self._cond.notify_all()

    def request_rollback(self, version: int, reason: str) -> None:
        """Roll ``version`` back to the previous one, on the worker thread (the watch window calls this)."""
        with self._cond:
            self._rollbacks.append(Rollback(version, reason))
            self.idle.clear()
            self._cond.notify_all()

    # -- start-up ---------------------------------------------------------------------------------
    def reconcile(self) -> None:
        """Make the persisted state agree with the active pointer after a crash; call before serving.

        - ``health-checking`` for the version now active: the switch happened just before the
          crash; it is recorded as done (and watched again).
        - ``health-checking`` for a version that is not active: the health check itself was cut
          short. Once is bad luck; a version that does it twice crash-loops the agent and is refused.
        - ``rolling-back``: the rollback is finished.
        """
        state = self.trust.state
        update = state.update
        if update is None or update.version is None:
            return
        active = self._store.active_version()
        version = update.version
        if update.state == "health-checking" and active == version:
            state.previous_version = update.previous
            state.update = UpdateRecord(state="active", version=active)
            self.trust.save()
            log.warning("v%s became active just before a crash; recorded it as active", active)
            self._report(StateChange("active", active, active=active))
            self._on_activated(active)
        elif update.state == "health-checking":
            crashes = state.health_crashes.get(version, 0) + 1
            state.health_crashes[version] = crashes
            if crashes >= HEALTH_CHECK_CRASHES:
                state.rolled_back = sorted({*state.rolled_back, version})
                state.update = UpdateRecord(state="rejected", version=version)
                reason = f"v{version} crashed the agent {crashes} times during its health check; refused"
                log.error("%s", reason)
                self._report(StateChange("rejected", version, error=reason))
            self.trust.save()
        elif update.state == "rolling-back":
            target = update.previous
            if active == version and target is not None and target in self._store.installed_versions():
                self._store.activate(target)
            state.previous_version = version
            state.update = UpdateRecord(state="rolled-back", version=version)
            self.trust.save()
            log.warning("finished the rollback of v%s interrupted by a crash", version)
            self._report(
                StateChange(
                    "rolled-back",
                    version,
                    error=f"v{version} rolled back (completed after a restart)",
                    active=self._store.active_version(),
                )
            )

    # -- the worker -------------------------------------------------------------------------------
    def _run(self) -> None:
        while (work := self._next_work()) is not None:
            if work.rollback is not None:
                self._guard(partial(self._rollback, work.rollback))
            elif work.retry:
                self._guard(self._retry_due)
            else:
                for topic, payload in work.messages:
                    self._guard(partial(self._on_message, topic, payload, work.in_snapshot))
                self._guard(self._apply_desired)

    def _next_work(self) -> _Work | None:
        """Wait for the next thing to do: a rollback, a settled snapshot, dirty topics or a due retry."""
        with self._cond:
            while not self._stopping:
                if self._rollbacks:
                    return _Work(rollback=self._rollbacks.pop(0))
                wait = self._snapshot_wait()
                if wait is None and self._snapshot_ready:
                    self._snapshot_ready = False
                    for topic in self.release_topics:  # a topic silent in the snapshot was cleared
                        if topic not in self._snapshot_seen:
                            self._heard[topic] = b""
                    self._dirty.clear()
                    device_first = reversed(self.release_topics)
                    return _Work(messages=[(t, self._heard.get(t, b"")) for t in device_first], in_snapshot=True)
                if wait is None and self._dirty:
                    topics = sorted(self._dirty, key=self._topics.specificity, reverse=True)
                    self._dirty.clear()
                    return _Work(messages=[(t, self._heard[t]) for t in topics])
                if wait is None and self._retry is not None:
                    wait = self._retry[0] - time.monotonic()
                    if wait <= 0:
                        return _Work(retry=True)
                if self._snapshot is None and not self._dirty:
                    self.idle.set()
                self._cond.wait(wait)
        return None

    def _snapshot_wait(self) -> float | None:
        """Seconds until the open snapshot settles (None once it has: ``_snapshot_ready``); hold ``_cond``."""
        snap = self._snapshot
        if snap is None:
            return None
        due = snap["opened"] + SNAPSHOT_CAP_S
        if snap["granted"]:
            due = min(due, max(snap["granted"], snap["last"]) + SNAPSHOT_QUIET_S)
        wait = due - time.monotonic()
        if wait > 0:
            return wait
        self._snapshot = None
        self._snapshot_ready = True
        return None

    def _guard(self, step: Callable[[], None]) -> None:
        try:
            step()
        except UpdateRefused as exc:
            log.warning("update refused: %s", exc)
        except OSError as exc:
            log.error("update failed on a storage error: %s", exc)
            self._report(StateChange("idle", None, error=f"storage error: {exc}"))
        except Exception as exc:
            log.exception("update failed")
            self._report(StateChange("rejected", None, error=f"internal error: {type(exc).__name__}: {exc}"))

    # -- desired state ----------------------------------------------------------------------------
    def _on_message(self, topic: str, payload: bytes, in_snapshot: bool) -> None:
        level = self._topics.specificity(topic)
        if not payload:
            self._withdraw(topic, level)
            return
        state = self.trust.state
        digest = sha256_bytes(payload)
        record = state.topics.get(topic)
        current = self._desired.get(level)
        if current is not None and current.digest == digest:
            return  # the same retained release again (a reconnect): nothing new
        if record is not None and record.refused and record.payload_sha256 == digest and not self.trust.locked:
            with contextlib.suppress(ProtocolError):  # accepted once, so it verifies; rebuilt from the bytes
                release = open_release(payload, self._trusted)
                self._desired[level] = _Desired(topic, release, payload, digest, refused=True)
                log.info("release v%s on %s was refused before; not fetched again", release.version, topic)
                return
        if self.trust.locked:
            raise self._refuse(None, f"release on {topic} refused: {self.trust.locked}")
        try:
            release = open_release(payload, self._trusted)
        except ProtocolError as exc:
            raise self._refuse(None, f"release on {topic} refused: {exc}") from None
        self._check_release(topic, level, release, digest, in_snapshot=in_snapshot)
        state.topics[topic] = TopicRecord(sequence=release.sequence, payload_sha256=digest)
        state.floor = max(state.floor, release.sequence)
        self.trust.save()
        self._desired[level] = _Desired(topic, release, payload, digest)
        if any(other > level for other in self._desired):
            log.info("release v%s on %s is shadowed by a more specific release", release.version, topic)

    def _withdraw(self, topic: str, level: int) -> None:
        record = self.trust.state.topics.get(topic)
        if record is not None and not record.withdrawn:
            record.withdrawn = True  # its sequence stays: the withdrawn release cannot come back
            record.payload_sha256 = None
            self.trust.save()
        dropped = self._desired.pop(level, None)
        if dropped is None:
            return
        log.info("release v%s on %s withdrawn", dropped.release.version, topic)
        if self._retry is not None and self._retry[1] == dropped.digest:
            self._retry = None
        active = self._store.active_version()
        self._report(StateChange("idle", active, error=f"release v{dropped.release.version} on {topic} withdrawn"))
        self._drop_unused_chunks()

    def _apply_desired(self) -> None:
        """Apply the most specific desired release, if it is not what runs already."""
        if not self._desired:
            return
        desired = self._desired[max(self._desired)]
        release = desired.release
        if desired.refused or release.version == self._store.active_version():
            self._retry = None
            return
        try:
            if release.version in self.trust.state.rolled_back:
                raise self._refuse(
                    release.version, f"v{release.version} was rolled back on this device; push a new version"
                )
            if release.is_expired():
                raise self._refuse(release.version, f"release expired at {release.expires_at.isoformat()}")
        except UpdateRefused:
            self._mark_refused(desired)
            raise
        if not in_canary(
            fleet=self._config.fleet, device=self._config.device_id, model=release.model, percent=release.canary_percent
        ):
            log.info("release v%s is a %s%% canary this device is not in", release.version, release.canary_percent)
            return
        with self._cond:
            if self._dirty or self._rollbacks or self._snapshot is not None or self._snapshot_ready:
                return  # newer messages first; the worker comes back here after them
            self._inflight = (desired.topic, desired.payload, self._topics.specificity(desired.topic))
            self._cancel.clear()
        try:
            self._apply(release)
            self._retry = None
            self._attempts.pop(desired.digest, None)
        except (UpdateDeferred, OSError) as exc:
            self._schedule_retry(desired.digest, str(exc))
        except UpdateCancelled as exc:
            log.info("update to v%s cancelled: %s", release.version, exc)
            self._retry = None
            self.trust.state.update = UpdateRecord(state="idle", version=None)
            self.trust.save()
            self._report(StateChange("idle", None, error=f"update to v{release.version} cancelled: {exc}"))
        except UpdateRefused:
            self._retry = None
            self._mark_refused(desired)
            self._store.drop_chunks(self._chunks_of_installed())  # what the refused release brought
            raise
        finally:
            with self._cond:
                self._inflight = None

    def _mark_refused(self, desired: _Desired) -> None:
        """Remember that this exact release was refused: a redelivery is not fetched again, and it
        keeps shadowing less specific releases (what runs keeps running)."""
        level = self._topics.specificity(desired.topic)
        if self._desired.get(level) == desired:
            self._desired[level] = _Desired(desired.topic, desired.release, desired.payload, desired.digest, True)
        state = self.trust.state
        record = state.topics.get(desired.topic)
        if record is not None and record.payload_sha256 == desired.digest:
            record.refused = True
        state.update = UpdateRecord(state="rejected", version=desired.release.version)
        self.trust.save()

    def _schedule_retry(self, digest: str, reason: str) -> None:
        attempt = self._attempts.get(digest, 0) + 1
        self._attempts = {digest: attempt}  # attempts of any other release are moot now
        delay = min(300.0, self._config.update.retry_base_s * 2 ** (attempt - 1))
        self._retry = (time.monotonic() + delay, digest, attempt)
        log.warning("update deferred (%s); retry %d in %.0fs", reason, attempt, delay)
        self._report(StateChange("idle", None, error=f"{reason}; retry {attempt} in {delay:.0f}s"))

    def _retry_due(self) -> None:
        retry, self._retry = self._retry, None
        if retry is None or not self._desired:
            return
        if self._desired[max(self._desired)].digest != retry[1]:
            log.info("dropped a retry: the release it was for is no longer the one to apply")
            return
        self._apply_desired()

    def _check_release(self, topic: str, level: int, release: Release, digest: str, *, in_snapshot: bool) -> None:
        cfg = self._config
        if release.fleet != cfg.fleet or release.model != cfg.model:
            raise self._refuse(release.version, f"release is for {release.fleet}/{release.model}, not this device")
        target = release.target
        kind, name, model = self._topics.release_target(topic) or ("?", "?", "?")
        if (target.kind, target.name, release.model) != (kind, name, model):
            raise self._refuse(
                release.version,
                f"release targets {target.kind} {target.name!r} model {release.model!r} but arrived on {topic} "
                f"({kind} {name!r} model {model!r}): replayed on another topic, refused",
            )
        state = self.trust.state
        record = state.topics.get(topic)
        redelivery = (
            record is not None
            and not record.withdrawn
            and record.sequence == release.sequence
            and record.payload_sha256 in (None, digest)  # None: recorded by an older agent
        )
        if not redelivery:
            if record is not None and release.sequence <= record.sequence:
                raise self._refuse(
                    release.version,
                    f"release sequence {release.sequence} on {topic} is not above {record.sequence}, "
                    f"{'withdrawn' if record.withdrawn else 'accepted'} there before (replay or rollback refused)",
                )
            # Below the floor only inside the retained snapshot, and only while shadowed: the current,
            # older release of a less specific topic (a fleet release under a device pin).
            shadowed = in_snapshot and any(other > level for other in self._desired)
            if not shadowed and release.sequence <= state.floor:
                raise self._refuse(
                    release.version,
                    f"release sequence {release.sequence} is not above {state.floor}, the newest accepted for "
                    f"{cfg.fleet}/{cfg.model} (replay or rollback refused)",
                )
        if release.is_expired():
            raise self._refuse(release.version, f"release expired at {release.expires_at.isoformat()}")
        if release.manifest_size > CHUNK_SIZE:
            raise self._refuse(release.version, f"manifest of {release.manifest_size} bytes exceeds one chunk")

    def _refuse(self, version: int | None, reason: str) -> UpdateRefused:
        self._report(StateChange("rejected", version, error=reason))
        return UpdateRefused(reason)

    # -- persisted update state -------------------------------------------------------------------
    def _set_update(self, change: StateChange, *, previous: int | None = None) -> None:
        self.trust.state.update = UpdateRecord(state=change.state, version=change.version, previous=previous)
        self.trust.save()
        self._report(change)
        self._crash_if(change.state)

    def _crash_if(self, point: str) -> None:
        if self._failpoint == point:
            log.warning("failpoint: crashing after %s", point)
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)

    # -- applying ---------------------------------------------------------------------------------
    def _apply(self, release: Release) -> None:
        version = release.version
        self._set_update(StateChange("downloading", version, progress=0.0))
        manifest, manifest_bytes, transferred = self._download(release)

        self._set_update(StateChange("verifying", version, progress=1.0, bytes_transferred=transferred))
        staging = self._store.fresh_staging(version)
        try:
            assemble_bundle(self._store, manifest, manifest_bytes, staging)
        except (ProtocolError, OSError) as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise self._refuse(version, f"bundle v{version} failed verification: {exc}") from None
        installed = self._store.install(staging, version)
        self._set_update(StateChange("staged", version, bytes_transferred=transferred))

        previous = self._store.active_version()
        self._set_update(StateChange("health-checking", version), previous=previous)
        try:
            model = load_verified(installed, self._config)
        except (ProtocolError, ModelLoadError, HealthCheckError) as exc:
            shutil.rmtree(installed, ignore_errors=True)
            raise self._refuse(version, f"bundle v{version} failed its health check: {exc}") from None

        self._store.activate(version)  # the recorded update names `previous`: start-up can reconcile
        self._crash_if("switch")
        self._on_activated(version)  # before the swap: every request the new version serves is watched
        self._holder.swap(model)
        del model
        release_freed_memory()  # the old session, once its last request is done
        self.trust.state.previous_version = previous
        removed = self._store.prune(self._config.update.keep_versions, protect={v for v in (version, previous) if v})
        for gone in removed:
            shutil.rmtree(engine_cache_dir(self._config, gone), ignore_errors=True)
        self._store.drop_chunks(self._chunks_of_installed())
        self._set_update(StateChange("active", version, bytes_transferred=transferred, active=version))
        log.info("version %s active (was %s); %s bytes transferred", version, previous, transferred)

    def _rollback(self, item: Rollback) -> None:
        previous = self.previous_version
        if self._store.active_version() != item.version:
            return
        if previous is None or previous not in self._store.installed_versions():
            self._report(
                StateChange("active", item.version, error=f"{item.reason}; no previous version to roll back to")
            )
            return
        try:
            model = load_verified(self._store.version_dir(previous), self._config)
        except (ProtocolError, ModelLoadError, HealthCheckError) as exc:
            self._report(StateChange("active", item.version, error=f"{item.reason}; rollback failed: {exc}"))
            return
        state = self.trust.state
        state.rolled_back = sorted({*state.rolled_back, item.version})  # before the switch: never re-applied
        state.update = UpdateRecord(state="rolling-back", version=item.version, previous=previous)
        self.trust.save()
        self._store.activate(previous)
        self._holder.swap(model)
        del model
        release_freed_memory()
        state.previous_version = item.version
        self._set_update(
            StateChange(
                "rolled-back", item.version, error=f"v{item.version} rolled back: {item.reason}", active=previous
            )
        )
        log.warning("rolled back v%s to v%s: %s", item.version, previous, item.reason)

    # -- downloading ------------------------------------------------------------------------------
    def _download(self, release: Release) -> tuple[Manifest, bytes, int]:
        """Fetch and check the manifest, then every chunk not yet held; return them and the bytes transferred."""
        version = release.version
        web: HttpChunkFetcher | None = None
        if release.artifact_url:
            try:
                web = HttpChunkFetcher(
                    base_url=release.artifact_url, store=self._store, timeout_s=self._config.update.chunk_timeout_s
                )
            except (HttpFetchError, ValueError) as exc:
                raise self._refuse(version, f"artifact_url {release.artifact_url!r} is not usable: {exc}") from None
            transferred = self._over_http(
                version, lambda: web.fetch_manifest(release.manifest_sha256, release.manifest_size)
            )
        else:
            transferred = self._fetch_chunks(
                {release.manifest_sha256: release.manifest_size}, version=version, progress=False
            )
        manifest_bytes = self._store.chunk_path(release.manifest_sha256).read_bytes()
        try:
            manifest = Manifest.parse(manifest_bytes, origin=f"manifest of version {version}")
        except ProtocolError as exc:
            raise self._refuse(version, str(exc)) from None
        if manifest.model != release.model or manifest.version != version:
            raise self._refuse(
                version,
                f"manifest is {manifest.model} v{manifest.version} but the release names "
                f"{release.model} v{version} (mix-and-match refused)",
            )
        if manifest.total_bytes > self._config.update.max_bundle_bytes:
            raise self._refuse(
                version,
                f"bundle of {manifest.total_bytes} bytes exceeds max_bundle_bytes "
                f"{self._config.update.max_bundle_bytes}",
            )
        free = shutil.disk_usage(self._store.root).free
        if free < 2 * manifest.total_bytes:
            raise UpdateDeferred(
                f"not enough disk for v{version}: {free} bytes free, {2 * manifest.total_bytes} needed"
            )
        if web is not None:
            progress = self._progress_reporter(version)
            transferred += self._over_http(
                version, lambda: web.fetch(manifest, progress=progress, cancelled=self._cancel.is_set)
            )
        else:
            transferred += self._fetch_chunks(manifest.chunk_sizes(), version=version)
        return manifest, manifest_bytes, transferred

    def _chunks_of_installed(self) -> set[str]:
        """Chunks worth keeping: those of installed versions, so a later update or pin reuses them."""
        keep: set[str] = set()
        for version in self._store.installed_versions():
            directory = self._store.version_dir(version)
            try:
                manifest_bytes = (directory / MANIFEST_NAME).read_bytes()
                manifest = Manifest.parse(manifest_bytes)
            except (OSError, ProtocolError):
                continue
            keep.add(sha256_bytes(manifest_bytes))
            keep.update(c for entry in manifest.files for c in entry.chunks)
        return keep

    def _drop_unused_chunks(self) -> None:
        """Delete chunks no installed version needs (a withdrawn release's), keeping those of the
        release desired now so its download resumes."""
        keep = self._chunks_of_installed()
        if self._desired:
            release = self._desired[max(self._desired)].release
            keep.add(release.manifest_sha256)
            try:
                manifest = Manifest.parse(self._store.chunk_path(release.manifest_sha256).read_bytes())
                keep.update(c for entry in manifest.files for c in entry.chunks)
            except (OSError, ProtocolError):
                pass
        self._store.drop_chunks(keep)

    def _progress_reporter(self, version: int | None) -> Callable[[int, int], None]:
        reported = [0.0]

        def progress(held: int, total: int) -> None:
            fraction = min(1.0, held / total) if total else 0.0
            if version is not None and fraction - reported[0] >= 0.1:  # a state message per 10%
                reported[0] = fraction
                self._report(StateChange("downloading", version, progress=round(fraction, 3)))

        return progress

    def _over_http(self, version: int, step: Callable[[], int | None]) -> int:
        try:
            return step() or 0
        except FetchCancelled as exc:
            raise UpdateCancelled(str(exc)) from None
        except HttpFetchError as exc:
            raise UpdateDeferred(f"download of v{version} stalled: {exc}") from None
        except ProtocolError as exc:
            raise self._refuse(version, f"download failed: {exc}") from None

    def _fetch_chunks(self, sizes: dict[str, int], *, version: int, progress: bool = True) -> int:
        """Fetch the chunks named in ``sizes`` (their exact expected sizes)."""
        try:
            return self._fetcher.fetch(
                sizes, progress=self._progress_reporter(version) if progress else None, cancelled=self._cancel.is_set
            )
        except FetchCancelled as exc:
            raise UpdateCancelled(str(exc)) from None
        except (FetchTimeout, FetchRefused) as exc:
            raise UpdateDeferred(f"download of v{version} stalled: {exc}") from None
        except ProtocolError as exc:
            raise self._refuse(version, f"download failed: {exc}") from None
