"""Text classification: the bundle's tokenizer (``tokenizers``, no transformers) into onnxruntime.

:class:`TextEncoder` is the one implementation of text preprocessing. The trainer, the exporter's
gates, ``cloud-train evaluate`` and the device all call it, so the tokens a model was trained on
are the tokens it is served with, head+tail truncation included.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_agent.protocol.manifest import Manifest, TextPreprocessing, safe_relative_path
from edge_agent.runtime.classifier import Classifier, Feeds, InputError
from edge_agent.runtime.session import ModelLoadError, ProviderSpec
from edge_agent.runtime.task import ClassificationTask, InputLimits, InputTooLarge, ProtocolInput

if TYPE_CHECKING:
    from tokenizers import Encoding, Tokenizer

CHARS_PER_TOKEN_BOUND = 32
"""A text longer than ``2 * 32 * max_length`` characters is cut to its first and last ``32 * max_length``
characters before tokenizing: far more than ``max_length`` tokens either way, and a megabyte of
input costs no more than a few kilobytes."""


class TextEncoder:
    """Texts to ``input_ids``/``attention_mask``/``token_type_ids``, as a bundle's preprocessing says.

    ``truncation="head"`` keeps the first ``max_length`` tokens (special tokens included);
    ``"head+tail"`` keeps the first ``head_tokens`` and fills the rest of the budget from the end of
    the text. Batches are padded to their longest member (dynamic padding).
    """

    def __init__(self, tokenizer: Tokenizer, pre: TextPreprocessing) -> None:
        self.pre = pre
        self.tokenizer = tokenizer
        pad_id = tokenizer.token_to_id(pre.pad_token)
        if pad_id is None:
            raise ModelLoadError(f"tokenizer has no pad token {pre.pad_token!r}")
        self.pad_id = pad_id
        tokenizer.no_padding()
        if pre.truncation == "head":
            tokenizer.enable_truncation(max_length=pre.max_length)
        else:
            tokenizer.no_truncation()
        self.budget = pre.max_length - tokenizer.num_special_tokens_to_add(False)
        if self.budget <= pre.head_tokens and pre.truncation == "head+tail":
            raise ModelLoadError(f"max_length {pre.max_length} leaves no room for tail tokens")
        self._char_bound = CHARS_PER_TOKEN_BOUND * pre.max_length

    @classmethod
    def from_file(cls, path: Path, pre: TextPreprocessing) -> TextEncoder:
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception
            raise ModelLoadError(f"cannot load tokenizer {path.name}: {exc}") from None
        return cls(tokenizer, pre)

    def _bounded(self, text: str) -> str:
        bound = self._char_bound
        if len(text) <= 2 * bound:
            return text
        return text[:bound] if self.pre.truncation == "head" else text[:bound] + " " + text[-bound:]

    def encodings(self, texts: Sequence[str]) -> list[Encoding]:
        """One tokenizers ``Encoding`` per text, truncated but not padded."""
        if not all(isinstance(t, str) for t in texts):
            raise InputError("text models take strings")
        prepared = [self._bounded(t.lower() if self.pre.lowercase else t) for t in texts]
        if self.pre.truncation == "head":
            if len(prepared) == 1:  # one text: skip encode_batch's parallel batch machinery
                return [self.tokenizer.encode(prepared[0])]
            return list(self.tokenizer.encode_batch(prepared))
        raw = self.tokenizer.encode_batch(prepared, add_special_tokens=False)
        return [self.tokenizer.post_process(self._head_tail(e)) for e in raw]

    def _head_tail(self, encoding: Encoding) -> Encoding:
        if len(encoding.ids) <= self.budget:
            return encoding
        from tokenizers import Encoding

        head, tail = encoding, copy.deepcopy(encoding)
        head.truncate(self.pre.head_tokens, direction="right")
        tail.truncate(self.budget - self.pre.head_tokens, direction="left")
        return Encoding.merge([head, tail], growing_offsets=False)

    def lengths(self, texts: Sequence[str]) -> list[int]:
        """Token counts after truncation (special tokens included)."""
        return [len(e.ids) for e in self.encodings(texts)]

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray[Any, np.dtype[np.int64]]]:
        """Padded int64 arrays ``input_ids``, ``attention_mask``, ``token_type_ids`` of shape (batch, longest)."""
        if len(texts) == 1:  # the common request: no padding to do, no batch to build
            (one,) = self.encodings(texts)
            return {
                "input_ids": np.array([one.ids], dtype=np.int64),
                "attention_mask": np.array([one.attention_mask], dtype=np.int64),
                "token_type_ids": np.array([one.type_ids], dtype=np.int64),
            }
        encodings = self.encodings(texts)
        width = max((len(e.ids) for e in encodings), default=0)
        ids = np.full((len(encodings), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        types = np.zeros((len(encodings), width), dtype=np.int64)
        for row, e in enumerate(encodings):
            n = len(e.ids)
            ids[row, :n] = e.ids
            mask[row, :n] = e.attention_mask
            types[row, :n] = e.type_ids
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


class TextClassifier(Classifier):
    """A text-classification bundle; inputs are strings."""

    def __init__(
        self, *, bundle_dir: Path, manifest: Manifest, providers: Sequence[ProviderSpec], **session: Any
    ) -> None:
        pre = manifest.preprocessing
        if not isinstance(pre, TextPreprocessing):
            raise ModelLoadError(f"bundle v{manifest.version} has {pre.kind} preprocessing, not text")
        super().__init__(bundle_dir=bundle_dir, manifest=manifest, providers=providers, **session)
        self.encoder = TextEncoder.from_file(bundle_dir / safe_relative_path(pre.tokenizer), pre)

    def feeds(self, inputs: Sequence[Any]) -> Feeds:
        arrays = self.encoder.encode(inputs)
        return {
            name: arrays[name] for name in ("input_ids", "attention_mask", "token_type_ids") if name in self.input_names
        }

    def golden_inputs(self, records: list[Any]) -> list[Any]:
        return [str(r) for r in records]


def encodable(text: str) -> bool:
    """Whether ``text`` is valid Unicode (a JSON "\\ud800" escape decodes to a lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class HeldText:
    """A text as sampling remembers it: the string itself."""

    text: str

    @property
    def nbytes(self) -> int:
        return sys.getsizeof(self.text)

    def record_fields(self) -> dict[str, Any]:
        return {"text": self.text}


class TextClassification(ClassificationTask):
    """``text-classification``: strings in (``{"texts": [...]}``; BYTES ``text`` on the inference
    protocol), tokenized by the bundle's tokenizer; a sample keeps the text."""

    name = "text-classification"
    classifier = TextClassifier
    field = "texts"
    item_kinds = "strings"

    def items_valid(self, items: Any) -> bool:
        return isinstance(items, list) and all(isinstance(t, str) for t in items)

    def prepare(self, items: list[Any], model: Classifier, limits: InputLimits) -> list[Any]:
        """Texts the tokenizer can take, within ``limits``; else an error naming the first bad one."""
        for index, text in enumerate(items):
            if not isinstance(text, str):
                raise InputError(f"texts[{index}] is not a string")
            if len(text) > limits.max_text_chars:
                raise InputTooLarge(f"texts[{index}] has {len(text)} characters; the limit is {limits.max_text_chars}")
            if not encodable(text):
                raise InputError(f"texts[{index}] is not valid Unicode (a lone surrogate?)")
        return items

    def protocol_input(self, manifest: Manifest) -> ProtocolInput:
        return ProtocolInput(name="text", datatype="BYTES", dims=[])

    def sample_input(self, item: Any) -> HeldText:
        return HeldText(item)
