"""Content-addressed chunks: how bundle files travel over MQTT.

A file is cut into fixed-size chunks; each chunk is published retained on
``{root}/{fleet}/chunks/{sha256-of-chunk}`` as raw bytes. The topic is the chunk's identity, so
a receiver checks ``sha256(payload) == topic id`` before it keeps a byte, a chunk a device
already holds (from any version) is never fetched again, and a transfer resumes wherever it
stopped.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from edge_agent.protocol.errors import IntegrityError
from edge_agent.protocol.manifest import CHUNK_SIZE, sha256_bytes

__all__ = ["CHUNK_SIZE", "MAX_MESSAGE_BYTES", "check_chunk", "iter_chunks"]

# 96 KiB of payload stays under a 128 KiB MQTT message limit with room for the topic and headers.
MAX_MESSAGE_BYTES = 128 * 1024


def iter_chunks(path: Path, *, chunk_size: int = CHUNK_SIZE) -> Iterator[tuple[str, bytes]]:
    """Yield ``(sha256, bytes)`` for each chunk of the file at ``path``, in order."""
    with path.open("rb") as handle:
        while data := handle.read(chunk_size):
            yield sha256_bytes(data), data


def check_chunk(expected_sha256: str, payload: bytes) -> None:
    """Raise ``IntegrityError`` unless ``payload`` is the chunk named ``expected_sha256``."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise IntegrityError(
            f"chunk {expected_sha256[:12]}… is {len(payload)} bytes, over the {MAX_MESSAGE_BYTES} limit"
        )
    actual = sha256_bytes(payload)
    if actual != expected_sha256:
        raise IntegrityError(f"chunk {expected_sha256[:12]}… arrived with sha256 {actual[:12]}…")
