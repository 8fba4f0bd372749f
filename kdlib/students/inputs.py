"""What every student reads: the joined BERT encoding and the two sequences encoded separately.

The small transformer (MKD sec. 3.3) reads a pair as one sequence "[CLS] a [SEP] b [SEP]". The BiLSTM
(MKD sec. 3.2) and CMOW (CMOW paper sec. III-C) encode a and b separately, then combine them
(bi-attention; DiffCat). A batch carries both so any student, or several, can run on it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from transformers import PreTrainedTokenizerBase

from kdlib.tokenize import text_pairs, tokenize


@dataclass
class StudentInputs:
    """One batch, all int64 tensors of shape (B, T*), right-padded, masks 1 = token, 0 = padding.

    Attributes:
        input_ids, attention_mask, token_type_ids: "[CLS] a [SEP] b [SEP]" (or "[CLS] a [SEP]"), (B, T).
        a_ids, a_mask: "[CLS] a [SEP]" alone, (B, Ta).
        b_ids, b_mask: "[CLS] b [SEP]" alone, (B, Tb); None for single-sentence tasks.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor
    a_ids: torch.Tensor
    a_mask: torch.Tensor
    b_ids: torch.Tensor | None = None
    b_mask: torch.Tensor | None = None

    def __post_init__(self):
        if (self.b_ids is None) != (self.b_mask is None):
            raise ValueError("b_ids and b_mask come together")

    @property
    def has_pair(self) -> bool:
        return self.b_ids is not None

    def to(self, device) -> StudentInputs:
        return StudentInputs(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                                for f in fields(self)})


def make_student_inputs(tokenizer: PreTrainedTokenizerBase, texts, pairs=None, max_length: int = 128
                        ) -> StudentInputs:
    """Tokenize a batch both ways with the project's `kdlib.tokenize.tokenize`.

    Args:
        texts: N strings. pairs: N strings, or None for a single-sentence batch (a batch may not mix).
        max_length: truncation length of the joined encoding and of each separate sequence.
    Returns:
        StudentInputs; each sequence keeps its [CLS]/[SEP], so no row is empty.
    """
    texts = list(texts)
    pairs = text_pairs(pairs)

    def tensors(t, p):
        return {k: torch.from_numpy(v) for k, v in tokenize(tokenizer, t, p, max_length=max_length).items()}

    joined = tensors(texts, pairs)
    a = tensors(texts, None)
    b = tensors(pairs, None) if pairs is not None else None
    return StudentInputs(input_ids=joined["input_ids"], attention_mask=joined["attention_mask"],
                         token_type_ids=joined["token_type_ids"], a_ids=a["input_ids"], a_mask=a["attention_mask"],
                         b_ids=None if b is None else b["input_ids"], b_mask=None if b is None else b["attention_mask"])
