"""The parts the Hugging Face Trainer is given: a class-weighted loss, per-epoch validation lines,
early stopping that restores the best epoch, and a training-time budget.

The Trainer itself stays (so accelerate and torchrun work unchanged); these are its seams.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

SELECT_METRICS = ("macro_f1", "accuracy", "loss")


class WeightedLossTrainer(Trainer):
    """A Trainer whose cross-entropy weights each class (``class_weights``, in label-id order), and
    whose classification head (parameters named ``classifier.*``) learns at ``head_learning_rate``.

    A fresh head next to a pretrained encoder needs a larger step than the encoder: at the
    encoder's rate it stays near its random start for epochs while the encoder bends its features
    to fit it. Both groups follow the same warm-up and decay.
    """

    def __init__(
        self, *args: Any, class_weights: list[float] | None = None, head_learning_rate: float | None = None,
        **kwargs: Any,
    ) -> None:  # fmt: skip
        self.head_learning_rate = head_learning_rate
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # the loss below is a plain (weighted) mean per batch
        self.class_weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None

    def create_optimizer(self) -> Any:
        model = self.model
        if self.optimizer is None and self.head_learning_rate is not None and model is not None:
            decay = set(self.get_decay_parameter_names(model))
            groups = []
            for head, rate in ((False, self.args.learning_rate), (True, self.head_learning_rate)):
                for decayed in (True, False):
                    params = [
                        p for n, p in model.named_parameters()
                        if p.requires_grad and n.startswith("classifier.") == head and (n in decay) == decayed
                    ]  # fmt: skip
                    if params:
                        groups.append({"params": params, "lr": rate,
                                       "weight_decay": self.args.weight_decay if decayed else 0.0})  # fmt: skip
            optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)  # type: ignore[arg-type]
            kwargs.pop("lr", None)
            self.optimizer = optimizer_cls(groups, lr=self.args.learning_rate, **kwargs)
        return super().create_optimizer()  # type: ignore[no-untyped-call]

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | None = None,
    ) -> Any:
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = weighted_cross_entropy(outputs.logits, labels, self.class_weights)
        return (loss, outputs) if return_outputs else loss


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean cross-entropy where an example of class c counts ``weights[c]`` (PyTorch's weighted mean)."""
    weight = None if weights is None else weights.to(logits.device, logits.dtype)
    return torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), weight=weight)


class BestEpoch(TrainerCallback):
    """After each epoch's evaluation: print one line, keep the best weights, stop on patience or budget.

    Args:
        metric: ``macro_f1``, ``accuracy`` (higher is better) or ``loss`` (lower is better).
        patience: epochs without improvement before stopping; 0 never stops early.
        budget_s: stop when the next epoch would not finish within this many seconds (None: no budget).
        say: where the per-epoch lines go.
    """

    def __init__(self, *, metric: str, patience: int, budget_s: float | None, say: Callable[[str], None]) -> None:
        if metric not in SELECT_METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(SELECT_METRICS)}")
        self.metric = metric
        self.patience = patience
        self.budget_s = budget_s
        self.say = say
        self.best_value: float | None = None
        self.best_epoch = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.history: list[dict[str, float]] = []
        self.stop_reason = ""
        self._started = time.monotonic()
        self._epoch_started = self._started
        self._train_loss: float | None = None

    def _better(self, value: float) -> bool:
        if self.best_value is None or math.isnan(self.best_value):
            return not math.isnan(value)
        return value < self.best_value if self.metric == "loss" else value > self.best_value

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self._started = self._epoch_started = time.monotonic()

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        logs: dict[str, float] | None = None, **kw: Any,
    ) -> None:  # fmt: skip
        if logs and "loss" in logs:
            self._train_loss = float(logs["loss"])

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if self.budget_s is not None and time.monotonic() - self._started > self.budget_s:
            control.should_training_stop = True  # the Trainer still ends the epoch, and so evaluates it
            self.stop_reason = f"the --max-minutes budget ran out in epoch {math.ceil(state.epoch or 0)}"

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        metrics: dict[str, float] | None = None, model: Any = None, **kw: Any,
    ) -> None:  # fmt: skip
        if not metrics:
            return
        now = time.monotonic()
        epoch = round(state.epoch or 0, 2)
        row = {
            "epoch": epoch,
            "train_loss": self._train_loss if self._train_loss is not None else float("nan"),
            "loss": float(metrics.get("eval_loss", float("nan"))),
            "accuracy": float(metrics.get("eval_accuracy", float("nan"))),
            "macro_f1": float(metrics.get("eval_macro_f1", float("nan"))),
            "seconds": now - self._epoch_started,
        }
        self.history.append(row)
        value = row[self.metric]
        improved = self._better(value)
        if improved and model is not None:
            self.best_value, self.best_epoch = value, len(self.history)
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        total = math.ceil(args.num_train_epochs) if args.max_steps <= 0 else "?"
        self.say(
            f"epoch {len(self.history)}/{total}  train loss {row['train_loss']:.4f}  val loss {row['loss']:.4f}  "
            f"accuracy {row['accuracy']:.3f}  macro-F1 {row['macro_f1']:.3f}  {row['seconds']:.0f} s"
            + ("  * best" if improved else "")
        )
        self._epoch_started = now
        if self.patience and len(self.history) - self.best_epoch >= self.patience:
            control.should_training_stop = True
            self.stop_reason = f"no better {self.metric} for {self.patience} epochs"
        elif self.budget_s is not None and not control.should_training_stop:
            elapsed = now - self._started
            per_epoch = elapsed / len(self.history)
            if elapsed + per_epoch > self.budget_s:
                control.should_training_stop = True
                self.stop_reason = "another epoch would not fit in --max-minutes"

    def restore_best(self, model: torch.nn.Module) -> None:
        """Load the best epoch's weights into ``model`` (a no-op if no epoch was evaluated)."""
        if self.best_state is not None:
            model.load_state_dict(copy.deepcopy(self.best_state))


def linear_probe(
    model: torch.nn.Module,
    batches: list[dict[str, torch.Tensor]],
    labels: torch.Tensor,
    class_weights: list[float] | None,
    *,
    l2: float = 1e-3,
) -> float | None:
    """Fit the classification head on the frozen encoder's features, before fine-tuning (LP-FT).

    A randomly initialised head sends noise back into a pretrained encoder during the first steps
    of fine-tuning and distorts its features (Kumar et al., "Fine-Tuning can Distort Pretrained
    Features", ICLR 2022); starting from the best linear head on the frozen features avoids that.
    The features are the head's own input (captured by a hook on ``model.classifier``), computed
    once without gradients; the head is then fitted with L-BFGS on the (class-weighted) loss.
    Returns the probe's training accuracy, or None when the head is not a single linear layer.
    """
    head = getattr(model, "classifier", None)
    if not isinstance(head, torch.nn.Linear):
        return None
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0].detach()))
    was_training = model.training
    model.eval()  # no dropout: the features the encoder gives
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch)
    finally:
        hook.remove()
        model.train(was_training)
    features = torch.cat(captured)
    weight = torch.zeros_like(head.weight, requires_grad=True)
    bias = torch.zeros_like(head.bias, requires_grad=True)
    class_w = torch.tensor(class_weights, dtype=features.dtype) if class_weights else None
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = features @ weight.T + bias
        loss = weighted_cross_entropy(logits, labels, class_w) + l2 * weight.pow(2).sum()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    optimizer.step(closure)  # type: ignore[no-untyped-call]
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
        return float(((features @ weight.T + bias).argmax(-1) == labels).float().mean())


def build_trainer(
    config: Any, out_dir: Path, model: torch.nn.Module, splits: tuple[Any, Any], *, collator: Any,
    labels: list[str], weights: list[float] | None, budget_s: float | None, tell: Callable[[str], None],
    **arguments: Any,
) -> tuple[WeightedLossTrainer, BestEpoch]:  # fmt: skip
    """The Trainer every family fine-tunes with: validation (accuracy, macro-F1) each epoch, the best
    epoch kept by :class:`BestEpoch`, the weighted loss and the head's own rate. ``config`` is a
    family's train config (its ``epochs``, ``batch_size``, rates, ``seed``, ``select_metric``,
    ``patience``...); ``arguments`` are a family's own ``TrainingArguments``."""
    import numpy as np
    from transformers import PrinterCallback

    from cloud_trainer.training.metrics import classification_metrics

    def compute_metrics(prediction: Any) -> dict[str, float]:
        predicted = np.asarray(prediction.predictions).argmax(-1).tolist()
        truth = np.asarray(prediction.label_ids).tolist()
        m = classification_metrics([labels[i] for i in predicted], [labels[i] for i in truth], labels=labels)
        return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}

    args = TrainingArguments(
        output_dir=str(out_dir / "trainer"),
        num_train_epochs=float(config.epochs or 1),
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=64,
        learning_rate=float(config.learning_rate or 0),
        weight_decay=config.weight_decay,
        warmup_ratio=float(config.warmup_ratio or 0),
        lr_scheduler_type="linear",
        seed=config.seed,
        data_seed=config.seed,
        eval_strategy="epoch",
        save_strategy="no",
        logging_strategy="epoch",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        **arguments,
    )
    best = BestEpoch(metric=config.select_metric, patience=config.patience, budget_s=budget_s, say=tell)
    trainer = WeightedLossTrainer(
        model=model,
        args=args,
        train_dataset=splits[0],
        eval_dataset=splits[1],
        data_collator=collator,
        compute_metrics=compute_metrics,
        callbacks=[best],
        class_weights=weights,
        head_learning_rate=config.head_learning_rate,
    )
    trainer.remove_callback(PrinterCallback)  # type: ignore[no-untyped-call]
    return trainer, best


def validation_metrics(trainer: Trainer, val_set: Any, labels: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The kept model's validation metrics, and ``evaluate``'s warnings (no better than the majority, a class
    never predicted)."""
    import numpy as np

    from cloud_trainer.training.evaluate import evaluate_predictions, format_report

    prediction = trainer.predict(val_set)  # length-grouped: rows come back in another order, with their labels
    predicted = [labels[i] for i in np.asarray(prediction.predictions).argmax(-1).tolist()]
    truth = [labels[i] for i in np.asarray(prediction.label_ids).tolist()]
    report = evaluate_predictions(predicted, truth, labels=labels, seconds=0.0)
    metrics = {key: report[key] for key in ("accuracy", "macro_f1", "per_class", "confusion_matrix")}
    metrics["split"] = "validation"
    metrics["examples"] = len(val_set)
    warnings = [line for line in format_report(report).splitlines() if line.startswith("WARNING:")]
    return metrics, [line.replace("the test data", "the validation split") for line in warnings]
