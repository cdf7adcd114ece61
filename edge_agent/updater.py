"""The update path: release → verify → download → assemble → install → health-check → activate.

Releases arrive on the MQTT thread and are queued; one worker thread runs each update to the end,
so the MQTT loop and the inference server never wait on it. Every refusal is reported with its
reason and the model that serves keeps serving.

Persisted (``state.json`` in the store): the newest sequence accepted per release topic, the
previous version, and the update in progress. A crash at any step leaves the active pointer on a
complete, verified version; the retained release arrives again after restart and the update is
redone, reusing every chunk already held.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import signal
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_agent.config import AgentConfig
from edge_agent.fetch import ChunkFetcher, FetchTimeout, assemble_bundle
from edge_agent.fetch_http import HttpChunkFetcher, HttpFetchError
from edge_agent.protocol.chunks import CHUNK_SIZE
from edge_agent.protocol.errors import ProtocolError
from edge_agent.protocol.manifest import MANIFEST_NAME, Manifest, sha256_bytes, verify_bundle_files
from edge_agent.protocol.release import Release, in_canary, open_release
from edge_agent.protocol.state import UpdateState
from edge_agent.protocol.topics import Topics
from edge_agent.runtime import Classifier, HealthCheckError, ModelHolder, ModelLoadError, load_classifier
from edge_agent.store import ModelStore

log = logging.getLogger(__name__)


class UpdateRefused(Exception):
    """A release or bundle was refused; the message is the reason reported to the fleet."""


class UpdateDeferred(Exception):
    """A transient failure (the broker stopped delivering, the disk is full): the update is retried."""


FAILPOINT_ENV = "EDGELOOP_FAILPOINT"
"""Fault injection for the crash tests: ``crash-after:<update state>`` SIGKILLs the agent right
after it has persisted and reported that state. Unset in production."""


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


def load_verified(bundle_dir: Path, config: AgentConfig) -> Classifier:
    """Verify every file of an installed bundle, load it and pass its golden vectors, or raise."""
    manifest = Manifest.read(bundle_dir)
    verify_bundle_files(bundle_dir, manifest)
    model = load_classifier(
        bundle_dir,
        manifest,
        providers=config.runtime.providers,
        intra_op_threads=config.runtime.intra_op_threads,
        inter_op_threads=config.runtime.inter_op_threads,
        allow_spinning=config.runtime.allow_spinning,
    )
    model.health_check(atol=config.update.golden_atol)
    return model


class Updater:
    """Runs updates for one model on a worker thread.

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
        trusted_keys: Mapping[str, Ed25519PublicKey],
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
        self._queue: queue.Queue[tuple[str, bytes] | Rollback | None] = queue.Queue(maxsize=64)
        self._state = store.load_state()
        self._desired: dict[int, tuple[str, Release]] = {}  # by specificity: 0 fleet, 1 group, 2 device
        self._retries: dict[str, int] = {}
        self._failpoint = os.environ.get(FAILPOINT_ENV, "").removeprefix("crash-after:")
        self._thread = threading.Thread(target=self._run, name="updater", daemon=True)
        self.idle = threading.Event()
        self.idle.set()

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def submit(self, topic: str, payload: bytes, _retained: bool = True) -> None:
        """Queue a release message (called on the MQTT thread); an empty one clears that topic's release."""
        try:
            self.idle.clear()
            self._queue.put_nowait((topic, payload))
        except queue.Full:
            log.warning("release queue full; dropping a message on %s (it is retained and comes again)", topic)

    @property
    def previous_version(self) -> int | None:
        value = self._state.get("previous_version")
        return value if isinstance(value, int) else None

    # -- the worker -------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, Rollback):
                self._rollback(item)
                continue
            topic, payload = item
            try:
                self._handle(topic, payload)
                self._retries.pop(topic, None)
            except UpdateRefused as exc:
                log.warning("update refused: %s", exc)
            except UpdateDeferred as exc:
                self._retry_later(topic, payload, str(exc))
            except Exception as exc:
                log.exception("update failed")
                self._report(StateChange("rejected", None, error=f"internal error: {exc}"))
            finally:
                if self._queue.empty():
                    self.idle.set()

    def request_rollback(self, version: int, reason: str) -> None:
        """Roll ``version`` back to the previous one, on the worker thread (the watch window calls this)."""
        self._queue.put(Rollback(version, reason))

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
        self._store.activate(previous)
        self._holder.swap(model)
        self._state["previous_version"] = item.version
        self._state["rolled_back"] = sorted({*self._state.get("rolled_back", []), item.version})
        self._set_update(
            StateChange(
                "rolled-back", item.version, error=f"v{item.version} rolled back: {item.reason}", active=previous
            )
        )
        log.warning("rolled back v%s to v%s: %s", item.version, previous, item.reason)

    def _retry_later(self, topic: str, payload: bytes, reason: str) -> None:
        attempt = self._retries.get(topic, 0) + 1
        self._retries[topic] = attempt
        delay = min(300.0, self._config.update.retry_base_s * 2 ** (attempt - 1))
        log.warning("update deferred (%s); retry %d in %.0fs", reason, attempt, delay)
        self._report(StateChange("idle", None, error=f"{reason}; retry {attempt} in {delay:.0f}s"))
        timer = threading.Timer(delay, self.submit, args=(topic, payload))
        timer.daemon = True
        timer.start()

    def _refuse(self, version: int | None, reason: str) -> UpdateRefused:
        self._report(StateChange("rejected", version, error=reason))
        return UpdateRefused(reason)

    def _handle(self, topic: str, payload: bytes) -> None:
        level = self._topics.specificity(topic)
        if not payload:  # the release on this topic was cleared: a less specific one may apply again
            if self._desired.pop(level, None) is not None and self._desired:
                topic, release = self._desired[max(self._desired)]
                if release.version != self._store.active_version() and not release.is_expired():
                    self._apply(topic, release)
            return
        try:
            release = open_release(payload, self._trusted)
        except ProtocolError as exc:
            raise self._refuse(None, f"release on {topic} refused: {exc}") from None
        self._check_release(topic, release)
        self._desired[level] = (topic, release)
        if level < max(self._desired):
            self._remember_sequence(topic, release)
            log.info("release v%s on %s is overridden by a more specific release", release.version, topic)
            return
        if release.version == self._store.active_version():
            self._remember_sequence(topic, release)
            return
        if release.version in self._state.get("rolled_back", []):
            raise self._refuse(
                release.version, f"v{release.version} was rolled back on this device; push a new version"
            )
        if not in_canary(
            fleet=self._config.fleet, device=self._config.device_id, model=release.model, percent=release.canary_percent
        ):
            log.info("release v%s is a %s%% canary this device is not in", release.version, release.canary_percent)
            return
        self._apply(topic, release)

    def _check_release(self, topic: str, release: Release) -> None:
        cfg = self._config
        if release.fleet != cfg.fleet or release.model != cfg.model:
            raise self._refuse(release.version, f"release is for {release.fleet}/{release.model}, not this device")
        target = release.target
        if (target.kind == "device" and target.name != cfg.device_id) or (
            target.kind == "group" and target.name != cfg.group
        ):
            raise self._refuse(release.version, f"release targets {target.kind} {target.name!r}, not this device")
        sequences = self._state.get("sequences", {})
        newest = sequences.get(topic, 0)
        if release.sequence < newest:
            raise self._refuse(
                release.version,
                f"release sequence {release.sequence} is lower than {newest} already accepted (rollback refused)",
            )
        if release.is_expired():
            raise self._refuse(release.version, f"release expired at {release.expires_at.isoformat()}")
        if release.manifest_size > CHUNK_SIZE:
            raise self._refuse(release.version, f"manifest of {release.manifest_size} bytes exceeds one chunk")

    def _remember_sequence(self, topic: str, release: Release) -> None:
        sequences = dict(self._state.get("sequences", {}))
        sequences[topic] = release.sequence
        self._state["sequences"] = sequences
        self._store.save_state(self._state)

    def _set_update(self, change: StateChange) -> None:
        self._state["update"] = {"state": change.state, "version": change.version}
        self._store.save_state(self._state)
        self._report(change)
        if self._failpoint == change.state:
            log.warning("failpoint: crashing after %s", change.state)
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)

    def _apply(self, topic: str, release: Release) -> None:
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

        self._set_update(StateChange("health-checking", version))
        try:
            model = load_verified(installed, self._config)
        except (ProtocolError, ModelLoadError, HealthCheckError) as exc:
            shutil.rmtree(installed, ignore_errors=True)
            raise self._refuse(version, f"bundle v{version} failed its health check: {exc}") from None

        previous = self._store.active_version()
        self._store.activate(version)
        self._on_activated(version)  # before the swap: every request the new version serves is watched
        self._holder.swap(model)
        self._state["previous_version"] = previous
        self._remember_sequence(topic, release)
        self._store.prune(self._config.update.keep_versions, protect={v for v in (version, previous) if v})
        self._store.drop_chunks(self._chunks_of_installed())
        self._set_update(StateChange("active", version, bytes_transferred=transferred, active=version))
        log.info("version %s active (was %s); %s bytes transferred", version, previous, transferred)

    def _download(self, release: Release) -> tuple[Manifest, bytes, int]:
        """Fetch and check the manifest, then every chunk not yet held; return them and the bytes transferred."""
        version = release.version
        web: HttpChunkFetcher | None = None
        if release.artifact_url:
            web = HttpChunkFetcher(
                base_url=release.artifact_url, store=self._store, timeout_s=self._config.update.chunk_timeout_s
            )
            transferred = self._over_http(
                version, lambda: web.fetch_manifest(release.manifest_sha256, release.manifest_size)
            )
        else:
            transferred = self._fetch_chunks(release.manifest_sha256)
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
            transferred += self._over_http(version, lambda: web.fetch(manifest, progress=progress))
        else:
            chunk_ids = [c for entry in manifest.files for c in entry.chunks]
            transferred += self._fetch_chunks(*chunk_ids, total_bytes=manifest.total_bytes, version=version)
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
        except HttpFetchError as exc:
            raise UpdateDeferred(f"download of v{version} stalled: {exc}") from None
        except ProtocolError as exc:
            raise self._refuse(version, f"download failed: {exc}") from None

    def _fetch_chunks(self, *chunk_ids: str, total_bytes: int = 0, version: int | None = None) -> int:
        progress = self._progress_reporter(version)

        sizes = dict.fromkeys(chunk_ids, CHUNK_SIZE)
        if total_bytes and chunk_ids:
            # Every chunk but a file's last is CHUNK_SIZE; the estimate only drives the progress bar.
            sizes = {c: min(CHUNK_SIZE, total_bytes) for c in chunk_ids}
        try:
            return self._fetcher.fetch(list(chunk_ids), sizes=sizes, progress=progress)
        except FetchTimeout as exc:
            raise UpdateDeferred(f"download of v{version or '?'} stalled: {exc}") from None
        except ProtocolError as exc:
            raise self._refuse(version, f"download failed: {exc}") from None
