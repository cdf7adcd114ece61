"""The model store: atomic activation, installs, pruning, persisted state; what kill -9 leaves."""

from __future__ import annotations

import os
import subprocess
import sys
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


# What a writer killed mid-write leaves: the child process stops itself at a chosen point inside
# atomic_write (patched in the child only) and says so; the test then kills it with SIGKILL.
_WRITER_AT = """
import os, sys, time
from pathlib import Path
import edge_agent.store as store

path, point, size = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])

def hold(*_args):
    print(point, flush=True)
    time.sleep(600)

if point == "mid-data":  # half the new bytes are in the temporary file
    real_open = Path.open

    class HalfWriter:
        def __init__(self, handle):
            self.handle = handle
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self.handle.close()
        def write(self, data):
            self.handle.write(data[: len(data) // 2])
            self.handle.flush()
            hold()

    Path.open = lambda self, *a, **k: HalfWriter(real_open(self, *a, **k))
elif point == "before-rename":  # written and fsynced, not yet renamed
    os.replace = hold
elif point == "before-dir-fsync":  # renamed, the directory not yet synced
    store.fsync_dir = hold
store.atomic_write(path, b"N" * size)
"""

_WRITER_LOOP = """
import itertools, sys
from pathlib import Path
from edge_agent.store import atomic_write

path, size = Path(sys.argv[1]), int(sys.argv[2])
for i in itertools.count():
    atomic_write(path, (b"A" if i % 2 else b"B") * size)
    print(i, flush=True)
"""

SIZE = 1 << 20


def _kill_when_it_says(args: list[str], lines: int = 1) -> list[str]:
    """Run a writer, read ``lines`` lines from it, then SIGKILL it; what it said."""
    child = subprocess.Popen([sys.executable, "-c", *args], stdout=subprocess.PIPE, text=True)
    said = []
    try:
        assert child.stdout is not None
        for _ in range(lines):
            said.append(child.stdout.readline().strip())
            assert said[-1], f"the writer exited first (code {child.poll()})"
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    assert child.returncode == -9
    return said


@pytest.mark.parametrize(
    ("point", "survivor"), [("mid-data", b"O"), ("before-rename", b"O"), ("before-dir-fsync", b"N")]
)
def test_kill_9_inside_atomic_write_leaves_the_old_file_or_the_new(tmp_path: Path, point: str, survivor: bytes) -> None:
    target = tmp_path / "state.json"
    atomic_write(target, b"O" * SIZE)
    assert _kill_when_it_says([_WRITER_AT, str(target), point, str(SIZE)]) == [point]
    assert target.read_bytes() == survivor * SIZE  # whole: never a mix of the two, never short
    temporaries = [p for p in tmp_path.iterdir() if p.name.startswith(".state.json.tmp")]
    if point == "mid-data":  # the torn write is there, but in the temporary file, not the target
        assert [p.stat().st_size for p in temporaries] == [SIZE // 2]
    atomic_write(target, b"P" * 10)  # a later writer is not disturbed by a leftover temporary
    assert target.read_bytes() == b"P" * 10


def test_kill_9_at_arbitrary_moments_never_tears_the_file(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    atomic_write(target, b"A" * SIZE)
    for lines in (1, 2, 3, 5, 8):  # killed while writing the next one, wherever that is
        said = _kill_when_it_says([_WRITER_LOOP, str(target), str(SIZE)], lines)
        assert said == [str(i) for i in range(lines)]
        content = target.read_bytes()
        assert content in (b"A" * SIZE, b"B" * SIZE), f"torn: {len(content)} bytes, {set(content)!r}"
