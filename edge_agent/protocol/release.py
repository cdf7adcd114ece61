"""Releases: the signed desired state that tells devices which bundle to run.

On the wire a release is an envelope::

    {"schema": "edgeloop.signed/1", "key_id": "<16 hex>", "payload": "<release JSON text>",
     "signature": "<base64 ed25519 signature of the UTF-8 bytes of payload>"}

The signature covers the exact bytes of ``payload``, so no JSON canonicalisation can make signer
and verifier disagree. ``payload`` parses to a :class:`Release`, which points at one manifest by
sha256 and carries a sequence number (rollback protection) and an expiry (freeze protection).

Devices verify with libsodium (PyNaCl), not with ``cryptography``, which the cloud signs with: ed25519
is one algorithm (RFC 8032) either way, and libsodium costs a device about 2 MB of memory where
``cryptography``'s bundled OpenSSL costs 9 (docs/benchmarks.md, "libsodium on the device").
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from nacl.exceptions import CryptoError
from nacl.signing import VerifyKey
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


# The DER of an ed25519 SubjectPublicKeyInfo (RFC 8410) is this prefix and the 32-byte key, always:
# SEQUENCE { SEQUENCE { OID 1.3.101.112 }, BIT STRING (no unused bits) }.
_ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
_PEM_BEGIN, _PEM_END = "-----BEGIN PUBLIC KEY-----", "-----END PUBLIC KEY-----"


class PublicKey:
    """An ed25519 release-verification key (its 32 raw bytes), verified with libsodium."""

    __slots__ = ("_verify_key", "raw")

    def __init__(self, raw: bytes) -> None:
        if len(raw) != 32:
            raise ValueError(f"an ed25519 public key is 32 bytes, not {len(raw)}")
        self.raw = bytes(raw)
        self._verify_key = VerifyKey(self.raw)

    @classmethod
    def from_pem(cls, pem: bytes) -> PublicKey:
        """Parse a PEM ``PUBLIC KEY`` (SubjectPublicKeyInfo) block; ``ValueError`` names what is wrong."""
        try:
            text = pem.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError("not a PEM public key (not ASCII text)") from None
        begin, end = text.find(_PEM_BEGIN), text.find(_PEM_END)
        if begin < 0 or end < begin:
            raise ValueError(f"not a PEM public key (no {_PEM_BEGIN} ... {_PEM_END} block)")
        body = "".join(text[begin + len(_PEM_BEGIN) : end].split())
        try:
            der = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("not a PEM public key (its body is not base64)") from None
        if len(der) != len(_ED25519_SPKI_PREFIX) + 32 or not der.startswith(_ED25519_SPKI_PREFIX):
            raise ValueError("not an ed25519 key (a PEM public key of another algorithm, or malformed)")
        return cls(der[len(_ED25519_SPKI_PREFIX) :])

    def to_pem(self) -> bytes:
        body = base64.b64encode(_ED25519_SPKI_PREFIX + self.raw).decode()
        return f"{_PEM_BEGIN}\n{body}\n{_PEM_END}\n".encode()

    def verify(self, signature: bytes, message: bytes) -> bool:
        """Whether ``signature`` is this key's ed25519 signature of ``message``."""
        try:
            self._verify_key.verify(message, signature)
        except (CryptoError, ValueError, TypeError):  # BadSignatureError, or a signature not 64 bytes
            return False
        return True

    def __repr__(self) -> str:
        return f"PublicKey(key_id={key_id_of(self)!r})"


def key_id_of(public_key: PublicKey | bytes) -> str:
    """A key's id: the first 16 hex digits of the sha256 of its 32 raw bytes."""
    raw = public_key.raw if isinstance(public_key, PublicKey) else public_key
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(path: Path) -> PublicKey:
    """Read an ed25519 public key in PEM (SubjectPublicKeyInfo) form."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read trusted key {path}: {exc.strerror}") from None
    try:
        return PublicKey.from_pem(data)
    except ValueError as exc:
        raise ValueError(f"trusted key {path} is {exc}") from None


def open_release(message: bytes, trusted: Mapping[str, PublicKey]) -> Release:
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
    except (binascii.Error, ValueError):  # ValueError: non-ASCII base64
        signature = b""
    if not key.verify(signature, envelope.payload.encode()):
        raise SignatureError(f"release signature does not verify with key {envelope.key_id!r}")
    try:  # pydantic's JSON parser bounds nesting: a 100,000-deep payload is a named refusal, not a crash
        return Release.model_validate_json(envelope.payload)
    except ValidationError as exc:
        raise MalformedPayload(f"signed release payload is not a valid {RELEASE_SCHEMA}: {_first_error(exc)}") from None
