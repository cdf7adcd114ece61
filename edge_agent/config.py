"""The agent's configuration: one TOML file, typed and validated; unknown keys are refused.

Example::

    device_id = "kitchen-hub-01"
    fleet = "demo"
    group = "lab"              # optional
    model = "intents"
    state_dir = "/var/lib/edge-agent"

    [mqtt]
    host = "127.0.0.1"
    port = 1883

    [http]
    host = "127.0.0.1"
    port = 8080

    [update]
    trusted_keys = ["/etc/edge-agent/release.pub"]

Relative paths are resolved against the directory of the config file.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from edge_agent.protocol.samples import SamplingRules
from edge_agent.protocol.topics import DEFAULT_ROOT, check_segment

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 on JetPack 6
    import tomli as tomllib


class ConfigError(Exception):
    """The config file is missing, not TOML, or does not validate; the message says where and why."""


def _segment(kind: str) -> AfterValidator:
    return AfterValidator(lambda value: check_segment(kind, value))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _existing_file(path: Path) -> Path:
    if not path.is_file():
        raise ValueError(f"file {path} does not exist" if not path.exists() else f"{path} is not a file")
    return path


ExistingFile = Annotated[Path, AfterValidator(_existing_file)]


class MqttTlsConfig(_Section):
    """``[mqtt.tls]``: TLS to the broker, and optionally a client certificate as this device's identity."""

    ca_file: ExistingFile | None = Field(
        default=None, description="CA certificate(s) that signed the broker's certificate; default: system CAs"
    )
    cert_file: ExistingFile | None = Field(default=None, description="client certificate (PEM); CN = device id")
    key_file: ExistingFile | None = Field(default=None, description="the client certificate's private key (PEM)")

    @model_validator(mode="after")
    def _pair(self) -> MqttTlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: give both or neither")
        return self


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class MqttConfig(_Section):
    host: str = Field(default="127.0.0.1", description="broker host name or address")
    port: int = Field(default=1883, ge=1, le=65535)
    protocol: Literal["5", "3.1.1"] = Field(default="5", description="MQTT protocol version")
    keepalive_s: int = Field(default=30, ge=5, le=3600, description="MQTT keepalive; the last will fires after 1.5x")
    topic_root: str = Field(default=DEFAULT_ROOT, description="prefix of every topic")
    client_id: str | None = Field(
        default=None, description="defaults to device_id (the identity; a secure broker makes it so anyway)"
    )
    tls: MqttTlsConfig | None = Field(default=None, description="connect with TLS (see [mqtt.tls])")
    username: str | None = Field(default=None, description="MQTT user name for password authentication")
    password_file: ExistingFile | None = Field(default=None, description="file holding the MQTT password")
    password_env: str | None = Field(default=None, description="environment variable holding the MQTT password")

    @model_validator(mode="after")
    def _credentials(self) -> MqttConfig:
        if self.password_file is not None and self.password_env is not None:
            raise ValueError("give password_file or password_env, not both")
        has_password = self.password_file is not None or self.password_env is not None
        if has_password and not self.username:
            raise ValueError("a password (password_file or password_env) needs a username")
        if self.password_env is not None and not os.environ.get(self.password_env):
            raise ValueError(f"password_env: environment variable {self.password_env} is not set or empty")
        if has_password and self.tls is None and not _is_loopback(self.host):
            raise ValueError(f"a password to {self.host} over plain TCP would travel in clear text; add [mqtt.tls]")
        return self

    def password(self) -> str | None:
        """The MQTT password, read now from its file (first line) or environment variable."""
        if self.password_file is not None:
            try:
                lines = self.password_file.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"mqtt.password_file: cannot read {self.password_file}: {exc}") from None
            if not lines or not lines[0]:
                raise ConfigError(f"mqtt.password_file: {self.password_file} is empty")
            return lines[0]
        if self.password_env is not None:
            return os.environ.get(self.password_env, "")
        return None


class HttpConfig(_Section):
    host: str = Field(default="127.0.0.1", description="listen address; localhost only by default")
    unix_socket: Path | None = Field(default=None, description="listen on this Unix socket instead of TCP")
    port: int = Field(default=8080, ge=0, le=65535, description="0 picks a free port (tests)")
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    max_texts: int = Field(default=64, ge=1, description="texts per request")
    max_text_chars: int = Field(default=2000, ge=1)
    max_connections: int = Field(
        default=128, ge=1, description="open connections at once; past it a new one gets 503 and is closed"
    )
    header_timeout_s: float = Field(default=10.0, gt=0, description="from a request's first byte to its last header")
    body_timeout_s: float = Field(default=30.0, gt=0, description="from the headers to the last byte of the body")
    idle_timeout_s: float = Field(
        default=30.0, gt=0, description="an idle keep-alive connection (or one not reading its answers) is closed"
    )


class ServingConfig(_Section):
    max_batch: int = Field(default=32, ge=1, le=1024, description="most inputs in one onnxruntime run")
    max_queue_delay_ms: float = Field(default=0.0, ge=0, le=1000, description="wait this long to fill a batch")
    queue_size: int = Field(default=256, ge=1, description="requests waiting; beyond it callers get 503")
    workers: int = Field(
        default=2,
        ge=1,
        le=64,
        description="model runs at once under load, each with runtime.intra_op_threads threads; a lone request "
        "runs on the HTTP loop at once. 2 uses both cores of a 2-core device under load; 1 keeps one free",
    )
    request_timeout_s: float = Field(default=30.0, gt=0)
    telemetry_interval_s: float = Field(default=30.0, ge=0, description="MQTT telemetry period; 0 turns it off")
    mqtt_inference: bool = Field(default=True, description="answer MQTT 5 request/response inference")


class RuntimeConfig(_Section):
    providers: list[str] = Field(
        default_factory=lambda: ["CPUExecutionProvider"],
        description="onnxruntime execution providers in order of preference; unavailable ones are skipped "
        "(a Jetson: TensorrtExecutionProvider, CUDAExecutionProvider, CPUExecutionProvider)",
    )
    model_providers: dict[str, list[str]] = Field(
        default_factory=dict, description="per model slot, a provider order that replaces `providers` for it"
    )
    trt_engine_cache: bool = Field(
        default=True, description="keep TensorRT engines in state_dir/trt-engines/<model>/v<version>, reused at restart"
    )
    trt_fp16: bool = Field(default=False, description="let TensorRT run fp32 layers in fp16")
    device_id: int = Field(default=0, ge=0, description="the GPU CUDA and TensorRT run on")
    intra_op_threads: int = Field(default=1, ge=0, description="0 lets onnxruntime choose")
    inter_op_threads: int = Field(default=1, ge=0)
    allow_spinning: bool = Field(
        default=False,
        description=(
            "let onnxruntime's intra-op threads spin-wait for work between runs; off is right on a small "
            "device whose few cores the MQTT loop and the HTTP server share: spinning burns a core while idle "
            "and takes CPU from them, for little latency gain with one intra-op thread"
        ),
    )


class UpdateConfig(_Section):
    trusted_keys: list[Path] = Field(min_length=1, description="PEM ed25519 public keys whose releases are trusted")
    max_bundle_bytes: int = Field(default=512 * 1024 * 1024, ge=1, description="refuse larger bundles")
    keep_versions: int = Field(default=2, ge=1, description="versions kept on disk, the active one included")
    chunk_timeout_s: float = Field(default=30.0, gt=0, description="give up on a chunk the broker does not deliver")
    chunk_window: int = Field(default=16, ge=1, le=256, description="chunks requested at once")
    golden_atol: float = Field(default=0.02, gt=0, description="tolerance on golden-vector probabilities")
    watch_s: float = Field(default=300.0, ge=0, description="after activation, roll back if the error rate breaches")
    max_error_rate: float = Field(default=0.2, ge=0, le=1, description="share of failed inferences that rolls back")
    min_requests: int = Field(default=20, ge=1, description="requests seen before the watch judges")
    retry_base_s: float = Field(default=5.0, gt=0, description="first retry delay after a stalled download; doubles")


class WatchdogConfig(_Section):
    """``[watchdog]``: when the systemd watchdog pings stop (``WatchdogSec=`` in the unit sets how often)."""

    max_stall_s: float = Field(
        default=60.0,
        gt=0,
        description="stop pinging when the main loop, the inference worker or one model run stalls this long",
    )


class SamplingConfig(SamplingRules):
    """``[sampling]``: the hard-example rules the device starts with, and what the cloud may change."""

    allow_remote: bool = Field(default=True, description="a retained policy from the cloud replaces these rules")
    remember: int = Field(default=4096, ge=1, le=1_000_000, description="recent predictions feedback can name")
    remember_mb: float = Field(
        default=16.0, gt=0, le=65536, description="and the memory they may take (MiB: inputs, scores, overhead)"
    )

    @property
    def remember_bytes(self) -> int:
        """``remember_mb`` in bytes, for :class:`edge_agent.sampling.Sampler`."""
        return int(self.remember_mb * 1024 * 1024)


class OutboxConfig(_Section):
    """``[outbox]``: the durable queue of samples waiting for upload (``state_dir/outbox.sqlite``)."""

    max_bytes: int = Field(default=64 * 1024 * 1024, ge=4096, description="past it, the oldest samples are dropped")
    batch_records: int = Field(default=200, ge=1, le=5000, description="samples per MQTT message at most")
    upload_interval_s: float = Field(default=5.0, gt=0, description="how often to look for samples to upload")
    ack_timeout_s: float = Field(default=10.0, gt=0, description="wait this long for the broker's PUBACK")
    retry_max_s: float = Field(default=60.0, gt=0, description="longest back-off between upload attempts")


class HomeAssistantConfig(_Section):
    """``[homeassistant]``: MQTT discovery, so the device and its sensors appear in Home Assistant."""

    discovery: bool = Field(default=False, description="publish discovery configs (retained) after each connect")
    prefix: Annotated[str, _segment("homeassistant.prefix")] = Field(
        default="homeassistant", description="Home Assistant's discovery prefix"
    )


class AgentConfig(_Section):
    device_id: Annotated[str, _segment("device_id")]
    fleet: Annotated[str, _segment("fleet")]
    group: Annotated[str, _segment("group")] | None = None
    model: Annotated[str, _segment("model")] = "intents"
    state_dir: Path
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)
    update: UpdateConfig
    watchdog: WatchdogConfig = Field(default_factory=WatchdogConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    outbox: OutboxConfig = Field(default_factory=OutboxConfig)
    homeassistant: HomeAssistantConfig = Field(default_factory=HomeAssistantConfig)

    @property
    def providers(self) -> list[str]:
        """The execution-provider order for this agent's model: its override, else ``runtime.providers``."""
        return self.runtime.model_providers.get(self.model, self.runtime.providers)


def _resolve(value: Any, base: Path) -> Any:
    return str(base / value) if isinstance(value, str) and not Path(value).is_absolute() else value


def resolve_mqtt_paths(mqtt: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """The ``[mqtt]`` table with its file paths (TLS files, password file) resolved against ``base_dir``."""
    mqtt = dict(mqtt)
    if "password_file" in mqtt:
        mqtt["password_file"] = _resolve(mqtt["password_file"], base_dir)
    if isinstance(mqtt.get("tls"), dict):
        mqtt["tls"] = {k: _resolve(v, base_dir) if k.endswith("_file") else v for k, v in mqtt["tls"].items()}
    return mqtt


def parse_config(data: dict[str, Any], *, base_dir: Path, origin: str = "config") -> AgentConfig:
    """Validate a config mapping; relative paths resolve against ``base_dir``."""
    data = dict(data)
    if "state_dir" in data:
        data["state_dir"] = _resolve(data["state_dir"], base_dir)
    update = data.get("update")
    if isinstance(update, dict) and isinstance(update.get("trusted_keys"), list):
        update = dict(update)
        update["trusted_keys"] = [_resolve(item, base_dir) for item in update["trusted_keys"]]
        data["update"] = update
    if isinstance(data.get("mqtt"), dict):
        data["mqtt"] = resolve_mqtt_paths(data["mqtt"], base_dir)
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(part) for part in err["loc"]) or "(top level)"
            message = "unknown key (not allowed)" if err["type"] == "extra_forbidden" else err["msg"]
            message = message.removeprefix("Value error, ")
            problems.append(f"  {where}: {message}")
        raise ConfigError(f"{origin} is not valid:\n" + "\n".join(problems)) from None


def load_config(path: Path) -> AgentConfig:
    """Read and validate the TOML file at ``path``."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config {path} is not valid TOML: {exc}") from None
    return parse_config(data, base_dir=path.resolve().parent, origin=f"config {path}")
