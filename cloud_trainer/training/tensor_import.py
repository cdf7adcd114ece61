"""Bring your own model, not a classifier: ``cloud-train import --task tensor MODEL.onnx`` registers an
ONNX model that the device serves by its own signature (named tensors in, every output out, the
``tensor`` task of :mod:`edge_agent.runtime.tensor`).

It is checked the way a device will run it:

1. ``onnx.checker`` on the file, then onnxruntime (CPU); every input and output a tensor of a
   datatype the inference protocol carries here (FP32, FP16, FP64, INT8-64, UINT8, UINT16, BOOL;
   no strings, sequences or maps), every input's fixed sizes at least 1;
2. golden inputs: the arrays in ``--golden-inputs`` files (``.npz``, one case each, arrays named by
   input), or seeded random ones: two cases, every dynamic axis 1 in the first and 2 in the second
   (axes that share a name share the size), floats standard normal, integers 0 to 3, booleans
   random (the second case only when the first holds under 256 KiB);
3. each case through the device's own runtime (:class:`edge_agent.runtime.TensorModel`, the
   checks a request passes included); every float output must be finite;
4. the bundle's health check, as a device runs it, reproduces the recorded outputs within 1e-6.

There are no labels and no quantization: the model ships as given (``quantization: none``).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cloud_trainer.training.importer import ModelImportError, checked_session, onnx_opset
from edge_agent.protocol import Lineage, Manifest, sha256_file

DYNAMIC_SIZES = (1, 2)
"""The size of every dynamic axis in the random golden cases, one case each."""
SECOND_CASE_MAX_BYTES = 256 * 1024
SELF_CHECK_ATOL = 1e-6
INTEGER_HIGH = 4
"""Random integer inputs are 0 to 3: small enough to index any table the model gathers from."""


@dataclass(frozen=True, kw_only=True)
class TensorImportRequest:
    """An ONNX model to register as a ``tensor`` bundle.

    Args:
        onnx_file: the model.
        model: the name in the registry and the fleet.
        golden_inputs: ``.npz`` files, one golden case each (arrays named by input); none: random cases.
    """

    onnx_file: Path
    model: str
    golden_inputs: list[Path] = field(default_factory=list)


def check_signature(session: Any, shown: str) -> dict[str, Any]:
    """Every input and output a tensor the device can carry; the signature as the import report shows it."""
    from edge_agent.protocol.manifest import TENSOR_DTYPES
    from edge_agent.runtime.tensor import datatype_of, ort_dtype

    report: dict[str, Any] = {}
    for kind, args in (("input", session.get_inputs()), ("output", session.get_outputs())):
        for arg in args:
            dtype = ort_dtype(str(arg.type))
            if not str(arg.type).startswith("tensor(") or dtype not in TENSOR_DTYPES:
                carried = ", ".join(datatype_of(d) for d in TENSOR_DTYPES)
                raise ModelImportError(f"{shown}: {kind} {arg.name!r} is {arg.type}; tensor models carry {carried}")
            shape = [d if isinstance(d, int) else str(d) if d is not None else "?" for d in arg.shape]
            if kind == "input" and any(isinstance(d, int) and d < 1 for d in shape):
                raise ModelImportError(f"{shown}: input {arg.name!r} has shape {shape}; no request can fill a size 0")
            report.setdefault(f"{kind}s", []).append({"name": arg.name, "datatype": datatype_of(dtype), "shape": shape})
    return report


def random_cases(manifest: Manifest, *, seed: int = 0) -> list[dict[str, np.ndarray[Any, Any]]]:
    """Seeded golden inputs for the declared signature (see the module docstring)."""
    rng = np.random.default_rng(seed)
    cases = []
    for size in DYNAMIC_SIZES:
        case: dict[str, np.ndarray[Any, Any]] = {}
        for spec in manifest.inputs:
            shape = [d if isinstance(d, int) else size for d in spec.shape]
            dtype = np.dtype(spec.dtype)
            if dtype.kind == "f":
                case[spec.name] = rng.standard_normal(shape).astype(dtype)
            elif dtype.kind == "b":
                case[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
            else:
                case[spec.name] = rng.integers(0, INTEGER_HIGH, size=shape).astype(dtype)
        cases.append(case)
        if sum(a.nbytes for a in case.values()) >= SECOND_CASE_MAX_BYTES:
            break
    return cases


def read_cases(paths: list[Path]) -> list[dict[str, np.ndarray[Any, Any]]]:
    """Golden cases from ``.npz`` files (``numpy.savez``), one a file, arrays named by input."""
    cases = []
    for path in paths:
        try:
            with np.load(path, allow_pickle=False) as archive:
                cases.append({name: archive[name] for name in archive.files})
        except (OSError, ValueError) as exc:
            raise ModelImportError(f"golden inputs {path}: not a readable .npz of arrays: {exc}") from None
    return cases


def build_tensor_bundle(req: TensorImportRequest, bundle_dir: Path, *, version: int, parent: int | None) -> Manifest:
    """Check the model, record its golden cases and write the bundle to ``bundle_dir`` (the registry's
    ``build`` callback)."""
    import onnxruntime as ort

    from edge_agent.protocol import NoPreprocessing
    from edge_agent.runtime import HealthCheckError, InputError, TensorModel, TensorOutputs
    from export.bundle import stage_bundle, write_tensor_golden

    if not req.onnx_file.is_file():
        raise ModelImportError(f"ONNX file {req.onnx_file} does not exist")
    shown = req.onnx_file.name
    given = read_cases(req.golden_inputs)
    with tempfile.TemporaryDirectory(prefix="edgeloop-import-") as tmp:
        source = Path(tmp) / "model.onnx"
        shutil.copyfile(req.onnx_file, source)
        report = {"onnx_checker": "passed", **check_signature(checked_session(source, shown), shown),
                  "source_sha256": sha256_file(source), "onnxruntime": ort.__version__}  # fmt: skip
        imported = {"imported": str(req.onnx_file), "source_sha256": report["source_sha256"]}
        lineage = Lineage(base_model=f"onnx:{shown}", parent_version=parent, hyperparameters=imported)
        manifest = stage_bundle(bundle_dir, model_file=source, task="tensor", preprocessing=NoPreprocessing(),
                                model=req.model, version=version, labels=[], opset=onnx_opset(source),
                                quantization="none", lineage=lineage)  # fmt: skip
    served = TensorModel(bundle_dir=bundle_dir, manifest=manifest, providers=["CPUExecutionProvider"])
    cases = given or random_cases(manifest)
    recorded = []
    for index, case in enumerate(cases):
        what = f"golden inputs {req.golden_inputs[index]}" if given else f"random golden case {index}"
        try:
            inputs = served.check(case)
        except InputError as exc:
            raise ModelImportError(f"{what}: {exc}") from None
        try:
            (result,) = served.run([inputs])
        except Exception as exc:  # noqa: BLE001 - onnxruntime's failure, whatever its type, ends the import
            hint = "" if given else "; give inputs it takes with --golden-inputs FILE.npz"
            raise ModelImportError(f"onnxruntime cannot run {shown} on {what}: {exc}{hint}") from None
        assert isinstance(result, TensorOutputs)
        for name, array in result.outputs.items():
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                hint = "" if given else " (random inputs: give real ones with --golden-inputs FILE.npz)"
                raise ModelImportError(f"{shown} gives NaN or infinite values in output {name!r} on {what}{hint}")
        recorded.append((inputs, result.outputs))
    report["golden_cases"] = len(recorded)
    sizes = ", ".join(map(str, DYNAMIC_SIZES[: len(recorded)]))
    report["golden_inputs"] = [str(p) for p in req.golden_inputs] if given else f"random, seed 0, dynamic axes {sizes}"
    manifest = write_tensor_golden(bundle_dir, manifest, recorded, metrics={"import": report})
    reloaded = TensorModel(bundle_dir=bundle_dir, manifest=manifest, providers=["CPUExecutionProvider"])
    try:  # what a device does before it serves the bundle
        reloaded.health_check(atol=SELF_CHECK_ATOL)
    except HealthCheckError as exc:
        raise ModelImportError(f"{shown} does not reproduce its own outputs (is it deterministic?): {exc}") from None
    return manifest


def import_tensor_model(req: TensorImportRequest, *, registry: Any, version: int | None = None) -> Any:
    """Check and register ``req`` as ``req.model`` (the next version unless given); returns the ModelVersion."""

    def build(bundle_dir: Path, number: int, parent: int | None) -> Manifest:
        return build_tensor_bundle(req, bundle_dir, version=number, parent=parent)

    source = {"import": str(req.onnx_file), "task": "tensor"}
    return registry.register(req.model, version=version, build=build, source=source)
