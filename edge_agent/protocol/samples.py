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
import math
import re
import zlib
from datetime import datetime, timedelta, timezone
from itertools import chain
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edge_agent.protocol.errors import MalformedPayload

SAMPLE_SCHEMA = "edgeloop.sample/1"
BATCH_SCHEMA = "edgeloop.samples/1"
POLICY_SCHEMA = "edgeloop.sampling/1"
MAX_BATCH_BYTES = 96 * 1024
"""The most compressed bytes one batch message carries: well under the broker's maximum packet
size (``max_packet_size 1048576`` in deploy/mosquitto/edgeloop.conf; at least 128 KiB on any broker
the fleet uses), with room for the topic and properties."""
MAX_UNCOMPRESSED_BYTES = 16 * 1024 * 1024
"""A batch that inflates past this is refused (a zip bomb is bad input, not a crash)."""
MAX_RECORDS = 5000
"""Records in one batch at most (the agent's ``outbox.batch_records`` is at most this)."""
MAX_RECORD_BYTES = MAX_BATCH_BYTES // 2
"""One record's JSON at most: the agent's outbox writer drops a larger record before it is queued,
so the collector refuses a batch holding one (:meth:`SampleRecord.size_problem`)."""
MAX_TEXT_CHARS = MAX_RECORD_BYTES
"""A text input's characters at most (each takes at least a byte of the record's JSON)."""
MAX_IMAGE_VALUES = MAX_RECORD_BYTES // 2
"""An image input's numbers at most (each takes at least two bytes, ``0,``, of the record's JSON)."""
MAX_IMAGE_DEPTH = 4
"""An image is nested lists of numbers at most this deep (height, width, channels, and one more)."""
IMAGE_DATA_URL = r"^data:image/(png|jpeg);base64,[A-Za-z0-9+/]*={0,2}$"
"""An image that came encoded travels as its bytes in a ``data:`` URL (JPEG or PNG), not as numbers."""
MAX_IMAGE_DATA_CHARS = MAX_RECORD_BYTES - 8 * 1024
"""An encoded image's ``data:`` URL at most (room is left for the rest of the record)."""
MAX_SCORES = MAX_RECORD_BYTES // 8
"""Classes in ``scores`` at most (each takes at least eight bytes, ``"a":0.0,``, of the record's JSON)."""
MAX_VERSION = 2**31 - 1
"""Model versions fit a signed 32-bit integer (the store's Parquet column)."""
EARLIEST = datetime(2020, 1, 1, tzinfo=timezone.utc)
"""No timestamp before this is real: a device whose clock says so has not set it yet."""
MAX_CLOCK_AHEAD = timedelta(days=1)
"""How far past the receiver's clock a timestamp may be."""

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
"""Device, fleet and model names, as in topics (they also name directories in the cloud's store)."""
LABEL = r"^[^\x00-\x1f]{1,100}$"
"""Class labels (``predicted``, ``label``, the keys of ``scores``): 1-100 characters, none of them
a control character below U+0020 (the rule ``POST /v1/feedback`` applies to the labels it takes)."""
TIMESTAMP = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?(Z|[+-][0-9]{2}:[0-9]{2})$"
"""RFC 3339 with seconds and an offset; the value is kept normalised to UTC (:func:`utc_timestamp`)."""

Reason = Literal["low_confidence", "small_margin", "high_entropy", "random", "feedback"]
Label = Annotated[str, Field(pattern=LABEL)]
Probability = Annotated[float, Field(ge=0, le=1)]

_TIMESTAMP = re.compile(TIMESTAMP, re.ASCII)
_IMAGE_DATA_URL = re.compile(IMAGE_DATA_URL, re.ASCII)


def utc_timestamp(value: str, *, now: datetime | None = None) -> str:
    """``value`` (RFC 3339, any offset) as UTC, ``YYYY-MM-DDTHH:MM:SS.mmm+00:00`` (microseconds when it
    has them), so its first ten characters are its UTC day. ``ValueError`` if it is not a real time
    between :data:`EARLIEST` and :data:`MAX_CLOCK_AHEAD` past ``now``."""
    match = _TIMESTAMP.fullmatch(value)
    if match is None:
        raise ValueError("must be an RFC 3339 time with an offset, e.g. 2026-11-25T10:00:01.123+00:00")
    try:  # fromisoformat before 3.11 takes neither "Z" nor every fraction length: build it by hand
        date, time = value[:10], value[11:19]
        fraction, offset = match.group(1) or "", match.group(2)
        shift = timedelta(0) if offset == "Z" else timedelta(hours=int(offset[1:3]), minutes=int(offset[4:6]))
        zone = timezone(-shift if offset[0] == "-" else shift)
        parsed = datetime(
            int(date[:4]), int(date[5:7]), int(date[8:10]), int(time[:2]), int(time[3:5]), int(time[6:8]),
            int((fraction[1:] + "000000")[:6]) if fraction else 0, tzinfo=zone,
        )  # fmt: skip
    except ValueError as exc:  # month 13, day 45, hour 25, offset past 24 h
        raise ValueError(f"is not a real time: {exc}") from None
    utc = parsed.astimezone(timezone.utc)
    latest = (now or datetime.now(timezone.utc)) + MAX_CLOCK_AHEAD
    if not EARLIEST <= utc <= latest:
        raise ValueError(f"{utc.isoformat()} is not between {EARLIEST.date()} and a day from now")
    return utc.isoformat(timespec="milliseconds" if utc.microsecond % 1000 == 0 else "microseconds")


def _image_problem(image: list[Any]) -> str | None:
    """What makes ``image`` not nested lists of finite numbers, or None. Every value is looked at,
    a level at a time in C (``chain``, ``map``): a 224x224x3 image takes a few milliseconds."""
    level: list[Any] = [image]
    for _depth in range(MAX_IMAGE_DEPTH):
        if not all(level):
            return "has an empty list"
        items = list(chain.from_iterable(level))
        kinds = set(map(type, items))
        if list not in kinds:
            return _numbers_problem(items, kinds)
        if kinds != {list}:
            return "mixes lists and numbers at one depth"
        level = items
    return f"is nested deeper than {MAX_IMAGE_DEPTH} lists"


def _numbers_problem(items: list[Any], kinds: set[type]) -> str | None:
    strange = kinds - {int, float}  # bool too: JSON's true is not a number
    if strange:
        return f"holds {min(kind.__name__ for kind in strange)} where a number belongs"
    try:
        finite = float not in kinds or all(map(math.isfinite, items))
    except OverflowError:  # an int too large for a float is finite: look at the floats alone
        finite = all(math.isfinite(v) for v in items if isinstance(v, float))
    return None if finite else "holds a number that is not finite (NaN or infinity)"


def _count_values(image: list[Any]) -> int:
    """The numbers in a valid image (its lists are nested to one depth throughout)."""
    level = image
    while level and isinstance(level[0], list):
        level = list(chain.from_iterable(level))
    return len(level)


class SampleRecord(BaseModel):
    """One kept input with what the model said about it (or, for feedback, what it should have said).

    Every field is checked when a record is made (on the device) and when one is read: finite
    numbers, real times, names and labels by pattern, exactly one input, a label on feedback. The
    size bounds (:meth:`size_problem`) are checked where batches are read from the wire
    (:meth:`SampleBatch.from_bytes`): a record made on a device may be too large to travel, and the
    device's outbox writer drops it then.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True, strict=True, allow_inf_nan=False)

    schema_: Literal["edgeloop.sample/1"] = Field(default=SAMPLE_SCHEMA, alias="schema")  # type: ignore[arg-type]
    id: str = Field(pattern=r"^[0-9a-f]{32}$", description="unique per record; the cloud stores each id once")
    kind: Literal["sample", "feedback"] = "sample"
    prediction_id: str = Field(pattern=r"^[0-9a-f]{32}$", description="the id the API returned with the prediction")
    device: str = Field(pattern=NAME)
    fleet: str = Field(pattern=NAME)
    model: str = Field(pattern=NAME)
    version: int = Field(ge=1, le=MAX_VERSION, description="the model version that made the prediction")
    created_at: str = Field(
        pattern=TIMESTAMP,
        description="when the prediction was made: RFC 3339 with an offset, from 2020 to a day past the "
        "receiver's clock; normalised to UTC (YYYY-MM-DDTHH:MM:SS.mmm+00:00)",
        json_schema_extra={"format": "date-time"},
    )
    text: str | None = Field(
        default=None,
        description=f"the input of a text model (at most {MAX_TEXT_CHARS} characters on the wire)",
        json_schema_extra={"maxLength": MAX_TEXT_CHARS},
    )
    image: list[Any] | str | None = Field(
        default=None,
        description=f"the input of an image model: nested lists (at most {MAX_IMAGE_DEPTH} deep) of finite "
        f"numbers (at most {MAX_IMAGE_VALUES} on the wire), or, for an image that came encoded, its JPEG or "
        f"PNG bytes as a data:image/png;base64,... URL (at most {MAX_IMAGE_DATA_CHARS} characters on the wire)",
    )
    predicted: Label = Field(description="the label the model gave")
    score: Probability = Field(description="the model's score for the predicted label, 0..1")
    scores: dict[Label, Probability] = Field(
        min_length=1,
        description=f"every class's score, 0..1 (at most {MAX_SCORES} classes on the wire)",
        json_schema_extra={"maxProperties": MAX_SCORES, "additionalProperties": False},
    )
    reasons: list[Reason] = Field(min_length=1, max_length=5, description="why it was kept, each reason once")
    label: Label | None = Field(default=None, description="the true label, for feedback records")

    @field_validator("created_at")
    @classmethod
    def _real_time(cls, value: str) -> str:
        return utc_timestamp(value)

    @field_validator("image")
    @classmethod
    def _numbers(cls, value: list[Any] | str | None) -> list[Any] | str | None:
        if isinstance(value, str):
            if _IMAGE_DATA_URL.fullmatch(value) is None:
                raise ValueError("image as a string must be a data:image/png;base64,... or image/jpeg URL")
            return value
        problem = None if value is None else _image_problem(value)
        if problem is not None:
            raise ValueError(f"image {problem}")
        return value

    @field_validator("reasons")
    @classmethod
    def _once_each(cls, value: list[Reason]) -> list[Reason]:
        if len(set(value)) != len(value):
            raise ValueError("a reason is given twice")
        return value

    @model_validator(mode="after")
    def _complete(self) -> SampleRecord:
        if (self.text is None) == (self.image is None):
            raise ValueError("a record carries exactly one input, text or image")
        if self.kind == "feedback" and self.label is None:
            raise ValueError("a feedback record carries the true label")
        return self

    def size_problem(self) -> str | None:
        """What makes this record too large to travel (``"text has ..."``), or None if it fits.

        Raises ``ValueError`` if the record cannot be written as UTF-8 JSON at all (a lone
        surrogate from a ``"\\ud800"`` escape).
        """
        if self.text is not None and len(self.text) > MAX_TEXT_CHARS:
            return f"text has {len(self.text)} characters; at most {MAX_TEXT_CHARS}"
        if isinstance(self.image, str) and len(self.image) > MAX_IMAGE_DATA_CHARS:
            return f"image has {len(self.image)} characters of data URL; at most {MAX_IMAGE_DATA_CHARS}"
        if isinstance(self.image, list) and (count := _count_values(self.image)) > MAX_IMAGE_VALUES:
            return f"image has {count} numbers; at most {MAX_IMAGE_VALUES}"
        if len(self.scores) > MAX_SCORES:
            return f"scores has {len(self.scores)} classes; at most {MAX_SCORES}"
        size = len(self.model_dump_json(by_alias=True).encode("utf-8"))
        if size > MAX_RECORD_BYTES:
            return f"the record is {size} bytes of JSON; at most {MAX_RECORD_BYTES}"
        return None


class SampleBatch(BaseModel):
    """What one MQTT message on ``.../devices/{device}/samples`` carries, gzip-compressed.

    :meth:`from_bytes` is the collector's gate: a batch with one bad record is refused whole.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True, strict=True)

    schema_: Literal["edgeloop.samples/1"] = Field(default=BATCH_SCHEMA, alias="schema")  # type: ignore[arg-type]
    device: str = Field(pattern=NAME)
    fleet: str = Field(pattern=NAME)
    sent_at: str = Field(
        pattern=TIMESTAMP,
        description="when the device sent it: RFC 3339 with an offset, normalised to UTC like created_at",
        json_schema_extra={"format": "date-time"},
    )
    records: list[SampleRecord] = Field(min_length=1, max_length=MAX_RECORDS)

    @field_validator("sent_at")
    @classmethod
    def _real_time(cls, value: str) -> str:
        return utc_timestamp(value)

    def to_bytes(self) -> bytes:
        """gzip-compressed JSON, as it goes on the wire."""
        return gzip.compress(self.model_dump_json(by_alias=True).encode(), compresslevel=6, mtime=0)

    @classmethod
    def from_bytes(cls, payload: bytes) -> SampleBatch:
        """Parse a wire payload (gzip or plain JSON) and check every record, sizes included; raise
        :class:`MalformedPayload` naming the first problem (``records.3.score: ...``)."""
        try:
            data = _inflate(payload) if payload[:2] == b"\x1f\x8b" else payload
            parsed = json.loads(data)  # takes NaN and Infinity literals: the model refuses them
        except (OSError, EOFError, zlib.error, ValueError, RecursionError) as exc:
            raise MalformedPayload(f"sample batch is not gzip JSON: {exc}") from None
        records = parsed.get("records") if isinstance(parsed, dict) else None
        if isinstance(records, list) and len(records) > MAX_RECORDS:  # before validating them all
            raise MalformedPayload(f"sample batch has {len(records)} records; at most {MAX_RECORDS}")
        try:
            batch = cls.model_validate(parsed)
        except ValidationError as exc:
            raise MalformedPayload(f"sample batch does not validate: {_first_error(exc)}") from None
        for index, record in enumerate(batch.records):
            try:
                problem = record.size_problem()
            except (ValueError, UnicodeError) as exc:  # "\ud800" escapes decode to lone surrogates
                raise MalformedPayload(
                    f"sample batch has text that is not valid Unicode: records.{index}: {exc}"
                ) from None
            if problem is not None:
                raise MalformedPayload(f"sample batch does not fit: records.{index}: {problem}")
        return batch


def _first_error(exc: ValidationError) -> str:
    """``records.3.score: Input should be a finite number (1 problem(s))``, printable whatever the input."""
    err = exc.errors()[0]
    where = ".".join(_printable(str(part)) for part in err["loc"]) or "payload"
    return f"{where}: {err['msg']} ({exc.error_count()} problem(s))"


def _printable(text: str, limit: int = 80) -> str:
    shown = text if text.isprintable() else ascii(text)
    return shown if len(shown) <= limit else shown[:limit] + "..."


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
