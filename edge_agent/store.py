"""The agent's model store on disk: chunks, staged and installed versions, the active pointer.

Layout under ``state_dir``::

    chunks/<sha256>                 verified chunks (content-addressed; a resumed download skips them)
    models/<model>/staging/<v>/     a bundle being assembled; never served
    models/<model>/versions/<v>/    complete, verified bundles
    models/<model>/active           symlink -> versions/<v>; switched with one atomic rename
    models/<model>/state.json       the trust state (sequence floor, rolled-back versions, update in
    models/<model>/state.backup.json  progress), twice: see :mod:`edge_agent.trust`

Every write goes to a temporary name, is fsynced, then renamed, so kill -9 at any point leaves
either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old content or the new, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class ModelStore:
    """Versions of one model on disk.

    Args:
        state_dir: the agent's state directory.
        model: the model name.
    """

    def __init__(self, *, state_dir: Path, model: str) -> None:
        self.chunks_dir = state_dir / "chunks"
        self.root = state_dir / "models" / model
        self.versions_dir = self.root / "versions"
        self.staging_root = self.root / "staging"
        self.active_link = self.root / "active"
        for directory in (self.chunks_dir, self.versions_dir, self.staging_root):
            directory.mkdir(parents=True, exist_ok=True)

    # -- chunks -----------------------------------------------------------------------------------
    def chunk_path(self, sha256: str) -> Path:
        return self.chunks_dir / sha256

    def has_chunk(self, sha256: str) -> bool:
        return self.chunk_path(sha256).is_file()

    def put_chunk(self, sha256: str, data: bytes) -> None:
        """Keep a chunk the caller has already verified."""
        atomic_write(self.chunk_path(sha256), data)

    def chunk_bytes_held(self) -> int:
        return sum(p.stat().st_size for p in self.chunks_dir.iterdir() if p.is_file())

    def drop_chunks(self, keep: set[str]) -> None:
        for path in self.chunks_dir.iterdir():
            if path.name not in keep:
                path.unlink(missing_ok=True)

    # -- versions ---------------------------------------------------------------------------------
    def version_dir(self, version: int) -> Path:
        return self.versions_dir / str(version)

    def installed_versions(self) -> list[int]:
        return sorted(int(p.name) for p in self.versions_dir.iterdir() if p.is_dir() and p.name.isdigit())

    def fresh_staging(self, version: int) -> Path:
        """An empty staging directory for ``version`` (leftovers of a crashed attempt are removed)."""
        staging = self.staging_root / str(version)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        return staging

    def install(self, staging: Path, version: int) -> Path:
        """Move a fully written, verified staging directory into ``versions/``."""
        for path in staging.rglob("*"):
            if path.is_file():
                with path.open("rb") as handle:
                    os.fsync(handle.fileno())
        target = self.version_dir(version)
        if target.exists():
            # Installed before a crash; the staged copy is redundant.
            shutil.rmtree(staging, ignore_errors=True)
            return target
        os.replace(staging, target)
        fsync_dir(self.versions_dir)
        return target

    # -- the active pointer -----------------------------------------------------------------------
    def active_version(self) -> int | None:
        try:
            target = os.readlink(self.active_link)
        except OSError:
            return None
        name = Path(target).name
        return int(name) if name.isdigit() and self.version_dir(int(name)).is_dir() else None

    def activate(self, version: int) -> None:
        """Point ``active`` at ``version`` with one atomic rename."""
        if not self.version_dir(version).is_dir():
            raise FileNotFoundError(f"version {version} is not installed")
        tmp = self.root / f".active.tmp-{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(Path("versions") / str(version), tmp)
        os.replace(tmp, self.active_link)
        fsync_dir(self.root)

    def prune(self, keep: int, *, protect: set[int]) -> list[int]:
        """Remove old versions beyond the newest ``keep``; versions in ``protect`` always stay."""
        versions = self.installed_versions()
        kept = set(versions[-keep:]) | protect
        removed = [v for v in versions if v not in kept]
        for version in removed:
            shutil.rmtree(self.version_dir(version), ignore_errors=True)
        for leftover in self.staging_root.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)
        return removed
