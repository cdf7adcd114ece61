"""The model store: atomic activation, installs, pruning, persisted state."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edge_agent.store import ModelStore, atomic_write


def _install(store: ModelStore, version: int) -> None:
    staging = store.fresh_staging(version)
    (staging / "model.onnx").write_bytes(b"v%d" % version)
    store.install(staging, version)


def test_activate_switches_one_pointer(tmp_path: Path) -> None:
    store = ModelStore(state_dir=tmp_path, model="m")
    assert store.active_version() is None
    _install(store, 1)
    _install(store, 2)
    store.activate(1)
    assert store.active_version() == 1
    store.activate(2)
    assert store.active_version() == 2
    assert os.readlink(store.active_link) == "versions/2"
    assert not list(store.root.glob(".active.tmp*"))


def test_activate_refuses_a_version_that_is_not_installed(tmp_path: Path) -> None:
    store = ModelStore(state_dir=tmp_path, model="m")
    with pytest.raises(FileNotFoundError, match="version 3 is not installed"):
        store.activate(3)


def test_leftover_staging_is_never_active_and_is_pruned(tmp_path: Path) -> None:
    store = ModelStore(state_dir=tmp_path, model="m")
    for v in (1, 2, 3):
        _install(store, v)
    store.activate(3)
    (store.fresh_staging(4) / "half").write_bytes(b"partial")  # a crash mid-download
    removed = store.prune(2, protect={3})
    assert removed == [1]
    assert store.installed_versions() == [2, 3]
    assert list(store.staging_root.iterdir()) == []


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    atomic_write(tmp_path / "x", b"old")
    atomic_write(tmp_path / "x", b"new")
    assert (tmp_path / "x").read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".x")] == []
