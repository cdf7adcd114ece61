"""The model registry: every exported version on local disk, immutable, with its lineage.

Layout::

    <root>/<model>/<version>/bundle/        the bundle exactly as pushed (read-only)
    <root>/<model>/<version>/record.json    registration: time, validation, bundle hash, source run
    <root>/<model>/.staging-<version>/      an export in progress (never listed)

A version is registered only after the export gates passed, by one directory rename; it is never
changed afterwards (files and directories are made read-only, and registering an existing
version is refused). Lineage (base model, data set hash, hyperparameters, parent version) and
metrics live in the bundle's manifest; the record adds what the manifest cannot know about itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cloud_trainer.errors import CloudTrainError
from edge_agent.protocol import MANIFEST_NAME, Manifest, ProtocolError, check_segment, sha256_file, verify_bundle_files

RECORD_SCHEMA = "edgeloop.registry-record/1"


def default_registry() -> Path:
    return Path(os.environ.get("EDGELOOP_REGISTRY", Path.home() / ".edgeloop" / "registry"))


class RegistryError(CloudTrainError):
    """A version that does not exist, already exists, or no longer matches its record."""


@dataclass(frozen=True)
class ModelVersion:
    model: str
    version: int
    bundle_dir: Path
    record: dict[str, Any]
    manifest: Manifest

    @property
    def ref(self) -> str:
        return f"{self.model}:{self.version}"


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``MODEL`` or ``MODEL:VERSION``."""
    model, _, version = ref.partition(":")
    try:
        check_segment("model", model)
    except ValueError as exc:
        raise RegistryError(str(exc)) from None
    if version and not version.isdigit():
        raise RegistryError(f"version in {ref!r} must be a positive integer")
    return model, int(version) if version else None


def _make_read_only(path: Path) -> None:
    for item in [*path.rglob("*"), path]:
        mode = item.stat().st_mode
        item.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


class Registry:
    """Versions of models under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def versions(self, model: str) -> list[int]:
        directory = self.root / model
        if not directory.is_dir():
            return []
        return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / "record.json").is_file())

    def next_version(self, model: str) -> int:
        versions = self.versions(model)
        return versions[-1] + 1 if versions else 1

    def register(
        self,
        model: str,
        *,
        version: int | None,
        build: Callable[[Path, int, int | None], Manifest],
        source: dict[str, Any] | None = None,
    ) -> ModelVersion:
        """Build a bundle with ``build(bundle_dir, version, parent_version)`` and register it.

        ``build`` must raise if a gate fails; then nothing is registered, and a model directory
        this call created is removed again, so no model without versions is listed.
        """
        check_segment("model", model)
        existing = self.versions(model)
        version = version or self.next_version(model)
        if version in existing:
            raise RegistryError(f"{model}:{version} is already registered; versions are immutable")
        parent = max((v for v in existing if v < version), default=None)
        model_dir = self.root / model
        created_model_dir = not model_dir.exists()
        staging = model_dir / f".staging-{version}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            manifest = build(staging / "bundle", version, parent)
            record = {
                "schema": RECORD_SCHEMA,
                "model": model,
                "version": version,
                "registered_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "validated": True,
                "bundle_sha256": sha256_file(staging / "bundle" / MANIFEST_NAME),
                "bundle_bytes": manifest.total_bytes,
                "parent_version": parent,
                "source": source or {},
            }
            (staging / "record.json").write_text(json.dumps(record, indent=2) + "\n")
            _make_read_only(staging)
            os.replace(staging, self.root / model / str(version))
        except BaseException:
            _make_writable(staging)
            shutil.rmtree(staging, ignore_errors=True)
            if created_model_dir:
                with contextlib.suppress(OSError):  # not empty: another version arrived meanwhile
                    model_dir.rmdir()
            raise
        return self.get(model, version)

    def get(self, model: str, version: int | None = None) -> ModelVersion:
        """A registered version (the newest if ``version`` is None), checked against its record."""
        versions = self.versions(model)
        if not versions:
            raise RegistryError(f"no model {model!r} in the registry at {self.root}")
        version = version or versions[-1]
        if version not in versions:
            raise RegistryError(f"{model}:{version} is not registered (versions: {', '.join(map(str, versions))})")
        directory = self.root / model / str(version)
        record = json.loads((directory / "record.json").read_text())
        bundle = directory / "bundle"
        try:
            manifest = Manifest.read(bundle)
        except ProtocolError as exc:
            raise RegistryError(f"{model}:{version} is damaged: {exc}") from None
        return ModelVersion(model=model, version=version, bundle_dir=bundle, record=record, manifest=manifest)

    def verified(self, model: str, version: int | None = None) -> ModelVersion:
        """Like :meth:`get`, and every byte still matches: safe to push."""
        entry = self.get(model, version)
        if not entry.record.get("validated"):
            raise RegistryError(f"{entry.ref} did not pass validation; it cannot be pushed")
        if sha256_file(entry.bundle_dir / MANIFEST_NAME) != entry.record.get("bundle_sha256"):
            raise RegistryError(f"{entry.ref}: manifest no longer matches its registration")
        try:
            verify_bundle_files(entry.bundle_dir, entry.manifest)
        except ProtocolError as exc:
            raise RegistryError(f"{entry.ref} is damaged: {exc}") from None
        return entry


def _make_writable(path: Path) -> None:
    if not path.exists():
        return
    for item in [path, *path.rglob("*")]:
        item.chmod(item.stat().st_mode | stat.S_IWUSR)


def summary(entry: ModelVersion) -> dict[str, Any]:
    """The fields ``models list`` shows; a metric an older manifest lacks is None."""
    metrics = entry.manifest.metrics
    export = metrics.get("export", {})
    bundle = metrics.get("bundle", {})
    return {
        "ref": entry.ref,
        "registered": entry.record.get("registered_at", ""),
        "task": entry.manifest.task,
        "quantization": entry.manifest.quantization,
        "accuracy": bundle.get("accuracy", metrics.get("bundle_accuracy")),
        "macro_f1": bundle.get("macro_f1", export.get("bundle_model_macro_f1")),
        "fp32_accuracy": export.get("onnx_fp32_accuracy"),
        "fp32_macro_f1": export.get("onnx_fp32_macro_f1"),
        "split": bundle.get("split", export.get("split")),
        "examples": bundle.get("examples", export.get("examples")),
        "bytes": entry.manifest.total_bytes,
        "parent": entry.record.get("parent_version"),
        "bundle_sha256": entry.record.get("bundle_sha256", "")[:12],
    }


def diff(a: ModelVersion, b: ModelVersion) -> dict[str, Any]:
    """What differs between two versions: lineage, hyperparameters, metrics, files."""
    changes: dict[str, Any] = {}
    la, lb = a.manifest.lineage, b.manifest.lineage
    for name in ("base_model", "dataset_sha256", "parent_version"):
        if getattr(la, name) != getattr(lb, name):
            changes[f"lineage.{name}"] = [getattr(la, name), getattr(lb, name)]
    for key in sorted(set(la.hyperparameters) | set(lb.hyperparameters)):
        va, vb = la.hyperparameters.get(key), lb.hyperparameters.get(key)
        if va != vb:
            changes[f"hyperparameters.{key}"] = [va, vb]
    for key, (va, vb) in _flat_numbers(a.manifest.metrics, b.manifest.metrics).items():
        if va != vb:
            changes[f"metrics.{key}"] = [va, vb, None if va is None or vb is None else round(vb - va, 6)]
    for field in ("quantization", "task", "labels", "opset"):
        if getattr(a.manifest, field) != getattr(b.manifest, field):
            changes[field] = [getattr(a.manifest, field), getattr(b.manifest, field)]
    files_a = {f.path: f.sha256 for f in a.manifest.files}
    files_b = {f.path: f.sha256 for f in b.manifest.files}
    for path in sorted(set(files_a) | set(files_b)):
        if files_a.get(path) != files_b.get(path):
            state = "added" if path not in files_a else "removed" if path not in files_b else "changed"
            changes[f"files.{path}"] = state
    return changes


def _flat_numbers(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
    out: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) or isinstance(vb, dict):
            out.update(_flat_numbers(va or {}, vb or {}, f"{prefix}{key}."))
        elif isinstance(va, (int, float)) or isinstance(vb, (int, float)):
            out[f"{prefix}{key}"] = (va, vb)
    return out
