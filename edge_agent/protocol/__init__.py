"""The wire contract: everything that crosses MQTT or sits in a bundle is defined here, once.

The cloud side (``export``, ``cloud_trainer``) imports this package; it imports nothing of ours.
"""

from edge_agent.protocol.chunks import CHUNK_SIZE, MAX_MESSAGE_BYTES, check_chunk, iter_chunks
from edge_agent.protocol.errors import (
    IntegrityError,
    MalformedPayload,
    ProtocolError,
    SignatureError,
    UnsafePath,
)
from edge_agent.protocol.manifest import (
    MANIFEST_NAME,
    FileEntry,
    ImagePreprocessing,
    Lineage,
    Manifest,
    NoPreprocessing,
    TensorSpec,
    TextPreprocessing,
    safe_relative_path,
    sha256_bytes,
    sha256_file,
    verify_bundle_files,
)
from edge_agent.protocol.release import (
    PublicKey,
    Release,
    SignedEnvelope,
    Target,
    in_canary,
    key_id_of,
    load_public_key,
    open_release,
)
from edge_agent.protocol.state import Availability, DeviceState, UpdateState
from edge_agent.protocol.topics import DEFAULT_ROOT, Topics, check_segment

__all__ = [
    "CHUNK_SIZE",
    "DEFAULT_ROOT",
    "MANIFEST_NAME",
    "MAX_MESSAGE_BYTES",
    "Availability",
    "DeviceState",
    "FileEntry",
    "ImagePreprocessing",
    "IntegrityError",
    "Lineage",
    "MalformedPayload",
    "Manifest",
    "NoPreprocessing",
    "ProtocolError",
    "PublicKey",
    "Release",
    "SignatureError",
    "SignedEnvelope",
    "Target",
    "TensorSpec",
    "TextPreprocessing",
    "Topics",
    "UnsafePath",
    "UpdateState",
    "check_chunk",
    "check_segment",
    "in_canary",
    "iter_chunks",
    "key_id_of",
    "load_public_key",
    "open_release",
    "safe_relative_path",
    "sha256_bytes",
    "sha256_file",
    "verify_bundle_files",
]
