"""Physically head/neuron-pruned BERT and RoBERTa: per-layer head counts and FFN sizes in the config.

A vanilla ``BertConfig`` cannot describe layers of different sizes (and transformers 5 has no ``prune_heads``), so
these classes reuse transformers' Bert/RoBERTa modules with per-layer ``nn.Linear`` shapes from
``config.layer_heads`` / ``config.layer_intermediate_sizes``. Head size stays ``hidden_size // num_attention_heads``.
A layer with 0 heads (or 0 neurons) skips that sublayer's computation: its output dense sees an empty input and
yields exactly its bias, as the masked model does, and the residual + LayerNorm follow unchanged. Attention goes
through transformers' eager/sdpa dispatch (``config._attn_implementation``); each layer views its own head count.

This file imports only torch and transformers: exports copy it as ``modeling_cap_pruned.py`` for
``trust_remote_code=True`` users; ``import cap_ds.compression`` registers the same classes with the Auto API.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from transformers import BertConfig, RobertaConfig
from transformers.models.bert import modeling_bert as _bert
from transformers.models.roberta import modeling_roberta as _roberta


def _per_layer(value, n: int, default: int, name: str) -> list[int]:
    if value is None:
        return [int(default)] * n
    value = [int(v) for v in value]
    if len(value) != n or any(v < 0 for v in value):
        raise ValueError(f"{name} must list {n} non-negative sizes (one per layer), got {value}")
    return value


def _linear(in_features: int, out_features: int) -> nn.Linear:
    """``nn.Linear`` that may have 0 rows or columns (a fully pruned sublayer) without init warnings."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        return nn.Linear(in_features, out_features)


class _PrunedConfigMixin:
    def _fill_sizes(self) -> None:
        n = self.num_hidden_layers
        self.layer_heads = _per_layer(self.layer_heads, n, self.num_attention_heads, "layer_heads")
        self.layer_intermediate_sizes = _per_layer(self.layer_intermediate_sizes, n, self.intermediate_size,
                                                   "layer_intermediate_sizes")
        if self.add_cross_attention:
            raise ValueError("pruned encoders do not support cross-attention")

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads


class CapPrunedBertConfig(_PrunedConfigMixin, BertConfig):
    """``BertConfig`` + per-layer ``layer_heads`` and ``layer_intermediate_sizes``."""

    model_type = "cap_pruned_bert"
    layer_heads: list[int] | None = None
    layer_intermediate_sizes: list[int] | None = None

    def __post_init__(self, **kwargs):
        self._fill_sizes()
        super().__post_init__(**kwargs)


class CapPrunedRobertaConfig(_PrunedConfigMixin, RobertaConfig):
    """``RobertaConfig`` + per-layer ``layer_heads`` and ``layer_intermediate_sizes``."""

    model_type = "cap_pruned_roberta"
    layer_heads: list[int] | None = None
    layer_intermediate_sizes: list[int] | None = None

    def __post_init__(self, **kwargs):
        self._fill_sizes()
        super().__post_init__(**kwargs)


def _encoder_class(ns, prefix: str) -> type:
    """Per-layer-sized subclasses of one family's encoder modules (forwards are inherited)."""
    SelfAttention = getattr(ns, f"{prefix}SelfAttention")
    SelfOutput = getattr(ns, f"{prefix}SelfOutput")
    Attention = getattr(ns, f"{prefix}Attention")
    Intermediate = getattr(ns, f"{prefix}Intermediate")
    Output = getattr(ns, f"{prefix}Output")
    Layer = getattr(ns, f"{prefix}Layer")
    Encoder = getattr(ns, f"{prefix}Encoder")

    class PrunedSelfAttention(SelfAttention):
        def __init__(self, config, layer_idx: int):
            nn.Module.__init__(self)
            self.config = config
            self.num_attention_heads = config.layer_heads[layer_idx]
            self.attention_head_size = config.hidden_size // config.num_attention_heads
            self.all_head_size = self.num_attention_heads * self.attention_head_size
            self.scaling = self.attention_head_size**-0.5
            self.query = _linear(config.hidden_size, self.all_head_size)
            self.key = _linear(config.hidden_size, self.all_head_size)
            self.value = _linear(config.hidden_size, self.all_head_size)
            self.dropout = nn.Dropout(config.attention_probs_dropout_prob)
            self.is_decoder = config.is_decoder
            self.is_causal = config.is_decoder
            self.layer_idx = layer_idx

        def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
            if self.num_attention_heads == 0:  # no head left: empty context, the output dense adds only its bias
                return hidden_states.new_zeros(*hidden_states.shape[:-1], 0), None
            return super().forward(hidden_states, *args, **kwargs)

    class PrunedSelfOutput(SelfOutput):
        def __init__(self, config, in_features: int):
            nn.Module.__init__(self)
            self.dense = _linear(in_features, config.hidden_size)
            self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            self.dropout = nn.Dropout(config.hidden_dropout_prob)

    class PrunedAttention(Attention):
        def __init__(self, config, layer_idx: int):
            nn.Module.__init__(self)
            self.is_cross_attention = False
            self.self = PrunedSelfAttention(config, layer_idx)
            self.output = PrunedSelfOutput(config, self.self.all_head_size)

    class PrunedIntermediate(Intermediate):
        def __init__(self, config, size: int):
            nn.Module.__init__(self)
            self.dense = _linear(config.hidden_size, size)
            self.intermediate_act_fn = _bert.ACT2FN[config.hidden_act] if isinstance(config.hidden_act, str) \
                else config.hidden_act

    class PrunedOutput(Output):
        def __init__(self, config, size: int):
            nn.Module.__init__(self)
            self.dense = _linear(size, config.hidden_size)
            self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            self.dropout = nn.Dropout(config.hidden_dropout_prob)

    class PrunedLayer(Layer):
        def __init__(self, config, layer_idx: int):
            super(Layer, self).__init__()  # GradientCheckpointingLayer, skipping the full-size build
            self.chunk_size_feed_forward = config.chunk_size_feed_forward
            self.seq_len_dim = 1
            self.attention = PrunedAttention(config, layer_idx)
            self.is_decoder = config.is_decoder
            self.add_cross_attention = False
            size = config.layer_intermediate_sizes[layer_idx]
            self.intermediate = PrunedIntermediate(config, size)
            self.output = PrunedOutput(config, size)

    class PrunedEncoder(Encoder):
        def __init__(self, config):
            nn.Module.__init__(self)
            self.config = config
            self.layer = nn.ModuleList([PrunedLayer(config, i) for i in range(config.num_hidden_layers)])

    for cls in (PrunedSelfAttention, PrunedSelfOutput, PrunedAttention, PrunedIntermediate, PrunedOutput,
                PrunedLayer, PrunedEncoder):
        cls.__name__ = cls.__qualname__ = f"CapPruned{prefix}{cls.__name__[len('Pruned'):]}"
    return PrunedEncoder


CapPrunedBertEncoder = _encoder_class(_bert, "Bert")
CapPrunedRobertaEncoder = _encoder_class(_roberta, "Roberta")


class CapPrunedBertModel(_bert.BertModel):
    config_class = CapPrunedBertConfig

    def __init__(self, config: CapPrunedBertConfig, add_pooling_layer: bool = True):
        _bert.BertPreTrainedModel.__init__(self, config)
        self.config = config
        self.gradient_checkpointing = False
        self.embeddings = _bert.BertEmbeddings(config)
        self.encoder = CapPrunedBertEncoder(config)
        self.pooler = _bert.BertPooler(config) if add_pooling_layer else None
        self.post_init()


class CapPrunedBertForSequenceClassification(_bert.BertForSequenceClassification):
    config_class = CapPrunedBertConfig

    def __init__(self, config: CapPrunedBertConfig):
        _bert.BertPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.config = config
        self.bert = CapPrunedBertModel(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()


class CapPrunedRobertaModel(_roberta.RobertaModel):
    config_class = CapPrunedRobertaConfig

    def __init__(self, config: CapPrunedRobertaConfig, add_pooling_layer: bool = True):
        _roberta.RobertaPreTrainedModel.__init__(self, config)
        self.config = config
        self.gradient_checkpointing = False
        self.embeddings = _roberta.RobertaEmbeddings(config)
        self.encoder = CapPrunedRobertaEncoder(config)
        self.pooler = _roberta.RobertaPooler(config) if add_pooling_layer else None
        self.post_init()


class CapPrunedRobertaForSequenceClassification(_roberta.RobertaForSequenceClassification):
    config_class = CapPrunedRobertaConfig

    def __init__(self, config: CapPrunedRobertaConfig):
        _roberta.RobertaPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.config = config
        self.roberta = CapPrunedRobertaModel(config, add_pooling_layer=False)
        self.classifier = _roberta.RobertaClassificationHead(config)
        self.post_init()


class CapPrunedBertForQuestionAnswering(_bert.BertForQuestionAnswering):
    """Extractive QA (start/end logits over the tokens) on the cleaned encoder; no pooler, as BERT's."""

    config_class = CapPrunedBertConfig

    def __init__(self, config: CapPrunedBertConfig):
        _bert.BertPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.bert = CapPrunedBertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()


class CapPrunedRobertaForQuestionAnswering(_roberta.RobertaForQuestionAnswering):
    config_class = CapPrunedRobertaConfig

    def __init__(self, config: CapPrunedRobertaConfig):
        _roberta.RobertaPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.roberta = CapPrunedRobertaModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()


AUTO_CLASSES = {
    CapPrunedBertConfig: {"AutoModel": CapPrunedBertModel,
                          "AutoModelForSequenceClassification": CapPrunedBertForSequenceClassification,
                          "AutoModelForQuestionAnswering": CapPrunedBertForQuestionAnswering},
    CapPrunedRobertaConfig: {"AutoModel": CapPrunedRobertaModel,
                             "AutoModelForSequenceClassification": CapPrunedRobertaForSequenceClassification,
                             "AutoModelForQuestionAnswering": CapPrunedRobertaForQuestionAnswering},
}


def register_auto_classes() -> None:
    """Make ``AutoConfig`` / ``AutoModel*`` ``from_pretrained`` resolve the pruned model types (no remote code)."""
    import transformers

    for config_cls, models in AUTO_CLASSES.items():
        transformers.AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        for auto_name, model_cls in models.items():
            getattr(transformers, auto_name).register(config_cls, model_cls, exist_ok=True)
