"""A BERT classifier over the mean of its token states: the head that sentence-transformer bases need.

``BertForSequenceClassification`` classifies the ``[CLS]`` state through BERT's pooler. A
sentence-transformer such as all-MiniLM-L6-v2 was trained for the *mean* of its token states
instead (its ``1_Pooling/config.json`` says so); its ``[CLS]`` state and pooler never were. On
small data the difference is large (see docs/benchmarks.md), so such bases get this model.

It is a Hugging Face ``PreTrainedModel`` registered with the Auto classes under its own
``model_type``: ``AutoModelForSequenceClassification.from_pretrained(checkpoint)`` loads it once
this module is imported, and optimum exports it with BERT's ONNX config (same inputs, ``logits``
out). The graph is plain BERT plus a masked mean and a linear layer, so onnxruntime's transformer
optimizer and quantizers treat it as any BERT.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, BertConfig, BertModel, BertPreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

MODEL_TYPE = "edgeloop-bert-mean"


class BertMeanPoolingConfig(BertConfig):
    model_type = MODEL_TYPE


class BertMeanPoolingForSequenceClassification(BertPreTrainedModel):
    """BERT encoder → masked mean over tokens → dropout → linear → ``logits``."""

    config_class = BertMeanPoolingConfig

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)  # type: ignore[no-untyped-call]
        self.dropout = torch.nn.Dropout(config.hidden_dropout_prob)
        self.classifier = torch.nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()  # type: ignore[no-untyped-call]

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **_: Any,
    ) -> SequenceClassifierOutput:
        if input_ids is None:
            raise ValueError("input_ids are required")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        states = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        mask = attention_mask.unsqueeze(-1).to(states.last_hidden_state.dtype)
        pooled = (states.last_hidden_state * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)  # type: ignore[arg-type]


AutoConfig.register(MODEL_TYPE, BertMeanPoolingConfig)
AutoModelForSequenceClassification.register(BertMeanPoolingConfig, BertMeanPoolingForSequenceClassification)


def base_pools_mean(base_model: str) -> bool:
    """Whether ``base_model`` (a local directory) is a BERT sentence-transformer trained with mean pooling,
    or a checkpoint of this classifier."""
    directory = Path(base_model).expanduser()
    if is_mean_pooling(directory):  # a checkpoint of ours, e.g. the previous version's run
        return True
    try:
        pooling = json.loads((directory / "1_Pooling" / "config.json").read_text())
        model_type = json.loads((directory / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return False
    return bool(pooling.get("pooling_mode_mean_tokens")) and model_type in ("bert", MODEL_TYPE)


def is_mean_pooling(checkpoint: Path) -> bool:
    try:
        return bool(json.loads((checkpoint / "config.json").read_text()).get("model_type") == MODEL_TYPE)
    except (OSError, ValueError):
        return False
