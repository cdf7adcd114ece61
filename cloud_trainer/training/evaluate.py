"""Score a model on a labelled test set: a bundle, a registered version, or a training run.

Bundles (on disk or in the registry) run through the device's own runtime
(``edge_agent.runtime.load_classifier``, onnxruntime on the CPU), so the labels scored are the
labels a device would serve. A training run's checkpoint runs in torch, fed by the device's
preprocessing: the text family's through :class:`edge_agent.runtime.text.TextEncoder`, the image
family's through the device's image decoder (:mod:`cloud_trainer.training.images.preprocessing`); the run's
family (:mod:`cloud_trainer.training.families`) opens it. Only prediction is timed.

Test data is texts (CSV, TSV, JSONL or Parquet with a text and a label column) for text models,
and images (an image folder with one sub-folder per label, or a table of image paths and labels)
for image models: :func:`evaluate_file` reads whichever the model takes.

Library use (``cloud-train train --test-data`` calls :func:`evaluate_file`)::

    report = evaluate_predictions(predicted, truth, labels=labels, seconds=elapsed)
    print(format_report(report))
    report = evaluate_source("intents:2", texts, truth, registry_root=root)
    report = evaluate_file("birds:3", Path("test-images/"), registry_root=root)
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from cloud_trainer.errors import BundleError, CloudTrainError, DataError
from cloud_trainer.training.metrics import classification_metrics, format_metrics

BATCH_SIZE = 32
"""Texts or images per forward pass, for bundles and for checkpoints alike."""
UNITS = {"texts": "text", "images": "image"}


@dataclass(frozen=True)
class SourceModel:
    """A model ready to label inputs, and what a report says about where it came from.

    ``predict`` takes ``inputs`` (texts, or images as their encoded JPEG/PNG bytes) and returns
    one label per input, from ``labels``.
    """

    labels: list[str]
    predict: Callable[[Sequence[Any]], list[str]]
    about: dict[str, Any] = field(default_factory=dict)
    inputs: Literal["texts", "images"] = "texts"


# -- metrics -------------------------------------------------------------------------------------
def check_known_labels(truth: Sequence[str], labels: Sequence[str]) -> None:
    """Refuse test labels the model cannot predict, naming them (scoring them would mean nothing)."""
    unknown = sorted(set(truth) - set(labels))
    if unknown:
        raise CloudTrainError(
            f"the test data has label(s) the model does not know: {', '.join(unknown)} "
            f"(the model's labels: {', '.join(labels)})"
        )


def evaluate_predictions(
    predicted: list[str], truth: list[str], *, labels: list[str], seconds: float, unit: str = "text"
) -> dict[str, Any]:
    """A test-set report: :func:`~cloud_trainer.training.metrics.classification_metrics` and what puts it in context.

    Added keys: ``examples``; ``majority_baseline`` (``label``, ``accuracy``, ``macro_f1`` of always
    predicting the most common true label, ties to the first in ``labels``); ``beats_majority``
    (strictly better on accuracy and on macro-F1); ``never_predicted`` (labels with examples in
    ``truth`` that the model never predicted); ``labels_without_examples`` (model labels absent
    from ``truth``; they count as F1 0 in macro-F1, for the model and the baseline alike);
    ``latency_ms_per_text`` (``seconds`` spent predicting, per text; ``latency_ms_per_image`` with
    ``unit="image"``).

    Raises ``CloudTrainError`` if ``truth`` has labels that are not in ``labels``.
    """
    check_known_labels(truth, labels)
    strange = sorted(set(predicted) - set(labels))
    if strange:
        raise CloudTrainError(f"the model predicted label(s) outside its label list: {', '.join(strange)}")
    if len(predicted) != len(truth) or not truth:
        raise CloudTrainError(f"need one prediction per test text: {len(predicted)} predictions, {len(truth)} texts")
    report = classification_metrics(predicted, truth, labels=labels)
    counts = Counter(truth)
    majority = max(labels, key=lambda label: (counts[label], -labels.index(label)))
    baseline = classification_metrics([majority] * len(truth), truth, labels=labels)
    produced = set(predicted)
    report.update(
        examples=len(truth),
        majority_baseline={"label": majority, "accuracy": baseline["accuracy"], "macro_f1": baseline["macro_f1"]},
        beats_majority=report["accuracy"] > baseline["accuracy"] and report["macro_f1"] > baseline["macro_f1"],
        never_predicted=[label for label in labels if counts[label] and label not in produced],
        labels_without_examples=[label for label in labels if not counts[label]],
    )
    report[f"latency_ms_per_{unit}"] = 1000.0 * seconds / len(truth)
    return report


def format_report(report: dict[str, Any]) -> str:
    """The metrics table, the majority baseline, latency, and ``WARNING:`` lines that are hard to miss.

    Takes :func:`evaluate_predictions`' report, or :func:`evaluate_source`'s (which also names the source).
    """
    lines = []
    if "source" in report:
        about = f"source: {report['source']} ({report['kind']}"
        if "version" in report:
            about += f"; {report['model']} v{report['version']}, quantization {report['quantization']}"
        lines.append(about + ")")
    lines.append(format_metrics(report))
    base = report["majority_baseline"]
    lines.append(
        f"{report['examples']} examples; majority baseline (always {base['label']!r}): "
        f"accuracy {base['accuracy']:.3f}   macro-F1 {base['macro_f1']:.3f}"
    )
    unit = "image" if "latency_ms_per_image" in report else "text"
    lines.append(f"latency {report[f'latency_ms_per_{unit}']:.3f} ms per {unit} (prediction only)")
    if report["labels_without_examples"]:
        lines.append(f"no test examples of: {', '.join(report['labels_without_examples'])} (F1 0 in macro-F1)")
    if not report["beats_majority"]:
        lines.append(
            f"WARNING: the model does NOT beat the majority baseline (accuracy {report['accuracy']:.3f} vs "
            f"{base['accuracy']:.3f}, macro-F1 {report['macro_f1']:.3f} vs {base['macro_f1']:.3f})"
        )
    if report["never_predicted"]:
        lines.append(
            f"WARNING: the model NEVER predicts {', '.join(report['never_predicted'])}, "
            "though the test data has examples of it"
        )
    return "\n".join(lines)


# -- sources -------------------------------------------------------------------------------------
def open_bundle(bundle_dir: Path) -> SourceModel:
    """A text- or image-classification bundle, verified file by file, served by the device's runtime."""
    from edge_agent.protocol import Manifest, ProtocolError, verify_bundle_files
    from edge_agent.runtime import InputError, ModelLoadError, load_classifier

    try:
        manifest = Manifest.read(bundle_dir)
        verify_bundle_files(bundle_dir, manifest)
    except ProtocolError as exc:
        raise BundleError(f"bundle {bundle_dir}: {exc}") from None
    inputs = _TASK_INPUTS.get(manifest.task)
    if inputs is None:
        raise BundleError(f"bundle {bundle_dir} is {manifest.task}; evaluate scores text and image classifiers")
    try:
        classifier = load_classifier(bundle_dir, manifest, providers=["CPUExecutionProvider"])
    except ModelLoadError as exc:
        raise BundleError(f"bundle {bundle_dir}: {exc}") from None

    def predict(items: Sequence[Any]) -> list[str]:
        labels: list[str] = []
        for start in range(0, len(items), BATCH_SIZE):
            batch = items[start : start + BATCH_SIZE]
            try:
                labels += [p.label for p in classifier.predict(batch)]
            except InputError as exc:  # an image the device could not decode either
                raise DataError(f"test inputs {start} to {start + len(batch) - 1}: {exc}") from None
        return labels

    about = {"model": manifest.model, "version": manifest.version, "quantization": manifest.quantization}
    return SourceModel(labels=list(manifest.labels), predict=predict, about=about, inputs=inputs)


_TASK_INPUTS: dict[str, Literal["texts", "images"]] = {"text-classification": "texts", "image-classification": "images"}


def open_run(run_dir: Path) -> SourceModel:
    """A text training run's ``checkpoint/`` in torch (eval mode), tokenized by the device's ``TextEncoder``."""
    from edge_agent.protocol import TextPreprocessing

    checkpoint = run_dir / "checkpoint"
    try:
        info = json.loads((run_dir / "run.json").read_text())
        labels = [str(label) for label in info["labels"]]
        if "preprocessing" in info:
            pre = TextPreprocessing.model_validate(info["preprocessing"])
        else:
            pre = TextPreprocessing(tokenizer="tokenizer.json", max_length=int(info["hyperparameters"]["max_length"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{run_dir} is not a finished text training run: run.json: {exc!r}") from None
    if (checkpoint / "model.pt").is_file():
        raise DataError(f"{run_dir} is a digits run; evaluate scores text classifiers")
    if not (checkpoint / "tokenizer.json").is_file():
        raise DataError(f"{run_dir} has no checkpoint/tokenizer.json; is the run finished?")
    encoder = _run_encoder(checkpoint / "tokenizer.json", pre)
    forward, inputs = _run_model(checkpoint, len(labels))

    def predict(texts: Sequence[str]) -> list[str]:
        import torch

        predicted: list[str] = []
        with torch.inference_mode():
            for start in range(0, len(texts), BATCH_SIZE):
                arrays = encoder.encode(texts[start : start + BATCH_SIZE])
                logits = forward(**{name: torch.from_numpy(arrays[name]) for name in inputs}).logits
                predicted += [labels[i] for i in logits.argmax(dim=-1).tolist()]
        return predicted

    return SourceModel(labels=labels, predict=predict)


def _run_encoder(tokenizer_file: Path, pre: Any) -> Any:
    from tokenizers import Tokenizer

    from edge_agent.runtime import ModelLoadError
    from edge_agent.runtime.text import TextEncoder

    try:
        return TextEncoder(Tokenizer.from_file(str(tokenizer_file)), pre)
    except ModelLoadError as exc:
        raise DataError(f"{tokenizer_file}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception
        raise DataError(f"cannot load tokenizer {tokenizer_file}: {exc}") from None


def _run_model(checkpoint: Path, num_labels: int) -> tuple[Any, list[str]]:
    """The checkpoint in eval mode, and which of the encoder's arrays its forward takes."""
    import inspect

    from transformers import AutoModelForSequenceClassification

    import export.pooling  # noqa: F401 - registers the mean-pooling classifier with the Auto classes

    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(checkpoint))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot load checkpoint {checkpoint}: {exc}") from None
    if model.config.num_labels != num_labels:
        raise DataError(f"checkpoint {checkpoint} has {model.config.num_labels} outputs; run.json lists {num_labels}")
    model.eval()
    accepted = inspect.signature(model.forward).parameters
    return model, [name for name in ("input_ids", "attention_mask", "token_type_ids") if name in accepted]


def open_source(source: str, *, registry_root: Path) -> SourceModel:
    """What ``source`` names: a bundle directory (``manifest.json``), a run directory (``run.json``),
    or ``MODEL[:VERSION]`` in the registry at ``registry_root`` (newest version without one).
    """
    from cloud_trainer.releases.registry import Registry, RegistryError, parse_ref
    from edge_agent.protocol import MANIFEST_NAME

    path = Path(source)
    if path.is_dir():
        if (path / MANIFEST_NAME).is_file():
            found = open_bundle(path)
            return replace(found, about={"source": source, "kind": "bundle", **found.about})
        if (path / "run.json").is_file():
            from cloud_trainer.training.families import family_of_run

            found = family_of_run(path).open_run(path)
            return replace(found, about={"source": source, "kind": "run", **found.about})
        raise CloudTrainError(
            f"cannot evaluate {source!r}: a directory with neither {MANIFEST_NAME} (a bundle) nor run.json "
            "(a training run)"
        )
    try:
        entry = Registry(registry_root).verified(*parse_ref(source))
    except RegistryError as exc:
        raise CloudTrainError(
            f"cannot evaluate {source!r}: not a bundle or training run directory, and not a registered "
            f"MODEL[:VERSION]: {exc}"
        ) from None
    found = open_bundle(entry.bundle_dir)
    return replace(found, about={"source": source, "kind": "registry", **found.about})


def evaluate_source(
    source: str, inputs: Sequence[Any], labels: Sequence[str], *, registry_root: Path
) -> dict[str, Any]:
    """Label ``inputs`` (texts, or encoded images for an image model) with the model ``source`` names
    (see :func:`open_source`) and score against ``labels``.

    The report is :func:`evaluate_predictions`' with ``source``, ``kind`` (bundle, registry or run)
    and, for bundles, ``model``, ``version`` and ``quantization`` first. Test labels the model does
    not know are refused before anything runs.
    """
    if len(inputs) != len(labels) or not inputs:
        raise DataError(f"need one label per input, and at least one: {len(inputs)} inputs, {len(labels)} labels")
    model = open_source(source, registry_root=registry_root)
    check_known_labels(labels, model.labels)
    start = time.perf_counter()
    predicted = model.predict(list(inputs))
    seconds = time.perf_counter() - start
    scored = evaluate_predictions(predicted, list(labels), labels=model.labels, seconds=seconds,
                                  unit=UNITS[model.inputs])  # fmt: skip
    return {**model.about, **scored}


def source_inputs(source: str, *, registry_root: Path) -> Literal["texts", "images"] | None:
    """What the model ``source`` names takes, read from its manifest or ``run.json`` without loading
    it; None when that cannot be told (:func:`open_source` then names the problem)."""
    from cloud_trainer.releases.registry import Registry, parse_ref
    from cloud_trainer.training.families import family_of_run
    from edge_agent.protocol import MANIFEST_NAME

    path = Path(source)
    try:
        if path.is_dir() and (path / MANIFEST_NAME).is_file():
            task = json.loads((path / MANIFEST_NAME).read_text()).get("task")
        elif path.is_dir() and (path / "run.json").is_file():
            return family_of_run(path).inputs
        elif path.is_dir():
            return None
        else:
            task = Registry(registry_root).get(*parse_ref(source)).manifest.task
    except (CloudTrainError, OSError, ValueError, AttributeError):
        return None
    return _TASK_INPUTS.get(str(task))


def load_test_data(
    path: Path, inputs: Literal["texts", "images"], *, text_column: str = "text", image_column: str = "image",
    label_column: str = "label",
) -> tuple[list[Any], list[str]]:  # fmt: skip
    """Labelled test inputs of the kind a model takes: texts from a table, or images (their encoded
    bytes) from an image folder or a table of image paths."""
    if inputs == "images":
        from cloud_trainer.training.images.data import load_images

        images = load_images(path, image_column=image_column, label_column=label_column)
        return images.read(), list(images.labels)
    from cloud_trainer.training.data import load_labelled

    texts = load_labelled(path, text_column=text_column, label_column=label_column)
    return list(texts.texts), list(texts.labels)


def evaluate_file(source: str, data: Path, *, registry_root: Path, text_column: str = "text",
                  image_column: str = "image", label_column: str = "label") -> dict[str, Any]:  # fmt: skip
    """:func:`evaluate_source` on the labelled test data in ``data`` (texts or images, whichever the model
    takes; see :func:`load_test_data`); the report starts with ``data``."""
    kind = source_inputs(source, registry_root=registry_root)
    if kind is None:  # a source that cannot be read: its error, not the data's, is the one to show
        kind = open_source(source, registry_root=registry_root).inputs
    inputs, labels = load_test_data(data, kind, text_column=text_column, image_column=image_column,
                                    label_column=label_column)  # fmt: skip
    return {"data": str(data), **evaluate_source(source, inputs, labels, registry_root=registry_root)}
