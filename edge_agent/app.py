"""The composition root: builds the agent's subsystems from config, starts them in order, stops them
in reverse. Subsystems meet here and nowhere else."""

from __future__ import annotations

import logging
import platform
import threading
from datetime import datetime, timezone
from typing import Any, get_args

from paho.mqtt.client import MQTTMessageInfo
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent import __version__
from edge_agent.config import AgentConfig, ConfigError
from edge_agent.fetch import ChunkFetcher
from edge_agent.homeassistant import discovery_messages
from edge_agent.mqtt_security import MqttSecurity
from edge_agent.outbox import Outbox
from edge_agent.protocol.errors import ProtocolError
from edge_agent.protocol.release import PublicKey, key_id_of, load_public_key
from edge_agent.protocol.samples import SamplingPolicy
from edge_agent.protocol.state import Availability, DeviceState, HostFacts, UpdateState
from edge_agent.protocol.topics import Topics
from edge_agent.runtime import HealthCheckError, ModelHolder, ModelLoadError
from edge_agent.sampling import Sampler
from edge_agent.serving import InferenceServer, ServingMetrics
from edge_agent.serving.mqtt import MqttInference
from edge_agent.serving.service import InferenceService
from edge_agent.store import ModelStore
from edge_agent.telemetry import TelemetryPublisher
from edge_agent.transport import MqttTransport, TransportError
from edge_agent.updater import StateChange, Updater, load_verified
from edge_agent.uploader import SampleUploader, SampleWriter
from edge_agent.watch import HealthWatch

log = logging.getLogger(__name__)


def _host_facts() -> HostFacts:
    import onnxruntime

    return HostFacts(
        machine=platform.machine(),
        system=f"{platform.system()} {platform.release()}",
        python=platform.python_version(),
        onnxruntime=onnxruntime.__version__,
        providers=list(onnxruntime.get_available_providers()),
    )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def load_trusted_keys(config: AgentConfig) -> dict[str, PublicKey]:
    keys: dict[str, PublicKey] = {}
    for path in config.update.trusted_keys:
        try:
            key = load_public_key(path)
        except ValueError as exc:
            raise ConfigError(f"update.trusted_keys: {exc}") from None
        keys[key_id_of(key)] = key
    return keys


class Agent:
    """The edge agent: MQTT updates in, verified models served over HTTP, state reported out."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.topics = Topics(fleet=config.fleet, root=config.mqtt.topic_root)
        self.store = ModelStore(state_dir=config.state_dir, model=config.model)
        self.holder = ModelHolder()
        self._state_lock = threading.Lock()
        self._state = DeviceState(
            device=config.device_id, fleet=config.fleet, online=True, model=config.model, updated_at=_now(),
            group=config.group, agent_version=__version__, started_at=_now(), host=_host_facts(),
        )  # fmt: skip
        self._state_topic = self.topics.device_state(config.device_id)
        self._availability_topic = self.topics.device_availability(config.device_id)
        self._connected_at = _now()
        self.transport = MqttTransport(
            host=config.mqtt.host,
            port=config.mqtt.port,
            client_id=config.mqtt.client_id or config.device_id,  # its identity, as the secure broker binds it
            keepalive_s=config.mqtt.keepalive_s,
            protocol=config.mqtt.protocol,
            will=(self._availability_topic, self._offline_will),
            security=MqttSecurity.from_config(config.mqtt),
            # Nothing larger than a chunk or an inference request reaches this process's memory.
            max_packet_bytes=max(256 * 1024, config.http.max_body_bytes + 64 * 1024),
        )
        fetcher = ChunkFetcher(
            transport=self.transport,
            topics=self.topics,
            store=self.store,
            timeout_s=config.update.chunk_timeout_s,
            window=config.update.chunk_window,
        )
        self.watch = HealthWatch(
            window_s=config.update.watch_s,
            max_error_rate=config.update.max_error_rate,
            min_requests=config.update.min_requests,
            on_breach=lambda version, reason: self.updater.request_rollback(version, reason),  # noqa: PLW0108 - built below
        )
        self.updater = Updater(
            config=config,
            store=self.store,
            fetcher=fetcher,
            holder=self.holder,
            trusted_keys=load_trusted_keys(config),
            report=self._on_update,
            on_activated=self.watch.watch,
        )
        self.outbox = Outbox(config.state_dir / "outbox.sqlite", max_bytes=config.outbox.max_bytes)
        self.uploader = SampleUploader(
            outbox=self.outbox,
            transport=self.transport,
            topic=self.topics.device_samples(config.device_id),
            device=config.device_id,
            fleet=config.fleet,
            batch_records=config.outbox.batch_records,
            interval_s=config.outbox.upload_interval_s,
            ack_timeout_s=config.outbox.ack_timeout_s,
            retry_max_s=config.outbox.retry_max_s,
        )
        self.sample_writer = SampleWriter(outbox=self.outbox, on_written=self.uploader.wake)
        self.sampler = Sampler(
            rules=config.sampling.rules(),
            device=config.device_id,
            fleet=config.fleet,
            model=config.model,
            sink=self.sample_writer.submit,
            remember=config.sampling.remember,
            remember_bytes=config.sampling.remember_bytes,
        )
        self._remote_policies: dict[str, SamplingPolicy] = {}
        self.metrics = ServingMetrics()
        self.metrics.track_outbox(self.outbox.stats)
        self.metrics.set_model(config.model, None, None, None)
        self.inference = InferenceService(  # one service; HTTP and MQTT are front ends over it
            limits=config.http,
            serving=config.serving,
            holder=self.holder,
            model_name=config.model,
            metrics=self.metrics,
            on_result=self.watch.record,
            sampler=self.sampler,
        )
        self.server = InferenceServer(
            config=config.http, holder=self.holder, model_name=config.model, service=self.inference
        )
        self.mqtt_inference = MqttInference(
            service=self.inference, transport=self.transport, topic=self.topics.device_infer(config.device_id)
        )
        telemetry_topic = self.topics.device_telemetry(config.device_id)
        self.telemetry = TelemetryPublisher(
            interval_s=config.serving.telemetry_interval_s,
            metrics=self.metrics,
            publish=lambda payload: self._publish_telemetry(telemetry_topic, payload),
            describe=self._describe,
            outbox=self.outbox.stats,
        )

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        problem = self.updater.trust_problem
        if problem:
            self._set_state(last_error=problem, publish=False)
        self.updater.reconcile()  # the active pointer is the truth after a crash
        update = self.updater.trust.state.update
        if update is not None and update.state in get_args(UpdateState):
            self._set_state(update_state=update.state, update_version=update.version, publish=False)
        self._serve_installed()
        self.server.start()
        self.updater.start()
        if self.config.serving.mqtt_inference:
            self.mqtt_inference.start()
        self.telemetry.start()
        self.sample_writer.start()
        self.uploader.start()
        if self.config.sampling.allow_remote:
            self.transport.subscribe(self.topics.fleet_sampling(self.config.model), self._on_policy)
            self.transport.subscribe(self.topics.device_sampling(self.config.device_id), self._on_policy)
        self.metrics.track_mqtt(self.transport.connected.is_set)
        self.metrics.set_update_state(self._state.update_state)
        self.transport.on_connected(self._republish_state)
        self.transport.on_connected(self._release_snapshot)
        for topic in self.updater.release_topics:
            self.transport.subscribe(topic, self.updater.submit, on_refused=self._release_refused)
        self.transport.start()

    def stop(self) -> None:
        with self._state_lock:
            self._state = self._state.model_copy(update={"online": False, "updated_at": _now()})
        try:
            infos = [self._publish_state(), self._publish_availability(online=False)]
            for info in infos:
                if info is not None:
                    info.wait_for_publish(timeout=2.0)
        except (TransportError, RuntimeError, ValueError) as exc:  # the connection went first
            log.warning("could not say goodbye on MQTT: %s", exc)
        self.telemetry.stop()
        self.updater.stop()
        self.server.stop()
        self.sample_writer.stop()  # every kept sample is on disk before the process ends
        self.uploader.stop()
        self.transport.stop()
        self.outbox.close()

    # -- start-up ---------------------------------------------------------------------------------
    def _serve_installed(self) -> None:
        """Serve the active version, verified again; if it fails, fall back to an older installed one."""
        active = self.store.active_version()
        candidates = [active] if active else []
        candidates += [v for v in reversed(self.store.installed_versions()) if v != active]
        for version in candidates:
            try:
                model = load_verified(self.store.version_dir(version), self.config)
            except (ProtocolError, ModelLoadError, HealthCheckError) as exc:
                log.error("installed version %s is unusable: %s", version, exc)
                self._set_state(last_error=f"installed version {version} is unusable: {exc}", publish=False)
                continue
            if version != active:
                self.store.activate(version)
            self.holder.swap(model)
            self._set_state(active_version=version, previous_version=self.updater.previous_version, publish=False)
            log.info("serving installed version %s", version)
            return
        log.info("no installed model yet; waiting for a release")

    # -- sampling policy ----------------------------------------------------------------------------
    def _on_policy(self, topic: str, payload: bytes, _retained: bool) -> None:
        """A retained policy from the cloud; the device's own topic wins over the fleet's; empty clears."""
        if not payload:
            self._remote_policies.pop(topic, None)
        else:
            try:
                self._remote_policies[topic] = SamplingPolicy.from_bytes(payload)
            except ProtocolError as exc:
                log.error("refused the sampling policy on %s: %s", topic, exc)
                self._set_state(last_error=f"sampling policy on {topic} refused: {exc}")
                return
        device_topic = self.topics.device_sampling(self.config.device_id)
        policy = self._remote_policies.get(device_topic) or next(iter(self._remote_policies.values()), None)
        rules = policy.rules() if policy is not None else self.config.sampling.rules()
        self.sampler.set_rules(rules)
        log.info("sampling rules now %s (%s)", rules.model_dump(), "from " + topic if policy else "from config")

    # -- reported state ---------------------------------------------------------------------------
    def state(self) -> DeviceState:
        return self._state

    def _on_update(self, change: StateChange) -> None:
        fields: dict[str, Any] = {
            "update_state": change.state,
            "update_version": change.version,
            "progress": change.progress,
        }
        if change.bytes_transferred is not None:
            fields["bytes_transferred"] = change.bytes_transferred
        if change.error:
            fields["last_error"] = change.error
        if change.active is not None:
            fields["active_version"] = change.active
            fields["previous_version"] = self.updater.previous_version
        if change.state == "active" and not change.error:
            fields["last_error"] = None
        self._set_state(**fields)

    def _set_state(self, *, publish: bool = True, **fields: Any) -> None:
        with self._state_lock:
            self._state = self._state.model_copy(update={**fields, "updated_at": _now()})
        if "update_state" in fields:
            self.metrics.set_update_state(fields["update_state"])
        if "active_version" in fields:
            model = self.holder.get()
            providers = model.session.get_providers() if model is not None else None
            quantization = model.manifest.quantization if model is not None else None
            self.metrics.set_model(self.config.model, fields["active_version"], quantization, providers)
        if publish:
            self._publish_state()

    def _describe(self) -> tuple[str, str, str, int | None, int]:
        model = self.holder.get()
        cfg = self.config
        return cfg.device_id, cfg.fleet, cfg.model, model.version if model else None, self.server.batcher.depth

    def _json_properties(self, *, expiry_s: int | None = None) -> Properties | None:
        """MQTT 5 properties of a published JSON document (content type, message expiry); None on 3.1.1."""
        if self.config.mqtt.protocol != "5":
            return None
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ContentType = "application/json"
        if expiry_s is not None:
            props.MessageExpiryInterval = expiry_s
        return props

    def _publish_telemetry(self, topic: str, payload: bytes) -> None:
        """Retained, so a dashboard that subscribes sees the latest at once; on MQTT 5 it expires
        after three periods, so a device that went silent stops showing numbers there."""
        if self.transport.connected.is_set():
            expiry = max(60, round(3 * self.config.serving.telemetry_interval_s))
            props = self._json_properties(expiry_s=expiry)
            self.transport.publish(topic, payload, qos=0, retain=True, properties=props)

    def _republish_state(self) -> None:
        """After every (re)connect: availability says online again; the state may have changed meanwhile."""
        self._publish_availability(online=True)
        self._publish_state()
        if self.config.homeassistant.discovery:
            self._publish_discovery()

    def _publish_discovery(self) -> None:
        cfg = self.config
        messages = discovery_messages(
            topics=self.topics, device=cfg.device_id, model=cfg.model, prefix=cfg.homeassistant.prefix
        )
        for topic, payload in messages.items():
            self.transport.publish(topic, payload, qos=1, retain=True, properties=self._json_properties())

    def _offline_will(self) -> bytes:
        """The last will, built before every connect attempt: ``connected_at`` is that attempt."""
        self._connected_at = _now()
        return self._availability(online=False, at=None)

    def _release_snapshot(self) -> None:
        """After every (re)connect the broker delivers every retained release again: the updater
        judges them together once the subscriptions are granted (waited for off the network thread)."""
        self.updater.begin_snapshot()

        def settle() -> None:
            try:
                for topic in self.updater.release_topics:
                    self.transport.wait_subscribed(topic, timeout_s=10)
            except TransportError as exc:
                log.warning("release subscriptions not confirmed: %s", exc)
                return  # the updater's snapshot cap takes over
            self.updater.end_snapshot()

        threading.Thread(target=settle, name="release-snapshot", daemon=True).start()

    def _release_refused(self, topic: str, reason: str) -> None:
        self._set_state(last_error=f"the broker refused the subscription to {topic}: {reason} (check its ACL)")

    def _availability(self, *, online: bool, at: str | None) -> bytes:
        cfg = self.config
        return Availability(
            device=cfg.device_id, fleet=cfg.fleet, online=online, at=at, connected_at=self._connected_at
        ).to_bytes()

    def _publish_availability(self, *, online: bool) -> MQTTMessageInfo | None:
        if not self.transport.connected.is_set():
            return None
        payload = self._availability(online=online, at=_now())
        props = self._json_properties()
        return self.transport.publish(self._availability_topic, payload, qos=1, retain=True, properties=props)

    def _publish_state(self) -> MQTTMessageInfo | None:
        if not self.transport.connected.is_set():
            return None  # published again on connect
        props = self._json_properties()
        return self.transport.publish(self._state_topic, self._state.to_bytes(), qos=1, retain=True, properties=props)
