"""Token features for students that train end to end: each example's ids kept unpadded, batched on demand.

The branched student caches frozen trunk states (kdlib.features.TrunkFeatures); the small transformer,
the BiLSTM and CMOW train every parameter, so what a worker keeps per example is only its token ids:
the joined "[CLS] a [SEP] b [SEP]" encoding and the two sequences alone (kdlib.students.inputs).
`batch(idx)` pads a mini-batch to its own longest row, like TrunkFeatures.batch.
"""

from __future__ import annotations

import numpy as np
import torch

from kdlib.students.inputs import StudentInputs, make_student_inputs


class TokenFeatures:
    """Per-example token ids of one task; `batch(idx)` collates a padded StudentInputs."""

    def __init__(self, rows: list[dict[str, np.ndarray]]):
        self.rows = rows  # per example: input_ids, token_type_ids, a_ids, and b_ids (pairs only), unpadded

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def compute(cls, tokenizer, texts: list[str], pairs: list[str | None], *, max_length: int) -> "TokenFeatures":
        """Tokenize texts (and pairs: all None or NaN for single-sentence tasks) both ways."""
        inputs = make_student_inputs(tokenizer, texts, pairs, max_length=max_length)

        def cut(ids, mask, i):
            return ids[i, : int(mask[i].sum())].numpy()

        rows = []
        for i in range(len(texts)):
            row = {"input_ids": cut(inputs.input_ids, inputs.attention_mask, i),
                   "token_type_ids": cut(inputs.token_type_ids, inputs.attention_mask, i),
                   "a_ids": cut(inputs.a_ids, inputs.a_mask, i)}
            if inputs.has_pair:
                row["b_ids"] = cut(inputs.b_ids, inputs.b_mask, i)
            rows.append(row)
        return cls(rows)

    @property
    def lengths(self) -> list[int]:
        return [len(r["input_ids"]) for r in self.rows]

    def batch(self, idx) -> StudentInputs:
        """A right-padded StudentInputs of examples `idx` (masks 1 on tokens, 0 on padding)."""
        rows = [self.rows[i] for i in idx]

        def pad(key):
            seqs = [r[key] for r in rows]
            width = max(len(s) for s in seqs)
            ids = torch.zeros(len(seqs), width, dtype=torch.long)
            mask = torch.zeros(len(seqs), width, dtype=torch.long)
            for j, s in enumerate(seqs):
                ids[j, : len(s)] = torch.from_numpy(np.asarray(s, dtype=np.int64))
                mask[j, : len(s)] = 1
            return ids, mask

        input_ids, attention_mask = pad("input_ids")
        token_type_ids, _ = pad("token_type_ids")
        a_ids, a_mask = pad("a_ids")
        b_ids, b_mask = pad("b_ids") if "b_ids" in rows[0] else (None, None)
        return StudentInputs(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                             a_ids=a_ids, a_mask=a_mask, b_ids=b_ids, b_mask=b_mask)
