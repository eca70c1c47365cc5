"""Sequential recommenders over item ids: SASRec-style (causal GPT) and BERT4Rec-style (masked BERT).

Both are transformers models built from their stock configs (`GPTBigCodeConfig`, `BertConfig`) with an item
vocabulary (0 = padding; BERT4Rec adds a [MASK] id after the last item), registered with `AutoConfig` and
`AutoModel` so that `save_pretrained` / `AutoModel.from_pretrained` work as for any HF model (after
`import toolkit.models.recommenders`).

Scores are the dot product of the hidden state with the (tied) item embeddings, computed only where they are
needed: at the labelled positions when `labels` is given (the loss is cross-entropy over the whole catalogue
there) and at the last position otherwise (the next-item scores for the sequence). Full-vocabulary logits at
every position cost as much as the rest of the model on CPU.

The causal backbone is GPTBigCode with one key/value head per attention head (`multi_query: false`): GPT-2's
blocks without GPT-2's `Conv1D` layers, so that quantization and pruning, which convert `nn.Linear`, apply.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, BertConfig, GPTBigCodeConfig
from transformers.modeling_outputs import ModelOutput
from transformers.models.bert.modeling_bert import BertModel, BertPredictionHeadTransform, BertPreTrainedModel
from transformers.models.gpt_bigcode.modeling_gpt_bigcode import GPTBigCodeModel, GPTBigCodePreTrainedModel


@dataclass
class NextItemOutput(ModelOutput):
    """`logits`: (N, num_items) scores, one row per labelled position (or per sequence without labels)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


def score_items(
    hidden: torch.Tensor, items: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor | None
) -> NextItemOutput:
    """Scores of every item at the labelled positions of `hidden` (B, T, H), or at its last position."""
    if labels is None:
        picked, targets = hidden[:, -1], None  # (B, H)
    else:
        keep = labels != -100
        picked, targets = hidden[keep], labels[keep]  # (N, H), row-major: batch order is kept
    # F.linear, not a matmul: a quantized item embedding (torchao) implements linear, as for a tied LM head
    logits = F.linear(picked, items, bias)  # (N, V)
    loss = F.cross_entropy(logits, targets) if targets is not None else None
    return NextItemOutput(loss=loss, logits=logits)


class SASRecConfig(GPTBigCodeConfig):
    """GPTBigCode's config with multi-head key/values by default (its own default is multi-query)."""

    model_type = "sasrec"
    multi_query: bool = False


class SASRecModel(GPTBigCodePreTrainedModel):
    """Causal GPT blocks over left-padded item sequences; position t predicts the item at t+1."""

    config_class = SASRecConfig

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__(config)
        self.transformer = GPTBigCodeModel(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> NextItemOutput:
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return score_items(hidden, self.transformer.wte.weight, None, labels)


class BERT4RecConfig(BertConfig):
    model_type = "bert4rec"


class ItemScoringHead(nn.Module):
    """BERT's prediction transform (dense, activation, LayerNorm) and a per-item output bias."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        # inside a module, not on the model: transformers' quantizers expect dotted parameter names
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))


class BERT4RecModel(BertPreTrainedModel):
    """Bidirectional BERT over item sequences; predicts the items at [MASK] positions (the last at test)."""

    config_class = BERT4RecConfig

    def __init__(self, config: BERT4RecConfig) -> None:
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.head = ItemScoringHead(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.bert.embeddings.word_embeddings

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> NextItemOutput:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        items = self.bert.embeddings.word_embeddings.weight
        return score_items(self.head.transform(hidden), items, self.head.bias, labels)


AutoConfig.register("sasrec", SASRecConfig, exist_ok=True)
AutoConfig.register("bert4rec", BERT4RecConfig, exist_ok=True)
AutoModel.register(SASRecConfig, SASRecModel, exist_ok=True)
AutoModel.register(BERT4RecConfig, BERT4RecModel, exist_ok=True)
