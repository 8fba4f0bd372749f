"""The user's own fine-tuned teachers: sequence-classification checkpoints of any transformers encoder family
(BERT, RoBERTa, DeBERTa-v2, ELECTRA, DistilBERT, ...) as the members of a task's ensemble.

`resolve_members` runs on the driver before any labeling: it finds each checkpoint (a local folder or a hub
id), reads its config and tokenizer, matches its outputs to the task's labels (by `id2label` name, or through
`teacher_label_map`) and fingerprints its files, so that a mismatch fails early, naming the checkpoint, and a
changed checkpoint changes the soft-target store's key. `CheckpointTeacher` hosts one member in a labeling
actor: its own tokenizer, its own length limit, its logits in the task's label order.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from kdlib.artifact import sha256_file
from kdlib.errors import ConfigError

# Files that make a checkpoint what it is: weights, config, tokenizer (a member's identity in the store key).
IDENTITY_PATTERNS = ("*.json", "*.safetensors", "*.bin", "*.model", "*.txt")
# A folder holding none of these has no tokenizer (transformers would build an empty one).
TOKENIZER_FILES = {"tokenizer.json", "vocab.txt", "vocab.json", "spm.model", "spiece.model", "tokenizer.model",
                   "sentencepiece.bpe.model"}
ROBERTA_LIKE = {"roberta", "xlm-roberta", "camembert", "longformer"}  # positions offset by padding_idx + 1


@dataclass(frozen=True)
class CheckpointMember:
    """One external teacher member, resolved.

    Attributes:
        name: as configured (a path or hub id); it names the member in errors and the store manifest.
        source: what `from_pretrained` loads: a local folder, or the hub id (with `revision`).
        revision: the hub commit the digest was taken of (None for a local folder).
        digest: SHA-256 over the checkpoint's config, weight and tokenizer files.
        family: the config's model_type.
        outputs: for each task label in order, the checkpoint output that scores it ([0] for regression).
        max_length: the member's own token limit (the run's encoder.max_length, lowered to what it takes).
        remote_code: the checkpoint's model class is kdlib's own modeling file (a kdlib teacher with mean
            pooling, kdlib.teacher_export), loaded with trust_remote_code; no other remote code is run.
    """

    name: str
    source: str
    revision: str | None
    digest: str
    family: str
    outputs: tuple[int, ...]
    max_length: int
    remote_code: bool = False

    def identity(self) -> dict:
        """What makes the member's logits what they are (the soft-target store's key covers it): its name, its
        files' digest, its label order and its length limit; not where the files were read from."""
        return {"name": self.name, "digest": self.digest, "family": self.family, "outputs": list(self.outputs),
                "max_length": self.max_length}

    def record(self) -> dict:
        """Everything about the member, for the store's manifest."""
        return asdict(self) | {"outputs": list(self.outputs)}


def resolve_members(*, task: str, kind: str, label_names: list[str], checkpoints: list[str],
                    label_map: dict[str, str] | None, max_length: int) -> list[CheckpointMember]:
    """Find, check and fingerprint a task's teacher checkpoints (ConfigError on any mismatch)."""
    return [_resolve(task, kind, label_names, name, label_map or {}, max_length) for name in checkpoints]


def _resolve(task: str, kind: str, label_names: list[str], name: str, label_map: dict[str, str],
             max_length: int) -> CheckpointMember:
    where = f"tasks.{task}.teacher_checkpoints: {name!r}"
    folder, source, revision = locate(name, where)
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001 - any failure to read it is the user's to fix, named
        raise ConfigError(f"{where}: {folder} is not a transformers checkpoint ({type(e).__name__}: {e})") from e
    tokenizer = load_checked_tokenizer(folder, config, where)
    outputs = match_outputs(where, kind, label_names, config, label_map)
    return CheckpointMember(name=name, source=source, revision=revision, digest=files_digest(folder),
                            family=config.model_type, outputs=outputs,
                            max_length=member_max_length(config, tokenizer, max_length),
                            remote_code=check_remote_code(folder, config, where))


def check_remote_code(folder: Path, config, where: str) -> bool:
    """Whether the checkpoint needs its own model code: only kdlib's own file (kdlib.teacher_export) is run;
    any other auto_map is an error (kdlib does not execute code that came with a checkpoint)."""
    from kdlib.teacher_export import AUTO_MAP, MODELING, modeling_digest

    auto_map = getattr(config, "auto_map", None)
    if not auto_map:
        return False
    copy = folder / MODELING.name
    if (auto_map == AUTO_MAP and copy.exists()
            and sha256_file(copy) == modeling_digest()):
        return True
    raise ConfigError(f"{where}: the checkpoint brings its own model code (auto_map {auto_map}), which kdlib does "
                      "not run; save it as one of transformers' own sequence-classification models")


def load_checked_tokenizer(folder: Path, config, where: str) -> PreTrainedTokenizerBase:
    """The checkpoint's own tokenizer. transformers builds an empty one (special tokens only) from a folder
    without tokenizer files, which would label every text as the same few ids: that is an error here."""
    fix = "save the tokenizer the teacher was fine-tuned with beside it (tokenizer.save_pretrained(folder))"
    if not any((folder / f).exists() for f in TOKENIZER_FILES):
        raise ConfigError(f"{where}: no usable tokenizer in {folder} (none of {sorted(TOKENIZER_FILES)}); {fix}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001 - any failure to read it is the user's to fix, named
        raise ConfigError(f"{where}: no usable tokenizer in {folder} ({type(e).__name__}: {e}); {fix}") from e
    vocab = getattr(config, "vocab_size", None)
    if vocab and len(tokenizer) < vocab // 2:
        raise ConfigError(f"{where}: no usable tokenizer in {folder}: it has {len(tokenizer)} tokens, the model "
                          f"{vocab}; {fix}")
    return tokenizer


def locate(name: str, where: str) -> tuple[Path, str, str | None]:
    """(local folder, source to load from, hub revision) of a configured checkpoint.

    A path (absolute, or relative to where the job starts, as encoder.path is) that holds a config.json is a
    local folder, passed on absolute (on a cluster it must be where every node reads it: a shared filesystem);
    anything else that could be a hub id (no leading '/', '.', '~') is fetched from the hub, once, pinned to
    the commit fetched."""
    path = Path(name).expanduser()
    if (path / "config.json").exists():
        return path.resolve(), str(path.resolve()), None
    if path.exists():
        raise ConfigError(f"{where}: {path} holds no config.json; give the folder that "
                          "save_pretrained wrote (config.json, weights, tokenizer files)")
    if name.startswith(("/", ".", "~")):
        raise ConfigError(f"{where}: no such folder ({path})")
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(name))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, no access: all the user's to fix
        raise ConfigError(f"{where}: not a local folder ({path} does not exist) and the model hub could not "
                          f"provide it ({type(e).__name__}: {e})") from e
    return folder, name, folder.name  # a hub snapshot's folder is named by its commit


def match_outputs(where: str, kind: str, label_names: list[str], config, label_map: dict[str, str]) -> tuple[int, ...]:
    """For each task label, the checkpoint output scoring it; ConfigError when the two do not fit."""
    n = config.num_labels
    if kind == "regression":
        if n != 1:
            raise ConfigError(f"{where}: a classification checkpoint with {n} outputs "
                              f"{list(config.id2label.values())} for a regression task; a regression task takes "
                              "one-output checkpoints (num_labels=1)")
        return (0,)
    ckpt = [str(config.id2label[i]) for i in range(n)]
    if n == 1:
        raise ConfigError(f"{where}: a one-output (regression) checkpoint for a classification task with labels "
                          f"{label_names}")
    if n != len(label_names):
        raise ConfigError(f"{where}: the checkpoint has {n} outputs {ckpt}, the task {len(label_names)} labels "
                          f"{label_names}")
    mapped = [label_map.get(c, c) for c in ckpt]
    unknown = [c for c, m in zip(ckpt, mapped) if m not in label_names]
    if unknown or len(set(mapped)) != n:
        hint = (f"tasks.<task>.teacher_label_map maps its labels to the task's (e.g. {{{ckpt[0]}: {label_names[0]}}})"
                if not label_map else f"teacher_label_map {label_map} does not map every one to a distinct task label")
        raise ConfigError(f"{where}: the checkpoint's labels {ckpt} are not the task's labels {label_names}"
                          + (f" (unknown: {unknown})" if unknown else " (two map to one label)") + f"; {hint}")
    return tuple(mapped.index(label) for label in label_names)


def member_max_length(config, tokenizer: PreTrainedTokenizerBase, run_max_length: int) -> int:
    """The run's token limit, lowered to the checkpoint's position embeddings and its tokenizer's limit."""
    limits = [run_max_length]
    positions = getattr(config, "max_position_embeddings", None)
    if positions:
        offset = config.pad_token_id + 1 if config.model_type in ROBERTA_LIKE and config.pad_token_id is not None else 0
        limits.append(positions - offset)
    if tokenizer.model_max_length and tokenizer.model_max_length < 1_000_000:  # unset limits are huge sentinels
        limits.append(tokenizer.model_max_length)
    return int(min(limits))


def files_digest(folder: Path) -> str:
    """SHA-256 over the checkpoint's identity files (names and contents), in name order."""
    files = sorted({f for pattern in IDENTITY_PATTERNS for f in folder.glob(pattern) if f.is_file()})
    return hashlib.sha256("".join(f"{f.name}\0{sha256_file(f)}\n" for f in files).encode()).hexdigest()


class CheckpointTeacher:
    """One member in a labeling actor: the model on `device` in eval mode, its tokenizer, its label order."""

    def __init__(self, member: CheckpointMember | dict, device: torch.device):
        m = member if isinstance(member, CheckpointMember) else CheckpointMember(**member)
        self.member = m
        kwargs = ({} if m.revision is None else {"revision": m.revision}) | (
            {"trust_remote_code": True} if m.remote_code else {})
        self.tokenizer = AutoTokenizer.from_pretrained(m.source, **kwargs)
        self.model = AutoModelForSequenceClassification.from_pretrained(m.source, **kwargs).to(device).eval()
        # the inputs its forward takes (DistilBERT: no token_type_ids, whatever its tokenizer returns)
        self.inputs = set(inspect.signature(self.model.forward).parameters)
        self.outputs = torch.tensor(m.outputs, device=device)

    def forward(self, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, C) logits in the task's label order, fp32."""
        logits = self.model(**{k: v for k, v in enc.items() if k in self.inputs}).logits
        return logits.float().index_select(1, self.outputs)



class _Precomputed(nn.Module):
    """Stands in for a member's embeddings: returns the states the shared bottom layers computed."""

    def __init__(self):
        super().__init__()
        self.states: torch.Tensor | None = None

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.states


class SharedBottom:
    """Members whose embeddings and bottom layers are identical (kdlib's own exported members, or teachers
    fine-tuned with frozen bottom layers) and who tokenize alike: those layers run once per batch, then each
    member its own upper layers and head, as transformers would run the whole member.

    Only families kdlib can cut (kdlib.families) are grouped; `forward` returns (B, k, C) for the k members."""

    def __init__(self, teachers: list[CheckpointTeacher], depth: int):
        from kdlib.families import FAMILIES

        first = teachers[0].model.base_model
        self.family = FAMILIES[first.config.model_type]
        self.teachers, self.depth = teachers, depth
        self.embeddings = self.family.embeddings_of(first)
        self.shared = self.family.shared_of(first)
        self.layers = list(self.family.layers_of(first))[:depth]
        self.slots = []
        for t in teachers:  # each member keeps its upper layers; its embeddings read the shared states
            base = t.model.base_model
            encoder = getattr(base, self.family.layers_attr)
            encoder.layer = nn.ModuleList(list(encoder.layer)[depth:])
            slot = _Precomputed()
            base.embeddings = slot
            if hasattr(base, "embeddings_project"):
                base.embeddings_project = nn.Identity()
            self.slots.append(slot)
        self.tokenizer, self.member = teachers[0].tokenizer, teachers[0].member

    def forward(self, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.family.embed(self.embeddings, enc["input_ids"], enc.get("token_type_ids"), enc["attention_mask"])
        context = self.family.context(self.shared, h, enc["attention_mask"])
        for layer in self.layers:
            h = self.family.run_layer(layer, h, context)
        outs = []
        for t, slot in zip(self.teachers, self.slots):
            slot.states = h
            outs.append(t.forward(enc))
            slot.states = None
        return torch.stack(outs, dim=1)


def shared_bottom_groups(teachers: list[CheckpointTeacher]) -> list[tuple[list[int], object]]:
    """The members as (positions, runner): runs of members sharing identical embeddings and bottom layers and
    tokenizer become one SharedBottom (forward: (B, k, C)); the others run alone (forward: (B, C))."""
    from kdlib.families import FAMILIES

    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(teachers):
        base = t.model.base_model
        family = FAMILIES.get(base.config.model_type)
        if family is None or getattr(base.config, "conv_kernel_size", 0) > 0:  # not cut by kdlib.families
            groups[("alone", i)] = [i]
            continue
        tok = getattr(t.tokenizer, "backend_tokenizer", None)
        key = (base.config.model_type, tok.to_str() if tok is not None else id(t), t.member.max_length,
               _state_digest(family.embeddings_of(base)))
        groups.setdefault(key, []).append(i)
    out = []
    for positions in groups.values():
        members = [teachers[i] for i in positions]
        depth = _common_depth(members) if len(members) > 1 else 0
        if depth == 0:
            out += [([i], teachers[i]) for i in positions]
        else:
            out.append((positions, SharedBottom(members, depth)))
    return out


def _state_digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, value in module.state_dict().items():
        h.update(name.encode() + value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _common_depth(teachers: list[CheckpointTeacher]) -> int:
    """How many bottom layers every member holds identically (their embeddings are identical already)."""
    from kdlib.families import FAMILIES

    stacks = [list(FAMILIES[t.model.config.model_type].layers_of(t.model.base_model)) for t in teachers]
    depth = 0
    while all(len(s) > depth + 1 for s in stacks):  # the top layer stays each member's own
        digests = {_state_digest(s[depth]) for s in stacks}
        if len(digests) != 1:
            break
        depth += 1
    return depth
