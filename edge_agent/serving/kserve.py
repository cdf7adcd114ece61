"""The Open Inference Protocol (KServe v2, as spoken by Triton and MLServer): infer request and
response codecs, JSON and the binary tensor extension, so ``tritonclient.http`` and ``curl`` work.

A text model takes one input ``text`` (BYTES, shape ``[N]``); an image model one input ``image``:
raw pixels (FP32 or another numeric type, shape ``[N, H, W]`` or ``[N, H, W, C]``), or encoded
JPEG/PNG images (BYTES, shape ``[N]``: raw bytes in the binary extension, base64 strings in JSON).
Both answer ``label`` (BYTES ``[N]``) and ``probabilities`` (FP32 ``[N, C]``).

A ``tensor`` model takes its own declared inputs, by name, in their declared datatypes (FP32, FP16,
FP64, INT8-64, UINT8, UINT16, BOOL) and shapes (``-1``: a dynamic axis), with no batch axis added, and
answers every output (or those requested) with the datatype and shape onnxruntime gave; one request
is one model run. Input data is a flat (or nested) JSON list, or raw little-endian bytes in the
binary extension (BOOL one byte each), in the order the inputs are listed.
"""

from __future__ import annotations

import json
import math
import struct
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.protocol.manifest import Manifest
from edge_agent.runtime import InputError, ProtocolInput, ProtocolOutput, Result, TensorOutputs, task_for
from edge_agent.runtime.task import predictions_of
from edge_agent.runtime.tensor import DATATYPES, array_from_json, datatype_of, names_problem

HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "statistics"]
NUMERIC = {
    "FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "INT8": np.int8, "INT16": np.int16,
    "INT32": np.int32, "INT64": np.int64, "UINT8": np.uint8, "UINT16": np.uint16,
}  # fmt: skip


class ProtocolViolation(Exception):
    """A request the protocol or the model cannot take; ``status`` is the HTTP answer."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    inputs: list[Any]  # texts, or images as arrays; a tensor model's: one dict of named arrays
    binary_outputs: set[str] = field(default_factory=set)
    requested: list[str] = field(default_factory=list)
    classification: dict[str, int] = field(default_factory=dict)  # output -> top-k (``class_count``)
    raw: bool = False  # a tensor model's request: its outputs are the model's own tensors


@dataclass
class InferenceStats:
    """Counts for the Triton statistics extension (``GET /v2/models/{name}/stats``); one per service."""

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    inference_count: int = 0  # inputs
    last_inference_ms: int = 0

    def record(self, *, ok: bool, seconds: float, inputs: int) -> None:
        ns = int(seconds * 1e9)
        if ok:
            self.success_count += 1
            self.success_ns += ns
            self.inference_count += inputs
        else:
            self.fail_count += 1
            self.fail_ns += ns
        self.last_inference_ms = int(time.time() * 1000)


def protocol_inputs(manifest: Manifest) -> list[ProtocolInput]:
    """The model's inputs, as its task declares them (:meth:`edge_agent.runtime.Task.protocol_inputs`)."""
    return task_for(manifest.task).protocol_inputs(manifest)


def protocol_outputs(manifest: Manifest) -> list[ProtocolOutput]:
    """The model's outputs, as its task declares them (:meth:`edge_agent.runtime.Task.protocol_outputs`)."""
    return task_for(manifest.task).protocol_outputs(manifest)


def input_spec(manifest: Manifest) -> list[dict[str, Any]]:
    return [{"name": s.name, "datatype": s.datatype, "shape": s.shape} for s in protocol_inputs(manifest)]


def model_metadata(name: str, manifest: Manifest) -> dict[str, Any]:
    return {
        "name": name,
        "versions": [str(manifest.version)],
        "platform": "onnxruntime_onnx",
        "inputs": input_spec(manifest),
        "outputs": [{"name": s.name, "datatype": s.datatype, "shape": s.shape} for s in protocol_outputs(manifest)],
        "parameters": {"labels": manifest.labels, "quantization": manifest.quantization, "task": manifest.task},
    }


def _config_tensor(spec: ProtocolInput | ProtocolOutput) -> dict[str, Any]:
    if spec.datatype == "BYTES":
        return {"name": spec.name, "data_type": "TYPE_STRING", "dims": [1], "reshape": {"shape": []}}
    return {"name": spec.name, "data_type": f"TYPE_{spec.datatype}", "dims": spec.dims}


def model_config(name: str, manifest: Manifest, max_batch: int) -> dict[str, Any]:
    """The Triton model configuration (``GET /v2/models/{name}/config``) as far as it fits this server.
    A tensor model is not batched by the server (``max_batch_size`` 0: ``dims`` are whole shapes)."""
    batched = not task_for(manifest.task).raw_tensors
    config: dict[str, Any] = {
        "name": name,
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": max_batch if batched else 0,
        "input": [_config_tensor(spec) for spec in protocol_inputs(manifest)],
        "output": [_config_tensor(spec) for spec in protocol_outputs(manifest)],
        "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
        "parameters": {
            "labels": {"string_value": ",".join(manifest.labels)},
            "quantization": {"string_value": manifest.quantization},
        },
    }
    if batched:
        config["dynamic_batching"] = {}
    return config


def statistics(name: str, model: Any, stats: InferenceStats) -> dict[str, Any]:
    """Triton's statistics extension for the one model (``GET /v2/models[/{name}]/stats``)."""

    def duration(count: int, ns: int) -> dict[str, int]:
        return {"count": count, "ns": ns}

    version = str(model.version) if model is not None else ""
    return {
        "model_stats": [
            {
                "name": name,
                "version": version,
                "last_inference": stats.last_inference_ms,
                "inference_count": stats.inference_count,
                "execution_count": stats.success_count,
                "inference_stats": {
                    "success": duration(stats.success_count, stats.success_ns),
                    "fail": duration(stats.fail_count, stats.fail_ns),
                    "queue": duration(0, 0),
                    "compute_input": duration(0, 0),
                    "compute_infer": duration(stats.success_count, stats.success_ns),
                    "compute_output": duration(0, 0),
                    "cache_hit": duration(0, 0),
                    "cache_miss": duration(0, 0),
                },
                "batch_stats": [],
            }
        ]
    }


def decode_request(body: bytes, header_length: str | None, manifest: Manifest, *, max_items: int) -> InferRequest:
    """Parse an infer request (JSON, or JSON plus binary tensors) for ``manifest``'s model."""
    if header_length is not None:
        try:
            split = int(header_length)
        except ValueError:
            raise ProtocolViolation(f"{HEADER_LENGTH} {header_length!r} is not a number") from None
        if not 0 < split <= len(body):
            raise ProtocolViolation(f"{HEADER_LENGTH} {split} does not fit a body of {len(body)} bytes")
        head, binary = body[:split], body[split:]
    else:
        head, binary = body, b""
    try:
        request = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolViolation(f"request is not valid JSON: {exc}") from None
    except RecursionError:
        raise ProtocolViolation("request is JSON nested too deep") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise ProtocolViolation('request must be a JSON object with an "inputs" list')
    task = task_for(manifest.task)
    specs = {spec.name: spec for spec in task.protocol_inputs(manifest)}
    tensors = {t["name"]: t for t in request["inputs"] if isinstance(t, dict) and isinstance(t.get("name"), str)}
    if len(tensors) != len(request["inputs"]):
        raise ProtocolViolation("every input must be an object with a unique name")
    if task.raw_tensors:
        inputs = [_decode_named_tensors(request["inputs"], binary, specs)]
    else:
        (spec,) = specs.values()
        if set(tensors) != {spec.name}:
            raise ProtocolViolation(
                f"this model takes exactly one input {spec.name!r}; got {sorted(map(str, tensors))}"
            )
        inputs = _decode_tensor(tensors[spec.name], binary, spec, max_items=max_items)
    request_id = request.get("id")
    return InferRequest(id=str(request_id) if request_id is not None else None, inputs=inputs,
                        raw=task.raw_tensors, **_requested_outputs(request, manifest))  # fmt: skip


def _requested_outputs(request: dict[str, Any], manifest: Manifest) -> dict[str, Any]:
    """The outputs a request asks for (default: all), which of them binary, and top-k for classifiers."""
    task = task_for(manifest.task)
    outputs = request.get("outputs") or []
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and "name" in o for o in outputs):
        raise ProtocolViolation('"outputs" must be a list of objects with a name')
    names = [spec.name for spec in task.protocol_outputs(manifest)]
    unknown = {str(o["name"]) for o in outputs} - set(names)
    if unknown:
        raise ProtocolViolation(f"unknown output(s) {sorted(unknown)}; this model has {', '.join(names)}")
    default_binary = bool((request.get("parameters") or {}).get("binary_data_output", False))
    requested = [o["name"] for o in outputs] or names
    binary_outputs = {o["name"] for o in outputs if (o.get("parameters") or {}).get("binary_data", default_binary)} or (
        set(requested) if default_binary else set()
    )
    ranked = [o for o in outputs if "classification" in (o.get("parameters") or {})]
    if ranked and task.raw_tensors:
        raise ProtocolViolation(f"output {ranked[0]['name']!r}: classification is for classifier outputs")
    classification = {o["name"]: _class_count(o, len(manifest.labels)) for o in ranked}
    return {"binary_outputs": binary_outputs, "requested": requested, "classification": classification}


def _decode_named_tensors(
    tensors: list[dict[str, Any]], binary: bytes, specs: dict[str, ProtocolInput]
) -> dict[str, npt.NDArray[Any]]:
    """A tensor model's request: every declared input by name, as an array of the datatype the
    request states (the model's checks compare it with the declared one). Binary data is taken in
    the order the inputs are listed."""
    problem = names_problem([str(t["name"]) for t in tensors], list(specs))
    if problem:
        raise ProtocolViolation(problem)
    arrays, offset = {}, 0
    for tensor in tensors:
        name = str(tensor["name"])
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        blob = None
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(binary) - offset:
                raise ProtocolViolation(f"input {name!r}: binary_data_size {size!r} does not fit the binary data")
            blob, offset = binary[offset : offset + size], offset + size
        arrays[name] = _decode_array(tensor, blob)
    if offset != len(binary):
        raise ProtocolViolation(f"{len(binary) - offset} bytes of binary data belong to no input")
    return arrays


def _decode_array(tensor: dict[str, Any], blob: bytes | None) -> npt.NDArray[Any]:
    """One named tensor of any datatype in :data:`DATATYPES`: JSON data or raw bytes (``blob``)."""
    name, datatype, shape = tensor["name"], tensor.get("datatype"), tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):  # fmt: skip
        raise ProtocolViolation(f"input {name!r}: shape must be a list of non-negative integers")
    if datatype not in DATATYPES:
        raise ProtocolViolation(f"input {name!r}: datatype {datatype} is not one of {', '.join(DATATYPES)}")
    dtype = np.dtype(DATATYPES[datatype])
    count = math.prod(shape)
    if blob is not None:
        if len(blob) != count * dtype.itemsize:
            raise ProtocolViolation(
                f"input {name!r}: shape {shape} of {datatype} needs {count * dtype.itemsize} bytes, "
                f"binary_data_size is {len(blob)}"
            )
        if dtype.kind == "b":
            flags: npt.NDArray[np.bool_] = np.frombuffer(blob, dtype=np.uint8) != 0
            return flags.reshape(shape)
        array: npt.NDArray[Any] = np.frombuffer(blob, dtype=dtype.newbyteorder("<")).astype(dtype)
        return array.reshape(shape)
    data = tensor.get("data")
    if not isinstance(data, list):
        raise ProtocolViolation(f"input {name!r}: data must be a list (or binary_data_size given)")
    if not data or not isinstance(data[0], list):  # flat: counted before anything is converted
        if len(data) != count:
            raise ProtocolViolation(f"input {name!r}: shape {shape} needs {count} values, got {len(data)}")
        if not data:
            return np.zeros(shape, dtype=dtype)  # an empty tensor: the model's checks name it
    try:
        array = array_from_json(data, dtype, what=f"input {name!r} data")
    except InputError as exc:
        raise ProtocolViolation(str(exc)) from None
    if array.size != count:
        raise ProtocolViolation(f"input {name!r}: shape {shape} needs {count} values, got {array.size}")
    return array.reshape(shape)


def _class_count(output: dict[str, Any], classes: int) -> int:
    count = output["parameters"]["classification"]
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= classes:
        raise ProtocolViolation(
            f"output {output['name']!r}: classification (class_count) must be an integer from 1 to {classes}"
        )
    return count


def _decode_tensor(tensor: dict[str, Any], binary: bytes, spec: ProtocolInput, *, max_items: int) -> list[Any]:
    name = tensor["name"]
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ProtocolViolation(f"input {name!r}: shape must be a list of non-negative integers")
    if shape[0] == 0 or 0 in shape:
        raise ProtocolViolation(f"input {name!r}: shape {shape} is empty; nothing to classify")
    if shape[0] > max_items:
        raise ProtocolViolation(
            f"input {name!r}: batch of {shape[0]}; the limit is {max_items}", HTTPStatus.REQUEST_ENTITY_TOO_LARGE
        )
    count = int(np.prod(shape))
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    if spec.datatype == "BYTES":
        return _decode_texts(tensor, binary, shape, count, size)
    if tensor.get("datatype") == "BYTES" and spec.encoded_bytes:
        return _decode_encoded_images(tensor, binary, shape, count, size)
    return _decode_numeric(tensor, binary, spec, shape, count=count, size=size)


def _decode_encoded_images(
    tensor: dict[str, Any], binary: bytes, shape: list[int], count: int, size: int | None
) -> list[Any]:
    """An image model's input as BYTES ``[N]`` (or ``[N, 1]``): each element one JPEG or PNG, raw in
    the binary extension, base64 (or a ``data:`` URL) in JSON. Decoded later, by the model's rules."""
    name = tensor["name"]
    if len(shape) > 2 or (len(shape) == 2 and shape[1] != 1):
        raise ProtocolViolation(f"input {name!r}: encoded images take shape [N] or [N, 1], got {shape}")
    items = _bytes_elements(binary[:size], count) if size is not None else tensor.get("data")
    if not isinstance(items, list) or len(items) != count:
        raise ProtocolViolation(f"input {name!r}: shape {shape} needs {count} elements")
    if size is None and not all(isinstance(i, str) for i in items):
        raise ProtocolViolation(f"input {name!r}: BYTES images in JSON must be base64 strings")
    return items


def _decode_texts(tensor: dict[str, Any], binary: bytes, shape: list[int], count: int, size: int | None) -> list[Any]:
    name, datatype = tensor["name"], tensor.get("datatype")
    if datatype != "BYTES":
        raise ProtocolViolation(f"input {name!r} must be BYTES (text), not {datatype}")
    if len(shape) != 1:
        raise ProtocolViolation(f"input {name!r}: shape must be [N], got {shape}")
    texts = _bytes_elements(binary[:size], count) if size is not None else tensor.get("data")
    if not isinstance(texts, list) or len(texts) != count:
        raise ProtocolViolation(f"input {name!r}: shape {shape} needs {count} elements")
    try:
        return [t.decode() if isinstance(t, bytes) else _text(t) for t in texts]
    except UnicodeDecodeError:
        raise ProtocolViolation(f"input {name!r}: text is not valid UTF-8") from None


def _decode_numeric(
    tensor: dict[str, Any], binary: bytes, spec: ProtocolInput, shape: list[int], *, count: int, size: int | None
) -> list[Any]:
    name, datatype = tensor["name"], tensor.get("datatype")
    dtype = NUMERIC.get(str(datatype))
    if dtype is None:
        raise ProtocolViolation(f"input {name!r}: datatype {datatype} is not numeric ({', '.join(NUMERIC)})")
    expected = spec.dims
    if list(shape[1:]) != expected:
        raise ProtocolViolation(f"input {name!r}: shape {shape} does not match [N, {', '.join(map(str, expected))}]")
    if size is not None:
        array: npt.NDArray[Any] = np.frombuffer(binary[:size], dtype=dtype)
    else:
        try:
            array = np.asarray(tensor.get("data"), dtype=dtype).reshape(-1)
        except (TypeError, ValueError):
            raise ProtocolViolation(f"input {name!r}: data is not a flat list of {datatype} numbers") from None
    if array.size != count:
        raise ProtocolViolation(f"input {name!r}: shape {shape} needs {count} values, got {array.size}")
    return list(array.astype(np.float32).reshape(shape))


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ProtocolViolation("BYTES input data must be strings")
    return value


def _bytes_elements(blob: bytes, count: int) -> list[bytes]:
    items, offset = [], 0
    for _ in range(count):
        if offset + 4 > len(blob):
            raise ProtocolViolation("binary BYTES tensor is shorter than its shape says")
        (length,) = struct.unpack_from("<I", blob, offset)
        offset += 4
        items.append(blob[offset : offset + length])
        offset += length
    if offset != len(blob):
        raise ProtocolViolation("binary BYTES tensor has trailing or missing bytes")
    return items


def encode_response(
    request: InferRequest, results: list[Result], *, model: str, version: int, labels: list[str]
) -> tuple[bytes, dict[str, str]]:
    """The response body and extra headers (the binary extension's header when any output is binary)."""
    if request.raw:
        return _encode_tensors(request, results, model=model, version=version)
    predictions = predictions_of(results)
    n = len(predictions)
    label_values = [p.label for p in predictions]
    probabilities = np.asarray([[p.scores[label] for label in labels] for p in predictions], dtype=np.float32)
    outputs, blobs = [], []
    out: dict[str, Any]
    for name in request.requested:
        if name in request.classification:  # Triton's classification extension: "score:index:label", best first
            k = request.classification[name]
            top = [np.argsort(-row, kind="stable")[:k].tolist() for row in probabilities]
            strings = [f"{row[i]:f}:{i}:{labels[i]}" for row, idx in zip(probabilities, top, strict=True) for i in idx]
            out = {"name": name, "datatype": "BYTES", "shape": [n, k]}
            blob = b"".join(struct.pack("<I", len(v.encode())) + v.encode() for v in strings)
            data: Any = strings
        elif name == "label":
            out = {"name": "label", "datatype": "BYTES", "shape": [n]}
            blob = b"".join(struct.pack("<I", len(v.encode())) + v.encode() for v in label_values)
            data = label_values
        else:
            out = {"name": "probabilities", "datatype": "FP32", "shape": [n, len(labels)]}
            blob = probabilities.tobytes()
            data = probabilities.reshape(-1).tolist()
        if name in request.binary_outputs:
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            out["data"] = data
        outputs.append(out)
    return _response(request, outputs, blobs, model=model, version=version)


def _encode_tensors(
    request: InferRequest, results: list[Result], *, model: str, version: int
) -> tuple[bytes, dict[str, str]]:
    """A tensor model's answer: each requested output with the datatype and shape it has."""
    (result,) = results
    if not isinstance(result, TensorOutputs):
        raise TypeError("a tensor request's result is not a tensor model's outputs")
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name in request.requested:
        array = result.outputs[name]
        out: dict[str, Any] = {"name": name, "datatype": datatype_of(array.dtype), "shape": list(array.shape)}
        if name in request.binary_outputs:
            blob = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            out["data"] = array.reshape(-1).tolist()
        outputs.append(out)
    return _response(request, outputs, blobs, model=model, version=version)


def _response(
    request: InferRequest, outputs: list[dict[str, Any]], blobs: list[bytes], *, model: str, version: int
) -> tuple[bytes, dict[str, str]]:
    response: dict[str, Any] = {"model_name": model, "model_version": str(version), "outputs": outputs}
    if request.id is not None:
        response["id"] = request.id
    head = json.dumps(response).encode()
    if not blobs:
        return head, {}
    return head + b"".join(blobs), {HEADER_LENGTH: str(len(head))}
