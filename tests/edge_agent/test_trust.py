"""The trust state on disk: two copies, the newer wins, corruption is loud and never lowers the floor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_agent.trust import BACKUP, PRIMARY, TopicRecord, TrustStore


def _saved(root: Path, floor: int, *, rolled_back: list[int] | None = None) -> TrustStore:
    trust = TrustStore(root)
    trust.state.floor = floor
    trust.state.topics["t/releases/m"] = TopicRecord(sequence=floor, payload_sha256="ab" * 32)
    trust.state.rolled_back = rolled_back or []
    trust.save()
    return trust


def test_both_copies_are_written_and_read_back(tmp_path: Path) -> None:
    _saved(tmp_path, 7, rolled_back=[3])
    first, second = (json.loads((tmp_path / name).read_text()) for name in (PRIMARY, BACKUP))
    assert first == second
    assert first["revision"] == 1
    trust = TrustStore(tmp_path)
    assert (trust.state.floor, trust.state.rolled_back, trust.problem, trust.locked) == (7, [3], None, None)


def test_a_corrupt_primary_is_loud_kept_aside_and_the_floor_survives(tmp_path: Path) -> None:
    _saved(tmp_path, 9, rolled_back=[4])
    (tmp_path / PRIMARY).write_bytes(b'{"schema": "edgeloop.agent-state/1", "floor": ')  # torn by a bad disk
    trust = TrustStore(tmp_path)
    assert trust.state.floor == 9
    assert trust.state.rolled_back == [4]
    assert trust.locked is None
    assert trust.problem is not None and "state.json is corrupt" in trust.problem
    assert "recovered revision 1" in trust.problem
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(f"{PRIMARY}.corrupt-")]
    assert len(aside) == 1 and aside[0].read_bytes().endswith(b'"floor": ')
    trust.save()  # the next save writes both copies again
    assert TrustStore(tmp_path).problem is None


def test_a_corrupt_backup_alone_is_reported_too(tmp_path: Path) -> None:
    _saved(tmp_path, 5)
    (tmp_path / BACKUP).write_text('{"floor": "many"}')
    trust = TrustStore(tmp_path)
    assert trust.state.floor == 5
    assert trust.problem is not None and "state.backup.json is corrupt" in trust.problem


def test_no_readable_copy_locks_releases_until_an_operator_resets(tmp_path: Path) -> None:
    _saved(tmp_path, 12)
    for name in (PRIMARY, BACKUP):
        (tmp_path / name).write_bytes(b"\x00\x00garbage")
    trust = TrustStore(tmp_path)
    assert trust.locked is not None
    assert "edge-agent reset-trust" in trust.locked
    trust.save()  # a locked store writes nothing...
    assert TrustStore(tmp_path).locked is not None  # ...so a restart is locked too
    assert len([p for p in tmp_path.iterdir() if ".corrupt-" in p.name]) == 2  # one per file and distinct content
    trust.reset(floor=12)
    again = TrustStore(tmp_path)
    assert (again.state.floor, again.locked, again.problem) == (12, None, None)


def test_a_crash_between_the_two_writes_keeps_the_newer_copy(tmp_path: Path) -> None:
    trust = _saved(tmp_path, 3)
    old_backup = (tmp_path / BACKUP).read_bytes()
    trust.state.floor = 4
    trust.save()
    (tmp_path / BACKUP).write_bytes(old_backup)  # as if the process died before the second write
    recovered = TrustStore(tmp_path)
    assert (recovered.state.floor, recovered.state.revision, recovered.problem) == (4, 2, None)


def test_the_state_of_an_older_agent_is_migrated_with_its_highest_sequence(tmp_path: Path) -> None:
    (tmp_path / PRIMARY).write_text(
        json.dumps(
            {
                "sequences": {"a/releases/m": 4, "a/devices/d/releases/m": 6},
                "previous_version": 1,
                "rolled_back": [2],
                "update": {"state": "active", "version": 3},
            }
        )
    )
    trust = TrustStore(tmp_path)
    assert trust.problem is None
    assert trust.state.floor == 6
    assert trust.state.topics["a/releases/m"].sequence == 4
    assert (trust.state.previous_version, trust.state.rolled_back) == (1, [2])


def test_an_empty_or_schemaless_document_is_corrupt_not_a_fresh_start(tmp_path: Path) -> None:
    for content in (b"{}", b"null", b'{"floor": 7}'):
        for name in (PRIMARY, BACKUP):
            (tmp_path / name).write_bytes(content)
        assert TrustStore(tmp_path).locked is not None, content


def test_no_copy_lowers_the_protection_of_another(tmp_path: Path) -> None:
    trust = _saved(tmp_path, 8, rolled_back=[2])
    newer_but_weaker = trust.state.model_copy(update={"revision": 99, "floor": 3, "rolled_back": [], "topics": {}})
    (tmp_path / PRIMARY).write_text(newer_but_weaker.model_dump_json(by_alias=True))  # e.g. written after a downgrade
    merged = TrustStore(tmp_path).state
    assert (merged.floor, merged.rolled_back, merged.revision) == (8, [2], 99)
    assert merged.topics["t/releases/m"].sequence == 8


def test_reset_trust_unlocks_a_locked_device_and_refuses_to_touch_a_healthy_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cloud_trainer.releases.signing import generate_keypair
    from edge_agent.cli import main

    _, public = generate_keypair(tmp_path / "keys")
    config = tmp_path / "agent.toml"
    config.write_text(
        f'device_id = "d"\nfleet = "f"\nmodel = "m"\nstate_dir = "{tmp_path / "state"}"\n\n'
        f'[update]\ntrusted_keys = ["{public}"]\n'
    )
    root = tmp_path / "state" / "models" / "m"
    _saved(root, 4)
    assert main(["reset-trust", "--config", str(config), "--floor", "9"]) == 1  # readable: left alone
    assert "nothing to reset" in capsys.readouterr().err
    for name in (PRIMARY, BACKUP):
        (root / name).write_bytes(b"\xff\xfe")
    assert TrustStore(root).locked is not None
    assert main(["reset-trust", "--config", str(config), "--floor", "9"]) == 0
    assert "sequence floor 9" in capsys.readouterr().out
    fresh = TrustStore(root)
    assert (fresh.locked, fresh.state.floor) == (None, 9)
