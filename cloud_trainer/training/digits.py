"""The second model family: a small CNN trained from scratch on scikit-learn's bundled 8x8 digits.

scikit-learn ships the data set (1,797 images, 10 classes), so nothing is downloaded. Pixels are
0..16; the network sees ``(x / 16 - 0.5) / 0.5`` in NCHW, exactly what the bundle's
:class:`~edge_agent.protocol.ImagePreprocessing` tells the device to do.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cloud_trainer.training.metrics import classification_metrics

LABELS = [str(i) for i in range(10)]
SCALE, MEAN, STD = 1 / 16, 0.5, 0.5
DATASET = "sklearn-digits"


@dataclass(frozen=True, kw_only=True)
class DigitsConfig:
    epochs: int = 15
    batch_size: int = 64
    learning_rate: float = 1e-3
    val_fraction: float = 0.2
    seed: int = 42


@dataclass(frozen=True)
class DigitsSplit:
    train_images: npt.NDArray[np.float32]
    train_labels: npt.NDArray[np.int64]
    val_images: npt.NDArray[np.float32]
    val_labels: npt.NDArray[np.int64]
    dataset_sha256: str


@dataclass(frozen=True)
class DigitsRun:
    run_dir: Path
    checkpoint: Path
    metrics: dict[str, Any]


def load_split(*, val_fraction: float, seed: int) -> DigitsSplit:
    """The digits as raw 0..16 pixel arrays (N, 8, 8), split stratified and reproducibly."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32)
    labels = digits.target.astype(np.int64)
    tr_x, va_x, tr_y, va_y = train_test_split(
        images, labels, test_size=val_fraction, random_state=seed, stratify=labels
    )
    sha = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    return DigitsSplit(tr_x, tr_y, va_x, va_y, sha)


def normalise(images: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Raw (N, 8, 8) pixels to the network's (N, 1, 8, 8) input; the device does the same from the manifest."""
    result: npt.NDArray[np.float32] = ((images * SCALE - MEAN) / STD)[:, np.newaxis].astype(np.float32)
    return result


def build_cnn() -> Any:
    """Two 3x3 convolutions, a 2x2 pool, two linear layers: about 40k parameters."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, len(LABELS)),
    )  # fmt: skip


def load_cnn(checkpoint: Path) -> Any:
    import torch

    model = build_cnn()
    model.load_state_dict(torch.load(checkpoint / "model.pt", weights_only=True))
    return model.eval()


def train_digits(run_dir: Path, *, config: DigitsConfig | None = None, progress: bool = False) -> DigitsRun:
    """Train the CNN (GPU when there is one), evaluate on the validation split, save the run."""
    import torch

    config = config or DigitsConfig()
    torch.manual_seed(config.seed)
    split = load_split(val_fraction=config.val_fraction, seed=config.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_cnn().to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    x = torch.from_numpy(normalise(split.train_images)).to(device)
    y = torch.from_numpy(split.train_labels).to(device)
    generator = torch.Generator().manual_seed(config.seed)
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), config.batch_size):
            batch = order[start : start + config.batch_size]
            optimiser.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
            total += float(loss.detach()) * len(batch)
        if progress:
            print(f"epoch {epoch + 1}/{config.epochs}: loss {total / len(x):.4f}")
    model.eval().cpu()
    with torch.inference_mode():
        predicted = model(torch.from_numpy(normalise(split.val_images))).argmax(-1).numpy()
    metrics = classification_metrics(
        [LABELS[i] for i in predicted], [LABELS[i] for i in split.val_labels], labels=LABELS
    )
    metrics["train_examples"], metrics["val_examples"] = len(split.train_labels), len(split.val_labels)
    checkpoint = run_dir / "checkpoint"
    checkpoint.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), checkpoint / "model.pt")
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    info = {"family": "digits", "dataset": DATASET, "dataset_sha256": split.dataset_sha256,
            "hyperparameters": asdict(config), "labels": LABELS}  # fmt: skip
    (run_dir / "run.json").write_text(json.dumps(info, indent=2))
    return DigitsRun(run_dir=run_dir, checkpoint=checkpoint, metrics=metrics)


def export_digits(
    run_dir: Path,
    bundle_dir: Path,
    *,
    model: str = "digits",
    version: int,
    quantization: str = "static-int8",
    max_accuracy_drop: float = 1.0,
    max_f1_drop: float = 0.02,
    parent_version: int | None = None,
) -> Any:
    """Export a digits run to a bundle through the gates; returns :class:`export.ExportResult`."""
    from edge_agent.protocol import ImagePreprocessing, Lineage
    from export.image import ImageExportRequest, export_image_classifier

    info = json.loads((run_dir / "run.json").read_text())
    pytorch = json.loads((run_dir / "metrics.json").read_text())
    hyper = info["hyperparameters"]
    split = load_split(val_fraction=hyper["val_fraction"], seed=hyper["seed"])
    return export_image_classifier(
        ImageExportRequest(
            network=load_cnn(run_dir / "checkpoint"), example_shape=(1, 1, 8, 8),
            preprocessing=ImagePreprocessing(height=8, width=8, channels=1, scale=SCALE, mean=[MEAN], std=[STD]),
            labels=LABELS, val_images=list(split.val_images), val_labels=[LABELS[i] for i in split.val_labels],
            calibration_images=list(split.train_images[:320]),
            bundle_dir=bundle_dir, work_dir=run_dir / "export", model=model, version=version,
            lineage=Lineage(base_model="DigitsCNN (from scratch)", dataset_sha256=info["dataset_sha256"],
                            parent_version=parent_version, hyperparameters=hyper),
            pytorch_metrics={k: pytorch[k] for k in ("accuracy", "macro_f1", "train_examples", "val_examples")},
            quantization=quantization, max_accuracy_drop=max_accuracy_drop, max_f1_drop=max_f1_drop,
        )
    )  # fmt: skip
