"""What the driver hands the Ray Train workers: one typed, validated object instead of a string-keyed dict.

`TrainSpec` is built once by the distill stage (kdlib.pipeline.distill) from the validated run config and
the teachers' facts, travels to every worker inside Ray Train's `train_loop_config`, and is written
beside the stage's outputs as `train_spec.json` (what the workers trained with; benchmarks read it back
with `TrainSpec.model_validate_json`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from kdlib.encoder import EncoderRef


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TaskSpec(_Frozen):
    """One task as the training loop sees it: its head, branch, loss and teacher."""

    kind: Literal["classification", "regression"]
    pair: bool  # sentence-pair task
    num_outputs: int = Field(ge=1)  # classes, 1 for regression, or the number of score bins
    bins: tuple[float, float, float] | None = None  # a regression target learned over score bins
    branch_layers: int = Field(ge=1)  # l: the student branch's layers (branched student)
    fine_tune_layers: int = Field(ge=1)  # L: the teacher's fine-tuned layers (branch depth N - L)
    aggregation: str  # how the K teachers' logits become one target (kdlib.losses)
    wrong_teacher_weight: float
    objective: Literal["kl", "mse_logits", "soft_ce", "hard"]
    # kdlib's own teacher ensemble artifact, whose best member the branched student's branch starts from;
    # None: the branch starts from the encoder's own layers (gold labels only, or the user's own teachers)
    ensemble_dir: str | None = None
    init_member: str | None = None  # the member whose branch the student starts from (branched)


class StudentSpec(_Frozen):
    kind: Literal["branched", "small_transformer", "bilstm", "cmow"]
    hparams: dict = Field(default_factory=dict)  # kdlib.students.build_student_model arguments


class TrainSpec(_Frozen):
    """Everything a distillation or per-task fine-tuning run trains with (kdlib.train_loop)."""

    tasks: dict[str, TaskSpec]
    encoder: EncoderRef
    student: StudentSpec
    per_task: bool = False  # end-to-end students: one copy per task, each trained on its task only
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    lr_schedule: Literal["constant", "linear"] = "constant"
    weight_decay: float = Field(ge=0)
    temperature: float = Field(gt=0)
    alpha: float = Field(ge=0, le=1)
    teacher_annealing: bool = False
    schedule: Literal["mtdnn", "sampling", "road"] = "mtdnn"
    sampling_tau: float = 1.0
    road_k: int = 2
    torch_threads: int = Field(1, ge=1)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast in forward passes (kdlib.device)
    log_every: int = 20  # steps between rank 0's progress lines
    batch_size_setting: str = "distill.batch_size"  # the config key an out-of-memory error tells to lower

    @property
    def max_length(self) -> int:
        return self.encoder.max_length

    @property
    def seed(self) -> int:
        return self.encoder.seed

    def key(self) -> dict:
        """What the trained weights depend on, for the stage's cache key: every field but where the
        teachers' artifacts happen to live (their identity enters the key through the soft-target stores)."""
        exclude = {"tasks": {t: {"ensemble_dir"} for t in self.tasks}, "batch_size_setting": True}
        if self.precision == "fp32":  # the default: keys written before precision existed stay valid
            exclude["precision"] = True
        return self.model_dump(mode="json", exclude=exclude)
