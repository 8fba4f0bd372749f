"""What the distillation loop trains: the branched student, or a student that trains end to end.

The training loop (kdlib/train_loop.py) is the same for every student; a trainee tells it how to turn
arriving rows into per-example features, how to run one task on a mini-batch of them, and which
parameters are shared by all tasks and which belong to one task (their gradients are averaged across
workers separately, so a step only reduces what it touched).

- `BranchedTrainee` (flexible-multitask-bert-serving): a frozen shared trunk cut from the encoder, one
  branch per task initialised from a teacher member. The trunk never trains, so its states are computed
  once per example on arrival (TrunkFeatures) and every step runs only a branch.
- `EndToEndTrainee`: the small transformer (MKD sec. 3.3), the bi-attentive LSTM (MKD sec. 3.2) and the
  bidirectional CMOW/CBOW-Hybrid (CMOW paper sec. III) from kdlib/students: one shared encoder and one
  head per task, all trained; a worker keeps only each example's token ids (TokenFeatures).

Every worker builds the same initial weights (teacher copies, or a seeded random init), which the replica
digest in the loop checks.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from kdlib import storage
from kdlib.artifact import load_model
from kdlib.branched import BranchSpec
from kdlib.device import autocast, device, model_device
from kdlib.features import TrunkFeatures
from kdlib.merge import build_student
from kdlib.optim import sparse_embeddings
from kdlib.students.features import TokenFeatures
from kdlib.students.heads import TaskHead
from kdlib.students.registry import build_student_model, needs_encoder
from kdlib.train_spec import TaskSpec, TrainSpec
from kdlib.train_state import load_weights

BRANCHED = "branched"


class BranchedTrainee:
    """Frozen trunk + per-task branches; features are trunk states at each task's branch depth."""

    def __init__(self, spec: TrainSpec):
        encoder = spec.encoder.load()
        tasks = spec.tasks
        teachers = {task: (load_model(storage.local_copy(t.ensemble_dir), encoder=encoder)[0], t.init_member)
                    for task, t in tasks.items() if t.ensemble_dir is not None}
        n = encoder.config.num_hidden_layers
        untaught = [BranchSpec(task, t.kind, t.num_outputs, n - t.fine_tune_layers, t.branch_layers)
                    for task, t in tasks.items() if t.ensemble_dir is None]
        self.model = build_student(encoder, teachers, {t: tasks[t].branch_layers for t in teachers},
                                   spec.encoder.pooling, untaught).to(device())
        self.tokenizer = spec.encoder.tokenizer()
        self.precision = spec.precision

    def features(self, task: str, texts: list[str], pairs: list, max_length: int) -> list:
        return TrunkFeatures.compute(self.model, self.tokenizer, texts, pairs, depth=self.model.specs[task].depth,
                                     max_length=max_length, precision=self.precision).states

    @staticmethod
    def collate(items: list) -> TrunkFeatures:
        return TrunkFeatures(items)

    def forward(self, task: str, feats: TrunkFeatures, idx) -> torch.Tensor:
        dev = model_device(self.model)
        h, mask = feats.batch(idx)
        with autocast(dev, self.precision):
            return self.model.branch_forward(task, h.to(dev, non_blocking=True), mask.to(dev, non_blocking=True))

    def start_from(self, folder) -> None:
        load_weights(folder, self.model)

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return list(self.model.branches[task].parameters())

    def shared_parameters(self) -> list[nn.Parameter]:
        return []  # the trunk is frozen


class EndToEndTrainee:
    """A kdlib.students model (small_transformer, bilstm, cmow) whose encoder and heads all train."""

    def __init__(self, spec: TrainSpec):
        self.tokenizer = spec.encoder.tokenizer()
        self.model = build_end_to_end_student(spec, self.tokenizer).to(device())
        # Vocabulary-sized tables get sparse gradients: a step updates the rows in its batch (kdlib.optim).
        sparse_embeddings(self.model, self.model.vocab_size)
        self.precision = spec.precision

    def features(self, task: str, texts: list[str], pairs: list, max_length: int) -> list:
        return TokenFeatures.compute(self.tokenizer, texts, pairs, max_length=max_length).rows

    @staticmethod
    def collate(items: list) -> TokenFeatures:
        return TokenFeatures(items)

    def forward(self, task: str, feats: TokenFeatures, idx) -> torch.Tensor:
        dev = model_device(self.model)
        with autocast(dev, self.precision):
            return self.model(feats.batch(idx).to(dev), task)

    def start_from(self, folder) -> None:
        load_weights(folder, self.model)

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return list(self.model.heads[task].parameters())

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.model.encoder.parameters())


class PerTaskCopiesTrainee(EndToEndTrainee):
    """One copy of an end-to-end student per task, each trained on its task only: per-task fine-tuning from
    the multi-task student (MKD sec. 6.2), or from the initial weights single-task distillation (MKD Table 2,
    line 2). The copies are independent, so training them in one run, each step one task's copy, equals
    training them one after another. `model[task]` is that task's student."""

    def __init__(self, spec: TrainSpec):
        super().__init__(spec)
        self.model = nn.ModuleDict({t: copy.deepcopy(self.model) for t in spec.tasks})
        for student in self.model.values():  # a deep copy drops the tables' sparse marks
            sparse_embeddings(student, student.vocab_size)

    def start_from(self, folder) -> None:
        """Every copy starts as the multi-task student whose checkpoint is in `folder`."""
        for student in self.model.values():
            load_weights(folder, student)

    def forward(self, task: str, feats: TokenFeatures, idx) -> torch.Tensor:
        dev = model_device(self.model)
        with autocast(dev, self.precision):
            return self.model[task](feats.batch(idx).to(dev), task)

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return list(self.model[task].parameters())

    def shared_parameters(self) -> list[nn.Parameter]:
        return []


def task_heads(tasks: dict[str, TaskSpec]) -> dict[str, TaskHead]:
    """{task: TaskHead} from the tasks' specs (kind, num_outputs, pair, bins)."""
    return {t: TaskHead(v.kind, v.num_outputs, v.pair, v.bins) for t, v in tasks.items()}


def build_end_to_end_student(spec: TrainSpec, tokenizer):
    """The configured student with a seeded initialisation (identical on every worker and the driver).

    The small transformer copies the pretrained encoder's embeddings and first layers; the BiLSTM starts
    from its WordPiece embeddings; CMOW from identity-plus-noise matrices (and its CBOW vectors from the
    encoder's word embeddings with cbow_init "encoder")."""
    student = spec.student
    encoder = spec.encoder.load() if needs_encoder(student.kind, student.hparams) else None
    torch.manual_seed(spec.seed)
    vocab_size = encoder.config.vocab_size if encoder is not None else len(tokenizer)
    return build_student_model(student.kind, tasks=task_heads(spec.tasks), vocab_size=vocab_size,
                               encoder=encoder, **student.hparams)


def make_trainee(spec: TrainSpec) -> BranchedTrainee | EndToEndTrainee:
    """The trainee for `spec`; with spec.per_task an end-to-end student trains one copy per task
    (per-task fine-tuning, or single-task distillation; a branched student's branches are per task already)."""
    if spec.student.kind == BRANCHED:
        return BranchedTrainee(spec)
    return PerTaskCopiesTrainee(spec) if spec.per_task else EndToEndTrainee(spec)


def saved_hparams(spec: TrainSpec, model: nn.Module) -> dict:
    """The architecture arguments that rebuild `model` (one student) without the pretrained encoder."""
    hparams = dict(spec.student.hparams)
    if spec.student.kind == "bilstm":
        hparams["embedding_dim"] = model.encoder.embed.embedding_dim
    if spec.student.kind == "small_transformer":
        hparams["num_layers"] = model.encoder.config.num_hidden_layers
    return hparams
