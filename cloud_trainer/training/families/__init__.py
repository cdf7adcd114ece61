"""Model families on the cloud side, found by name instead of ``if`` chains.

=========  ==============================================================================  ==========
family     what it trains                                                                  module
=========  ==============================================================================  ==========
text       a Hugging Face text classifier, fine-tuned on labelled texts (default: MiniLM)  ``text``
digits     a small CNN from scratch on scikit-learn's 8x8 digits                           ``digits``
image      a Hugging Face image classifier (ResNet, ViT, ConvNeXt...), fine-tuned on an   ``image``
           image folder or a table of image paths
=========  ==============================================================================  ==========

``cloud-train train --family NAME`` calls ``family(NAME).train(args)``; ``cloud-train export`` and
``cloud-train evaluate`` find a run's family from its ``run.json`` (:func:`family_of_run`). A new
family is one module with a :class:`Family` subclass and one entry in :data:`_BUILTIN` below (or a
call to :func:`register` from anywhere).
"""

from __future__ import annotations

from pathlib import Path

from cloud_trainer.errors import CloudTrainError, DataError
from cloud_trainer.training.families.base import ExportOptions, Family, read_run_info
from cloud_trainer.training.families.digits import DigitsFamily
from cloud_trainer.training.families.image import ImageFamily
from cloud_trainer.training.families.text import TextFamily

__all__ = ["ExportOptions", "Family", "family", "family_of_run", "names", "register", "train_options"]

_REGISTRY: dict[str, Family] = {}


def register(new: Family) -> Family:
    """Make ``new`` available by its name; a name is registered once."""
    if new.name in _REGISTRY:
        raise ValueError(f"a family named {new.name!r} is already registered")
    _REGISTRY[new.name] = new
    return new


def names() -> list[str]:
    """Registered family names, the default (text) first."""
    return list(_REGISTRY)


def family(name: str) -> Family:
    """The family called ``name``; ``CloudTrainError`` naming the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise CloudTrainError(f"unknown family {name!r}; known: {', '.join(_REGISTRY)}") from None


def train_options() -> set[str]:
    """Every family-specific ``cloud-train train`` option (argparse ``dest``) some family reads."""
    return {option for registered in _REGISTRY.values() for option in registered.train_options}


def family_of_run(run_dir: Path) -> Family:
    """The family a training run belongs to, from its ``run.json`` (runs from before families were
    recorded: a ``checkpoint/model.pt`` is digits, anything else text)."""
    if not (run_dir / "run.json").is_file():
        raise DataError(f"{run_dir} is not a training run: it has no run.json (is the run finished?)")
    info = read_run_info(run_dir)
    for candidate in _REGISTRY.values():
        if candidate.owns_run(info, run_dir):
            return candidate
    recorded = info.get("family")
    if recorded is not None:
        raise DataError(f"{run_dir} is a run of family {recorded!r}, which is not registered ({', '.join(_REGISTRY)})")
    return _REGISTRY["text"]


_BUILTIN: tuple[Family, ...] = (TextFamily(), DigitsFamily(), ImageFamily())
for _family in _BUILTIN:
    register(_family)
