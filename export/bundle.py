"""Writing model bundles: plain files plus a ``manifest.json`` that names each with size, sha256 and chunks."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edge_agent.protocol import (
    MANIFEST_NAME,
    FileEntry,
    ImagePreprocessing,
    Lineage,
    Manifest,
    NoPreprocessing,
    TensorSpec,
    TextPreprocessing,
    iter_chunks,
    sha256_file,
)
from edge_agent.runtime import load_classifier

MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
GOLDEN_FILE = "golden.json"


def file_entry(bundle_dir: Path, name: str) -> FileEntry:
    path = bundle_dir / name
    return FileEntry(
        path=name,
        size=path.stat().st_size,
        sha256=sha256_file(path),
        chunks=[sha for sha, _ in iter_chunks(path)],
    )


def tensor_specs(model: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])

    def spec(arg: Any) -> TensorSpec:
        dtype = str(arg.type).removeprefix("tensor(").removesuffix(")")
        dtype = {"float": "float32", "double": "float64"}.get(dtype, dtype)
        # a dynamic axis without a name gets one of its own: two unnamed axes are not the same axis
        shape = [d if isinstance(d, int) else str(d) if d is not None else f"{arg.name}:{axis}"
                 for axis, d in enumerate(arg.shape)]  # fmt: skip
        return TensorSpec(name=arg.name, dtype=dtype, shape=shape)

    return [spec(i) for i in session.get_inputs()], [spec(o) for o in session.get_outputs()]


def stage_bundle(
    bundle_dir: Path,
    *,
    model_file: Path,
    task: str,
    preprocessing: TextPreprocessing | ImagePreprocessing | NoPreprocessing,
    model: str,
    version: int,
    labels: list[str],
    opset: int,
    quantization: str,
    lineage: Lineage,
    extra_files: dict[str, Path] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Manifest:
    """Copy the model (and ``extra_files`` by bundle name) into a fresh ``bundle_dir``; write its manifest.

    The golden vectors start empty; :func:`record_golden` fills them from the staged bundle itself.
    """
    if bundle_dir.exists():
        shutil.rmtree(bundle_dir)
    bundle_dir.mkdir(parents=True)
    shutil.copyfile(model_file, bundle_dir / MODEL_FILE)
    for name, source in (extra_files or {}).items():
        shutil.copyfile(source, bundle_dir / name)
    (bundle_dir / GOLDEN_FILE).write_text(json.dumps({"inputs": [], "probabilities": []}))
    inputs, outputs = tensor_specs(bundle_dir / MODEL_FILE)
    import onnxruntime as ort

    fields: dict[str, Any] = {
        "model": model,
        "version": version,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "task": task,
        "model_file": MODEL_FILE,
        "inputs": inputs,
        "outputs": outputs,
        "opset": opset,
        "min_onnxruntime": ".".join(ort.__version__.split(".")[:2]),
        "execution_providers": ["CPUExecutionProvider"],
        "quantization": quantization,
        "preprocessing": preprocessing,
        "labels": labels,
        "golden_file": GOLDEN_FILE,
        "metrics": metrics or {},
        "lineage": lineage,
    }
    return write_manifest(bundle_dir, fields)


def stage_text_bundle(
    bundle_dir: Path,
    *,
    tokenizer_file: Path,
    max_length: int,
    truncation: str = "head",
    head_tokens: int = 0,
    **common: Any,
) -> Manifest:
    """A text-classification bundle: the model plus its Hugging Face ``tokenizer.json``, truncated as in training."""
    preprocessing = TextPreprocessing(
        tokenizer=TOKENIZER_FILE,
        max_length=max_length,
        truncation=truncation,
        head_tokens=head_tokens,
    )
    return stage_bundle(
        bundle_dir,
        task="text-classification",
        preprocessing=preprocessing,
        extra_files={TOKENIZER_FILE: tokenizer_file},
        **common,
    )


def write_manifest(bundle_dir: Path, fields: dict[str, Any]) -> Manifest:
    names = sorted(
        str(p.relative_to(bundle_dir)) for p in bundle_dir.rglob("*") if p.is_file() and p.name != MANIFEST_NAME
    )
    manifest = Manifest(files=[file_entry(bundle_dir, name) for name in names], **fields)
    (bundle_dir / MANIFEST_NAME).write_bytes(manifest.to_json())
    return manifest


def record_golden(bundle_dir: Path, manifest: Manifest, inputs: list[Any], *, metrics: dict[str, Any]) -> Manifest:
    """Run the staged bundle through the device's own runtime and store what it says as golden vectors.

    ``inputs`` are texts, or images as nested lists of raw pixels.
    """
    classifier = load_classifier(bundle_dir, manifest, providers=["CPUExecutionProvider"])
    probabilities = classifier.probabilities(inputs)
    records = [i.tolist() if hasattr(i, "tolist") else i for i in inputs]
    golden = {"inputs": records, "probabilities": probabilities.round(6).tolist()}
    (bundle_dir / GOLDEN_FILE).write_text(json.dumps(golden, indent=1))
    fields = manifest.model_dump(by_alias=False, exclude={"files"})
    fields["metrics"] = metrics
    return write_manifest(bundle_dir, fields)


def write_tensor_golden(
    bundle_dir: Path, manifest: Manifest, cases: list[tuple[dict[str, Any], dict[str, Any]]], *, metrics: dict[str, Any]
) -> Manifest:
    """A ``tensor`` bundle's golden vectors: each case's input and output arrays by name, as the
    device reads them (:func:`edge_agent.runtime.tensor.tensor_record`); the manifest rewritten."""
    from edge_agent.runtime.tensor import tensor_record

    golden = {
        "cases": [
            {"inputs": {name: tensor_record(a) for name, a in inputs.items()},
             "outputs": {name: tensor_record(a) for name, a in outputs.items()}}
            for inputs, outputs in cases
        ]
    }  # fmt: skip
    (bundle_dir / GOLDEN_FILE).write_text(json.dumps(golden))
    fields = manifest.model_dump(by_alias=False, exclude={"files"})
    fields["metrics"] = metrics
    return write_manifest(bundle_dir, fields)
