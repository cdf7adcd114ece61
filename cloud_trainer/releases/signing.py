"""Release signing keys (ed25519) and the sequence numbers a key signs."""

from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_trainer.errors import KeyFileError
from edge_agent.protocol import Release, SignedEnvelope, key_id_of


def generate_keypair(out_dir: Path, *, name: str = "release") -> tuple[Path, Path]:
    """Write ``<name>.key`` (PKCS#8 PEM, mode 0600) and ``<name>.pub`` (PEM) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    private, public = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    if private.exists():
        raise KeyFileError(f"{private} exists; refusing to overwrite a signing key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private, public


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise KeyFileError(
            f"cannot read signing key {path}: {exc.strerror} (create one with `cloud-train keygen`)"
        ) from None
    except (ValueError, TypeError):
        raise KeyFileError(f"signing key {path} is not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"signing key {path} is not an ed25519 key")
    return key


def next_sequence(key_path: Path) -> int:
    """The next sequence number for releases signed by ``key_path`` (kept beside it, never reused)."""
    counter = key_path.with_suffix(".seq")
    try:
        current = int(counter.read_text().strip() or 0)
    except FileNotFoundError:
        current = 0
    except ValueError:
        raise KeyFileError(f"sequence file {counter} is corrupt; fix it by hand to the last sequence used") from None
    value = current + 1
    tmp = counter.with_name(counter.name + ".tmp")
    tmp.write_text(f"{value}\n")
    os.replace(tmp, counter)
    return value


def sign_release(release: Release, key: Ed25519PrivateKey) -> SignedEnvelope:
    payload = release.to_json()
    signature = key.sign(payload.encode())
    return SignedEnvelope(
        key_id=key_id_of(key.public_key().public_bytes_raw()),
        payload=payload,
        signature=base64.b64encode(signature).decode(),
    )
