"""kdlib's own teachers as standard transformers checkpoints (config with id2label, safetensors, tokenizer).

Each member of a trained ensemble is the encoder's embeddings and frozen bottom layers, its own fine-tuned top
layers and its head: together one full sequence-classification model. With `encoder.pooling: cls` that is
exactly transformers' BertForSequenceClassification (the head's dense + tanh on [CLS] is BERT's pooler, its
linear layer the classifier); with `mean` pooling the checkpoint carries kdlib/hf/modeling_kdlib.py, a
BertModel plus the mean-pooled head, that transformers loads with trust_remote_code=True. Either way plain
transformers reproduces the member's logits, and `tasks.<t>.teacher_checkpoints` accepts the folder.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

from transformers import BertForSequenceClassification, BertModel, PreTrainedTokenizerBase

from kdlib.artifact import sha256_file
from kdlib.branched import BranchedModel

MODELING = Path(__file__).resolve().parent / "hf" / "modeling_kdlib.py"
MEAN_POOLED_CLASS = "KdlibBertForSequenceClassification"
AUTO_MAP = {"AutoModelForSequenceClassification": f"modeling_kdlib.{MEAN_POOLED_CLASS}"}


def modeling_digest() -> str:
    """SHA-256 of the modeling file kdlib writes: the only remote code kdlib runs in a checkpoint."""
    return sha256_file(MODELING)


def export_member(model: BranchedModel, member: str, folder: str | Path, *, kind: str, label_names: list[str],
                  tokenizer: PreTrainedTokenizerBase) -> Path:
    """Write member `member` of `model` (an ensemble on its encoder's trunk) as a checkpoint in `folder`."""
    if model.config.model_type != "bert":
        raise ValueError(f"exporting a {model.config.model_type} teacher: only BERT-family teachers are written as "
                         "transformers checkpoints (their head is BERT's pooler and classifier)")
    spec = model.specs[member]
    branch = model.branches[member]
    if spec.depth + spec.layers != model.config.num_hidden_layers:
        raise ValueError(f"member {member!r} ends at layer {spec.depth + spec.layers}, not at the top of the "
                         f"{model.config.num_hidden_layers}-layer encoder: not a full model")
    config = copy.deepcopy(model.config)
    config.num_labels = spec.num_outputs
    names = label_names if kind == "classification" else ["score"]
    config.id2label = dict(enumerate(names))
    config.label2id = {n: i for i, n in enumerate(names)}
    config.problem_type = "single_label_classification" if kind == "classification" else "regression"
    mean = model.pooling == "mean"
    if mean:
        config.auto_map = dict(AUTO_MAP)
        config.architectures = [MEAN_POOLED_CLASS]
    else:
        config.architectures = ["BertForSequenceClassification"]
    hf = mean_pooled_class()(config) if mean else BertForSequenceClassification(config)
    encoder: BertModel = hf.bert
    encoder.embeddings.load_state_dict(model.embeddings.state_dict())
    layers = [*list(model.trunk)[:spec.depth], *branch.layers]
    for target, source in zip(encoder.encoder.layer, layers):
        target.load_state_dict(source.state_dict())
    if mean:
        hf.pool_dense.load_state_dict(branch.head.dense.state_dict())
    else:
        encoder.pooler.dense.load_state_dict(branch.head.dense.state_dict())
    hf.classifier.load_state_dict(branch.head.out.state_dict())
    folder = Path(folder)
    hf.float().cpu().eval().save_pretrained(folder)
    clean_copy(tokenizer).save_pretrained(folder)
    if mean:
        shutil.copyfile(MODELING, folder / MODELING.name)
    return folder


def clean_copy(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The tokenizer without the truncation and padding its last call left set (a fast tokenizer keeps them and
    would save them into tokenizer.json)."""
    tokenizer = copy.deepcopy(tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        backend.no_truncation()
        backend.no_padding()
    return tokenizer


def export_ensemble(model: BranchedModel, folder: str | Path, *, kind: str, label_names: list[str],
                    tokenizer: PreTrainedTokenizerBase) -> list[Path]:
    """Every member of a trained ensemble as `<folder>/<member>/`; none for an encoder other than BERT's."""
    if model.config.model_type != "bert":
        return []
    return [export_member(model, name, Path(folder) / name, kind=kind, label_names=label_names, tokenizer=tokenizer)
            for name in model.specs]


def mean_pooled_class():
    """The class kdlib/hf/modeling_kdlib.py defines, loaded from that file (as transformers loads it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("kdlib_hf_modeling", MODELING)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, MEAN_POOLED_CLASS)
