"""Encoder families: what kdlib needs of each to cut an encoder into a trunk and branches.

kdlib's own teachers, the branched student, the merged model and the small transformer take the encoder
apart: its embeddings, its list of layers, how a layer is called with a padding mask. Each family says so in
a small adapter; everything else loads through transformers' Auto classes. Supported: BERT, RoBERTa, ELECTRA
(with its embedding projection when embedding_size != hidden_size) and DistilBERT (no token types). DeBERTa-v2
shares relative-position embeddings across its layers and is not cut; its fine-tuned checkpoints still work as
teachers (`tasks.<t>.teacher_checkpoints`), distilled into the end-to-end students.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import CONFIG_MAPPING, PretrainedConfig
from transformers.models.bert.modeling_bert import BertEmbeddings, BertLayer
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

    def embed(self, embeddings: nn.Module, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None):
        if not self.token_types:
            return embeddings(input_ids)
        return embeddings(input_ids=input_ids, token_type_ids=token_type_ids)

    @staticmethod
    def run_layer(layer: nn.Module, h: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """One layer on (B, T, H) states; `bias` the boolean (B, 1, T, T) SDPA mask, or None (no padding)."""
        out = layer(h, attention_mask=bias)
        return out[0] if isinstance(out, tuple) else out  # a tensor in transformers 5, a tuple in 4.x

    def dropout(self, config) -> float:
        return getattr(config, "hidden_dropout_prob", None) or getattr(config, "dropout", 0.1)


FAMILIES = {f.name: f for f in (
    Family("bert", BertEmbeddings, BertLayer),
    Family("roberta", RobertaEmbeddings, RobertaLayer),
    Family("electra", ElectraEmbeddings, ElectraLayer),
    Family("distilbert", DistilBertEmbeddings, TransformerBlock, token_types=False, layers_attr="transformer"),
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
