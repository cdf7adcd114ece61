"""Pixels for an image classifier: the bundle's preprocessing read from the model's own image
processor, the device's decoder for evaluation, and standard augmentation for training.

**Preprocessing.** A Hugging Face image processor (``AutoImageProcessor``) says how its model saw
images in pre-training: the resize, the crop, the rescale and the mean/std. It is translated once
into the bundle's :class:`~edge_agent.protocol.ImagePreprocessing`, and from then on that record
is the one definition: evaluation during training, the export gates, ``cloud-train evaluate`` and
the device all decode with :func:`edge_agent.runtime.imagecodec.decode_image` and normalise with
:func:`pixel_batch`, so the model is trained on exactly what it will be served. Where the
processor does something the bundle cannot say, the nearest equivalent is taken and a note says
so (the plan prints it).

**Augmentation** (training only): torchvision's ``RandomResizedCrop`` (a random area share of
``min_crop_scale``..1 and aspect ratio 3/4..4/3 of the decoded image, resized to the model's input
with the bundle's filter) and ``RandomHorizontalFlip``, written with Pillow and numpy.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from cloud_trainer.errors import CloudTrainError
from edge_agent.protocol import ImagePreprocessing

Filter = Literal["bilinear", "bicubic", "nearest"]
_PIL_FILTERS: dict[int, Filter] = {0: "nearest", 2: "bilinear", 3: "bicubic"}
"""Pillow's resampling numbers (what image processors store) that the device has."""
_NEAREST_FILTER: dict[int, tuple[Filter, str]] = {1: ("bicubic", "lanczos"), 4: ("bilinear", "box"),
                                                  5: ("bilinear", "hamming")}  # fmt: skip
_MODES = {1: "L", 3: "RGB"}


def preprocessing_from_processor(processor: Any, *, channels: int = 3,
                                 image_size: int | None = None) -> tuple[ImagePreprocessing, list[str]]:  # fmt: skip
    """The bundle's preprocessing for a slow Hugging Face image processor, and notes on what is approximated.

    ``channels``: the model's ``num_channels``; ``image_size``: its config's ``image_size``, used
    when the processor does not resize.
    """
    if channels not in _MODES:
        raise CloudTrainError(f"the model takes {channels} channels; image classifiers of 1 or 3 are supported")
    size = dict(getattr(processor, "size", None) or {}) if getattr(processor, "do_resize", True) else {}
    crop = dict(getattr(processor, "crop_size", None) or {}) if getattr(processor, "do_center_crop", False) else {}
    (resize, height, width), notes = _geometry(size, crop, getattr(processor, "crop_pct", None), image_size)
    resample, resample_notes = _resample(getattr(processor, "resample", None))
    scale = float(processor.rescale_factor) if getattr(processor, "do_rescale", True) else 1.0
    if getattr(processor, "do_normalize", True):
        mean, std = _per_channel(processor.image_mean, channels), _per_channel(processor.image_std, channels)
    else:
        mean, std = [0.0] * channels, [1.0] * channels
    pre = ImagePreprocessing(height=height, width=width, channels=channels, layout="NCHW", scale=scale, mean=mean,
                             std=std, resize=resize, resample=resample)  # fmt: skip
    return pre, notes + resample_notes


def _geometry(size: dict[str, Any], crop: dict[str, Any], crop_pct: float | None,
              image_size: int | None) -> tuple[tuple[int | None, int, int], list[str]]:  # fmt: skip
    """``(resize, height, width)`` for the processor's resize and crop settings, and notes."""
    if "height" in size and "width" in size:
        height, width = int(size["height"]), int(size["width"])
        if not crop or (int(crop["height"]), int(crop["width"])) == (height, width):
            return (None, height, width), []
        crop_h, crop_w = int(crop["height"]), int(crop["width"])
        note = (f"the processor resizes to {height}x{width} and crops {crop_h}x{crop_w}; the bundle scales the "
                f"shorter side to {min(height, width)} and crops (the same for square images)")  # fmt: skip
        return (min(height, width), crop_h, crop_w), [note]
    if "shortest_edge" in size:
        edge = int(size["shortest_edge"])
        notes = []
        if "longest_edge" in size:
            notes.append(f"the processor also caps the longest edge at {size['longest_edge']}; the bundle does not")
        if crop_pct is not None:  # ConvNeXt's rule: below 384, resize to edge / crop_pct and crop edge x edge
            return ((int(edge / crop_pct) if edge < 384 else None), edge, edge), notes
        if crop:
            return (edge, int(crop["height"]), int(crop["width"])), notes
        notes.append(f"the processor keeps the aspect ratio (shorter side {edge}, no crop); the bundle center-crops "
                     f"{edge}x{edge} so that every image has the model's fixed size")  # fmt: skip
        return (edge, edge, edge), notes
    if not size and image_size:
        note = f"the processor does not resize; images are scaled to the model's image_size {image_size}"
        return (None, int(image_size), int(image_size)), [note]
    raise CloudTrainError(f"cannot translate the image processor's size {size or None} into a fixed input size")


def _resample(value: Any) -> tuple[Filter, list[str]]:
    """The device's resampling filter for Pillow's number ``value`` (bilinear when unset), and a note if it differs."""
    number = 2 if value is None else int(value)
    if number in _PIL_FILTERS:
        return _PIL_FILTERS[number], []
    if number in _NEAREST_FILTER:
        ours, theirs = _NEAREST_FILTER[number]
        return ours, [f"the processor resizes with {theirs}; the device has {ours}, which is used instead"]
    raise CloudTrainError(f"the image processor's resampling filter {number} is not one Pillow names")


def _per_channel(value: Any, channels: int) -> list[float]:
    values = [float(value)] * channels if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != channels:
        raise CloudTrainError(f"the image processor's mean/std have {len(values)} values for {channels} channels")
    return values


def describe(pre: ImagePreprocessing) -> str:
    """One line for the plan: what every image goes through."""
    steps = (
        f"shorter side to {pre.resize} ({pre.resample}), center crop {pre.height}x{pre.width}"
        if pre.resize
        else f"scaled to {pre.height}x{pre.width} ({pre.resample})"
    )
    mean = ", ".join(f"{m:g}" for m in pre.mean)
    std = ", ".join(f"{s:g}" for s in pre.std)
    return f"{steps}; x{pre.scale:.5g}, mean [{mean}], std [{std}], {pre.layout}, {'RGB' if pre.channels == 3 else 'L'}"


# -- the device's path ----------------------------------------------------------------------------
def decode(data: bytes, pre: ImagePreprocessing) -> npt.NDArray[np.uint8]:
    """``height x width x channels`` uint8, decoded, resized and cropped by the device's own decoder."""
    from edge_agent.runtime.imagecodec import ImageDecodeError, decode_image

    try:
        return decode_image(data, pre).pixels
    except ImageDecodeError as exc:
        raise CloudTrainError(f"image {exc}") from None


def pixel_batch(images: Sequence[npt.NDArray[Any]], pre: ImagePreprocessing) -> npt.NDArray[np.float32]:
    """Model input for ``height x width x channels`` pixel arrays: ``(pixels * scale - mean) / std`` per
    channel, in the bundle's channel order and layout (what :class:`edge_agent.runtime.ImageClassifier`
    feeds onnxruntime; a test holds the two equal)."""
    batch: npt.NDArray[Any] = np.asarray(images, dtype=np.float32)
    if batch.ndim == 3:
        batch = batch[..., np.newaxis]
    if pre.channel_order == "BGR":
        batch = batch[..., ::-1]
    batch = (batch * pre.scale - np.asarray(pre.mean, dtype=np.float32)) / np.asarray(pre.std, dtype=np.float32)
    if pre.layout == "NCHW":
        batch = batch.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(batch, dtype=np.float32)


# -- augmentation ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Augmentation:
    """Training-time augmentation. ``min_crop_scale`` 1.0 with ``hflip`` False leaves the device's path."""

    min_crop_scale: float = 0.08
    max_aspect: float = 4 / 3
    hflip: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.min_crop_scale <= 1:
            raise CloudTrainError(f"min crop scale must be in (0, 1], not {self.min_crop_scale}")
        if self.max_aspect < 1:
            raise CloudTrainError(f"max aspect must be at least 1, not {self.max_aspect}")


def random_resized_box(width: int, height: int, aug: Augmentation, rng: random.Random) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params``: a box ``(left, top, right, bottom)`` of a random
    area share and aspect ratio; after ten misses, the largest center box within the ratio range."""
    area = width * height
    log_low, log_high = math.log(1 / aug.max_aspect), math.log(aug.max_aspect)
    for _ in range(10):
        target = area * rng.uniform(aug.min_crop_scale, 1.0)
        aspect = math.exp(rng.uniform(log_low, log_high))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    ratio = width / height
    if ratio < 1 / aug.max_aspect:
        w, h = width, round(width * aug.max_aspect)
    elif ratio > aug.max_aspect:
        w, h = round(height * aug.max_aspect), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def augmented(path: Path, pre: ImagePreprocessing, aug: Augmentation, rng: random.Random) -> npt.NDArray[np.uint8]:
    """One training image: decoded, a random resized crop to the model's size, maybe flipped."""
    from PIL import Image

    filters = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
               "nearest": Image.Resampling.NEAREST}  # fmt: skip
    mode = _MODES[pre.channels]
    with Image.open(path, formats=("JPEG", "PNG")) as image:
        if image.format == "JPEG":  # DCT scaling: a photo far larger than needed decodes at 1/2..1/8 of the work,
            side = math.sqrt(aug.min_crop_scale)  # still large enough that the smallest crop is not upscaled
            image.draft(mode, (math.ceil(pre.width / side), math.ceil(pre.height / side)))
        converted = image.convert(mode) if image.mode != mode else image.copy()
    box = random_resized_box(*converted.size, aug, rng)
    resized = converted.resize((pre.width, pre.height), filters[pre.resample], box=box)
    pixels = np.asarray(resized, dtype=np.uint8)
    if aug.hflip and rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    return pixels[..., np.newaxis] if pixels.ndim == 2 else np.ascontiguousarray(pixels)
