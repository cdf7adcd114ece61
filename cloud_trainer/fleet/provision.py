"""Device provisioning: identities on the broker, and a ready-to-copy config directory per device.

A PKI directory (``--pki``, default ``$EDGELOOP_PKI`` or ``~/.edgeloop/pki``) holds everything the
cloud keeps about who may talk to the broker::

    pki.json            broker address, ports and topic root, the release public key for devices
    identities.json     every device (fleet, group, auth, certificate serial) and revoked serials
    ca/                 ca.crt, ca.key (0600): the CA that signs the broker's and every client's certificate
    broker/             ca.crt, broker.crt, broker.key, crl.pem, acl, passwd: copy to /etc/mosquitto/edgeloop/
    cloud/              the cloud's identity (``edgeloop-cloud``): mqtt.toml, ca.crt, client.crt, client.key
    collector/          the sample collector's identity (``edgeloop-collector``): mqtt.toml, ca.crt,
                        mqtt.password (password listener: see ``_write_service_identity``), share.env

Identities are MQTT user names: a certificate's CN (Mosquitto's ``use_identity_as_username``) or
a password entry. A device's user name is its device id, so device ids are unique across a PKI
directory (one broker), not only within a fleet. The ACL file is generated whole from
``identities.json`` on every change: a ``user`` block per identity with its exact topics
(see :func:`acl_entries`), never edited in place.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from cloud_trainer.errors import CloudTrainError
from cloud_trainer.fleet.pki import CertificateAuthority, PkiError, write_private, write_public
from edge_agent.homeassistant import node_id
from edge_agent.protocol.release import load_public_key
from edge_agent.protocol.topics import DEFAULT_ROOT, Topics, check_segment, chunk_root

CLOUD_IDENTITY = "edgeloop-cloud"
COLLECTOR_IDENTITY = "edgeloop-collector"
VIEWER_IDENTITY = "edgeloop-viewer"  # viewer identities are edgeloop-viewer-<name>
RESERVED = (CLOUD_IDENTITY, COLLECTOR_IDENTITY)
CERT_PORT = 8883
PASSWORD_PORT = 8884
PBKDF2_ITERATIONS = 101  # what mosquitto_passwd writes for $7$ (PBKDF2-SHA512) entries

Auth = Literal["cert", "password"]


class ProvisionError(CloudTrainError):
    """A device name that is taken or unknown, an output directory in the way, a bad release key."""


def default_pki() -> Path:
    return Path(os.environ.get("EDGELOOP_PKI", Path.home() / ".edgeloop" / "pki"))


def mosquitto_password_hash(password: str, *, salt: bytes | None = None) -> str:
    """A Mosquitto 2 password-file hash (``$7$``: PBKDF2-SHA512, 101 iterations, 12-byte salt)."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, PBKDF2_ITERATIONS)
    return f"$7${PBKDF2_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def acl_entries(*, user: str, fleet: str, group: str | None, root: str = DEFAULT_ROOT) -> list[str]:
    """The ACL lines of one device: it writes only under its own device topic and reads only what
    is addressed to it (its fleet's, group's and own releases and sampling policy, the fleet's chunks,
    its inference requests). MQTT 5 inference replies go to ``.../devices/{device}/replies/...``."""
    topics = Topics(fleet=fleet, root=root)
    own = f"{topics.base}/devices/{check_segment('device', user)}"  # for the wildcard lines
    lines = [
        f"topic write {topics.device_state(user)}",
        f"topic write {topics.device_availability(user)}",
        f"topic write {topics.device_telemetry(user)}",
        f"topic write {topics.device_samples(user)}",
        f"topic write {topics.device_replies(user)}/#",
        f"topic read {topics.device_infer(user)}",
        f"topic read {own}/releases/+",
        f"topic read {topics.device_sampling(user)}",
        f"topic read {topics.base}/releases/+",
        f"topic read {topics.chunk_base}/+",
        f"topic read {topics.base}/sampling/+",
    ]
    if group:
        lines.append(f"topic read {topics.base}/groups/{check_segment('group', group)}/releases/+")
    # Home Assistant MQTT discovery (opt-in on the device): its own entities' configs only
    lines.append(f"topic write homeassistant/+/{node_id(user)}/+/config")
    return lines


def service_acl_entries(identity: str, *, root: str = DEFAULT_ROOT) -> list[str]:
    """The cloud publishes releases, chunks, sampling policy and inference requests and reads
    everything; the collector only reads samples, state, availability and telemetry (shared subscriptions)."""
    if identity == CLOUD_IDENTITY:
        return [f"topic readwrite {root}/#", f"topic readwrite {chunk_root(root)}/#"]
    if identity.startswith(f"{VIEWER_IDENTITY}-"):  # fleet views: what devices report, and the releases
        return [
            *(f"topic read {root}/+/devices/+/{kind}" for kind in ("state", "availability", "telemetry")),
            f"topic read {root}/+/releases/+",
            f"topic read {root}/+/groups/+/releases/+",
            f"topic read {root}/+/devices/+/releases/+",
        ]
    return [f"topic read {root}/+/devices/+/{kind}" for kind in ("samples", "state", "availability", "telemetry")]


@dataclass(frozen=True)
class DeviceRecord:
    name: str
    fleet: str
    group: str | None
    auth: Auth
    serial: int | None
    issued_at: str

    def to_json(self) -> dict[str, Any]:
        return {
            "fleet": self.fleet,
            "group": self.group,
            "auth": self.auth,
            "serial": self.serial,
            "issued_at": self.issued_at,
        }

    @classmethod
    def from_json(cls, name: str, entry: dict[str, Any]) -> DeviceRecord:
        """The inverse of :meth:`to_json`, as ``identities.json`` keeps it under the device's name."""
        return cls(name=name, **{key: entry[key] for key in ("fleet", "group", "auth", "serial", "issued_at")})


class Pki:
    """A PKI directory: :meth:`init` creates one, the constructor opens it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        try:
            self.settings: dict[str, Any] = json.loads((root / "pki.json").read_text())
        except FileNotFoundError:
            raise PkiError(f"{root} is not a PKI directory (run `cloud-train pki init --pki {root}`)") from None
        except (OSError, ValueError) as exc:
            raise PkiError(f"cannot read {root / 'pki.json'}: {exc}") from None
        self.ca = CertificateAuthority(root / "ca")

    # -- set-up -----------------------------------------------------------------------------------
    @classmethod
    def init(
        cls,
        root: Path,
        *,
        broker_host: str,
        extra_names: list[str] | None = None,
        cert_port: int = CERT_PORT,
        password_port: int = PASSWORD_PORT,
        topic_root: str = DEFAULT_ROOT,
        release_key: Path | None = None,
    ) -> Pki:
        """Create the CA, the broker's certificate and files, and the cloud and collector identities."""
        if (root / "pki.json").exists():
            raise PkiError(f"{root} is already a PKI directory")
        if release_key is not None:
            _check_release_key(release_key)
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o700)
        ca = CertificateAuthority.create(root / "ca", name="edgeloop broker CA")
        broker = root / "broker"
        broker.mkdir(exist_ok=True)
        names = list(dict.fromkeys([broker_host, *(extra_names or []), "localhost", "127.0.0.1"]))
        server = ca.issue(broker_host, server_names=names)
        write_public(broker / "ca.crt", ca.cert_pem)
        write_public(broker / "broker.crt", server.cert_pem)
        write_private(broker / "broker.key", server.key_pem)
        settings = {
            "broker_host": broker_host,
            "cert_port": cert_port,
            "password_port": password_port,
            "topic_root": topic_root,
            "release_key": str(release_key.resolve()) if release_key else None,
            # Mosquitto's acl_file cannot refuse a SUBSCRIBE: a device that joined the collectors'
            # $share group would be handed every other batch, which the broker then drops (it may
            # not read them). A group name no device can guess keeps devices out of the rotation.
            "share_group": f"collectors-{secrets.token_hex(12)}",
        }
        write_public(root / "pki.json", json.dumps(settings, indent=2).encode() + b"\n")
        (root / "identities.json").write_text(json.dumps({"devices": {}, "revoked_serials": []}, indent=2) + "\n")
        pki = cls(root)
        for identity in RESERVED:
            pki._write_service_identity(identity)
        pki.write_broker_files()
        return pki

    def _write_service_identity(self, identity: str, out: Path | None = None) -> None:
        """Write ``identity``'s credentials and ``mqtt.toml`` (for ``--mqtt-config``) to ``out``.

        The cloud and viewer identities hold a client certificate. A collector logs in with a user name and a
        password on the password listener instead: it is the one client that keeps a broker
        session while it is away (its queued batches), and Mosquitto 2.0 mishandles an offline
        session of a certificate client when it reloads (every ``device add``): it disconnects the
        already-disconnected session again, which leaves a dangling entry in its session-expiry
        list and crashed the broker when the collector came back. A password client's offline
        session is re-checked against its stored password and kept as it is."""
        out = out or self.root / ("cloud" if identity == CLOUD_IDENTITY else "collector")
        out.mkdir(exist_ok=True)
        write_public(out / "ca.crt", self.ca.cert_pem)
        header = (
            f"# The {identity} identity: pass to cloud-train with --mqtt-config {out / 'mqtt.toml'}\n"
            f"[mqtt]\nhost = {json.dumps(self.settings['broker_host'])}\n"
        )
        topic_root = f"topic_root = {json.dumps(self.settings['topic_root'])}\n"
        if not identity.startswith(COLLECTOR_IDENTITY):
            issued = self.ca.issue(identity)
            write_public(out / "client.crt", issued.cert_pem)
            write_private(out / "client.key", issued.key_pem)
            body = (
                f"port = {self.settings['cert_port']}\n{topic_root}\n"
                '[mqtt.tls]\nca_file = "ca.crt"\ncert_file = "client.crt"\nkey_file = "client.key"\n'
            )
        else:
            password = secrets.token_urlsafe(24)
            write_private(out / "mqtt.password", password.encode() + b"\n")
            data = self._identities()
            data.setdefault("passwords", {})[identity] = mosquitto_password_hash(password)
            self._save_identities(data)
            body = (
                f"port = {self.settings['password_port']}\n{topic_root}"
                f'username = "{identity}"\npassword_file = "mqtt.password"\n\n[mqtt.tls]\nca_file = "ca.crt"\n'
            )
            # read by the collector's unit (EnvironmentFile=) and by `collect`
            write_private(out / "share.env", f"EDGELOOP_SHARE_GROUP={self.share_group}\n".encode())
        write_public(out / "mqtt.toml", (header + body).encode())

    @property
    def share_group(self) -> str:
        """The collectors' secret shared-subscription group (see ``init``)."""
        return str(self.settings.get("share_group") or "collectors")

    # -- identities -------------------------------------------------------------------------------
    def add_collector(self, name: str) -> str:
        """Another collector identity, ``edgeloop-collector-<name>``, in ``<pki>/collector-<name>/``.

        The broker binds each connection's client id to its identity (``use_username_as_clientid``),
        so one identity holds one connection: a second collector needs an identity of its own. It
        gets the collector's ACL, a password of its own and the same secret share group; the
        broker splits the batches between the collectors."""
        try:
            check_segment("collector name", name)
        except ValueError as exc:
            raise PkiError(str(exc)) from None
        identity = f"{COLLECTOR_IDENTITY}-{name}"
        data = self._identities()
        if name in data.get("collectors", []) or name in data["devices"] or identity in data["devices"]:
            raise PkiError(f"an identity named {name!r} exists already")
        self._write_service_identity(identity, self.root / f"collector-{name}")  # saves its password entry
        data = self._identities()
        data.setdefault("collectors", []).append(name)
        self._save_identities(data)
        self.write_broker_files()
        return identity

    def add_viewer(self, name: str) -> str:
        """A read-only identity, ``edgeloop-viewer-<name>``, in ``<pki>/viewer-<name>/``, for
        ``fleet status --watch``, ``rollout status`` and dashboards that run beside the cloud's
        own commands (one connection per identity: the cloud identity would keep kicking them).
        It reads the devices' state, availability and telemetry and the releases; it writes nothing."""
        try:
            check_segment("viewer name", name)
        except ValueError as exc:
            raise PkiError(str(exc)) from None
        identity = f"{VIEWER_IDENTITY}-{name}"
        data = self._identities()
        if name in data.get("viewers", []) or identity in data["devices"]:
            raise PkiError(f"a viewer named {name!r} exists already")
        self._write_service_identity(identity, self.root / f"viewer-{name}")
        data = self._identities()
        data.setdefault("viewers", []).append(name)
        self._save_identities(data)
        self.write_broker_files()
        return identity

    def viewers(self) -> list[str]:
        return [f"{VIEWER_IDENTITY}-{n}" for n in self._identities().get("viewers", [])]

    def collectors(self) -> list[str]:
        """Every collector identity: the one of ``init`` and those of :meth:`add_collector`."""
        return [COLLECTOR_IDENTITY, *(f"{COLLECTOR_IDENTITY}-{n}" for n in self._identities().get("collectors", []))]

    def _identities(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.root / "identities.json").read_text())
        return data

    def _save_identities(self, data: dict[str, Any]) -> None:
        write_private(self.root / "identities.json", json.dumps(data, indent=2).encode() + b"\n")

    def devices(self) -> list[DeviceRecord]:
        return [DeviceRecord.from_json(name, d) for name, d in sorted(self._identities()["devices"].items())]

    def add_device(
        self,
        name: str,
        *,
        fleet: str,
        out: Path,
        group: str | None = None,
        model: str = "intents",
        auth: Auth = "cert",
        release_key: Path | None = None,
        state_dir: str = "/var/lib/edge-agent",
        broker: tuple[str, int] | None = None,
    ) -> DeviceRecord:
        """Issue ``name``'s identity and write its config directory to ``out``; update the broker files."""
        try:
            for kind, value in (("device", name), ("fleet", fleet), ("model", model)):
                check_segment(kind, value)
            if group is not None:
                check_segment("group", group)
        except ValueError as exc:
            raise ProvisionError(str(exc)) from None
        if name in RESERVED or name.startswith((f"{COLLECTOR_IDENTITY}-", f"{VIEWER_IDENTITY}-")):
            raise ProvisionError(f"device name {name!r} is reserved for the cloud's own identities")
        data = self._identities()
        if name in data["devices"]:
            other = data["devices"][name]
            raise ProvisionError(
                f"device {name!r} already exists (fleet {other['fleet']}); device ids are MQTT user names and "
                "must be unique on the broker: pick another name or `cloud-train device revoke` it first"
            )
        key_path = release_key or (Path(self.settings["release_key"]) if self.settings.get("release_key") else None)
        if key_path is None:
            raise ProvisionError("no release public key: pass --release-key (the release.pub of `cloud-train keygen`)")
        _check_release_key(key_path)
        if out.exists() and any(out.iterdir()):
            raise ProvisionError(f"output directory {out} is not empty; refusing to overwrite a device's files")
        out.mkdir(parents=True, exist_ok=True)
        os.chmod(out, 0o700)
        host, port = broker or (
            self.settings["broker_host"],
            self.settings["cert_port" if auth == "cert" else "password_port"],
        )
        write_public(out / "ca.crt", self.ca.cert_pem)
        shutil.copyfile(key_path, out / "release.pub")
        os.chmod(out / "release.pub", 0o644)
        serial: int | None = None
        if auth == "cert":
            issued = self.ca.issue(name)
            write_public(out / "device.crt", issued.cert_pem)
            write_private(out / "device.key", issued.key_pem)
            serial = issued.serial
            credentials = '[mqtt.tls]\nca_file = "ca.crt"\ncert_file = "device.crt"\nkey_file = "device.key"\n'
        else:
            password = secrets.token_urlsafe(24)
            write_private(out / "mqtt.password", password.encode() + b"\n")
            data.setdefault("passwords", {})[name] = mosquitto_password_hash(password)
            credentials = f'username = "{name}"\npassword_file = "mqtt.password"\n\n[mqtt.tls]\nca_file = "ca.crt"\n'
        group_line = f"group = {json.dumps(group)}\n" if group else ""
        write_public(
            out / "agent.toml",
            (
                f"# Written by `cloud-train device add` for device {name} of fleet {fleet}.\n"
                "# Copy this directory to /etc/edge-agent/ (deploy/install-device does), then start edge-agent.\n"
                f'device_id = "{name}"\nfleet = "{fleet}"\n{group_line}model = "{model}"\n'
                f"state_dir = {json.dumps(state_dir)}\n\n"
                f"[mqtt]\nhost = {json.dumps(host)}\nport = {port}\n"
                f"topic_root = {json.dumps(self.settings['topic_root'])}\n{credentials}\n"
                '[update]\ntrusted_keys = ["release.pub"]\n'
            ).encode(),
        )
        record = DeviceRecord(
            name=name,
            fleet=fleet,
            group=group,
            auth=auth,
            serial=serial,
            issued_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        data["devices"][name] = record.to_json()
        self._save_identities(data)
        self.write_broker_files()
        return record

    def revoke_device(self, name: str) -> DeviceRecord:
        """Revoke ``name``: its certificate goes on the CRL, its password entry and ACL lines go away."""
        data = self._identities()
        entry = data["devices"].pop(name, None)
        if entry is None:
            known = ", ".join(sorted(data["devices"])) or "none"
            raise ProvisionError(f"no device {name!r} in {self.root} (devices: {known})")
        if entry["serial"] is not None:
            data["revoked_serials"].append(entry["serial"])
        data.get("passwords", {}).pop(name, None)
        self._save_identities(data)
        self.write_broker_files()
        return DeviceRecord.from_json(name, entry)

    # -- the broker's files -----------------------------------------------------------------------
    def write_broker_files(self) -> None:
        """Regenerate ``broker/acl``, ``broker/passwd`` and ``broker/crl.pem`` from the identities."""
        data = self._identities()
        root = self.settings["topic_root"]
        lines = [
            "# Generated by cloud-train from identities.json; edits are overwritten.",
            "# After a change: copy to the broker, then `systemctl reload mosquitto`.",
            "# No topic is open to all: every identity gets exactly its own lines below.",
        ]
        for identity in (CLOUD_IDENTITY, *self.collectors(), *self.viewers()):
            lines += ["", f"user {identity}", *service_acl_entries(identity, root=root)]
        for name, device in sorted(data["devices"].items()):
            lines += ["", f"# device {name}: fleet {device['fleet']}, group {device['group'] or '-'}, {device['auth']}"]
            lines += [f"user {name}", *acl_entries(user=name, fleet=device["fleet"], group=device["group"], root=root)]
        broker = self.root / "broker"
        write_private(broker / "acl", ("\n".join(lines) + "\n").encode())
        passwords = data.get("passwords", {})
        write_private(broker / "passwd", "".join(f"{user}:{h}\n" for user, h in sorted(passwords.items())).encode())
        write_public(broker / "crl.pem", self.ca.crl_pem(data["revoked_serials"]))


def _check_release_key(path: Path) -> None:
    try:
        load_public_key(path)
    except ValueError as exc:
        raise ProvisionError(f"release key: {exc}") from None
