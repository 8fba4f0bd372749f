"""Tiny fine-tuned-looking sequence-classification checkpoints of every encoder family kdlib takes, built
offline with plain transformers and tokenizers: what a user brings as `tasks.<t>.teacher_checkpoints`.

BERT, DistilBERT and ELECTRA use MiniLM's WordPiece vocabulary (the offline package); RoBERTa gets a byte-level
BPE and DeBERTa-v2 a Unigram (SentencePiece-style) tokenizer, both trained here on a few sentences.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, DebertaV2TokenizerFast,
                          RobertaTokenizerFast)

from kdlib.encoder import load_tokenizer, resolve_encoder_path

FAMILIES = ("bert", "distilbert", "electra", "roberta", "deberta-v2")
CORPUS = ["a good movie", "a bad film", "the plot is thin", "great acting and a fine story", "not worth the time",
          "an utterly charming delight", "boring and far too long", "the best film of the year"] * 20
SIZE = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def tiny_tokenizer(family: str):
    if family in ("bert", "distilbert", "electra"):
        return load_tokenizer(resolve_encoder_path("sentence-transformers/all-MiniLM-L6-v2"))
    if family == "roberta":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")),
                                                          ("<s>", tok.token_to_id("<s>")))
        return RobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                    cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")
    if family == "deberta-v2":
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(
            vocab_size=120, special_tokens=["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"], unk_token="[UNK]"))
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
        return DebertaV2TokenizerFast(tokenizer_object=tok, bos_token="[CLS]", eos_token="[SEP]", unk_token="[UNK]",
                                      sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]")
    raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")


def tiny_checkpoint(folder: Path, family: str, labels: list[str] | None, *, seed: int = 0,
                    tokenizer: bool = True, **config) -> Path:
    """Save a random `family` sequence-classification model (labels: its id2label names; None: one output, a
    regression checkpoint) and, unless tokenizer=False, its tokenizer into `folder`."""
    tok = tiny_tokenizer(family)
    num_labels = 1 if labels is None else len(labels)
    size = dict(SIZE)
    if family == "distilbert":  # its own names for the same sizes
        size = {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64}
    cfg = AutoConfig.for_model(family, **{"vocab_size": len(tok), "max_position_embeddings": 64,
                                          "num_labels": num_labels, "pad_token_id": tok.pad_token_id, **size, **config})
    if labels is not None:
        cfg.id2label = dict(enumerate(labels))
        cfg.label2id = {name: i for i, name in enumerate(labels)}
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(cfg).eval()
    with torch.no_grad():  # a louder output layer: random init leaves the logits nearly equal
        for p in model.parameters():
            if p.dim() == 2 and p.shape[0] == num_labels:
                p.mul_(4.0)
    model.save_pretrained(folder)
    if tokenizer:
        tok.save_pretrained(folder)
    return Path(folder)


@torch.no_grad()
def plain_logits(folder: Path, texts: list[str], pairs: list[str] | None = None, max_length: int = 32) -> torch.Tensor:
    """What plain transformers makes of the checkpoint: (N, num_labels) logits, one example at a time."""
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    out = []
    for i, text in enumerate(texts):
        enc = tok(text, None if pairs is None else pairs[i], truncation=True, max_length=max_length, return_tensors="pt")
        out.append(model(**{k: v for k, v in enc.items() if k in tok.model_input_names}).logits[0])
    return torch.stack(out)



def tiny_encoder(folder: Path, family: str, seed: int = 0, **config) -> Path:
    """A random `family` base model (no head) and its tokenizer in `folder`: an `encoder.path` for kdlib."""
    from transformers import AutoModel

    tok = tiny_tokenizer(family)
    size = {"dim": 32, "n_layers": 4, "n_heads": 2, "hidden_dim": 64} if family == "distilbert" else {
        **SIZE, "num_hidden_layers": 4}
    cfg = AutoConfig.for_model(family, **{"vocab_size": len(tok), "max_position_embeddings": 64,
                                          "pad_token_id": tok.pad_token_id, **size, **config})
    torch.manual_seed(seed)
    AutoModel.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return Path(folder)
