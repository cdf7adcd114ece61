"""Releases: the signed desired state that tells devices which bundle to run.

On the wire a release is an envelope::

    {"schema": "edgeloop.signed/1", "key_id": "<16 hex>", "payload": "<release JSON text>",
     "signature": "<base64 ed25519 signature of the UTF-8 bytes of payload>"}

The signature covers the exact bytes of ``payload``, so no JSON canonicalisation can make signer
and verifier disagree. ``payload`` parses to a :class:`Release`, which points at one manifest by
sha256 and carries a sequence number (rollback protection) and an expiry (freeze protection).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from edge_agent.protocol.errors import MalformedPayload, SignatureError
from edge_agent.protocol.manifest import Sha256, _first_error

RELEASE_SCHEMA = "edgeloop.release/1"
ENVELOPE_SCHEMA = "edgeloop.signed/1"


class Target(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["fleet", "group", "device"]
    name: str


class Release(BaseModel):
    """What a device should run, signed by the cloud."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    schema_: Literal["edgeloop.release/1"] = Field(default=RELEASE_SCHEMA, alias="schema")  # type: ignore[arg-type]
    fleet: str
    target: Target
    model: str
    version: int = Field(ge=1)
    sequence: int = Field(ge=1, description="grows with every release a key signs; lower ones are refused")
    manifest_sha256: Sha256
    manifest_size: int = Field(gt=0)
    issued_at: AwareDatetime
    expires_at: AwareDatetime
    artifact_url: str | None = Field(
        default=None,
        pattern=r"^https?://[^\s]+$",
        description="fetch manifest.json and files from this http(s) directory instead of MQTT chunks",
    )
    canary_percent: float | None = Field(
        default=None, gt=0, le=100, description="only this share of the targeted devices applies it (by device id)"
    )

    def is_expired(self, now: datetime | None = None) -> bool:
        return (now or datetime.now(timezone.utc)) >= self.expires_at

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True)


class SignedEnvelope(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    schema_: Literal["edgeloop.signed/1"] = Field(default=ENVELOPE_SCHEMA, alias="schema")  # type: ignore[arg-type]
    key_id: str
    payload: str
    signature: str

    def to_bytes(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()


def in_canary(*, fleet: str, device: str, model: str, percent: float | None) -> bool:
    """Whether ``device`` is in a canary of ``percent`` percent: a stable bucket from its id.

    The same devices are the canaries of every release of a model, so a fleet grows a canary
    from 5 to 50 to 100 percent without devices flapping in and out.
    """
    if percent is None or percent >= 100:
        return True
    bucket = int(hashlib.sha256(f"{fleet}/{model}/{device}".encode()).hexdigest()[:8], 16) % 10_000
    return bucket < percent * 100


def key_id_of(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read an ed25519 public key in PEM (SubjectPublicKeyInfo) form."""
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise ValueError(f"cannot read trusted key {path}: {exc.strerror}") from None
    except ValueError:
        raise ValueError(f"trusted key {path} is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"trusted key {path} is not an ed25519 key")
    return key


def open_release(message: bytes, trusted: Mapping[str, Ed25519PublicKey]) -> Release:
    """Verify a signed envelope against ``trusted`` keys (by key id) and return its release."""
    try:
        envelope = SignedEnvelope.model_validate_json(message)
    except ValidationError as exc:
        raise MalformedPayload(f"release envelope is not a valid {ENVELOPE_SCHEMA}: {_first_error(exc)}") from None
    key = trusted.get(envelope.key_id)
    if key is None:
        raise SignatureError(f"release is signed by key {envelope.key_id!r}, which this device does not trust")
    try:
        signature = base64.b64decode(envelope.signature, validate=True)
        key.verify(signature, envelope.payload.encode())
    except (binascii.Error, ValueError, InvalidSignature):  # ValueError: non-ASCII base64
        raise SignatureError(f"release signature does not verify with key {envelope.key_id!r}") from None
    try:  # pydantic's JSON parser bounds nesting: a 100,000-deep payload is a named refusal, not a crash
        return Release.model_validate_json(envelope.payload)
    except ValidationError as exc:
        raise MalformedPayload(f"signed release payload is not a valid {RELEASE_SCHEMA}: {_first_error(exc)}") from None
