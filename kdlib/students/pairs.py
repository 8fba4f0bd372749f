"""How a sentence-pair student combines its two sequence representations before a task head.

    concat        [a ; b]                       the bi-attentive LSTM's pair output (MKD sec. 3.2)
    diffcat       [a ; b ; |a - b|]             DiffCat (CMOW paper sec. III-C)
    diff_product  [a ; b ; |a - b| ; a * b]     DiffCat plus the elementwise product of Mou et al., the
                                                work DiffCat takes its inspiration from

The product lets a head read a dot product of the two sentences, i.e. a similarity, off one linear layer.
"""

from __future__ import annotations

import torch

PAIR_FEATURES = {"concat": 2, "diffcat": 3, "diff_product": 4}  # name -> output width / input width


def combine_pair(a: torch.Tensor, b: torch.Tensor, how: str) -> torch.Tensor:
    """(B, D), (B, D) -> (B, PAIR_FEATURES[how] * D); see the module docstring."""
    if how not in PAIR_FEATURES:
        raise ValueError(f"unknown pair features {how!r}; known: {list(PAIR_FEATURES)}")
    parts = [a, b] + ([(a - b).abs()] if how != "concat" else []) + ([a * b] if how == "diff_product" else [])
    return torch.cat(parts, dim=-1)
