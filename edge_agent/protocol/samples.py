"""Samples for retraining, and the sampling policy that chooses them.

A device keeps some of its inputs (the hard ones: low confidence, small margin, high entropy, or
a random share) and the labels apps report for them, and uploads them in batches::

    {root}/{fleet}/devices/{device}/samples     a SampleBatch, gzip-compressed JSON, QoS 1
    {root}/{fleet}/sampling/{model}             retained SamplingPolicy for the fleet
    {root}/{fleet}/devices/{device}/sampling    retained SamplingPolicy for one device (wins)

Every record has a unique ``id``: delivery is at least once, and the cloud stores each id once.
A ``feedback`` record carries the true label an app reported for one prediction
(``prediction_id``); it repeats the input, so it is useful even when the prediction itself was
not sampled.
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_agent.protocol.errors import MalformedPayload
from edge_agent.protocol.manifest import _first_error

SAMPLE_SCHEMA = "edgeloop.sample/1"
BATCH_SCHEMA = "edgeloop.samples/1"
POLICY_SCHEMA = "edgeloop.sampling/1"
MAX_BATCH_BYTES = 96 * 1024
"""The most compressed bytes one batch message carries (the fleet's brokers allow 128 KiB)."""
MAX_UNCOMPRESSED_BYTES = 16 * 1024 * 1024
"""A batch that inflates past this is refused (a zip bomb is bad input, not a crash)."""

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
"""Device, fleet and model names, as in topics (they also name directories in the cloud's store)."""

Reason = Literal["low_confidence", "small_margin", "high_entropy", "random", "feedback"]


class SampleRecord(BaseModel):
    """One kept input with what the model said about it (or, for feedback, what it should have said)."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    schema_: Literal["edgeloop.sample/1"] = Field(default=SAMPLE_SCHEMA, alias="schema")  # type: ignore[arg-type]
    id: str = Field(pattern=r"^[0-9a-f]{32}$", description="unique per record; the cloud stores each id once")
    kind: Literal["sample", "feedback"] = "sample"
    prediction_id: str = Field(pattern=r"^[0-9a-f]{32}$", description="the id the API returned with the prediction")
    device: str = Field(pattern=NAME)
    fleet: str = Field(pattern=NAME)
    model: str = Field(pattern=NAME)
    version: int = Field(ge=1, description="the model version that made the prediction")
    created_at: str = Field(pattern=r"^\d{4}-\d{2}-\d{2}T", description="ISO 8601, UTC")
    text: str | None = Field(default=None, description="the input of a text model")
    image: list[Any] | None = Field(default=None, description="the input of an image model (nested pixel lists)")
    predicted: str = Field(description="the label the model gave")
    score: float
    scores: dict[str, float]
    reasons: list[Reason] = Field(min_length=1, description="why it was kept")
    label: str | None = Field(default=None, description="the true label, for feedback records")


class SampleBatch(BaseModel):
    """What one MQTT message on ``.../devices/{device}/samples`` carries, gzip-compressed."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    schema_: Literal["edgeloop.samples/1"] = Field(default=BATCH_SCHEMA, alias="schema")  # type: ignore[arg-type]
    device: str = Field(pattern=NAME)
    fleet: str = Field(pattern=NAME)
    sent_at: str
    records: list[SampleRecord] = Field(min_length=1)

    def to_bytes(self) -> bytes:
        """gzip-compressed JSON, as it goes on the wire."""
        return gzip.compress(self.model_dump_json(by_alias=True).encode(), compresslevel=6, mtime=0)

    @classmethod
    def from_bytes(cls, payload: bytes) -> SampleBatch:
        """Parse a wire payload (gzip or plain JSON); raise :class:`MalformedPayload` naming the problem."""
        try:
            data = _inflate(payload) if payload[:2] == b"\x1f\x8b" else payload
            parsed = json.loads(data)
        except (OSError, EOFError, zlib.error, ValueError, RecursionError) as exc:
            raise MalformedPayload(f"sample batch is not gzip JSON: {exc}") from None
        try:
            batch = cls.model_validate(parsed)
        except ValidationError as exc:
            raise MalformedPayload(f"sample batch does not validate: {_first_error(exc)}") from None
        try:  # "\ud800" escapes decode to lone surrogates, which no store can write
            batch.model_dump_json().encode("utf-8")
        except (ValueError, UnicodeError) as exc:
            raise MalformedPayload(f"sample batch has text that is not valid Unicode: {exc}") from None
        return batch


def _inflate(payload: bytes) -> bytes:
    with gzip.GzipFile(fileobj=io.BytesIO(payload)) as stream:
        data = stream.read(MAX_UNCOMPRESSED_BYTES + 1)
    if len(data) > MAX_UNCOMPRESSED_BYTES:
        raise MalformedPayload(f"sample batch inflates past {MAX_UNCOMPRESSED_BYTES} bytes")
    return data


class SamplingRules(BaseModel):
    """Which predictions a device keeps: one is kept when any rule fires, within the caps."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    enabled: bool = True
    low_confidence: float | None = Field(default=0.6, ge=0, le=1, description="keep when the top score is below")
    min_margin: float | None = Field(default=None, ge=0, le=1, description="keep when top-1 minus top-2 is below")
    max_entropy: float | None = Field(
        default=None, ge=0, le=1, description="keep when the normalised entropy of the scores (0..1) is above"
    )
    random_rate: float = Field(default=0.0, ge=0, le=1, description="keep this share of all predictions")
    per_class_per_hour: int = Field(default=60, ge=0, description="most kept per predicted class per hour")
    per_hour: int = Field(default=600, ge=0, description="most kept per hour in all")

    def rules(self) -> SamplingRules:
        """Just the rules, whatever subclass this is."""
        return SamplingRules.model_validate(self.model_dump(include=set(SamplingRules.model_fields)))


class SamplingPolicy(SamplingRules):
    """The rules as the cloud publishes them, retained (``cloud-train sampling set``).

    The device's config holds the rules it starts with; a retained policy replaces them (the
    device's own topic wins over the fleet's) unless the config says ``allow_remote = false``.
    """

    schema_: Literal["edgeloop.sampling/1"] = Field(default=POLICY_SCHEMA, alias="schema")  # type: ignore[arg-type]

    def to_bytes(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()

    @classmethod
    def from_bytes(cls, payload: bytes) -> SamplingPolicy:
        try:
            return cls.model_validate_json(payload)
        except ValidationError as exc:
            raise MalformedPayload(f"sampling policy does not validate: {_first_error(exc)}") from None
