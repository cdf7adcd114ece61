"""Tiny Hugging Face image classifiers and an image folder of rendered shapes, for the image family's tests.

Nothing is downloaded: the models are built from their transformers configs with random weights
and saved with ``save_pretrained`` beside an image processor config, as a hub checkpoint would be.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")


def render_shape(shape: str, rng: random.Random, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A filled shape of a random colour, size and place on a random dark background."""
    width, height = size
    background = tuple(rng.randint(0, 70) for _ in range(3))
    colour = tuple(rng.randint(150, 255) for _ in range(3))
    image = Image.new("RGB", size, background)  # type: ignore[arg-type]
    draw = ImageDraw.Draw(image)
    side = rng.randint(int(min(size) * 0.55), int(min(size) * 0.8))
    left, top = rng.randint(0, width - side), rng.randint(0, height - side)
    box = (left, top, left + side, top + side)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(left + side / 2, top), (left, top + side), (left + side, top + side)], fill=colour)
    return image


def write_shapes(folder: Path, *, per_class: int, seed: int = 0, jpeg_every: int = 4) -> Path:
    """``folder/<shape>/<n>.png`` (every ``jpeg_every``-th a JPEG), landscape and portrait, larger than the crop."""
    rng = random.Random(seed)
    for shape in SHAPES:
        (folder / shape).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            size = (48, 40) if index % 2 == 0 else (40, 52)
            image = render_shape(shape, rng, size)
            if jpeg_every and index % jpeg_every == jpeg_every - 1:
                image.save(folder / shape / f"{index}.jpg", quality=92)
            else:
                image.save(folder / shape / f"{index}.png")
    return folder


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def save_tiny_resnet(directory: Path, *, num_labels: int = 3) -> Path:
    """A ResNet of a few thousand parameters and a ConvNeXt-style processor (shorter side 32 / 0.875 = 36,
    center crop 32): ``AutoModelForImageClassification`` and ``AutoImageProcessor`` load it."""
    import torch
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                          num_labels=num_labels)  # fmt: skip
    ResNetForImageClassification(config).save_pretrained(directory)
    ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875).save_pretrained(directory)
    return directory


def save_tiny_vit(directory: Path, *, num_labels: int = 3) -> Path:
    """A two-layer ViT on 32x32 images (8x8 patches) and its processor (scaled straight to 32x32, mean/std 0.5)."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=num_labels)  # fmt: skip
    ViTForImageClassification(config).save_pretrained(directory)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory
