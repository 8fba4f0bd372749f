"""One model description for teachers, ensembles, students and the merged multi-task model.

A `BranchedModel` is an encoder (BERT, RoBERTa, ELECTRA, DistilBERT or DeBERTa-v2: kdlib.families) cut in two (flexible-multitask-bert-serving, sec. 3 and Fig. 1):
the embeddings and the bottom layers form a frozen *trunk* shared by every branch; each *branch* is a
stack of transformer layers that starts at its own trunk depth, followed by a head. A partially
fine-tuned teacher is one branch of L layers at depth N - L; an ensemble is K such branches on one
trunk; a distilled student keeps l of the teacher's layers at the same depth; the merged model holds
every task's branch and runs the trunk once, up to the deepest branch point.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from kdlib.families import attention_bias, family_of  # noqa: F401 - attention_bias: kdlib.branched's API


@dataclass(frozen=True)
class BranchSpec:
    """Where a branch attaches and what it outputs.

    Attributes:
        name: branch key (a task, or `task__m<k>` for ensemble member k).
        kind: "classification" or "regression".
        num_outputs: classes (classification) or 1 (regression).
        depth: trunk layers below the branch (0 = straight on the embeddings).
        layers: transformer layers in the branch.
    """

    name: str
    kind: str
    num_outputs: int
    depth: int
    layers: int

    def to_dict(self) -> dict:
        return asdict(self)


class Head(nn.Module):
    """Pooling then a two-layer classifier/regressor (dense + tanh, as BERT's pooler, then linear)."""

    def __init__(self, hidden: int, num_outputs: int, pooling: str, dropout: float):
        super().__init__()
        self.pooling = pooling
        self.dense = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, num_outputs)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            pooled = h[:, 0]  # (B, H)
        else:
            m = attention_mask.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, H)
        x = torch.tanh(self.dense(self.dropout(pooled)))
        return self.out(self.dropout(x))  # (B, C)


class Branch(nn.Module):
    def __init__(self, layers: list[nn.Module], head: Head):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.head = head


class BranchedModel(nn.Module):
    """Trunk (embeddings + bottom layers) shared by branches attached at their own depths."""

    def __init__(self, config: PretrainedConfig, branches: list[BranchSpec], pooling: str = "mean"):
        super().__init__()
        if len({b.name for b in branches}) != len(branches):
            raise ValueError(f"branch names repeat: {[b.name for b in branches]}")
        for b in branches:
            if b.depth + b.layers > config.num_hidden_layers or b.depth < 0 or b.layers < 0:
                raise ValueError(f"branch {b.name!r}: depth {b.depth} + layers {b.layers} does not fit an "
                                 f"encoder of {config.num_hidden_layers} layers")
        config = copy.deepcopy(config)
        config._attn_implementation = "sdpa"
        self.config, self.pooling = config, pooling
        self.family = family = family_of(config)
        self.specs = {b.name: b for b in branches}
        self.embeddings = family.new_embeddings(config)
        self.shared = family.new_shared(config)  # what every layer reads (DeBERTa-v2's relative positions), or None
        self.trunk = nn.ModuleList(family.new_layer(config) for _ in range(self.trunk_depth))
        self.branches = nn.ModuleDict({
            b.name: Branch([family.new_layer(config) for _ in range(b.layers)],
                           Head(config.hidden_size, b.num_outputs, pooling, family.dropout(config)))
            for b in branches
        })

    @property
    def trunk_depth(self) -> int:
        return max(b.depth for b in self.specs.values()) if self.specs else 0

    @classmethod
    def from_encoder(cls, encoder: PreTrainedModel, branches: list[BranchSpec], pooling: str = "mean",
                     seed: int = 0) -> "BranchedModel":
        """Cut a pretrained encoder: trunk and every branch's layers copied from it, heads freshly initialised."""
        torch.manual_seed(seed)
        model = cls(encoder.config, branches, pooling)
        family = model.family
        layers = family.layers_of(encoder)
        model.embeddings.load_state_dict(family.embeddings_of(encoder).state_dict())
        if model.shared is not None:
            model.shared.load_state_dict(family.shared_of(encoder).state_dict())
        for i, layer in enumerate(model.trunk):
            layer.load_state_dict(layers[i].state_dict())
        for spec in branches:
            for j, layer in enumerate(model.branches[spec.name].layers):
                layer.load_state_dict(layers[spec.depth + j].state_dict())
        return model

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
              attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, H) embeddings (the family's own: positions, token types where it has them)."""
        return self.family.embed(self.embeddings, input_ids, token_type_ids, attention_mask)

    def context(self, h: torch.Tensor, attention_mask: torch.Tensor):
        """What every layer of one forward takes besides its input (kdlib.families: the padding mask as the
        family's attention wants it, DeBERTa-v2's relative positions); computed once per forward."""
        return self.family.context(self.shared, h, attention_mask)

    def run_layer(self, layer: nn.Module, h: torch.Tensor, context) -> torch.Tensor:
        return self.family.run_layer(layer, h, context)

    def freeze_trunk(self) -> None:
        shared = [] if self.shared is None else list(self.shared.parameters())
        for p in list(self.embeddings.parameters()) + list(self.trunk.parameters()) + shared:
            p.requires_grad_(False)

    def trunk_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     token_type_ids: torch.Tensor | None, depth: int) -> torch.Tensor:
        """Hidden states after `depth` trunk layers: (B, T) ids -> (B, T, H)."""
        h = self.embed(input_ids, token_type_ids, attention_mask)  # (B, T, H)
        context = self.context(h, attention_mask)
        for layer in self.trunk[:depth]:
            h = self.run_layer(layer, h, context)
        return h

    def branch_forward(self, name: str, h: torch.Tensor, attention_mask: torch.Tensor,
                       context=...) -> torch.Tensor:
        """Run branch `name` on trunk states at its depth: (B, T, H) -> (B, C).

        context: `self.context(h, attention_mask)` when the caller already has it (forward: once for all branches).
        """
        branch = self.branches[name]
        context = self.context(h, attention_mask) if context is ... else context
        for layer in branch.layers:
            h = self.run_layer(layer, h, context)
        return branch.head(h, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, names: list[str] | None = None
                ) -> dict[str, torch.Tensor]:
        """Outputs of the requested branches (all by default); the trunk runs once, only as deep as needed.

        Returns:
            {branch name: (B, C) logits, or (B, 1) predictions for regression}.
        """
        names = list(self.specs) if names is None else names
        unknown = [n for n in names if n not in self.specs]
        if unknown:
            raise KeyError(f"unknown branches {unknown}; known: {sorted(self.specs)}")
        by_depth: dict[int, list[str]] = {}
        for n in names:
            by_depth.setdefault(self.specs[n].depth, []).append(n)
        h = self.embed(input_ids, token_type_ids, attention_mask)  # (B, T, H)
        context = self.context(h, attention_mask)
        out: dict[str, torch.Tensor] = {}
        for depth in range(max(by_depth) + 1):
            for n in by_depth.get(depth, []):
                out[n] = self.branch_forward(n, h, attention_mask, context)
            if depth < max(by_depth):
                h = self.run_layer(self.trunk[depth], h, context)
        return {n: out[n] for n in names}


def member_name(task: str, k: int) -> str:
    """Branch key of ensemble member k of a task."""
    return f"{task}__m{k}"
