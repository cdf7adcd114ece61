"""The wire contract: manifests, signed releases, topics, chunks."""

from __future__ import annotations

import base64
import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from cloud_trainer.releases.signing import generate_keypair, load_private_key, next_sequence, sign_release
from edge_agent.protocol import (
    CHUNK_SIZE,
    IntegrityError,
    MalformedPayload,
    Manifest,
    PublicKey,
    Release,
    SignatureError,
    Target,
    Topics,
    UnsafePath,
    check_chunk,
    iter_chunks,
    key_id_of,
    load_public_key,
    open_release,
    safe_relative_path,
    sha256_bytes,
    verify_bundle_files,
)
from tests.tinymodel import make_tiny_bundle


def _release(**overrides: object) -> Release:
    now = datetime.now(timezone.utc)
    fields: dict[str, object] = {
        "fleet": "f",
        "target": Target(kind="fleet", name="f"),
        "model": "intents",
        "version": 1,
        "sequence": 1,
        "manifest_sha256": "a" * 64,
        "manifest_size": 10,
        "issued_at": now,
        "expires_at": now + timedelta(days=1),
    }
    fields.update(overrides)
    return Release.model_validate(fields)


@pytest.fixture
def keypair(tmp_path: Path) -> tuple[Path, Path]:
    return generate_keypair(tmp_path)


def test_signed_release_round_trip(keypair: tuple[Path, Path]) -> None:
    private, public = keypair
    key = load_public_key(public)
    envelope = sign_release(_release(version=3), load_private_key(private))
    release = open_release(envelope.to_bytes(), {key_id_of(key): key})
    assert release.version == 3


def test_tampered_payload_fails_signature(keypair: tuple[Path, Path]) -> None:
    private, public = keypair
    key = load_public_key(public)
    envelope = json.loads(sign_release(_release(), load_private_key(private)).to_bytes())
    envelope["payload"] = envelope["payload"].replace('"version":1', '"version":2')
    with pytest.raises(SignatureError, match="does not verify"):
        open_release(json.dumps(envelope).encode(), {key_id_of(key): key})


def test_unknown_key_and_garbage_are_refused(keypair: tuple[Path, Path], tmp_path: Path) -> None:
    private, _ = keypair
    _, other_public = generate_keypair(tmp_path / "other")
    other = load_public_key(other_public)
    with pytest.raises(SignatureError, match="does not trust"):
        open_release(sign_release(_release(), load_private_key(private)).to_bytes(), {key_id_of(other): other})
    with pytest.raises(MalformedPayload, match=r"not a valid edgeloop\.signed/1"):
        open_release(b"\xff\x00", {})


def test_public_keys_read_as_the_cloud_writes_them(keypair: tuple[Path, Path], tmp_path: Path) -> None:
    """The device's own PEM reader (libsodium, no cryptography) agrees with cryptography's writer,
    and names what is wrong with any other file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    private, public = keypair
    signing = load_private_key(private)
    key = load_public_key(public)
    assert isinstance(key, PublicKey)
    assert key.raw == signing.public_key().public_bytes_raw()
    assert key_id_of(key) == key_id_of(signing.public_key().public_bytes_raw())
    assert key.to_pem() == public.read_bytes()
    assert key.verify(signing.sign(b"payload"), b"payload")
    assert not key.verify(signing.sign(b"payload"), b"payloaD")
    assert not key.verify(b"short", b"payload")  # a signature of the wrong length is a refusal, not a crash

    spki = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    others = {
        "rsa.pub": rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_bytes(*spki),
        "ec.pub": ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(*spki),
        "text.pub": b"hello\n",
        "binary.pub": b"\xff\xfe",
        "notb64.pub": b"-----BEGIN PUBLIC KEY-----\n!!!!\n-----END PUBLIC KEY-----\n",
        "longer.pub": b"-----BEGIN PUBLIC KEY-----\n%s\n-----END PUBLIC KEY-----\n"
        % base64.b64encode(base64.b64decode(b"".join(key.to_pem().splitlines()[1:-1])) + b"\x00"),
    }
    expected = {
        "rsa.pub": "not an ed25519 key", "ec.pub": "not an ed25519 key", "text.pub": "not a PEM public key",
        "binary.pub": "not a PEM public key", "notb64.pub": "not base64", "longer.pub": "not an ed25519 key",
    }  # fmt: skip
    for name, data in others.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=expected[name]):
            load_public_key(tmp_path / name)
    with pytest.raises(ValueError, match="cannot read trusted key"):
        load_public_key(tmp_path / "missing.pub")


def test_a_signature_that_is_not_64_bytes_is_refused_by_name(keypair: tuple[Path, Path]) -> None:
    private, public = keypair
    key = load_public_key(public)
    envelope = json.loads(sign_release(_release(), load_private_key(private)).to_bytes())
    for signature in ("", "AAAA", "é", "A" * 200):
        envelope["signature"] = signature
        with pytest.raises(SignatureError, match="does not verify"):
            open_release(json.dumps(envelope).encode(), {key_id_of(key): key})


def test_sequence_numbers_grow(keypair: tuple[Path, Path]) -> None:
    private, _ = keypair
    assert [next_sequence(private) for _ in range(3)] == [1, 2, 3]


def test_expiry() -> None:
    assert _release(expires_at=datetime.now(timezone.utc) - timedelta(seconds=1)).is_expired()
    assert not _release().is_expired()


@pytest.mark.parametrize("name", ["../etc/passwd", "/abs", "a/../../b", "a\\b", "", "./x", "a//b"])
def test_unsafe_bundle_paths_are_refused(name: str) -> None:
    with pytest.raises(UnsafePath):
        safe_relative_path(name)


def test_manifest_with_escaping_path_is_malformed(tmp_path: Path) -> None:
    manifest = make_tiny_bundle(tmp_path / "b", version=1)
    data = json.loads(manifest.to_json())
    data["files"][0]["path"] = "../../outside"
    with pytest.raises(MalformedPayload, match="escapes the bundle directory"):
        Manifest.parse(json.dumps(data).encode())


def test_bundle_verification_names_the_bad_file(tmp_path: Path) -> None:
    manifest = make_tiny_bundle(tmp_path / "b", version=1)
    verify_bundle_files(tmp_path / "b", manifest)
    (tmp_path / "b" / "tokenizer.json").write_text("{}")
    with pytest.raises(IntegrityError, match=r"tokenizer\.json"):
        verify_bundle_files(tmp_path / "b", manifest)


def test_manifest_lists_every_file_with_size_sha256_and_chunks(tmp_path: Path) -> None:
    manifest = make_tiny_bundle(tmp_path / "b", version=1)
    assert {f.path for f in manifest.files} == {"model.onnx", "tokenizer.json", "golden.json"}
    for entry in manifest.files:
        data = (tmp_path / "b" / entry.path).read_bytes()
        assert (entry.size, entry.sha256) == (len(data), sha256_bytes(data))
        assert entry.chunks == [sha for sha, _ in iter_chunks(tmp_path / "b" / entry.path)]


def test_chunks_are_checked_against_their_name(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(256_000))
    chunks = list(iter_chunks(path))
    assert len(chunks) == -(-256_000 // CHUNK_SIZE)
    check_chunk(chunks[0][0], chunks[0][1])
    with pytest.raises(IntegrityError, match="arrived with sha256"):
        check_chunk(chunks[0][0], chunks[1][1])


def test_topics() -> None:
    t = Topics(fleet="demo")
    assert t.release_topics_for(device="d1", group="g", model="m") == [
        "edgeloop/v1/demo/releases/m",
        "edgeloop/v1/demo/groups/g/releases/m",
        "edgeloop/v1/demo/devices/d1/releases/m",
    ]
    with pytest.raises(ValueError, match="not a valid name"):
        Topics(fleet="a/#")
    with pytest.raises(ValueError, match="sha256"):
        t.chunk("../x")


def test_published_json_schemas_are_current() -> None:
    from edge_agent.protocol.schemas import schemas

    docs = Path(__file__).parents[2] / "docs" / "schemas"
    for name, schema in schemas().items():
        on_disk = json.loads((docs / f"{name}.schema.json").read_text())
        assert on_disk == schema, f"docs/schemas/{name}.schema.json is stale: python -m edge_agent.protocol.schemas"
