"""Errors raised while reading what crossed the wire.

    ProtocolError                 anything on the wire we refuse
    ├── MalformedPayload          not JSON, wrong schema, a missing or mistyped field
    ├── SignatureError            unknown key id, or a signature that does not verify
    ├── IntegrityError            a file or chunk whose size or sha256 differs from what was declared
    └── UnsafePath                a bundle file name that would escape the bundle directory

Every message names the problem in words a fleet operator can act on; the agent reports it on its
state topic and keeps serving what it had.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base class: something received over MQTT, or read from a bundle, was refused."""


class MalformedPayload(ProtocolError):
    """A payload is not valid JSON or does not match its schema."""


class SignatureError(ProtocolError):
    """A release is signed by an untrusted key, or its signature does not verify."""


class IntegrityError(ProtocolError):
    """A file or chunk does not match the size or sha256 that was declared for it."""


class UnsafePath(ProtocolError):
    """A bundle names a file outside its own directory."""
