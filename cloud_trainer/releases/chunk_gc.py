"""Garbage collection of retained chunks: clear the chunks that no current release needs.

Bundles reach devices as retained chunks on ``{chunk_root}/{fleet}/{sha256}``
(:mod:`edge_agent.protocol.chunks`). A push replaces a release but not the chunks of the release
it replaced, so without this module a broker grows with every version. A fleet's **live set** is
what its current releases need: for every release retained on its fleet, group and device
release topics (all models), the release's manifest and every chunk that manifest lists. Every
other chunk is garbage.

- :func:`collect_garbage` sweeps a whole fleet (``cloud-train chunks gc``).
- :class:`SupersededChunks` is the automatic GC of ``push_bundle``: it reads the release a push
  is about to replace and, after the push, clears the chunks only that release used.

Safety comes first, since a live chunk cleared by mistake breaks every device still installing
that bundle:

- Releases are parsed without verifying their signature: an unverifiable release only keeps more.
- A release that cannot be parsed, or whose manifest cannot be read, makes the sweep delete
  nothing (:class:`~cloud_trainer.errors.UnreadableRelease`, naming each topic), because its
  chunks cannot be told from garbage. A withdrawn release (an empty retained message) needs nothing.
- The chunks are listed before the releases are read, so a push that lands during a sweep keeps
  its chunks unless they were already on the broker before the sweep began and its release
  arrives after the sweep read the releases. Still: do not sweep while another push to the same
  fleet is in progress (docs/operations.md).

Reading what a broker retains: MQTT has no end-of-retained marker. A read subscribes and waits
for each SUBACK (the broker sends the retained messages right after it), then ends when every
exact topic it asked for has arrived or else when no message has come for a quiet period, all
bounded by a timeout.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from pydantic import ValidationError

from cloud_trainer.errors import BrokerError, CloudTrainError, UnreadableRelease
from cloud_trainer.releases.publish import Publisher
from edge_agent.mqtt_security import MqttSecurity
from edge_agent.protocol import MalformedPayload, Manifest, ProtocolError, Release, SignedEnvelope, Topics
from edge_agent.transport import MqttTransport, TransportError

log = logging.getLogger(__name__)

QUIET_S = 0.5
"""Default quiet period: a read of retained messages ends after this long without one."""
TIMEOUT_S = 120.0
"""Default bound on one read of retained messages (listing every chunk of a fleet moves them all)."""
CONNECT_TIMEOUT_S = 10.0

__all__ = [
    "QUIET_S",
    "TIMEOUT_S",
    "GcResult",
    "LiveSet",
    "SupersededChunks",
    "collect_garbage",
    "parse_release",
    "read_live_set",
]


@dataclass(frozen=True)
class GcResult:
    """What a sweep found and did.

    Attributes:
        releases: how many current releases the live set came from.
        kept: the chunks on the broker that a current release needs (chunk id -> bytes).
        removed: the chunks cleared, or in a dry run the chunks a sweep would clear (id -> bytes).
        dry_run: whether nothing was cleared.
    """

    releases: int
    kept: Mapping[str, int]
    removed: Mapping[str, int]
    dry_run: bool

    @property
    def kept_bytes(self) -> int:
        return sum(self.kept.values())

    @property
    def bytes_freed(self) -> int:
        """Bytes the broker no longer retains (in a dry run: would no longer retain)."""
        return sum(self.removed.values())


@dataclass(frozen=True)
class LiveSet:
    """What a fleet's current releases need on the broker.

    Attributes:
        releases: every current release by its topic.
        chunks: the ids of the manifests of those releases and of every chunk the manifests list.
        problems: topic -> why what that release needs is unknown; a sweep deletes nothing while
            there is one.
    """

    releases: Mapping[str, Release]
    chunks: frozenset[str]
    problems: Mapping[str, str]


@dataclass(frozen=True, kw_only=True)
class _Broker:
    host: str
    port: int
    protocol: str
    security: MqttSecurity | None
    quiet_s: float
    timeout_s: float

    def __post_init__(self) -> None:
        if not 0 < self.quiet_s < self.timeout_s:
            raise ValueError(f"need 0 < quiet_s < timeout_s, got {self.quiet_s:g} and {self.timeout_s:g}")


@dataclass
class _Snapshot:
    """Retained messages by topic: every size, and the payloads when asked for."""

    sizes: dict[str, int] = field(default_factory=dict)
    payloads: dict[str, bytes] = field(default_factory=dict)

    def record(self, topic: str, payload: bytes, *, keep_payload: bool) -> None:
        if not payload:  # an empty retained message clears the topic
            self.sizes.pop(topic, None)
            self.payloads.pop(topic, None)
            return
        self.sizes[topic] = len(payload)
        if keep_payload:
            self.payloads[topic] = payload


# -- public API -----------------------------------------------------------------------------------
def parse_release(payload: bytes) -> Release:
    """The release inside a signed envelope, without checking the signature; ``MalformedPayload`` if none.

    Chunk GC keeps what any release names, so it needs no key: a forged release only keeps more.
    """
    try:
        envelope = SignedEnvelope.model_validate_json(payload)
    except ValidationError as exc:
        raise MalformedPayload(f"not a signed release envelope ({_first_error(exc)})") from None
    try:
        return Release.model_validate_json(envelope.payload)
    except ValidationError as exc:
        raise MalformedPayload(f"its envelope's payload is not a valid release ({_first_error(exc)})") from None


def read_live_set(
    *,
    host: str,
    port: int,
    fleet: str,
    protocol: str = "5",
    security: MqttSecurity | None = None,
    topic_root: str | None = None,
    quiet_s: float = QUIET_S,
    timeout_s: float = TIMEOUT_S,
) -> LiveSet:
    """Read every current release of ``fleet`` and the manifests they name; see :class:`LiveSet`."""
    broker = _Broker(host=host, port=port, protocol=protocol, security=security, quiet_s=quiet_s, timeout_s=timeout_s)
    return _live_set(broker, _topics(fleet, topic_root))


def collect_garbage(
    *,
    host: str,
    port: int,
    fleet: str,
    dry_run: bool = False,
    protocol: str = "5",
    security: MqttSecurity | None = None,
    topic_root: str | None = None,
    quiet_s: float = QUIET_S,
    timeout_s: float = TIMEOUT_S,
) -> GcResult:
    """Clear (an empty retained message, QoS 1) every retained chunk of ``fleet`` that no current release needs.

    Args:
        host: broker host.
        port: broker port.
        fleet: the fleet whose chunks to sweep.
        dry_run: find the garbage and report it, but clear nothing.
        protocol: MQTT version, ``"5"`` or ``"3.1.1"``.
        security: TLS and credentials (the cloud identity); none by default.
        topic_root: the topic prefix (default ``edgeloop/v1``).
        quiet_s: a read of retained messages ends after this long without a message.
        timeout_s: the longest one read may take.

    Raises:
        UnreadableRelease: a current release, or its manifest, cannot be read; nothing was cleared.
        BrokerError: the broker cannot be reached, or a read did not finish within ``timeout_s``.
    """
    broker = _Broker(host=host, port=port, protocol=protocol, security=security, quiet_s=quiet_s, timeout_s=timeout_s)
    topics = _topics(fleet, topic_root)
    on_broker = _list_chunks(broker, topics)  # before the releases: see the module docstring
    live = _live_set(broker, topics)
    if live.problems:
        raise _refusal(live.problems)
    kept = {sha: size for sha, size in on_broker.items() if sha in live.chunks}
    garbage = {sha: size for sha, size in sorted(on_broker.items()) if sha not in live.chunks}
    if garbage and not dry_run:
        _clear(broker, topics, garbage)
    log.info(
        "chunk GC of fleet %s: %d releases, %d chunks kept, %d %s (%d bytes)",
        fleet, len(live.releases), len(kept), len(garbage), "garbage" if dry_run else "cleared",
        sum(garbage.values()),
    )  # fmt: skip
    return GcResult(releases=len(live.releases), kept=kept, removed=garbage, dry_run=dry_run)


def clear_legacy_chunks(
    *,
    host: str,
    port: int,
    fleet: str,
    dry_run: bool = False,
    protocol: str = "5",
    security: MqttSecurity | None = None,
    topic_root: str | None = None,
    quiet_s: float = QUIET_S,
    timeout_s: float = TIMEOUT_S,
) -> GcResult:
    """Clear every chunk retained where earlier releases kept them (``{root}/{fleet}/chunks/``): once every
    agent of the fleet fetches from the chunk root (this release on), none of them is read again."""
    broker = _Broker(host=host, port=port, protocol=protocol, security=security, quiet_s=quiet_s, timeout_s=timeout_s)
    topics = _topics(fleet, topic_root)
    old = _list_chunks(broker, topics, legacy=True)
    if old and not dry_run:
        _clear(broker, topics, old, legacy=True)
    return GcResult(releases=0, kept={}, removed=dict(sorted(old.items())), dry_run=dry_run)


class SupersededChunks:
    """The automatic GC of a push: clears the chunks of the release it replaced that nothing needs any more.

    :meth:`read` before the push reads the release retained on the push's topic; :meth:`clear`
    after the push (the new release published and acknowledged) clears that release's manifest
    and chunks, except those a current release of the fleet needs. Neither raises: a push has
    succeeded whatever happens here, so every failure is a logged warning and clears nothing.
    """

    def __init__(self, *, topic: str, previous: Release | None, topics: Topics, broker: _Broker) -> None:
        self.topic = topic
        self.previous = previous
        self._topics = topics
        self._broker = broker

    @classmethod
    def read(
        cls,
        topic: str,
        *,
        host: str,
        port: int,
        fleet: str,
        protocol: str = "5",
        security: MqttSecurity | None = None,
        topic_root: str | None = None,
        quiet_s: float = QUIET_S,
        timeout_s: float = TIMEOUT_S,
        transport: MqttTransport | None = None,
    ) -> SupersededChunks:
        """Note the release retained on ``topic`` now, which a push to ``topic`` is about to replace
        (over ``transport``, the push's own connection, when given)."""
        broker = _Broker(
            host=host, port=port, protocol=protocol, security=security, quiet_s=quiet_s, timeout_s=timeout_s
        )
        topics = _topics(fleet, topic_root)
        previous = None
        try:
            payload = _read_retained(broker, [topic], keep_payloads=True, transport=transport).payloads.get(topic)
            previous = parse_release(payload) if payload else None
        except (CloudTrainError, ProtocolError) as exc:
            log.warning(
                "automatic chunk GC skipped: cannot read the release on %s that this push replaces (%s); "
                "its chunks stay until `cloud-train chunks gc`",
                topic, exc,
            )  # fmt: skip
        return cls(topic=topic, previous=previous, topics=topics, broker=broker)

    def clear(self) -> tuple[str, ...]:
        """Clear what only the replaced release used; the ids of the chunks cleared."""
        previous = self.previous
        if previous is None:
            return ()
        try:
            return self._sweep(previous)
        except CloudTrainError as exc:
            log.warning(
                "automatic chunk GC after the push to %s cleared nothing: %s (the push itself succeeded; "
                "`cloud-train chunks gc` clears the old chunks later)",
                self.topic, exc,
            )  # fmt: skip
        except Exception:
            log.exception("automatic chunk GC after the push to %s failed; the push itself succeeded", self.topic)
        return ()

    def _sweep(self, previous: Release) -> tuple[str, ...]:
        live = _live_set(self._broker, self._topics)
        if live.problems:
            raise _refusal(live.problems)
        sha = previous.manifest_sha256
        manifest = _read_manifests(self._broker, self._topics, {sha})[sha]
        if not isinstance(manifest, Manifest):  # already cleared, or an --artifact-url release
            log.info("no chunks of the replaced release on %s to clear: its manifest %s", self.topic, manifest)
            return ()
        needed = {sha, *(chunk for entry in manifest.files for chunk in entry.chunks)}
        garbage = sorted(needed - live.chunks)
        if garbage:
            _clear(self._broker, self._topics, garbage)
        log.info(
            "cleared %d chunks of %s v%s, replaced on %s", len(garbage), previous.model, previous.version, self.topic
        )
        return tuple(garbage)


# -- the live set ---------------------------------------------------------------------------------
def _live_set(broker: _Broker, topics: Topics) -> LiveSet:
    retained = _read_retained(broker, _release_filters(topics), keep_payloads=True).payloads
    releases: dict[str, Release] = {}
    problems: dict[str, str] = {}
    for topic, payload in sorted(retained.items()):
        try:
            releases[topic] = parse_release(payload)
        except ProtocolError as exc:
            problems[topic] = str(exc)
    manifests = _read_manifests(broker, topics, {release.manifest_sha256 for release in releases.values()})
    chunks: set[str] = set()
    for topic, release in releases.items():
        chunks.add(release.manifest_sha256)
        manifest = manifests[release.manifest_sha256]
        if isinstance(manifest, Manifest):
            chunks.update(chunk for entry in manifest.files for chunk in entry.chunks)
        elif release.artifact_url is None:  # devices fetch this bundle from the broker, so it must be there
            problems[topic] = f"its manifest {release.manifest_sha256[:12]}… {manifest}"
    return LiveSet(releases=releases, chunks=frozenset(chunks), problems=problems)


def _read_manifests(broker: _Broker, topics: Topics, shas: Iterable[str]) -> dict[str, Manifest | str]:
    """Each manifest by id, or why it cannot be read."""
    wanted = sorted(set(shas))
    if not wanted:
        return {}
    payloads = _read_retained(broker, [topics.chunk(sha) for sha in wanted], keep_payloads=True).payloads
    manifests: dict[str, Manifest | str] = {}
    for sha in wanted:
        payload = payloads.get(topics.chunk(sha))
        if payload is None:
            manifests[sha] = "is not on the broker"
            continue
        try:
            manifests[sha] = Manifest.parse(payload, origin="the retained chunk")
        except ProtocolError as exc:
            manifests[sha] = f"cannot be read: {exc}"
    return manifests


def _list_chunks(broker: _Broker, topics: Topics, *, legacy: bool = False) -> dict[str, int]:
    """Every chunk the broker retains for the fleet (``legacy``: where earlier releases kept them): id -> bytes."""
    prefix = f"{topics.legacy_chunk_base() if legacy else topics.chunk_base}/"
    # Only retained deliveries: a chunk published while we listen belongs to a push in progress.
    sizes = _read_retained(broker, [f"{prefix}+"], keep_payloads=False, live_messages=False).sizes
    chunks, odd = {}, []
    for topic, size in sizes.items():
        name = topic.removeprefix(prefix)
        if _is_chunk_id(name):
            chunks[name] = size
        else:
            odd.append(topic)
    if odd:
        log.warning("left %d retained messages alone that are not chunks: %s", len(odd), ", ".join(sorted(odd)[:5]))
    return chunks


def _release_filters(topics: Topics) -> list[str]:
    # The wildcard forms of Topics.fleet_release, group_release and device_release.
    return [f"{topics.base}/releases/+", f"{topics.base}/groups/+/releases/+", f"{topics.base}/devices/+/releases/+"]


# -- MQTT -----------------------------------------------------------------------------------------
def _read_retained(
    broker: _Broker,
    filters: Sequence[str],
    *,
    keep_payloads: bool,
    live_messages: bool = True,
    transport: MqttTransport | None = None,
) -> _Snapshot:
    """What the broker retains on ``filters``; see the module docstring for when a read ends.

    ``live_messages=False`` ignores messages published while we listen (delivered without the
    retain flag), except the empty ones that clear a topic. ``transport``: an open connection to
    read over (its subscriptions are removed after), instead of a connection of our own: a broker
    that binds client ids to identities (``use_username_as_clientid``) lets one identity hold only
    one connection at a time.
    """
    snapshot = _Snapshot()
    wildcards = any("+" in f or "#" in f for f in filters)
    exact = None if wildcards else set(filters)  # a read of exact topics is over once each has arrived
    cond = threading.Condition()
    last = 0.0

    def on_message(topic: str, payload: bytes, retained: bool) -> None:
        nonlocal last
        if payload and not retained and not live_messages:
            return
        with cond:
            snapshot.record(topic, payload, keep_payload=keep_payloads)
            last = time.monotonic()
            cond.notify_all()

    own = transport is None
    if transport is None:
        transport = MqttTransport(
            host=broker.host,
            port=broker.port,
            client_id=f"cloud-train-gc-{secrets.token_hex(4)}",
            protocol=broker.protocol,
            security=broker.security,
        )
    deadline = time.monotonic() + broker.timeout_s
    try:
        try:
            if own:
                transport.connect(timeout_s=min(CONNECT_TIMEOUT_S, broker.timeout_s))
            for topic_filter in filters:
                transport.subscribe(topic_filter, on_message)
            for topic_filter in filters:  # the broker sends what it retains right after each SUBACK
                transport.wait_subscribed(topic_filter, timeout_s=max(0.1, deadline - time.monotonic()))
        except TransportError as exc:
            raise BrokerError(str(exc)) from None
        with cond:
            last = time.monotonic()
            while not (exact is not None and exact <= snapshot.sizes.keys()):
                now = time.monotonic()
                if now - last >= broker.quiet_s:
                    break
                if now >= deadline:
                    raise BrokerError(
                        f"retained messages on {filters[0]} were still arriving after {broker.timeout_s:g}s; "
                        "allow a longer timeout"
                    )
                cond.wait(min(last + broker.quiet_s, deadline) - now)
    finally:
        if own:
            transport.stop()
        else:
            for topic_filter in filters:
                transport.unsubscribe(topic_filter)
    return snapshot


def _clear(broker: _Broker, topics: Topics, chunk_ids: Iterable[str], *, legacy: bool = False) -> None:
    """Publish an empty retained message (QoS 1) on each chunk's topic, and wait for every PUBACK."""
    with Publisher(
        host=broker.host,
        port=broker.port,
        client_id=f"cloud-train-gc-{secrets.token_hex(4)}",
        protocol=broker.protocol,
        security=broker.security,
    ) as pub:
        for sha in chunk_ids:
            pub.publish(f"{topics.legacy_chunk_base()}/{sha}" if legacy else topics.chunk(sha), b"", retain=True)


# -- helpers --------------------------------------------------------------------------------------
def _topics(fleet: str, topic_root: str | None) -> Topics:
    try:
        return Topics(fleet=fleet) if topic_root is None else Topics(fleet=fleet, root=topic_root)
    except ValueError as exc:
        raise CloudTrainError(str(exc)) from None


def _is_chunk_id(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


def _refusal(problems: Mapping[str, str]) -> UnreadableRelease:
    listed = "; ".join(f"{topic}: {why}" for topic, why in sorted(problems.items()))
    return UnreadableRelease(
        f"chunk GC cleared nothing: it cannot tell which chunks {len(problems)} release(s) need: {listed}. "
        "Fix or withdraw (clear) those releases and run it again",
        topics=sorted(problems),
    )


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(part) for part in err["loc"]) or "payload"
    return f"{where}: {err['msg']}"
