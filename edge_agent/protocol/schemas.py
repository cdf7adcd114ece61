"""JSON Schemas of every payload, for dashboards and other implementations.

python -m edge_agent.protocol.schemas docs/schemas     # regenerate (a test checks they are current)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from edge_agent.protocol.manifest import Manifest
from edge_agent.protocol.release import Release, SignedEnvelope
from edge_agent.protocol.samples import SampleBatch, SamplingPolicy
from edge_agent.protocol.state import Availability, DeviceState
from edge_agent.protocol.telemetry import InferenceReply, Telemetry

MODELS: dict[str, type[BaseModel]] = {
    "signed-envelope": SignedEnvelope,
    "release": Release,
    "manifest": Manifest,
    "device-state": DeviceState,
    "availability": Availability,
    "telemetry": Telemetry,
    "inference-reply": InferenceReply,
    "sample-batch": SampleBatch,
    "sampling-policy": SamplingPolicy,
}


def schemas() -> dict[str, dict[str, Any]]:
    return {name: model.model_json_schema(by_alias=True) for name, model in MODELS.items()}


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in schemas().items():
        path = directory / f"{name}.schema.json"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written


if __name__ == "__main__":
    for written_path in write(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/schemas")):
        print(written_path)
