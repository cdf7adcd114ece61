"""The ``tensor`` task: a model that is not a classifier, served by its own signature. Named tensors
in, every output out, through the Open Inference Protocol (and ``{"inputs": {...}}`` on
``/v1/predict`` and MQTT); numpy only.

:class:`TensorModel` checks every request against the manifest's declared inputs before
onnxruntime sees it (names, datatypes, ranks, fixed sizes, one size per named dynamic axis across
inputs, bytes), so a caller's mistake is an :class:`~edge_agent.runtime.classifier.InputError` (a 4xx
that never counts against the model) and an onnxruntime failure on valid input is the model's.
One request is one model run: requests are not stacked into one batch (their dynamic axes may
differ), though the batcher may hand several to one worker.

Golden vectors (``golden.json``) are cases of named input tensors and the outputs the importer saw
(:func:`tensor_record`): a device reproduces every output before it serves the bundle, floats within
``golden_atol`` (absolute plus the same relative share), integers and booleans exactly.
Tensor models are not sampled: the sampling rules judge a classifier's scores.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.protocol.manifest import Manifest, NoPreprocessing, TensorSpec, safe_relative_path
from edge_agent.runtime.classifier import Classifier, Feeds, HealthCheckError, InputError, Result, TensorOutputs
from edge_agent.runtime.session import ModelLoadError, ProviderSpec
from edge_agent.runtime.task import InputLimits, InputTooLarge, ProtocolInput, ProtocolOutput, Task

Array = npt.NDArray[Any]
Tensors = dict[str, Array]
"""One request's inputs, or one run's outputs, by name."""

DATATYPES: dict[str, str] = {
    "FP32": "float32", "FP16": "float16", "FP64": "float64", "INT8": "int8", "INT16": "int16", "INT32": "int32",
    "INT64": "int64", "UINT8": "uint8", "UINT16": "uint16", "BOOL": "bool",
}  # fmt: skip
"""The inference protocol's datatypes a tensor model may use, and their numpy dtypes."""
_DATATYPE_OF = {dtype: datatype for datatype, dtype in DATATYPES.items()}
_ORT_TYPES = {"float": "float32", "double": "float64"}


def datatype_of(dtype: np.dtype[Any] | str) -> str:
    """The protocol's name (``FP32``) for a numpy dtype; ``ValueError`` for one it cannot carry."""
    name = np.dtype(dtype).name
    try:
        return _DATATYPE_OF[name]
    except KeyError:
        raise ValueError(f"dtype {name} has no inference-protocol datatype here ({', '.join(DATATYPES)})") from None


def ort_dtype(ort_type: str) -> str:
    """onnxruntime's type string (``tensor(float)``) as a numpy dtype name (``float32``)."""
    inner = ort_type.removeprefix("tensor(").removesuffix(")") if ort_type.startswith("tensor(") else ort_type
    return _ORT_TYPES.get(inner, inner)


def protocol_dims(shape: Sequence[int | str]) -> list[int]:
    """A manifest shape as the protocol declares it: a named (dynamic) axis is ``-1``."""
    return [d if isinstance(d, int) else -1 for d in shape]


_KINDS = {"b": "booleans (true, false)", "i": "integers", "u": "integers", "f": "numbers"}
_GOT = {"b": "booleans", "i": "integers", "u": "integers", "f": "floats", "S": "strings", "U": "strings"}


def array_from_json(values: Any, dtype: np.dtype[Any], *, what: str) -> Array:
    """Nested lists (or a flat list, or one number) from JSON as an array of ``dtype``, refusing
    what the dtype cannot hold exactly: floats or booleans for an integer type, numbers for BOOL,
    integers out of range, strings, nulls and ragged lists. ``what`` names it in the message."""
    try:
        raw = np.asarray(values)
    except (ValueError, TypeError):
        raise InputError(f"{what} is not a rectangular array (nested lists of one length per level)") from None
    if raw.size == 0 and raw.dtype.kind == "f":  # [] (or [[]]) holds nothing of any type
        return raw.astype(dtype)
    allowed = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}[dtype.kind]
    if raw.dtype.kind not in allowed:
        if dtype.kind in "iu" and raw.dtype.kind in "fO":  # numpy turns integers past 64 bits into floats
            _refuse_large_integers(values, dtype, what=what)
        got = _GOT.get(raw.dtype.kind, "nulls or values of mixed types")
        raise InputError(f"{what} must hold {_KINDS[dtype.kind]} for {datatype_of(dtype)}, not {got}")
    if dtype.kind in "iu" and raw.size:
        info = np.iinfo(dtype)
        low, high = int(raw.min()), int(raw.max())
        if low < info.min or high > info.max:
            raise InputError(f"{what} holds {low if low < info.min else high}, out of range for {datatype_of(dtype)}")
    if dtype.kind == "f" and raw.size:
        with np.errstate(over="ignore"):
            converted = raw.astype(dtype)
        if bool((np.isfinite(raw) & ~np.isfinite(converted)).any()):
            raise InputError(f"{what} holds a number too large for {datatype_of(dtype)}")
        return converted
    return raw.astype(dtype)


def _refuse_large_integers(values: Any, dtype: np.dtype[Any], *, what: str) -> None:
    """When every value is a whole JSON number, name the first one out of ``dtype``'s range."""
    try:
        flat = np.asarray(values, dtype=object).reshape(-1)
    except (ValueError, TypeError):
        return
    if all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
        info = np.iinfo(dtype)
        big = next((v for v in flat if not info.min <= v <= info.max), None)
        if big is not None:
            raise InputError(f"{what} holds {big}, out of range for {datatype_of(dtype)}")


def names_problem(given: Sequence[str], declared: Sequence[str]) -> str | None:
    """What is wrong with a request's input names (missing, unknown), or None."""
    missing = [name for name in declared if name not in given]
    unknown = [name[:64] for name in given if name not in declared][:5]
    if not missing and not unknown:
        return None
    parts = ([f"missing input(s) {missing}"] if missing else []) + ([f"unknown input(s) {unknown}"] if unknown else [])
    return f"{', '.join(parts)}; this model takes {', '.join(map(repr, declared))}"


def tensor_record(array: Array) -> dict[str, Any]:
    """A tensor as ``golden.json`` holds it: ``{"dtype", "shape", "data"}`` (data flat, row-major;
    every float32 value written exactly)."""
    array = np.asarray(array)
    return {"dtype": array.dtype.name, "shape": list(array.shape), "data": array.reshape(-1).tolist()}


def tensor_from_record(record: Any, *, what: str) -> Array:
    """The tensor :func:`tensor_record` wrote; ``ValueError`` naming ``what`` when it is malformed."""
    if not isinstance(record, dict) or set(record) != {"dtype", "shape", "data"}:
        raise ValueError(f"{what} is not an object with dtype, shape and data")
    dtype, shape = record["dtype"], record["shape"]
    if dtype not in DATATYPES.values():
        raise ValueError(f"{what} has dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"{what} has shape {shape!r}")
    try:
        flat = array_from_json(record["data"], np.dtype(dtype), what=what)
    except InputError as exc:
        raise ValueError(str(exc)) from None
    if flat.ndim != 1 or flat.size != int(np.prod(shape, dtype=np.int64)):
        raise ValueError(f"{what}: shape {shape} and {flat.size} values disagree")
    return flat.reshape(shape)


class TensorModel(Classifier):
    """A ``tensor`` bundle: its declared inputs in (:meth:`check`), every output out (:meth:`run`).

    Each input of :meth:`run` is one request: a dict of the model's input names to arrays of their
    declared dtypes (or nested lists, converted as :func:`array_from_json` does). It has no labels,
    logits or probabilities.
    """

    def __init__(
        self, *, bundle_dir: Path, manifest: Manifest, providers: Sequence[ProviderSpec], **session: Any
    ) -> None:
        if not isinstance(manifest.preprocessing, NoPreprocessing):
            given = manifest.preprocessing.kind
            raise ModelLoadError(f"bundle v{manifest.version} has {given} preprocessing, not none")
        super().__init__(bundle_dir=bundle_dir, manifest=manifest, providers=providers, **session)
        self.specs: dict[str, TensorSpec] = {spec.name: spec for spec in manifest.inputs}
        self.output_names = [o.name for o in self.session.get_outputs()]
        for kind, found, declared in (
            ("inputs", self.session.get_inputs(), manifest.inputs),
            ("outputs", self.session.get_outputs(), manifest.outputs),
        ):
            actual = {arg.name: (ort_dtype(arg.type), len(arg.shape)) for arg in found}
            wanted = {spec.name: (spec.dtype, len(spec.shape)) for spec in declared}
            if actual != wanted:
                raise ModelLoadError(
                    f"the model's {kind} {_signature(actual)} are not the manifest's {_signature(wanted)}"
                )

    def check(self, item: Any, *, max_bytes: int | None = None) -> Tensors:
        """One request's inputs, checked against the declared signature and converted; raises
        :class:`InputError` naming the first problem, or :class:`InputTooLarge` past ``max_bytes``."""
        if not isinstance(item, dict) or not all(isinstance(name, str) for name in item):
            raise InputError("inputs must be an object of the model's input names")
        problem = names_problem(list(item), list(self.specs))
        if problem:
            raise InputError(problem)
        axes: dict[str, tuple[str, int, int]] = {}  # named dynamic axis -> (input, axis, size) that fixed it
        checked: Tensors = {}
        total = 0
        for name, spec in self.specs.items():
            array = _as_declared(item[name], np.dtype(spec.dtype), name=name)
            _check_shape(name, list(array.shape), spec.shape, axes)
            total += array.nbytes
            if max_bytes is not None and total > max_bytes:
                raise InputTooLarge(f"the inputs hold over {max_bytes} bytes as tensors; the limit is {max_bytes}")
            checked[name] = np.require(array, requirements="C")  # 0-d stays 0-d
        return checked

    def feeds(self, inputs: Sequence[Any]) -> Feeds:
        """The feeds of one request (a tensor model runs each request on its own)."""
        if len(inputs) != 1:
            raise InputError(f"a tensor model runs one request's inputs at a time, not {len(inputs)}")
        return self.check(inputs[0])

    def run(self, inputs: Sequence[Any]) -> Sequence[Result]:
        """Every output of the model for each request, by name."""
        results: list[Result] = []
        for item in inputs:
            values = self.session.run(self.output_names, self.feeds([item]))
            results.append(TensorOutputs(dict(zip(self.output_names, map(np.asarray, values), strict=True))))
        return results

    def logits(self, inputs: Sequence[Any]) -> npt.NDArray[np.float32]:
        raise TypeError("a tensor model has no labels, logits or probabilities: run() gives its outputs")

    def golden_inputs(self, records: list[Any]) -> list[Any]:
        """Golden cases' ``inputs`` (names to :func:`tensor_record` objects) as requests."""
        inputs = []
        for index, record in enumerate(records):
            if not isinstance(record, dict):
                raise ValueError(f"golden case {index} inputs are not an object")
            inputs.append({name: tensor_from_record(r, what=f"golden case {index} input {name!r}")
                           for name, r in record.items()})  # fmt: skip
        return inputs

    def health_check(self, *, atol: float) -> None:
        """Reproduce every golden case's outputs: the same names, dtypes and shapes, floats finite and
        within ``atol`` absolute plus ``atol`` relative, integers and booleans equal; else
        ``HealthCheckError``."""
        path = self.bundle_dir / safe_relative_path(self.manifest.golden_file)
        try:
            cases = json.loads(path.read_text())["cases"]
            inputs = self.golden_inputs([case["inputs"] for case in cases])
            expected = [
                {name: tensor_from_record(r, what=f"golden case {index} output {name!r}") for name, r in
                 case["outputs"].items()}
                for index, case in enumerate(cases)
            ]  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise HealthCheckError(f"golden vectors {path.name} are unreadable: {exc}") from None
        if not inputs:
            raise HealthCheckError("golden vectors hold no cases")
        for index, (request, wanted) in enumerate(zip(inputs, expected, strict=True)):
            try:
                (result,) = self.run([request])
            except InputError as exc:
                raise HealthCheckError(f"golden case {index} does not fit this model: {exc}") from None
            except Exception as exc:  # noqa: BLE001 - onnxruntime's error types are not public API; any failure fails the check
                raise HealthCheckError(f"the model fails on golden case {index}: {type(exc).__name__}: {exc}") from None
            assert isinstance(result, TensorOutputs)
            for name, want in wanted.items():
                _compare(result.outputs.get(name), want, atol=atol, where=f"golden case {index} output {name!r}")


def _as_declared(value: Any, dtype: np.dtype[Any], *, name: str) -> Array:
    """An input as an array of its declared dtype: an array must have it; JSON values are converted."""
    if isinstance(value, np.ndarray):
        if value.dtype != dtype:
            raise InputError(f"input {name!r} is {_datatype_name(value.dtype)}; the model takes {datatype_of(dtype)}")
        return value
    return array_from_json(value, dtype, what=f"input {name!r}")


def _check_shape(name: str, shape: list[int], declared: list[int | str], axes: dict[str, tuple[str, int, int]]) -> None:
    """Rank and fixed sizes as declared, nothing empty, and one size per named dynamic axis across
    the inputs (``axes`` remembers where each was first seen)."""
    wanted = protocol_dims(declared)
    if len(shape) != len(declared):
        raise InputError(f"input {name!r} has shape {shape}; the model takes {wanted} (rank {len(wanted)})")
    for axis, (size, want) in enumerate(zip(shape, declared, strict=True)):
        if size == 0:
            raise InputError(f"input {name!r} has shape {shape}: it is empty")
        if isinstance(want, int):
            if size != want:
                raise InputError(f"input {name!r} has shape {shape}; the model takes {wanted} (axis {axis})")
            continue
        first = axes.setdefault(want, (name, axis, size))
        if first[2] != size:
            raise InputError(
                f"input {name!r} axis {axis} is {size}, but input {first[0]!r} axis {first[1]} is {first[2]}: "
                f"both are the model's axis {want!r}"
            )


def _compare(actual: Array | None, expected: Array, *, atol: float, where: str) -> None:
    if actual is None:
        raise HealthCheckError(f"{where} is missing from the model's outputs")
    if actual.dtype != expected.dtype or actual.shape != expected.shape:
        golden = f"{expected.dtype.name} {list(expected.shape)}"
        raise HealthCheckError(f"{where} is {actual.dtype.name} {list(actual.shape)}; golden is {golden}")
    if expected.dtype.kind != "f":
        wrong = int((actual != expected).sum())
        if wrong:
            raise HealthCheckError(f"{where} differs in {wrong} of {expected.size} values (integers must be equal)")
        return
    if not np.isfinite(actual).all():
        raise HealthCheckError(f"{where} holds NaN or infinite values")
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    if not np.allclose(a, e, rtol=atol, atol=atol):
        worst = float(np.abs(a - e).max())
        raise HealthCheckError(f"{where} differs by up to {worst:.4g} (tolerance {atol} absolute + {atol} relative)")


def _signature(specs: dict[str, tuple[str, int]]) -> str:
    return "{" + ", ".join(f"{name}: {dtype} rank {rank}" for name, (dtype, rank) in sorted(specs.items())) + "}"


def _datatype_name(dtype: np.dtype[Any]) -> str:
    try:
        return datatype_of(dtype)
    except ValueError:
        return dtype.name


class TensorTask(Task):
    """``tensor``: the model's own named tensors in and out. On the inference protocol its declared
    inputs (any datatype of :data:`DATATYPES`) and every output; on ``/v1/predict`` and MQTT
    ``{"inputs": {name: nested lists}}``, answered ``{"outputs": {name: nested lists}}``. Not sampled."""

    name = "tensor"
    classifier = TensorModel
    field = "inputs"
    item_kinds = "an object of the model's input names, each a nested list of numbers"
    raw_tensors = True

    def items_valid(self, items: Any) -> bool:
        return isinstance(items, dict) and bool(items) and all(isinstance(name, str) for name in items)

    def request_items(self, value: Any) -> list[Any]:
        return [value]  # one request, one model run

    def prepare(self, items: list[Any], model: Classifier, limits: InputLimits) -> list[Any]:
        if not isinstance(model, TensorModel):
            raise TypeError(f"the tensor task serves TensorModel, not {type(model).__name__}")
        return [model.check(item, max_bytes=limits.max_tensor_bytes) for item in items]

    def protocol_inputs(self, manifest: Manifest) -> list[ProtocolInput]:
        return [
            ProtocolInput(name=s.name, datatype=datatype_of(s.dtype), dims=protocol_dims(s.shape), batched=False)
            for s in manifest.inputs
        ]

    def protocol_outputs(self, manifest: Manifest) -> list[ProtocolOutput]:
        return [
            ProtocolOutput(name=s.name, datatype=datatype_of(s.dtype), dims=protocol_dims(s.shape), batched=False)
            for s in manifest.outputs
        ]

    def reply(
        self, predictions: Sequence[Result], ids: Sequence[str] | None, *, top_k: int | None = None
    ) -> list[dict[str, Any]]:
        """``{"outputs": {name: nested lists}}`` per request (ids and ``top_k`` do not apply); a NaN or
        infinite float is ``null``, so the answer stays JSON."""
        replies = []
        for result in predictions:
            if not isinstance(result, TensorOutputs):
                raise TypeError("these results are not a tensor model's outputs")
            replies.append({"outputs": {name: _json_values(array) for name, array in result.outputs.items()}})
        return replies


def _json_values(array: Array) -> Any:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        values = array.astype(object)
        values[~np.isfinite(array)] = None
        return values.tolist()
    return array.tolist()
