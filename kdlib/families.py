"""Encoder families: what kdlib needs of each to cut an encoder into a trunk and branches.

kdlib's own teachers, the branched student, the merged model and the small transformer take the encoder
apart: its embeddings, its list of layers, how a layer is called with a padding mask. Each family says so in
a small adapter; everything else loads through transformers' Auto classes. Supported: BERT, RoBERTa, ELECTRA
(with its embedding projection when embedding_size != hidden_size), DistilBERT (no token types) and DeBERTa-v2
(its relative-position embeddings, kept outside its layers, travel with the trunk as `shared`; its layers take
their own mask and relative positions, computed once per forward as the layers' `context`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import CONFIG_MAPPING, PretrainedConfig
from transformers.models.bert.modeling_bert import BertEmbeddings, BertLayer
from transformers.models.deberta_v2.modeling_deberta_v2 import DebertaV2Embeddings, DebertaV2Encoder, DebertaV2Layer
from transformers.models.distilbert.modeling_distilbert import Embeddings as DistilBertEmbeddings
from transformers.models.distilbert.modeling_distilbert import TransformerBlock
from transformers.models.electra.modeling_electra import ElectraEmbeddings, ElectraLayer
from transformers.models.roberta.modeling_roberta import RobertaEmbeddings, RobertaLayer

from kdlib.errors import ConfigError


class ProjectedEmbeddings(nn.Module):
    """ELECTRA's embeddings followed by its projection to the hidden size (ElectraModel.embeddings_project)."""

    def __init__(self, embeddings: nn.Module, project: nn.Module):
        super().__init__()
        self.inner, self.project = embeddings, project

    def forward(self, input_ids=None, token_type_ids=None):
        return self.project(self.inner(input_ids=input_ids, token_type_ids=token_type_ids))


def attention_bias(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """(B, T) 0/1 padding mask -> (B, 1, T, T) boolean mask as the SDPA attention takes it.

    None when nothing is padded: SDPA then runs its unmasked kernel (3-8% faster on CPU, same result).
    """
    if bool(attention_mask.all()):
        return None
    b, t = attention_mask.shape
    return attention_mask.bool()[:, None, None, :].expand(b, 1, t, t)


@dataclass(frozen=True)
class Family:
    """How one encoder family is built, taken apart and run layer by layer."""

    name: str
    embeddings_cls: type
    layer_cls: type
    token_types: bool = True  # the embeddings take token_type_ids
    layers_attr: str = "encoder"  # where the encoder keeps `.layer` (DistilBERT: transformer)

    def new_embeddings(self, config) -> nn.Module:
        emb = self.embeddings_cls(config)
        if self.name == "electra" and config.embedding_size != config.hidden_size:
            return ProjectedEmbeddings(emb, nn.Linear(config.embedding_size, config.hidden_size))
        return emb

    def new_layer(self, config) -> nn.Module:
        return self.layer_cls(config)

    def embeddings_of(self, encoder: nn.Module) -> nn.Module:
        """The encoder's own embeddings module (shared, not copied), in the form `new_embeddings` builds."""
        project = getattr(encoder, "embeddings_project", None)
        return ProjectedEmbeddings(encoder.embeddings, project) if project is not None else encoder.embeddings

    def layers_of(self, encoder: nn.Module) -> nn.ModuleList:
        return getattr(encoder, self.layers_attr).layer

    def embed(self, embeddings: nn.Module, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
              attention_mask: torch.Tensor) -> torch.Tensor:
        if not self.token_types:
            return embeddings(input_ids)
        return embeddings(input_ids=input_ids, token_type_ids=token_type_ids)

    def new_shared(self, config) -> nn.Module | None:
        """What every layer reads besides its input (DeBERTa-v2: relative-position embeddings); None for most."""
        return None

    def shared_of(self, encoder: nn.Module) -> nn.Module | None:
        return None

    def context(self, shared: nn.Module | None, h: torch.Tensor, attention_mask: torch.Tensor):
        """What the layers of one forward take besides the states: the boolean (B, 1, T, T) SDPA mask, or None
        when nothing is padded (SDPA then runs its unmasked kernel)."""
        return attention_bias(attention_mask)

    def run_layer(self, layer: nn.Module, h: torch.Tensor, context) -> torch.Tensor:
        """One layer on (B, T, H) states."""
        out = layer(h, attention_mask=context)
        return out[0] if isinstance(out, tuple) else out  # a tensor in transformers 5, a tuple in 4.x

    def dropout(self, config) -> float:
        return getattr(config, "hidden_dropout_prob", None) or getattr(config, "dropout", 0.1)


@dataclass(frozen=True)
class DebertaV2Family(Family):
    """DeBERTa-v2/v3: embeddings masked by the padding; relative-position embeddings (and their LayerNorm) shared
    by every layer, held by a layer-less DebertaV2Encoder; each layer takes the pairwise mask and the relative
    positions of the sequence."""

    def embed(self, embeddings, input_ids, token_type_ids, attention_mask):
        return embeddings(input_ids=input_ids, token_type_ids=token_type_ids, mask=attention_mask)

    def new_shared(self, config) -> nn.Module:
        if getattr(config, "conv_kernel_size", 0) > 0:
            raise ConfigError("a DeBERTa-v2 encoder with a convolution after its first layer (conv_kernel_size > 0, "
                              "e.g. deberta-v2-xlarge) is not cut by kdlib; DeBERTa-v3 models have none")
        config = copy.deepcopy(config)
        config.num_hidden_layers = 0
        return DebertaV2Encoder(config)

    def shared_of(self, encoder) -> nn.Module:
        shared = self.new_shared(encoder.config)
        shared.load_state_dict({k: v for k, v in encoder.encoder.state_dict().items() if not k.startswith("layer.")})
        return shared.to(next(encoder.parameters()).device)

    def context(self, shared, h, attention_mask):
        return (shared.get_attention_mask(attention_mask), shared.get_rel_pos(h), shared.get_rel_embedding())

    def run_layer(self, layer, h, context):
        mask, relative_pos, rel_embeddings = context
        return layer(h, mask, relative_pos=relative_pos, rel_embeddings=rel_embeddings)[0]


FAMILIES = {f.name: f for f in (
    Family("bert", BertEmbeddings, BertLayer),
    Family("roberta", RobertaEmbeddings, RobertaLayer),
    Family("electra", ElectraEmbeddings, ElectraLayer),
    Family("distilbert", DistilBertEmbeddings, TransformerBlock, token_types=False, layers_attr="transformer"),
    DebertaV2Family("deberta-v2", DebertaV2Embeddings, DebertaV2Layer),
)}


def family_of(config: PretrainedConfig) -> Family:
    """The adapter of the config's model_type; ConfigError naming what works otherwise."""
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise ConfigError(f"encoder family {config.model_type!r}: kdlib's own teachers, the branched student and the "
                          f"small transformer cut encoders of the families {sorted(FAMILIES)}. A "
                          f"{config.model_type} model still works as a teacher you bring "
                          "(tasks.<t>.teacher_checkpoints), distilled into a cmow or bilstm student")
    return family


def config_from_dict(d: dict) -> PretrainedConfig:
    """The config a manifest stored (`config.to_dict()`), of its own family; older manifests hold BERT's."""
    return CONFIG_MAPPING[d.get("model_type") or "bert"].from_dict(d)
