"""Text classification: the bundle's tokenizer (``tokenizers``, no transformers) into onnxruntime."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.protocol.manifest import Manifest, TextPreprocessing, safe_relative_path
from edge_agent.runtime.classifier import Classifier, Feeds, InputError
from edge_agent.runtime.session import ModelLoadError


class TextClassifier(Classifier):
    """A text-classification bundle; inputs are strings."""

    def __init__(self, *, bundle_dir: Path, manifest: Manifest, providers: list[str], **session: Any) -> None:
        pre = manifest.preprocessing
        if not isinstance(pre, TextPreprocessing):
            raise ModelLoadError(f"bundle v{manifest.version} has {pre.kind} preprocessing, not text")
        super().__init__(bundle_dir=bundle_dir, manifest=manifest, providers=providers, **session)
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(str(bundle_dir / safe_relative_path(pre.tokenizer)))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception
            raise ModelLoadError(f"cannot load tokenizer {pre.tokenizer}: {exc}") from None
        self.tokenizer.enable_truncation(max_length=pre.max_length)
        pad_id = self.tokenizer.token_to_id(pre.pad_token)
        if pad_id is None:
            raise ModelLoadError(f"tokenizer {pre.tokenizer} has no pad token {pre.pad_token!r}")
        self.tokenizer.enable_padding(pad_id=pad_id, pad_token=pre.pad_token)
        self._lowercase = pre.lowercase

    def feeds(self, inputs: Sequence[Any]) -> Feeds:
        if not all(isinstance(t, str) for t in inputs):
            raise InputError("text models take strings")
        texts = [t.lower() for t in inputs] if self._lowercase else list(inputs)
        encodings = self.tokenizer.encode_batch(texts)
        feeds: Feeds = {}
        if "input_ids" in self.input_names:
            feeds["input_ids"] = np.asarray([e.ids for e in encodings], dtype=np.int64)
        if "attention_mask" in self.input_names:
            feeds["attention_mask"] = np.asarray([e.attention_mask for e in encodings], dtype=np.int64)
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = np.asarray([e.type_ids for e in encodings], dtype=np.int64)
        return feeds

    def golden_inputs(self, records: list[Any]) -> list[Any]:
        return [str(r) for r in records]
