"""More input for the teachers to label: masked copies of the training set and plain unlabeled text.

Masking augmentation follows MKD (mkd-multitask-distillation.txt, sec. 6.2, after Tang et al. 2019):
each word of a sentence is replaced by the mask token with probability p (0.1), and N copies are made
per example (MKD: 40 for small sets such as STS-B and MRPC, 10 for larger ones). Augmented and
unlabeled rows carry no gold label (NaN): they are trained on teacher targets only.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pandas as pd

from kdlib.errors import DataError
from kdlib.readers import EXAMPLE_COLUMNS, read_text_file


def mask_words(text: str, p: float, rng: np.random.Generator, mask_token: str) -> str:
    """Replace each whitespace-separated word by `mask_token` with probability p."""
    words = text.split()
    hits = rng.random(len(words)) < p
    return " ".join(mask_token if h else w for w, h in zip(words, hits))


def masked_copies(train: pd.DataFrame, *, copies: int, p: float, seed: int, mask_token: str) -> pd.DataFrame:
    """`copies` masked copies of every training example, deterministic in `seed`.

    Both sentences of a pair are masked independently. Ids are `<original id>~m<k>`, labels NaN, source
    "augmented", split "train".
    """
    if copies == 0 or train.empty:
        return pd.DataFrame(columns=[*EXAMPLE_COLUMNS, "split"])
    rng = np.random.default_rng([seed, 0x6D61736B])  # "mask"
    has_pair = train["text_pair"].notna().any()
    rows = {c: [] for c in ("id", "text", "text_pair")}
    for k in range(copies):
        for ex_id, text, pair in zip(train["id"], train["text"], train["text_pair"]):
            rows["id"].append(f"{ex_id}~m{k}")
            rows["text"].append(mask_words(text, p, rng, mask_token))
            rows["text_pair"].append(mask_words(pair, p, rng, mask_token) if has_pair else None)
    return _frame(rows, task=train["task"].iloc[0], source="augmented")


def read_unlabeled(path: str, *, task: str, has_pair: bool) -> pd.DataFrame:
    """Plain text, one example per line (UTF-8); for pair tasks the two sentences are split by a tab.

    Read like a tsv task file without a header row (header: false): a BOM is dropped, blank lines are
    skipped but counted, and errors name the line. Ids hash the text and its occurrence number, like the readers' ids.
    """
    rows = {c: [] for c in ("id", "text", "text_pair")}
    seen: dict[str, int] = {}
    for lineno, line in enumerate(io.StringIO(read_text_file(path)), start=1):
        line = line.rstrip("\n").rstrip("\r")
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != (2 if has_pair else 1):
            want = "two tab-separated sentences" if has_pair else "one sentence without tabs"
            raise DataError(f"expected {want}, got {len(fields)} field{'s' * (len(fields) != 1)}", path=path, line=lineno)
        blank = next((i for i, s in enumerate(fields) if not s.strip()), None)
        if blank is not None:
            raise DataError(f"empty {('first', 'second')[blank]} sentence", path=path, line=lineno)
        text, pair = fields[0], (fields[1] if has_pair else None)
        key = f"{task}\x1funlabeled\x1f{text}\x1f{pair}"
        k = seen.get(key, 0)
        seen[key] = k + 1
        rows["id"].append(hashlib.sha1(f"{key}\x1f{k}".encode()).hexdigest()[:16])
        rows["text"].append(text)
        rows["text_pair"].append(pair)
    if not rows["id"]:
        raise DataError("no unlabeled examples (the file is empty)", path=path)
    return _frame(rows, task=task, source="unlabeled")


def write_unlabeled(texts, pairs, path: str) -> int:
    """Write examples as read_unlabeled reads them: one per line, a pair's sentences split by a tab.

    Whitespace inside a sentence (tabs and line breaks included) becomes single spaces, so every example
    stays one line; blank sentences are skipped, since read_unlabeled would reject them. Returns the lines
    written. The file appears whole or not at all (written beside it, then renamed).
    """
    pairs = [None] * len(texts) if pairs is None else pairs
    written = 0
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    partial = f"{path}.partial"
    with open(partial, "w", encoding="utf-8") as f:
        for text, pair in zip(texts, pairs):
            fields = [" ".join(str(text).split())] + ([] if pair is None else [" ".join(str(pair).split())])
            if all(fields):
                f.write("\t".join(fields) + "\n")
                written += 1
    os.replace(partial, path)
    return written


def file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _frame(rows: dict, *, task: str, source: str) -> pd.DataFrame:
    n = len(rows["id"])
    return pd.DataFrame({
        "id": rows["id"], "task": task, "text": rows["text"], "text_pair": rows["text_pair"],
        "label": np.full(n, np.nan), "source": source, "split": "train",
    })
