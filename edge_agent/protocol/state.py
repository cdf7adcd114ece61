"""Reported state: one retained JSON document per device, for dashboards and the cloud."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

STATE_SCHEMA = "edgeloop.state/1"

UpdateState = Literal[
    "idle", "downloading", "verifying", "staged", "health-checking", "active", "rejected", "rolled-back"
]


class DeviceState(BaseModel):
    """Published retained on ``.../devices/{device}/state``; the MQTT last will sets ``online`` false."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    schema_: Literal["edgeloop.state/1"] = Field(default=STATE_SCHEMA, alias="schema")  # type: ignore[arg-type]
    device: str
    fleet: str
    online: bool
    model: str
    active_version: int | None = None
    previous_version: int | None = None
    update_state: UpdateState = "idle"
    update_version: int | None = Field(default=None, description="the version the update_state is about")
    progress: float | None = Field(default=None, ge=0, le=1, description="fraction of bytes held, while downloading")
    bytes_transferred: int | None = None
    last_error: str | None = None
    updated_at: str

    def to_bytes(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()


def offline_will(device: str, fleet: str, model: str, updated_at: str) -> bytes:
    """The last-will payload the broker publishes when the device vanishes."""
    return DeviceState(device=device, fleet=fleet, online=False, model=model, updated_at=updated_at).to_bytes()
