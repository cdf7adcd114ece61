"""Telemetry: a periodic JSON document per device for dashboards, retained (with an MQTT 5 message
expiry of three periods, so a silent device's numbers do not outlive it there)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

TELEMETRY_SCHEMA = "edgeloop.telemetry/1"


class Latency(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    p50: float | None = None
    p95: float | None = None
    p99: float | None = None


class SamplesTelemetry(BaseModel):
    """The device's sample outbox: what waits for upload, and what was lost to a full outbox or disk."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    queued: int
    queued_bytes: int
    dropped: int = Field(description="dropped since the outbox was created (oldest first when full)")
    uploaded: int = Field(description="acknowledged by the broker since the outbox was created")


class Telemetry(BaseModel):
    """Published on ``.../devices/{device}/telemetry`` every ``serving.telemetry_interval_s``."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    schema_: Literal["edgeloop.telemetry/1"] = Field(default=TELEMETRY_SCHEMA, alias="schema")  # type: ignore[arg-type]
    device: str
    fleet: str
    model: str
    active_version: int | None
    window_s: float = Field(description="the period the counts and percentiles cover")
    requests: int
    errors: int = Field(description="requests whose model run failed")
    throughput_rps: float
    latency_ms: Latency
    queue_depth: int
    cpu_percent: float = Field(description="this process, share of one core, over the window")
    rss_mb: float
    samples: SamplesTelemetry | None = None
    sent_at: str

    def to_bytes(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()


class InferenceReply(BaseModel):
    """The answer to an MQTT inference request, published on the request's response topic."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    status: int = Field(description="HTTP-style status: 200, or the 4xx/5xx the HTTP API would give")
    model: str
    version: int | None = None
    predictions: list[dict[str, object]] = Field(default_factory=list)
    error: str | None = None
