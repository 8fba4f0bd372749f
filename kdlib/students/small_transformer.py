"""Small transformer student (MKD sec. 3.3 and 6.2).

Three transformer layers "initialized with the first three layers parameters from pre-trained BERT-base"
(following BERT-PKD); a pair is joined BERT-style as "[CLS] a [SEP] b [SEP]"; "the average [CLS]
representation from each layer" is the output fed to the task heads. We average the [CLS] states output by
the n transformer layers (not the embedding layer's output).
"""

from __future__ import annotations

import copy
import inspect
import re

import torch
from transformers import AutoModel, PretrainedConfig, PreTrainedModel

from kdlib.students.base import MultiTaskStudent
from kdlib.students.heads import TaskHead
from kdlib.students.inputs import StudentInputs


class SmallTransformerStudent(MultiTaskStudent):
    """An encoder of `num_layers` layers shared by all tasks; per task an `MLPHead` on the mean [CLS].

    Args:
        tasks: {name: TaskHead}.
        config: the encoder's config (BERT, RoBERTa, ELECTRA, DistilBERT; num_hidden_layers replaced by num_layers).
        num_layers: transformer layers (MKD: 3).
        head_hidden: output size of each head's ReLU layer (MKD sec. 6.2: 512).
        dropout: dropout inside the heads.
    """

    def __init__(self, tasks: dict[str, TaskHead], config: PretrainedConfig, num_layers: int = 3,
                 head_hidden: int = 512, dropout: float = 0.1):
        super().__init__(tasks)
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        config = copy.deepcopy(config)
        config.num_hidden_layers = num_layers
        no_pooler = {"add_pooling_layer": False} if config.model_type in ("bert", "roberta") else {}
        self.encoder = AutoModel.from_config(config, **no_pooler)
        # DistilBERT's embeddings take no token types
        self.token_types = "token_type_ids" in inspect.signature(self.encoder.forward).parameters
        self._build_heads({t: config.hidden_size for t in self.tasks}, head_hidden, dropout)

    @classmethod
    def from_encoder(cls, encoder: PreTrainedModel, tasks: dict[str, TaskHead], num_layers: int = 3,
                     head_hidden: int = 512, dropout: float = 0.1) -> SmallTransformerStudent:
        """Copy the encoder's embeddings and its first `num_layers` layers; heads freshly initialised."""
        if num_layers > encoder.config.num_hidden_layers:
            raise ValueError(f"num_layers {num_layers} > the encoder's {encoder.config.num_hidden_layers} layers")
        model = cls(tasks, encoder.config, num_layers, head_hidden, dropout)
        keep = {k: v for k, v in encoder.state_dict().items()  # all but the upper layers (and a pooler)
                if not k.startswith("pooler.") and (_layer_index(k) is None or _layer_index(k) < num_layers)}
        missing, unexpected = model.encoder.load_state_dict(keep, strict=False)
        if unexpected or [k for k in missing if not k.endswith("position_ids")]:
            raise RuntimeError(f"copying the encoder: missing {missing}, unexpected {unexpected}")
        return model

    def encode(self, inputs: StudentInputs) -> torch.Tensor:
        """Mean over layers of the [CLS] state: -> (B, H)."""
        types = {"token_type_ids": inputs.token_type_ids} if self.token_types else {}
        out = self.encoder(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                           output_hidden_states=True, **types)
        cls = torch.stack([h[:, 0] for h in out.hidden_states[1:]], dim=0)  # (L, B, H), layers 1..L
        return cls.mean(0)  # (B, H)

    def task_features(self, encoded: torch.Tensor, task: str) -> torch.Tensor:
        return encoded


def _layer_index(key: str) -> int | None:
    """`encoder.layer.<i>.` (DistilBERT: `transformer.layer.<i>.`) -> i, else None."""
    m = re.match(r"(encoder|transformer)\.layer\.(\d+)\.", key)
    return int(m.group(2)) if m else None
