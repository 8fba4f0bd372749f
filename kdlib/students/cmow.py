"""Bidirectional CMOW/CBOW-Hybrid student (CMOW paper sec. III-A, III-C, IV-A).

Each token has a forward matrix M_t, a backward matrix M'_t (both d x d) and a CBOW vector v_t. A sequence
of T tokens is encoded as

    [ flat(M_1 M_2 ... M_T) ; flat(M'_T ... M'_2 M'_1) ; sum_t v_t ]        (2 d^2 + cbow_dim)

(sec. III-A; the forward and backward CBOW sums coincide for whole sequences, so there is one). Matrices
start as identity plus Gaussian noise. Products are computed in log-depth steps (`prefix_product`);
padded positions are identities and add nothing to the CBOW sum, so padding changes nothing.
Sentence pairs are encoded separately and combined by DiffCat (sec. III-C): [s_a ; s_b ; |s_a - s_b|].

Defaults: d = 20 (400-dim matrices) per direction and a 400-dim CBOW, i.e. 1,200 numbers per token, as
the paper's parameter counts imply (36,626,400 embedding parameters = 30,522 WordPiece ids x 1,200).
"""

from __future__ import annotations

import torch
from torch import nn

from kdlib.students.base import MultiTaskStudent
from kdlib.students.heads import TaskHead
from kdlib.students.inputs import StudentInputs
from kdlib.students.pairs import PAIR_FEATURES, combine_pair
from kdlib.students.prefix_product import matrix_product, prefix_products


class CMOWEncoder(nn.Module):
    """Token ids -> bidirectional CMOW/CBOW-Hybrid sequence encoding (see the module docstring).

    Args:
        vocab_size: WordPiece vocabulary size.
        matrix_dim: d, side of each token matrix (paper: 20).
        cbow_dim: CBOW vector width (paper: 400); 0 for CMOW only.
        bidirectional: add the backward matrices (the paper's proposed model); False = Mai et al.'s hybrid.
        noise_std: std of the Gaussian noise added to the identity at initialisation (Mai et al. use 0.1;
            the figure is lost from our copy of the CMOW paper).
        dropout: dropout on the aggregated sequence representation.
        cbow_embeddings: optional (vocab_size, cbow_dim) weights to start the CBOW vectors from (e.g. the
            teacher encoder's word embeddings, as the paper starts from pretrained embeddings); None: N(0, 0.1).
    """

    def __init__(self, vocab_size: int, matrix_dim: int = 20, cbow_dim: int = 400, bidirectional: bool = True,
                 noise_std: float = 0.1, dropout: float = 0.1, cbow_embeddings: torch.Tensor | None = None):
        super().__init__()
        d = matrix_dim
        self.matrix_dim, self.cbow_dim, self.noise_std = d, cbow_dim, noise_std
        self.forward_matrices = nn.Embedding(vocab_size, d * d)
        self.backward_matrices = nn.Embedding(vocab_size, d * d) if bidirectional else None
        self.cbow = nn.Embedding(vocab_size, cbow_dim) if cbow_dim > 0 else None
        self.dropout = nn.Dropout(dropout)
        self.output_dim = d * d * (2 if bidirectional else 1) + cbow_dim
        self.reset_parameters()
        if cbow_embeddings is not None:
            if tuple(cbow_embeddings.shape) != (vocab_size, cbow_dim):
                raise ValueError(f"student.cbow_dim: the CBOW vectors start from embeddings of shape "
                                 f"{tuple(cbow_embeddings.shape)}, so cbow_dim must be {cbow_embeddings.shape[1]} "
                                 f"(it is {cbow_dim}) and the vocabulary {vocab_size}")
            with torch.no_grad():
                self.cbow.weight.copy_(cbow_embeddings)

    def reset_parameters(self) -> None:
        eye = torch.eye(self.matrix_dim).flatten()
        with torch.no_grad():
            for emb in (self.forward_matrices, self.backward_matrices):
                if emb is not None:
                    emb.weight.normal_(0.0, self.noise_std).add_(eye)
            if self.cbow is not None:
                self.cbow.weight.normal_(0.0, 0.1)

    def _matrices(self, emb: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        return emb(ids).view(b, t, self.matrix_dim, self.matrix_dim)  # (B, T, d, d)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and 0/1 mask -> (B, output_dim) sequence encoding."""
        parts = [matrix_product(self._matrices(self.forward_matrices, ids), mask).flatten(1)]  # (B, d*d)
        if self.backward_matrices is not None:
            back = self._matrices(self.backward_matrices, ids).flip(1)  # M'_T, ..., M'_1
            parts.append(matrix_product(back, mask.flip(1)).flatten(1))
        if self.cbow is not None:
            parts.append((self.cbow(ids) * mask[..., None].to(self.cbow.weight.dtype)).sum(1))  # (B, cbow)
        return self.dropout(torch.cat(parts, dim=-1))

    def token_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-token representations (sec. III-A, for masked-LM pretraining), via the parallel scan.

        Position t: [flat(M_1 ... M_t) ; flat(M'_T ... M'_t) ; sum_{s<=t} v_s ; sum_{s>=t} v_s], where T is
        the sequence's last real token. Returns (B, T, d*d*(1 + bidirectional) + 2*cbow_dim). At padded
        positions the forward parts keep the whole sequence's values, the backward product is the
        identity and the backward sum is zero.
        """
        parts = [prefix_products(self._matrices(self.forward_matrices, ids), mask).flatten(2)]
        if self.backward_matrices is not None:
            back = self._matrices(self.backward_matrices, ids).flip(1)
            parts.append(prefix_products(back, mask.flip(1)).flip(1).flatten(2))  # suffix products
        if self.cbow is not None:
            v = self.cbow(ids) * mask[..., None].to(self.cbow.weight.dtype)  # (B, T, cbow)
            parts += [v.cumsum(1), v.flip(1).cumsum(1).flip(1)]
        return torch.cat(parts, dim=-1)


class CMOWStudent(MultiTaskStudent):
    """Shared `CMOWEncoder`; per task an `MLPHead` on s_a (single sentence) or DiffCat(s_a, s_b) (pairs).

    Args:
        tasks: {name: TaskHead}; `pair` decides the pair features (DiffCat: 3 x output_dim) or s_a alone.
        vocab_size, matrix_dim, cbow_dim, bidirectional, noise_std, dropout, cbow_embeddings: see `CMOWEncoder`.
        pair_features: how a pair's s_a and s_b combine (kdlib.students.pairs; the paper's: "diffcat").
        head_hidden: output size of each head's ReLU layer (MKD sec. 6.2: 512; the CMOW paper's MLP
            head size is not stated in our copy).
    """

    def __init__(self, tasks: dict[str, TaskHead], vocab_size: int, matrix_dim: int = 20, cbow_dim: int = 400,
                 bidirectional: bool = True, noise_std: float = 0.1, head_hidden: int = 512, dropout: float = 0.1,
                 pair_features: str = "diffcat", cbow_embeddings: torch.Tensor | None = None):
        super().__init__(tasks)
        self.encoder = CMOWEncoder(vocab_size, matrix_dim, cbow_dim, bidirectional, noise_std, dropout,
                                   cbow_embeddings)
        self.pair_features = pair_features
        d, pair_width = self.encoder.output_dim, PAIR_FEATURES[pair_features]
        self._build_heads({t: pair_width * d if spec.pair else d for t, spec in self.tasks.items()},
                          head_hidden, dropout)

    def encode(self, inputs: StudentInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        a = self.encoder(inputs.a_ids, inputs.a_mask)  # (B, D)
        b = self.encoder(inputs.b_ids, inputs.b_mask) if inputs.has_pair else None
        return a, b

    def task_features(self, encoded, task: str) -> torch.Tensor:
        a, b = encoded
        return combine_pair(a, b, self.pair_features) if self.tasks[task].pair else a
