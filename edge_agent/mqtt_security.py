"""How a client proves itself to the broker: TLS, a client certificate, or a user name and password.

One small value object, :class:`MqttSecurity`, used by the agent's transport and by the cloud
side's publisher and collector alike (the cloud imports it; this module imports nothing of the
cloud). It is built from the ``[mqtt]`` config table, read from the agent's config or, for
``cloud-train``, from a TOML file holding just that table (:func:`load_mqtt_file`).
Plain TCP without credentials, to a broker on localhost, stays the default.
"""

from __future__ import annotations

import ssl
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from pydantic import ValidationError

from edge_agent.config import ConfigError, MqttConfig, resolve_mqtt_paths

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 on JetPack 6
    import tomli as tomllib


@dataclass(frozen=True, kw_only=True)
class MqttSecurity:
    """TLS and credentials for one MQTT connection.

    Args:
        tls: connect with TLS (the broker's certificate is verified, host name included).
        ca_file: CA certificate(s) that signed the broker's certificate; ``None``: the system's.
        cert_file: client certificate (PEM) that identifies this client (its CN is the MQTT user).
        key_file: the client certificate's private key (PEM).
        username: MQTT user name, for password authentication.
        password: the password itself (read from a file or the environment, never from config text).
    """

    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def from_config(cls, config: MqttConfig) -> MqttSecurity:
        """Read the secrets ``config`` points at (raises :class:`ConfigError` naming the problem)."""
        tls = config.tls
        return cls(
            tls=tls is not None,
            ca_file=tls.ca_file if tls else None,
            cert_file=tls.cert_file if tls else None,
            key_file=tls.key_file if tls else None,
            username=config.username,
            password=config.password(),
        )

    def ssl_context(self) -> ssl.SSLContext:
        """A client TLS context: TLS 1.2 or newer, the broker's certificate and host name verified."""
        try:
            context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"mqtt.tls.ca_file: cannot load CA certificates from {self.ca_file}: {exc}") from None
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file is not None and self.key_file is not None:
            try:
                context.load_cert_chain(str(self.cert_file), str(self.key_file))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"mqtt.tls: cannot use client certificate {self.cert_file} with key {self.key_file}: {exc}"
                ) from None
        return context

    def apply(self, client: mqtt.Client) -> None:
        """Configure a paho client (before it connects)."""
        if self.tls:
            client.tls_set_context(self.ssl_context())
        if self.username is not None:
            client.username_pw_set(self.username, self.password)

    def describe(self) -> str:
        """One line for logs, without secrets."""
        parts = ["TLS" if self.tls else "plain TCP"]
        if self.cert_file is not None:
            parts.append(f"client certificate {self.cert_file.name}")
        if self.username is not None:
            parts.append(f"user {self.username}" + (" with password" if self.password is not None else ""))
        return ", ".join(parts)


def load_mqtt_file(path: Path) -> MqttConfig:
    """Read a TOML file holding an ``[mqtt]`` table (the same keys as the agent's); relative paths
    resolve against the file's directory. ``cloud-train`` uses it for its broker connections."""
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read MQTT config {path}: {exc.strerror}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"MQTT config {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - {"mqtt"})
    if unknown or not isinstance(data.get("mqtt"), dict):
        raise ConfigError(f"MQTT config {path} must hold one [mqtt] table and nothing else (found {unknown})")
    try:
        return MqttConfig.model_validate(resolve_mqtt_paths(data["mqtt"], path.resolve().parent))
    except ValidationError as exc:
        problems = [
            f"  mqtt.{'.'.join(str(p) for p in err['loc'])}: "
            + ("unknown key (not allowed)" if err["type"] == "extra_forbidden" else err["msg"]).removeprefix(
                "Value error, "
            )
            for err in exc.errors()
        ]
        raise ConfigError(f"MQTT config {path} is not valid:\n" + "\n".join(problems)) from None
