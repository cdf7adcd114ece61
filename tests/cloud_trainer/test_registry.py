"""The model registry: versions, lineage, immutability."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud_trainer.releases.registry import Registry, RegistryError, diff, parse_ref
from tests.tinymodel import make_tiny_bundle


def test_round_trip_with_lineage_and_parent(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    first = registry.register("intents", version=None, build=lambda d, v, _p: make_tiny_bundle(d, version=v))
    second = registry.register(
        "intents", version=None, build=lambda d, v, _p: make_tiny_bundle(d, version=v, scale=3.0), source={"run": "r2"}
    )
    assert (first.ref, second.ref) == ("intents:1", "intents:2")
    assert registry.versions("intents") == [1, 2]
    again = registry.verified("intents")  # newest by default
    assert again.version == 2
    assert again.record["parent_version"] == 1
    assert again.record["source"] == {"run": "r2"}
    assert again.record["validated"] is True
    assert again.manifest.lineage.base_model == "tiny-bag-of-words"
    changes = diff(first, second)
    assert changes["files.model.onnx"] == "changed"
    assert changes["files.golden.json"] == "changed"
    assert "files.tokenizer.json" not in changes


def test_versions_are_immutable(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    registry.register("intents", version=None, build=lambda d, v, _p: make_tiny_bundle(d, version=v))
    with pytest.raises(RegistryError, match="already registered; versions are immutable"):
        registry.register("intents", version=1, build=lambda d, v, _p: make_tiny_bundle(d, version=v))
    model = registry.get("intents", 1).bundle_dir / "model.onnx"
    assert model.stat().st_mode & 0o222 == 0  # read-only for everyone
    assert model.parent.stat().st_mode & 0o222 == 0
    # root ignores permissions; tampering is still caught before a push
    model.chmod(0o644)
    model.write_bytes(b"changed")
    with pytest.raises(RegistryError, match=r"intents:1 is damaged: bundle file 'model\.onnx'"):
        registry.verified("intents", 1)


def test_a_failed_gate_registers_nothing(tmp_path: Path) -> None:
    registry = Registry(tmp_path)

    def failing(_d: Path, _v: int, _p: int | None) -> object:
        raise RuntimeError("gate failed")

    with pytest.raises(RuntimeError):
        registry.register("intents", version=None, build=failing)  # type: ignore[arg-type]
    assert registry.versions("intents") == []
    assert not (tmp_path / "intents").exists()  # no empty model directory either


def test_refs() -> None:
    assert parse_ref("intents") == ("intents", None)
    assert parse_ref("intents:3") == ("intents", 3)
    with pytest.raises(RegistryError, match="positive integer"):
        parse_ref("intents:x")
