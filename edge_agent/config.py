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

import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

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


class MqttConfig(_Section):
    host: str = Field(default="127.0.0.1", description="broker host name or address")
    port: int = Field(default=1883, ge=1, le=65535)
    protocol: Literal["5", "3.1.1"] = Field(default="5", description="MQTT protocol version")
    keepalive_s: int = Field(default=30, ge=5, le=3600, description="MQTT keepalive; the last will fires after 1.5x")
    topic_root: str = Field(default=DEFAULT_ROOT, description="prefix of every topic")
    client_id: str | None = Field(default=None, description="defaults to edge-agent-<device_id>")


class HttpConfig(_Section):
    host: str = Field(default="127.0.0.1", description="listen address; localhost only by default")
    unix_socket: Path | None = Field(default=None, description="listen on this Unix socket instead of TCP")
    port: int = Field(default=8080, ge=0, le=65535, description="0 picks a free port (tests)")
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    max_texts: int = Field(default=64, ge=1, description="texts per request")
    max_text_chars: int = Field(default=2000, ge=1)


class ServingConfig(_Section):
    max_batch: int = Field(default=32, ge=1, le=1024, description="most inputs in one onnxruntime run")
    max_queue_delay_ms: float = Field(default=0.0, ge=0, le=1000, description="wait this long to fill a batch")
    queue_size: int = Field(default=256, ge=1, description="requests waiting; beyond it callers get 503")
    request_timeout_s: float = Field(default=30.0, gt=0)
    telemetry_interval_s: float = Field(default=30.0, ge=0, description="MQTT telemetry period; 0 turns it off")
    mqtt_inference: bool = Field(default=True, description="answer MQTT 5 request/response inference")


class RuntimeConfig(_Section):
    providers: list[str] = Field(
        default_factory=lambda: ["CPUExecutionProvider"],
        description="onnxruntime execution providers in order of preference; unavailable ones are skipped",
    )
    intra_op_threads: int = Field(default=1, ge=0, description="0 lets onnxruntime choose")
    inter_op_threads: int = Field(default=1, ge=0)


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


def _resolve(value: Any, base: Path) -> Any:
    return str(base / value) if isinstance(value, str) and not Path(value).is_absolute() else value


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
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(part) for part in err["loc"]) or "(top level)"
            message = "unknown key (not allowed)" if err["type"] == "extra_forbidden" else err["msg"]
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
