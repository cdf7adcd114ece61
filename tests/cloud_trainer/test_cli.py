"""cloud-train's CLI: --help without the training stack, and one clear line for the errors a user will hit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cloud_trainer.releases.registry import Registry
from tests.ports import refused_port
from tests.tinymodel import make_tiny_bundle

TRAINING_STACK = ["torch", "transformers", "optimum", "onnx", "accelerate", "datasets", "sklearn"]


def cloud_train(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cloud_trainer", *args], capture_output=True, text=True, timeout=300)


def registered(tmp_path: Path) -> Path:
    root = tmp_path / "registry"
    Registry(root).register("intents", version=None, build=lambda d, v, _p: make_tiny_bundle(d, version=v))
    return root


def test_help_does_not_import_the_training_stack() -> None:
    """`cloud-train --help` stays quick because it imports none of the heavy packages (its speed
    itself is measured in bench/, not asserted here)."""
    probe = (
        "import json, sys\nfrom cloud_trainer.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as exc:\n    code = exc.code\n"
        "heavy = [m for m in json.loads(sys.argv[1]) if m in sys.modules]\n"
        "print(json.dumps({'code': code, 'heavy': heavy}))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe, json.dumps(TRAINING_STACK)], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    report = json.loads(out.strip().splitlines()[-1])
    assert report == {"code": 0, "heavy": []}
    result = cloud_train("--help")  # the real entry point, as a user runs it
    assert result.returncode == 0
    assert result.stdout.startswith("usage: cloud-train")
    for command in ("train", "export", "push", "collect"):
        assert command in result.stdout


def test_export_target_default_is_the_exporters_default() -> None:
    """The CLI spells the default out (importing export would slow --help); it must not drift."""
    import argparse

    from cloud_trainer.cli import build_parser
    from export.quantize import DEFAULT_TARGET

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    target = next(a for a in commands.choices["export"]._actions if a.dest == "target")
    assert target.default is None and f"uses preset {DEFAULT_TARGET}" in (target.help or "")
    from cloud_trainer.cli.training import _export_precision

    resolved = _export_precision(argparse.Namespace(quantize="dynamic-int8", target=None))
    assert resolved == ("dynamic-int8", DEFAULT_TARGET)


def test_push_errors_are_one_line(tmp_path: Path) -> None:
    registry = str(registered(tmp_path))
    missing_key = cloud_train("push", "intents", "--registry", registry, "--fleet", "f", "--key", str(tmp_path / "no"))
    assert missing_key.returncode == 2
    assert missing_key.stderr.startswith("error: cannot read signing key")
    assert "cloud-train keygen" in missing_key.stderr

    assert cloud_train("keygen", "--out", str(tmp_path / "k")).returncode == 0
    key = str(tmp_path / "k" / "release.key")
    with refused_port() as port:  # held by this process, not listening: nothing can answer there
        unreachable = cloud_train(
            "push", "intents:1", "--registry", registry, "--fleet", "f", "--key", key, "--broker", f"127.0.0.1:{port}"
        )
    assert unreachable.returncode == 3
    assert unreachable.stderr.startswith("error: cannot reach MQTT broker")

    unknown = cloud_train("push", "intents:7", "--registry", registry, "--fleet", "f", "--key", key)
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == "error: intents:7 is not registered (versions: 1)"
    for result in (missing_key, unreachable, unknown):
        assert "Traceback" not in result.stderr


def test_push_refuses_a_damaged_registered_bundle(tmp_path: Path) -> None:
    root = registered(tmp_path)
    model = root / "intents" / "1" / "bundle" / "model.onnx"
    model.chmod(0o644)
    model.write_bytes(model.read_bytes() + b"tampered")
    assert cloud_train("keygen", "--out", str(tmp_path / "k")).returncode == 0
    result = cloud_train(
        "push", "intents", "--registry", str(root), "--fleet", "f", "--key", str(tmp_path / "k" / "release.key")
    )
    assert result.returncode == 2
    assert "intents:1 is damaged" in result.stderr
    assert "model.onnx" in result.stderr


def test_train_data_errors_are_one_line(tmp_path: Path) -> None:
    data = tmp_path / "d.csv"
    data.write_text("utterance,label\nhello,greet\n")
    result = cloud_train("train", "--data", str(data), "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: data set {data} has no column 'text' (columns: utterance, label)"
    empty = tmp_path / "e.csv"
    empty.write_text("text,label\n")
    assert "has no rows" in cloud_train("train", "--data", str(empty), "--out", str(tmp_path / "r")).stderr
    missing = cloud_train("train", "--data", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "r"))
    assert missing.stderr.strip() == f"error: data set {tmp_path / 'nope.csv'} does not exist or is not a file"
    config = tmp_path / "c.toml"
    config.write_text("[train]\nepochs = 2\nlearnin_rate = 1\n")
    bad = cloud_train("train", "--data", str(data), "--out", str(tmp_path / "r"), "--config", str(config))
    assert "unknown key(s) learnin_rate" in bad.stderr
    for r in (result, missing, bad):
        assert "Traceback" not in r.stderr


def test_base_model_that_does_not_exist(tmp_path: Path) -> None:
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"t{i},{'a' if i % 2 else 'b'}\n" for i in range(10)))
    result = cloud_train(
        "train", "--data", str(data), "--out", str(tmp_path / "r"), "--base-model", str(tmp_path / "nomodel")
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: base model directory {tmp_path / 'nomodel'} does not exist"


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    assert cloud_train("keygen", "--out", str(tmp_path)).returncode == 0
    again = cloud_train("keygen", "--out", str(tmp_path))
    assert again.returncode == 2
    assert "refusing to overwrite" in again.stderr


def test_models_list_show_diff(tmp_path: Path) -> None:
    root = registered(tmp_path)
    Registry(root).register("intents", version=None, build=lambda d, v, _p: make_tiny_bundle(d, version=v, scale=2.0))
    listing = cloud_train("models", "--registry", str(root), "list")
    assert "intents:1" in listing.stdout
    assert "intents:2" in listing.stdout
    show = cloud_train("models", "--registry", str(root), "show", "intents:2")
    assert '"parent_version": 1' in show.stdout
    changes = cloud_train("models", "--registry", str(root), "diff", "intents:1", "intents:2")
    assert 'files.model.onnx: "changed"' in changes.stdout
    assert "files.tokenizer.json" not in changes.stdout
