"""Reported state: one retained JSON document per device, for dashboards and the cloud."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

STATE_SCHEMA = "edgeloop.state/1"

UpdateState = Literal[
    "idle", "downloading", "verifying", "staged", "health-checking", "active", "rejected", "rolled-back"
]


class HostFacts(BaseModel):
    """What runs the agent, for a fleet view: set once at start-up."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    machine: str = Field(description="CPU architecture, e.g. x86_64, aarch64")
    system: str = Field(description="OS and kernel release, e.g. Linux 6.1.0-18-arm64")
    python: str
    onnxruntime: str
    providers: list[str] = Field(description="execution providers this onnxruntime build offers")


class DeviceState(BaseModel):
    """Published retained on ``.../devices/{device}/state`` at every change.

    The broker's last will goes to the availability topic instead (:class:`Availability`), so a
    crash never erases this document: after one, it still names the active version and the last
    error, as of ``updated_at``; ``online`` here is what the device last said, and the
    availability document is the truth about liveness.
    """

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
    group: str | None = Field(default=None, description="the device's group (group releases reach it)")
    agent_version: str | None = Field(default=None, description="the edge-agent release running")
    started_at: str | None = Field(default=None, description="when this agent process started (uptime)")
    host: HostFacts | None = None

    def to_bytes(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()


AVAILABILITY_SCHEMA = "edgeloop.availability/1"


class Availability(BaseModel):
    """Published retained on ``.../devices/{device}/availability``: ``online`` at every connect,
    ``offline`` at a clean stop, and as the MQTT last will when the device vanishes (crash, power
    or network loss). For Home Assistant:
    ``availability_template: "{{ 'online' if value_json.online else 'offline' }}"``."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    schema_: Literal["edgeloop.availability/1"] = Field(default=AVAILABILITY_SCHEMA, alias="schema")  # type: ignore[arg-type]
    device: str
    fleet: str
    online: bool
    at: str | None = Field(
        description="when the device published this; null in the last will, which the broker publishes "
        "when it notices the device gone (keepalive × 1.5 at most): the receiver's clock dates it"
    )
    connected_at: str = Field(description="when the connection this document is about was set up (agent clock)")

    def to_bytes(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()
