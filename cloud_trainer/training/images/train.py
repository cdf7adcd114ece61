"""Fine-tuning a Hugging Face image classifier with the HF Trainer (so accelerate/torchrun work).

Any ``AutoModelForImageClassification`` (ResNet, MobileNetV2, ViT, ConvNeXt...) from a hub id or
a local directory, with its own image processor translated into the bundle's preprocessing
(:mod:`cloud_trainer.training.images.preprocessing`). The Trainer's seams are the text family's
(:mod:`cloud_trainer.training.fit`): a class-weighted loss, a faster-learning fresh head, one validation
line per epoch, the best epoch kept and early stopping, and the time budget.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

from cloud_trainer.errors import CloudTrainError
from cloud_trainer.training.images.data import LabelledImages
from cloud_trainer.training.images.preprocessing import Augmentation, augmented, decode, describe, pixel_batch
from cloud_trainer.training.plan import FROZEN_BASE, FULL_FINE_TUNE, HEAD_RATE_FACTOR, is_imbalanced, majority_baseline
from edge_agent.protocol import ImagePreprocessing

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ImageTrainConfig:
    """Hyperparameters of the image family; each is a CLI flag (or a ``[train]`` key in ``--config``).
    ``None`` means "chosen as the text family chooses it" (see :mod:`cloud_trainer.training.plan`).

    Args:
        base_model: hub id or local directory of an image classifier with an image processor config.
        epochs: most passes over the training split (early stopping may end sooner); auto: 8, 30 frozen.
        batch_size: images per step.
        learning_rate: AdamW peak rate (linear decay after warm-up); auto: 1e-4, 2e-3 frozen.
        weight_decay: AdamW weight decay.
        warmup_ratio: share of steps warming up; auto: 0.1, 0 frozen.
        class_weights: ``balanced`` inverse-frequency loss weights, ``none``, or ``auto`` (balanced
            when the largest class is over 1.5 times the smallest).
        select_metric: the validation metric that picks the best epoch (macro_f1, accuracy, loss).
        patience: epochs without improvement before training stops; 0 trains every epoch.
        max_minutes: training-time budget; the number of epochs is fitted to it before training.
        keep: ``best`` restores the best validation epoch at the end; ``last`` keeps the last one.
        head_learning_rate: the classification head's peak rate; auto: 10x the learning rate, the
            same with ``freeze_base``.
        head_init: ``probe`` fits a linear head on the frozen features before training (only for a
            single linear head: ViT, ConvNeXt, MobileNetV2); auto: probe with ``freeze_base``.
        seed: fixes the head's init, the data order and the augmentation.
        max_steps: stop after this many steps (tests); -1 for no limit.
        freeze_base: train only the classification head.
        augment: random resized crops and horizontal flips while training (never for validation).
        min_crop_scale: the smallest share of an image's area a random crop keeps (torchvision: 0.08).
        hflip: flip half of the training images left to right (off for digits, text, arrows...).
        progress: print the plan and one line per epoch.
    """

    base_model: str
    epochs: float | None = None
    batch_size: int = 16
    learning_rate: float | None = None
    weight_decay: float = 0.01
    warmup_ratio: float | None = None
    class_weights: Literal["auto", "balanced", "none"] = "auto"
    select_metric: Literal["macro_f1", "accuracy", "loss"] = "macro_f1"
    patience: int = 3
    max_minutes: float | None = None
    keep: Literal["best", "last"] = "best"
    head_learning_rate: float | None = None
    head_init: Literal["auto", "probe", "random"] = "auto"
    seed: int = 42
    max_steps: int = -1
    freeze_base: bool = False
    augment: bool = True
    min_crop_scale: float = 0.08
    hflip: bool = True
    progress: bool = True

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, origin: str = "config") -> ImageTrainConfig:
        """Build from a config-file table and flags; unknown keys and wrong types are refused by name."""
        from pydantic import TypeAdapter, ValidationError

        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CloudTrainError(
                f"{origin}: unknown key(s) for the image family {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        if "base_model" not in data:
            raise CloudTrainError(
                "the image family needs --base-model: a hub id (microsoft/resnet-50, google/vit-base-patch16-224) "
                "or a local directory with the model and its image processor config"
            )
        try:
            return TypeAdapter(cls).validate_python(dict(data))
        except ValidationError as exc:
            err = exc.errors()[0]
            raise CloudTrainError(f"{origin}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


@dataclass(frozen=True)
class ImageTrainResult:
    """A finished run. ``config`` has every ``auto`` value resolved to what was used."""

    checkpoint: Path
    labels: list[str]
    metrics: dict[str, Any]
    config: ImageTrainConfig
    preprocessing: ImagePreprocessing


class ImageDataset:
    """A torch-style map dataset: ``pixel_values`` (C x H x W float32) and ``labels`` per image.

    With ``augmentation`` each item is a fresh random crop (and maybe flip) of the decoded file;
    without, it is the device's decode of the file's bytes.
    """

    def __init__(self, data: LabelledImages, label_ids: list[int], pre: ImagePreprocessing, *,
                 augmentation: Augmentation | None = None, seed: int = 0) -> None:  # fmt: skip
        self.paths = data.paths
        self.label_ids = label_ids
        self.pre = pre
        self.augmentation = augmentation
        self._rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.paths)

    def pixels(self, index: int) -> Any:
        path = self.paths[index]
        try:
            if self.augmentation is not None:
                return augmented(path, self.pre, self.augmentation, self._rng)
            return decode(path.read_bytes(), self.pre)
        except (OSError, ValueError, SyntaxError) as exc:  # Pillow's errors for a file that changed or is cut short
            raise CloudTrainError(f"image {path} cannot be read: {exc}") from None

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        (values,) = pixel_batch([self.pixels(index)], self.pre)
        return {"pixel_values": torch.from_numpy(values), "labels": self.label_ids[index]}


def load_base(base_model: str, labels: list[str]) -> tuple[Any, Any]:
    """The image processor and the classifier with a fresh head of ``len(labels)`` outputs."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification
    from transformers.utils import logging as hf_logging

    looks_local = base_model.startswith(("/", ".", "~")) or Path(base_model).exists()
    if looks_local and not Path(base_model).expanduser().is_dir():
        raise CloudTrainError(f"base model directory {base_model} does not exist")
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]  # no "you should TRAIN this model"
    try:
        processor = AutoImageProcessor.from_pretrained(base_model, use_fast=False)  # type: ignore[no-untyped-call]
    except (OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0]
        raise CloudTrainError(
            f"cannot load the image processor of {base_model!r} (its preprocessor_config.json): {reason}"
        ) from None
    try:
        model = AutoModelForImageClassification.from_pretrained(
            base_model, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)}, ignore_mismatched_sizes=True,
        )  # fmt: skip
    except (OSError, ValueError) as exc:  # a missing directory looks like a bad hub id to transformers
        reason = str(exc).splitlines()[0]
        raise CloudTrainError(f"cannot load image classifier {base_model!r}: {reason}") from None
    return processor, model


def resolve(config: ImageTrainConfig, train: LabelledImages) -> tuple[ImageTrainConfig, list[str]]:
    """Fill every ``auto``/``None`` value; returns the plan's lines with their reasons (as the text family)."""
    preset, preset_name = (FROZEN_BASE, "frozen base") if config.freeze_base else (FULL_FINE_TUNE, "full fine-tune")
    values: dict[str, Any] = {}
    lines = []
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
                        f"{factor}x the base's, a fresh head next to a pretrained base"))  # fmt: skip
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
    if config.augment:
        lines.append(
            f"augmentation: random resized crops ({config.min_crop_scale:g} to 1 of the area, aspect 3/4 "
            f"to 4/3){', horizontal flips' if config.hflip else ''}; validation images are not augmented"
        )
    else:
        lines.append("augmentation: none (--no-augment)")
    lines.append(f"best epoch by validation {config.select_metric}; early stopping after {config.patience} "
                 "epochs without improvement" if config.patience else
                 f"best epoch by validation {config.select_metric}; no early stopping")  # fmt: skip
    return replace(config, class_weights=weights, **values), lines


def summary_lines(train: LabelledImages, val: LabelledImages) -> tuple[list[str], dict[str, Any]]:
    """Rows per split, class counts and shares, the majority baseline (the text family's summary, for images)."""
    names = sorted(set(train.labels) | set(val.labels))
    counts, val_counts = Counter(train.labels), Counter(val.labels)
    width = max(len(n) for n in names)
    lines = [f"data: {len(train)} training images, {len(val)} validation images, {len(names)} classes"]
    for name in names:
        lines.append(f"  {name:<{width}}  train {counts[name]:>6} ({counts[name] / len(train):6.1%})   "
                     f"validation {val_counts[name]:>5}")  # fmt: skip
    baseline = majority_baseline(train.labels, val.labels)
    lines.append(f"majority baseline (always {baseline['label']!r}): accuracy {baseline['accuracy']:.3f}, "
                 f"macro-F1 {baseline['macro_f1']:.3f}")  # fmt: skip
    return lines, baseline


def train_image_classifier(
    train: LabelledImages,
    val: LabelledImages,
    *,
    out_dir: Path,
    config: ImageTrainConfig,
    say: Callable[[str], None] | None = None,
) -> ImageTrainResult:
    """Fine-tune ``config.base_model`` on ``train``, pick the best epoch on ``val``, save it in ``out_dir``.

    ``say`` receives the data summary, the plan with its reasons, one line per epoch and any
    warning (default: printed when ``config.progress``, else logged).
    """
    from transformers import default_data_collator, set_seed

    from cloud_trainer.training.fit import build_trainer, validation_metrics
    from cloud_trainer.training.plan import balanced_class_weights

    tell: Callable[[str], None] = say or (print if config.progress else log.info)
    labels = sorted(set(train.labels) | set(val.labels))
    unseen = sorted(set(val.labels) - set(train.labels))
    if unseen:
        raise CloudTrainError(f"labels only in the validation split, never trained on: {', '.join(unseen)}")
    set_seed(config.seed)
    processor, model = load_base(config.base_model, labels)
    config, pre, baseline = _plan(config, train, val, processor, model, tell=tell)
    index = {label: i for i, label in enumerate(labels)}
    augmentation = Augmentation(min_crop_scale=config.min_crop_scale, hflip=config.hflip) if config.augment else None
    train_set = ImageDataset(train, [index[x] for x in train.labels], pre, augmentation=augmentation,
                             seed=config.seed)  # fmt: skip
    val_set = ImageDataset(val, [index[x] for x in val.labels], pre)
    if config.freeze_base:
        for parameter in model.base_model.parameters():
            parameter.requires_grad = False
    weights = balanced_class_weights(train.labels, labels) if config.class_weights == "balanced" else None
    if config.head_init == "probe" and config.max_steps <= 0:
        _probe_head(model, ImageDataset(train, train_set.label_ids, pre), weights=weights, tell=tell)
    budget_s = config.max_minutes * 60 if config.max_minutes else None
    if budget_s is not None and config.max_steps <= 0:
        per_epoch = _seconds_per_epoch(model, train_set, config.batch_size)
        fits = max(1, math.floor(budget_s * 0.9 / per_epoch))
        if fits < float(config.epochs or 1):
            tell(f"  epochs {fits}: about {per_epoch:.0f} s per epoch here, --max-minutes {config.max_minutes:g}")
            config = replace(config, epochs=float(fits))
    set_seed(config.seed)
    trainer, best = build_trainer(
        config, out_dir, model, (train_set, val_set), collator=default_data_collator, labels=labels,
        weights=weights, budget_s=budget_s, tell=tell, remove_unused_columns=False,
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
        train_examples=len(train), val_examples=len(val), majority_baseline=baseline,
        best_epoch=best.best_epoch if config.keep == "best" else len(best.history), epochs_run=len(best.history),
        training_minutes=round(minutes, 2), history=best.history,
    )  # fmt: skip
    for warning in warnings:
        tell(warning)
    checkpoint = out_dir / "checkpoint"
    trainer.save_model(str(checkpoint))
    processor.save_pretrained(str(checkpoint))
    (checkpoint / "train_config.json").write_text(json.dumps(asdict(config), indent=2))
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return ImageTrainResult(checkpoint=checkpoint, labels=labels, metrics=metrics, config=config, preprocessing=pre)


def _plan(
    config: ImageTrainConfig, train: LabelledImages, val: LabelledImages, processor: Any, model: Any, *,
    tell: Callable[[str], None],
) -> tuple[ImageTrainConfig, ImagePreprocessing, dict[str, Any]]:  # fmt: skip
    """The bundle's preprocessing from the processor, every automatic setting resolved; prints the data
    summary and the plan."""
    from cloud_trainer.training.images.preprocessing import preprocessing_from_processor

    pre, notes = preprocessing_from_processor(
        processor, channels=int(getattr(model.config, "num_channels", 3)),
        image_size=getattr(model.config, "image_size", None),
    )  # fmt: skip
    config, plan = resolve(config, train)
    summary, baseline = summary_lines(train, val)
    plan = [f"preprocessing from the model's image processor: {describe(pre)}", *notes, *plan]
    for line in [*summary, "plan:", *(f"  {line}" for line in plan)]:
        tell(line)
    return config, pre, baseline


def _probe_head(model: Any, data: ImageDataset, *, weights: list[float] | None, tell: Callable[[str], None]) -> None:
    import torch

    from cloud_trainer.training.fit import linear_probe

    batches = []
    for start in range(0, len(data), 64):
        items = [data[i] for i in range(start, min(start + 64, len(data)))]
        batches.append({"pixel_values": torch.stack([item["pixel_values"] for item in items])})
    accuracy = linear_probe(model, batches, torch.tensor(data.label_ids), weights)
    if accuracy is None:
        tell("  head: not a single linear layer, so no linear probe; it starts at random")
    else:
        tell(f"  head: fitted on the frozen base's features first (linear probe, train accuracy {accuracy:.3f})")


def _seconds_per_epoch(model: Any, data: ImageDataset, batch_size: int) -> float:
    """Time two forward/backward passes on real batches; the weights do not change."""
    import torch

    rng = random.Random(0)
    model.train()
    timings = []
    for _ in range(2):
        rows = [data[i] for i in rng.sample(range(len(data)), min(batch_size, len(data)))]
        started = time.perf_counter()
        pixels = torch.stack([row["pixel_values"] for row in rows])
        out = model(pixel_values=pixels)
        torch.nn.functional.cross_entropy(out.logits, torch.tensor([row["labels"] for row in rows])).backward()  # type: ignore[no-untyped-call]
        timings.append(time.perf_counter() - started)
    model.zero_grad(set_to_none=True)
    return min(timings) * 1.3 * math.ceil(len(data) / batch_size)  # the optimizer step and evaluation add a third
