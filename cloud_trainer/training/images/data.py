"""Labelled images: an image folder (one sub-folder per class) or a table of image paths and labels.

A table is CSV, TSV, JSONL or Parquet with an image-path column and a label column; relative paths
are relative to the table's own directory. Images are JPEG or PNG, what a device accepts. Every
image is opened (its header read, not its pixels) when the set is loaded, so a missing or broken
file is named before training starts rather than in the middle of an epoch.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cloud_trainer.errors import DataError
from cloud_trainer.training.data import LabelledTexts, read_table, stratified_split
from edge_agent.protocol import sha256_file

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class LabelledImages:
    """Image files and their labels, in the same order."""

    paths: list[Path]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def label_names(self) -> list[str]:
        return sorted(set(self.labels))

    def read(self) -> list[bytes]:
        """Every image's encoded bytes, in order (what a device would be sent)."""
        return [path.read_bytes() for path in self.paths]


def load_images(path: Path, *, image_column: str = "image", label_column: str = "label") -> LabelledImages:
    """An image folder (``path/<label>/*.png|jpg``) or a table naming images; see the module docstring."""
    if path.is_dir():
        data = _from_folder(path)
    else:
        data = _from_table(path, image_column=image_column, label_column=label_column)
    if not len(data):
        raise DataError(f"image data set {path} has no JPEG or PNG images")
    if len(data.label_names) < 2:
        raise DataError(f"image data set {path} has only one label ({data.label_names[0]!r}); need at least two")
    for image in data.paths:
        check_image(image)
    return data


def _from_folder(folder: Path) -> LabelledImages:
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"image folder {folder} has no sub-folders; put each class's images in a folder named after it")
    paths: list[Path] = []
    labels: list[str] = []
    for sub in classes:
        for image in sorted(sub.iterdir()):
            if image.is_file() and image.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(image.resolve())
                labels.append(sub.name)
    return LabelledImages(paths, labels)


def _from_table(table: Path, *, image_column: str, label_column: str) -> LabelledImages:
    columns, rows = read_table(table)
    for column in (image_column, label_column):
        if column not in columns:
            raise DataError(
                f"data set {table} has no column {column!r} (columns: {', '.join(columns) or 'none'}); "
                "image tables need an image-path column (--image-column) and a label column (--label-column)"
            )
    base = table.resolve().parent
    paths: list[Path] = []
    labels: list[str] = []
    for number, row in enumerate(rows, start=1):
        name, label = row.get(image_column), row.get(label_column)
        name = name.strip() if isinstance(name, str) else ""
        label = str(label).strip() if label is not None and not isinstance(label, (dict, list)) else ""
        if not name or not label:
            raise DataError(f"data set {table} row {number}: empty {image_column if not name else label_column}")
        image = Path(name).expanduser()
        paths.append(image if image.is_absolute() else base / image)
        labels.append(label)
    return LabelledImages(paths, labels)


def check_image(path: Path) -> None:
    """Refuse, by name, a file that is missing, not JPEG or PNG, or whose header Pillow cannot read."""
    from PIL import Image, UnidentifiedImageError

    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise DataError(f"image {path}: only JPEG and PNG are accepted (what a device decodes)")
    try:
        with Image.open(path, formats=("JPEG", "PNG")):  # parses the header only
            pass
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"image {path} is not a readable JPEG or PNG: {exc}") from None


def split_images(data: LabelledImages, *, val_fraction: float, seed: int) -> tuple[LabelledImages, LabelledImages]:
    """The same stratified, seeded split as the text family (:func:`cloud_trainer.training.data.stratified_split`)."""
    train, val = stratified_split(LabelledTexts([str(p) for p in data.paths], data.labels), val_fraction=val_fraction,
                                  seed=seed)  # fmt: skip
    return (
        LabelledImages([Path(p) for p in train.texts], train.labels),
        LabelledImages([Path(p) for p in val.texts], val.labels),
    )


def images_sha256(data: LabelledImages) -> str:
    """A content hash of the set: each image's sha256 and label, in a sorted order (file names and
    where the images live do not change it; a changed pixel or label does)."""
    entries = sorted(f"{sha256_file(path)} {label}" for path, label in zip(data.paths, data.labels, strict=True))
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def write_image_table(path: Path, data: LabelledImages) -> None:
    """A CSV (``image,label``, absolute paths) that :func:`load_images` reads back."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label"])
        writer.writerows((str(p.resolve()), label) for p, label in zip(data.paths, data.labels, strict=True))
