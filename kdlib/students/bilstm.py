"""Bi-attentive LSTM student (MKD sec. 3.2, after the biattentive classification network of McCann et al.).

Per sequence: WordPiece embeddings -> feed-forward with ReLU -> BiLSTM, giving X (B, Tx, 2H) and
Y (B, Ty, 2H). Bi-attention: A = X Y^T; each token's context is the attention-weighted sum of the *other*
sequence's states, C = softmax(A) Y for x and softmax(A^T) X for y, normalised over the other sequence's
real tokens (MKD eq. 3). The three combinations [X; X - C; X * C] go through a second BiLSTM, then max,
mean and self-attentive pooling, concatenated. The pair representation is [pool(x); pool(y)]. For
single-sentence tasks y is x itself (MKD: "w^y is the same as w^x"), so every task reads a (B, 12H) vector;
with `pair_features="diff_product"` pair tasks also read |pool(x) - pool(y)| and pool(x) * pool(y).

Padding is ignored exactly: the LSTMs run on packed sequences, attention and pooling are masked, so
right-padding a batch further does not change its outputs.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from kdlib.students.base import MultiTaskStudent
from kdlib.students.heads import TaskHead
from kdlib.students.inputs import StudentInputs
from kdlib.students.pairs import PAIR_FEATURES, combine_pair


class BiAttentiveLSTMEncoder(nn.Module):
    """(a, b) token ids -> (B, 12 * hidden) sentence(-pair) representation; see the module docstring.

    Args:
        vocab_size: WordPiece vocabulary size.
        embedding_dim: token embedding width (ignored when `embeddings` is given).
        ffn_dim: width of the ReLU feed-forward layer on the embeddings.
        hidden: units per direction of both BiLSTMs (MKD sec. 6.2: 256).
        dropout: dropout on the feed-forward output and on the pooled representation.
        embeddings: optional (vocab_size, dim) weights to initialise the embeddings with (e.g. the
            teacher encoder's word embeddings).
    """

    def __init__(self, vocab_size: int, embedding_dim: int = 300, ffn_dim: int = 300, hidden: int = 256,
                 dropout: float = 0.1, embeddings: torch.Tensor | None = None):
        super().__init__()
        if embeddings is not None:
            if embeddings.shape[0] != vocab_size:
                raise ValueError(f"embeddings have {embeddings.shape[0]} rows, vocab_size is {vocab_size}")
            embedding_dim = embeddings.shape[1]
        self.embed = nn.Embedding(vocab_size, embedding_dim)
        if embeddings is not None:
            with torch.no_grad():
                self.embed.weight.copy_(embeddings)
        self.ffn = nn.Sequential(nn.Linear(embedding_dim, ffn_dim), nn.ReLU())
        self.encode_lstm = nn.LSTM(ffn_dim, hidden, batch_first=True, bidirectional=True)
        self.integrate_lstm = nn.LSTM(3 * 2 * hidden, hidden, batch_first=True, bidirectional=True)
        self.attn_score = nn.Linear(2 * hidden, 1)  # self-attentive pooling
        self.dropout = nn.Dropout(dropout)
        self.output_dim = 2 * 3 * 2 * hidden

    def forward(self, a_ids: torch.Tensor, a_mask: torch.Tensor, b_ids: torch.Tensor | None = None,
                b_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Args: (B, Ta) ids and 0/1 mask; b likewise or None (then b = a). Returns: (B, 12H)."""
        x = self._contextualise(a_ids, a_mask)  # (B, Ta, 2H)
        if b_ids is None:
            b_mask, y = a_mask, x
        else:
            y = self._contextualise(b_ids, b_mask)  # (B, Tb, 2H)
        am, bm = a_mask.bool(), b_mask.bool()
        scores = x @ y.transpose(1, 2)  # (B, Ta, Tb): A = X Y^T
        cx = _masked_softmax(scores, bm[:, None, :]) @ y  # (B, Ta, 2H): context of each x token from y
        cy = _masked_softmax(scores.transpose(1, 2), am[:, None, :]) @ x  # (B, Tb, 2H)
        px = self._integrate_and_pool(x, cx, am)  # (B, 6H)
        py = px if b_ids is None else self._integrate_and_pool(y, cy, bm)
        return self.dropout(torch.cat([px, py], dim=-1))  # (B, 12H)

    def _contextualise(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.dropout(self.ffn(self.embed(ids)))  # (B, T, F)
        return _run_lstm(self.encode_lstm, h, mask)  # (B, T, 2H)

    def _integrate_and_pool(self, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = _run_lstm(self.integrate_lstm, torch.cat([x, x - c, x * c], dim=-1), mask)  # (B, T, 2H)
        m = mask[..., None]  # (B, T, 1)
        max_pool = h.masked_fill(~m, float("-inf")).amax(1)  # (B, 2H)
        mean_pool = (h * m).sum(1) / m.sum(1)  # (B, 2H)
        beta = _masked_softmax(self.attn_score(h).squeeze(-1), mask)  # (B, T)
        self_pool = (beta[..., None] * h).sum(1)  # (B, 2H)
        return torch.cat([max_pool, mean_pool, self_pool], dim=-1)  # (B, 6H)


def _masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis restricted to mask == True (every row has at least one True)."""
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)


def _run_lstm(lstm: nn.LSTM, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Run on the real (right-padded) tokens only; padded positions come back as zeros: (B, T, D) -> (B, T, 2H)."""
    lengths = mask.sum(1).cpu()
    if (lengths == 0).any():
        raise ValueError("a sequence has no tokens")
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out, _ = lstm(packed)
    return pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0]


class BiAttentiveLSTMStudent(MultiTaskStudent):
    """Shared `BiAttentiveLSTMEncoder`, one `MLPHead` per task on its (B, 12H) output.

    Args:
        tasks: {name: TaskHead}.
        vocab_size, embedding_dim, ffn_dim, hidden, dropout, embeddings: see `BiAttentiveLSTMEncoder`.
        head_hidden: output size of each head's ReLU layer (MKD sec. 6.2: 512).
        pair_features: how a pair task combines pool(x) and pool(y) (kdlib.students.pairs; MKD: "concat").
    """

    def __init__(self, tasks: dict[str, TaskHead], vocab_size: int, embedding_dim: int = 300,
                 ffn_dim: int = 300, hidden: int = 256, head_hidden: int = 512, dropout: float = 0.1,
                 embeddings: torch.Tensor | None = None, pair_features: str = "concat"):
        super().__init__(tasks)
        self.encoder = BiAttentiveLSTMEncoder(vocab_size, embedding_dim, ffn_dim, hidden, dropout, embeddings)
        self.pair_features = pair_features
        pooled = self.encoder.output_dim // 2  # one sequence's (B, 6H)
        self._build_heads({t: PAIR_FEATURES[pair_features] * pooled if spec.pair else self.encoder.output_dim
                           for t, spec in self.tasks.items()}, head_hidden, dropout)

    def encode(self, inputs: StudentInputs) -> torch.Tensor:
        return self.encoder(inputs.a_ids, inputs.a_mask, inputs.b_ids, inputs.b_mask)  # (B, 12H)

    def task_features(self, encoded: torch.Tensor, task: str) -> torch.Tensor:
        if not self.tasks[task].pair:
            return encoded
        px, py = encoded.chunk(2, dim=-1)  # [pool(x) ; pool(y)]
        return combine_pair(px, py, self.pair_features)
