"""Building a student by name, and counting its parameters."""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

from kdlib.students.base import MultiTaskStudent
from kdlib.students.bilstm import BiAttentiveLSTMStudent
from kdlib.students.cmow import CMOWStudent
from kdlib.students.heads import TaskHead
from kdlib.students.small_transformer import SmallTransformerStudent

STUDENT_NAMES = ("small_transformer", "bilstm", "cmow")


def needs_encoder(name: str, hparams: dict) -> bool:
    """Whether building student `name` with `hparams` takes the pretrained encoder (see build_student_model)."""
    return name in ("small_transformer", "bilstm") or (name == "cmow" and hparams.get("cbow_init") == "encoder")


def build_student_model(name: str, *, tasks: dict[str, TaskHead], vocab_size: int,
                        encoder: PreTrainedModel | None = None, **hparams) -> MultiTaskStudent:
    """A multi-task student by name.

    Args:
        name: "small_transformer" (MKD sec. 3.3), "bilstm" (MKD sec. 3.2) or "cmow" (bidirectional
            CMOW/CBOW-Hybrid, CMOW paper sec. III).
        tasks: {task: TaskHead}.
        vocab_size: the tokenizer's vocabulary size (checked against the encoder's when one is given).
        encoder: the pretrained teacher encoder. small_transformer copies its embeddings and first layers
            (required, unless hparams holds a `config` to build a randomly initialised one); bilstm starts
            from its word embeddings; cmow starts its CBOW vectors from them with `cbow_init="encoder"`.
        hparams: the student class's architecture arguments (e.g. num_layers, hidden, matrix_dim).
    """
    if encoder is not None and encoder.config.vocab_size != vocab_size:
        raise ValueError(f"vocab_size {vocab_size} differs from the encoder's {encoder.config.vocab_size}")
    if name == "small_transformer":
        if encoder is not None:
            return SmallTransformerStudent.from_encoder(encoder, tasks, **hparams)
        if "config" not in hparams:
            raise ValueError("small_transformer needs the pretrained `encoder` (or a `config` for random init)")
        return SmallTransformerStudent(tasks, **hparams)
    if name == "bilstm":
        if encoder is not None and "embeddings" not in hparams:
            hparams["embeddings"] = encoder.get_input_embeddings().weight.detach()
        return BiAttentiveLSTMStudent(tasks, vocab_size, **hparams)
    if name == "cmow":
        if hparams.pop("cbow_init", "random") == "encoder":
            if encoder is None:
                raise ValueError("cmow with cbow_init='encoder' needs the pretrained `encoder`")
            hparams["cbow_embeddings"] = encoder.get_input_embeddings().weight.detach()
        return CMOWStudent(tasks, vocab_size, **hparams)
    raise ValueError(f"unknown student {name!r}; known: {list(STUDENT_NAMES)}")


def count_parameters(model: nn.Module, include_embeddings: bool = True) -> int:
    """Number of (distinct) parameters; with include_embeddings=False, those of nn.Embedding modules
    (word, position, token-type, CMOW matrix and CBOW tables) are left out."""
    skip = set()
    if not include_embeddings:
        skip = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in skip)
