"""The typed run configuration: the YAML files in configs/ validate into `RunConfig`.

`BaseRunConfig` holds what every job's config shares (run name, storage, data, seed, encoder, tasks,
teachers, Ray) and the rules on it; `RunConfig` and the depth search's `kdlib.tune.config.TuneRunConfig`
extend it.

The schema is the single source of defaults; library code takes plain arguments, and only jobs/ reads
this object. Load a file with `load_run_config(path, overrides)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationInfo, field_validator, model_validator

from kdlib.config_loading import load_config
from kdlib.students.binning import ScoreBins


class StrictModel(BaseModel):
    """A schema that refuses unknown keys: a misspelt key fails naming the allowed ones instead of being ignored."""

    model_config = ConfigDict(extra="forbid")


class EncoderConfig(StrictModel):
    """The pretrained encoder that teachers fine-tune and students are cut from."""

    name: str = "sentence-transformers/all-MiniLM-L6-v2"
    path: str | None = None  # local model folder; None resolves `name` (offline packages, then the hub)
    random_init: bool = False  # True: random weights from the config (+ config_overrides), for tests
    config_overrides: dict[str, int | float | str] = Field(default_factory=dict)
    max_length: int = Field(128, ge=8, le=512)
    pooling: Literal["mean", "cls"] = "mean"


class AugmentConfig(StrictModel):
    """Masking augmentation (MKD sec. 6.2): `copies` masked copies of each training example."""

    copies: int = Field(0, ge=0)  # N; MKD used 40 for small sets (STS-B, MRPC), 10 for larger ones
    mask_prob: float = Field(0.1, ge=0, le=1)  # each word becomes the mask token with this probability


class TaskConfig(StrictModel):
    """One task: where its data is, which columns hold what, and its depths in the branched model."""

    kind: Literal["classification", "regression"]
    format: Literal["tsv", "csv", "jsonl", "parquet", "hub", "demo"]
    train: str  # file relative to data_dir (or absolute), hub dataset name, or demo task name
    dev: str
    hub_config: str | None = None
    # tsv/csv: false reads every line as an example (no header row); the columns are then positions, 0 first.
    # Positions also work with a header row (which is then skipped); other formats name their columns.
    header: bool = True
    text_column: str | StrictInt = Field("sentence", validate_default=True)
    text_pair_column: str | StrictInt | None = None
    label_column: str | StrictInt = Field("label", validate_default=True)
    labels: list[str] | None = None  # declared label set (classification); None: sorted values seen in train
    metric: Literal["accuracy", "f1", "matthews", "pearson", "spearman"] | None = None  # None: kind's default
    max_train_examples: int | None = Field(None, gt=0)  # first N rows of train (quick benchmarks)
    fine_tune_layers: int = Field(2, ge=1)  # L: teacher trains the top L encoder layers
    branch_layers: int = Field(1, ge=1)  # l: student branch layers, initialised from the teacher's
    # How the K teachers' stored logits become one target at training time. None: mean_logits for
    # classification, mean for regression. weighted: ROaD weighted KD (needs gold labels).
    aggregation: Literal["mean_logits", "mean_probs", "weighted", "mean"] | None = None
    # The loss against the teachers; None: distill.objective. hard: gold labels only (no teacher term).
    objective: Literal["kl", "mse_logits", "soft_ce", "hard"] | None = None
    wrong_teacher_weight: float = Field(0.5, gt=0, lt=1)  # W of weighted KD
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    unlabeled: str | None = None  # plain text file (relative to data_dir), one example per line; pairs: tab
    # false: no teacher is trained or labels this task; the student learns it from gold labels only
    # (MT-DNN KD trains some tasks so). Its branch starts from the encoder's layers at depth N - L.
    teacher: bool = True
    # The user's own fine-tuned teachers (kdlib.teacher_checkpoints): the task's K members as transformers
    # sequence-classification checkpoints (folders, absolute or relative to where the job starts, as encoder.path;
    # or hub ids), of any encoder
    # family; kdlib then trains no teacher for this task. Their labels match the task's by id2label name, or
    # through teacher_label_map (checkpoint label -> task label, for names like LABEL_0).
    teacher_checkpoints: list[str] | None = Field(None, min_length=1)
    teacher_label_map: dict[str, str] | None = None
    # [low, high, width]: end-to-end students learn this regression target as classes over score bins and
    # predict the expected score (CMOW paper sec. IV-B: STS-B as [0, 5, 0.2], 26 classes).
    bins: tuple[float, float, float] | None = None

    @field_validator("header")
    @classmethod
    def _header_fits_format(cls, header: bool, info: ValidationInfo) -> bool:
        fmt = info.data.get("format")
        if not header and fmt not in ("tsv", "csv"):
            raise ValueError(f"header: false applies to tsv and csv files; {fmt} files name their columns")
        return header

    @field_validator("text_column", "text_pair_column", "label_column")
    @classmethod
    def _column_fits_format(cls, column: str | int | None, info: ValidationInfo) -> str | int | None:
        fmt, header = info.data.get("format"), info.data.get("header", True)  # absent: invalid, named already
        if isinstance(column, int):
            if fmt not in ("tsv", "csv"):
                raise ValueError(f"a column position applies to tsv and csv files; give the {fmt} column's name")
            if column < 0:
                raise ValueError("a column position counts from 0 (the first column)")
        elif column is not None and not header:
            default = " (the default)" if column == cls.model_fields[info.field_name].default else ""
            raise ValueError(f"header: false reads a file without column names, so {info.field_name} must be a "
                             f"column position (0 is the first column), not the name {column!r}{default}")
        return column

    @model_validator(mode="after")
    def _columns_distinct(self) -> "TaskConfig":
        given = [c for c in (self.text_column, self.text_pair_column, self.label_column) if c is not None]
        if len(set(given)) != len(given):
            raise ValueError(f"text_column, text_pair_column and label_column must be different columns; got "
                             f"{self.text_column!r}, {self.text_pair_column!r}, {self.label_column!r}")
        return self

    @property
    def resolved_aggregation(self) -> str:
        return self.aggregation or ("mean_logits" if self.kind == "classification" else "mean")

    @model_validator(mode="after")
    def _metric_fits_kind(self) -> "TaskConfig":
        cls_metrics, reg_metrics = {"accuracy", "f1", "matthews"}, {"pearson", "spearman"}
        allowed = cls_metrics if self.kind == "classification" else reg_metrics
        if self.metric is not None and self.metric not in allowed:
            raise ValueError(f"metric {self.metric!r} does not fit kind {self.kind!r}; allowed: {sorted(allowed)}")
        if (self.aggregation == "mean") != (self.kind == "regression") and self.aggregation is not None:
            allowed = ["mean"] if self.kind == "regression" else ["mean_logits", "mean_probs", "weighted"]
            raise ValueError(f"aggregation {self.aggregation!r} does not fit kind {self.kind!r}; allowed: {allowed}")
        if self.bins is not None:
            if self.kind != "regression":
                raise ValueError("bins cast a regression target to classes; this task is a classification task")
            ScoreBins(*self.bins)  # low < high, width > 0, a whole number of bins
        if self.teacher_label_map is not None and self.teacher_checkpoints is None:
            raise ValueError("teacher_label_map maps the labels of teacher_checkpoints, which this task does not set")
        if self.teacher_label_map is not None and self.kind == "regression":
            raise ValueError("teacher_label_map applies to classification tasks; a regression task's checkpoints "
                             "have one output")
        if not self.teacher:
            if self.teacher_checkpoints is not None:
                raise ValueError("teacher: false trains no teacher and uses none; drop teacher_checkpoints, or "
                                 "teacher: false to distil from them")
            given = [k for k, bad in (("objective", self.objective not in (None, "hard")),
                                      ("augment.copies", self.augment.copies > 0),
                                      ("unlabeled", self.unlabeled is not None)) if bad]
            if given:
                raise ValueError(f"teacher: false trains on gold labels only, so {', '.join(given)} cannot apply "
                                 "(augmented and unlabeled examples have no gold label; the objective is hard)")
        if self.branch_layers > self.fine_tune_layers:
            raise ValueError(f"branch_layers ({self.branch_layers}) must not exceed fine_tune_layers "
                             f"({self.fine_tune_layers}): the branch is cut from the teacher's fine-tuned layers")
        return self


class TeacherConfig(StrictModel):
    """Partial fine-tuning of each task's K-member ensemble (flexible-multitask-bert-serving, sec. 3.1)."""

    members: int = Field(2, ge=1)  # K seeds per task
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(5e-5, gt=0)  # encoder layers
    head_lr: float = Field(1e-3, gt=0)  # the freshly initialised head learns faster
    weight_decay: float = Field(0.01, ge=0)
    cpus_per_task: float = Field(1.0, gt=0)  # one Ray task per task trains its K members
    gpus_per_task: float = Field(0.0, ge=0)  # > 0: each task's ensemble trains on a GPU (fractions share one)


class LabelingConfig(StrictModel):
    """Teacher ensembles in a Ray Data actor pool filling the soft-target store, shard by shard."""

    num_actors: int = Field(2, ge=1)  # each hosts every task's ensemble on one shared encoder
    cpus_per_actor: float = Field(0.8, gt=0)  # < 1 leaves room for Ray Data's own tasks on small machines
    gpus_per_actor: float = Field(0.0, ge=0)  # > 0: actors label on a GPU; 0.25 lets four actors share one
    torch_threads: int = Field(1, ge=1)  # per actor; num_actors x torch_threads ~ the cores to use
    batch_size: int = Field(64, ge=1)  # examples per forward pass (sorted by length within a shard)
    # at most this many padded tokens per forward pass too: short texts in big batches, long ones in small
    # ones (GPUs: e.g. 131072 with batch_size 1024); null: batch_size rows whatever their length
    batch_tokens: int | None = Field(None, ge=8)
    shard_size: int = Field(512, ge=1)  # examples per committed shard: the unit of retry and resume
    stream: bool = False  # true: Ray Train consumes training shards while they are labeled
    progress_seconds: float = Field(10.0, gt=0)  # how often labeling prints done / rate / ETA


class StudentConfig(StrictModel):
    """The student architecture: one shared encoder, one head per task (fields apply to the kinds named).

    branched: the encoder's frozen trunk plus per-task branches cut from the teachers (tasks.<t>.branch_layers);
    the only kind that merges into one serving artifact. small_transformer (MKD sec. 3.3), bilstm (MKD
    sec. 3.2) and cmow (bidirectional CMOW/CBOW-Hybrid, CMOW paper sec. III) train end to end.
    """

    kind: Literal["branched", "small_transformer", "bilstm", "cmow"] = "branched"
    num_layers: int = Field(3, ge=1)  # small_transformer: the pretrained encoder's first layers (MKD: 3)
    hidden: int = Field(256, ge=1)  # bilstm: LSTM units per direction (MKD: 256)
    ffn_dim: int = Field(300, ge=1)  # bilstm: ReLU feed-forward width on the embeddings
    matrix_dim: int = Field(20, ge=1)  # cmow: d of the d x d token matrices (paper: 20)
    cbow_dim: int = Field(400, ge=0)  # cmow: CBOW vector width (paper: 400)
    # cmow: "encoder" starts the CBOW vectors from the encoder's word embeddings (cbow_dim = its hidden
    # size), as the paper starts from pretrained embeddings; "random": N(0, 0.1)
    cbow_init: Literal["random", "encoder"] = "random"
    # bilstm, cmow: how a sentence pair's two representations combine (kdlib.students.pairs): concat,
    # diffcat or diff_product (diffcat plus a * b); null: the paper's (bilstm concat, cmow diffcat)
    pair_features: Literal["concat", "diffcat", "diff_product"] | None = None
    head_hidden: int = Field(512, ge=1)  # every end-to-end kind: each task head's ReLU layer (MKD: 512)
    dropout: float = Field(0.1, ge=0, lt=1)

    @model_validator(mode="after")
    def _options_fit_kind(self) -> "StudentConfig":
        if self.pair_features is not None and self.kind not in ("bilstm", "cmow"):
            raise ValueError(f"pair_features applies to bilstm and cmow (which encode a pair's sentences apart); "
                             f"student.kind is {self.kind}")
        if self.cbow_init != "random" and self.kind != "cmow":
            raise ValueError(f"cbow_init applies to cmow; student.kind is {self.kind}")
        return self

    def hparams(self) -> dict:
        """The architecture arguments of `kind` (kdlib.students.build_student_model)."""
        common = {"head_hidden": self.head_hidden, "dropout": self.dropout}
        pairs = {} if self.pair_features is None else {"pair_features": self.pair_features}  # else the paper's
        return {"branched": {}, "small_transformer": {"num_layers": self.num_layers, **common},
                "bilstm": {"hidden": self.hidden, "ffn_dim": self.ffn_dim, **pairs, **common},
                "cmow": {"matrix_dim": self.matrix_dim, "cbow_dim": self.cbow_dim, "cbow_init": self.cbow_init,
                         **pairs, **common}}[self.kind]


class DistillConfig(StrictModel):
    """Multi-task student training on Ray Train: KL with temperature against the ensemble + hard loss.

    Each task's `aggregation` decides how its teachers' logits combine into the target."""

    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(0.9, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)  # > 0: Ray Train workers use GPUs (use_gpu, NCCL)
    # The workers' collective backend. auto: nccl with GPUs, gloo without; gloo with GPUs: for Ray's
    # logical GPUs on a machine without CUDA (tests), or GPUs that NCCL cannot reach.
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    torch_threads: int = Field(1, ge=1)
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-4, gt=0)
    # constant, or linear: decays to 0 over the run's steps (the CMOW paper's schedule, no warm-up: sec. IV
    # found none helped); per-task fine-tuning follows the same schedule over its own steps.
    lr_schedule: Literal["constant", "linear"] = "constant"
    weight_decay: float = Field(0.01, ge=0)
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1)  # weight of the KD term; 1 - alpha on the hard-label loss
    # kl: ROaD sec. 2.2 (T^2 KL + hard, by alpha); mse_logits: MKD eq. 6; soft_ce: MT-DNN KD sec. 3
    # (cross-entropy against the teachers' mean probabilities, averaged with the hard loss: alpha 0.5);
    # hard: gold labels only. A task's own `objective` overrides this.
    objective: Literal["kl", "mse_logits", "soft_ce", "hard"] = "kl"
    teacher_annealing: bool = False  # true: the hard-label weight rises linearly 0 -> 1 over training (replaces alpha)
    # mtdnn: every task's batches merged and shuffled each epoch (MT-DNN Algorithm 1); sampling: tasks
    # drawn with p ~ |D_t|^sampling_tau; road: each step averages the gradients of road_k tasks (ROaD Alg. 1).
    schedule: Literal["mtdnn", "sampling", "road"] = "mtdnn"
    sampling_tau: float = Field(1.0, ge=0)
    road_k: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0)
    # true: every task distils into its own copy of an end-to-end student (single-task distillation, the
    # ablation of MKD Table 2); the branched student's branches are per task already.
    per_task_students: bool = False
    # MKD sec. 6.2: after multi-task distillation, fine-tune the student on each task alone (0 = off).
    # End-to-end students then become one copy per task; the branched student stays one merged model.
    fine_tune_epochs: int = Field(0, ge=0)
    fine_tune_lr: float = Field(5e-5, gt=0)  # MKD picks from {1, 1.5, 5} x 1e-5


class RayConfig(StrictModel):
    address: str | None = None  # None: join the cluster a `ray job submit` driver runs in, else start one
    num_cpus: int | None = Field(None, ge=1)  # only for a locally started Ray
    # Ray's own logs on the console (driver logs, workers' output); always in <storage_root>/<run_name>/run.log
    verbose: bool = False


RunName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]  # a folder name under storage_root


class BaseRunConfig(StrictModel):
    """What every job's config shares: where it runs and stores, the encoder, the tasks and their teachers, Ray.

    `RunConfig` (jobs/distill.py) and the depth search's `kdlib.tune.config.TuneRunConfig` extend it, so a
    task block reads the same in both, and the rules on these fields are checked in one place.
    """

    run_name: RunName = "demo"
    storage_root: str = "runs"  # a path or pyarrow.fs URI; cached stages, artifacts and run folders live under it
    data_dir: str | None = None  # relative task paths are read from here
    seed: int = 0
    # fp32; bf16: autocast in training and inference (CPU and GPU); fp16: autocast + gradient scaler
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    tasks: dict[str, TaskConfig]
    teachers: TeacherConfig = Field(default_factory=TeacherConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _check_tasks(self) -> "BaseRunConfig":
        if not self.tasks:
            raise ValueError("tasks: at least one task is needed")
        for name in self.tasks:
            if not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"task name {name!r}: use letters, digits, '-' and '_' only")
        needs_dir = [n for n, t in self.tasks.items() if (t.format in ("tsv", "csv", "jsonl", "parquet")
                     and not (Path(t.train).is_absolute() and Path(t.dev).is_absolute()))
                     or (t.unlabeled is not None and not Path(t.unlabeled).is_absolute())]
        if needs_dir and self.data_dir is None:
            raise ValueError(f"data_dir is not set but tasks {needs_dir} read relative paths; "
                             "set data_dir in the config or as data_dir=PATH on the command line")
        return self

    def task_path(self, task: str, split: Literal["train", "dev", "unlabeled"]) -> str:
        """Where a task split's data is: as given for hub/demo names and absolute paths, else under data_dir."""
        t = self.tasks[task]
        raw = getattr(t, split)
        if (t.format in ("hub", "demo") and split != "unlabeled") or Path(raw).is_absolute():
            return raw
        if self.data_dir is None:
            raise ValueError(f"tasks.{task}.{split} is a relative path but data_dir is not set")
        return str(Path(self.data_dir).expanduser() / raw)


class RunConfig(BaseRunConfig):
    """A distillation run (jobs/distill.py): the shared fields plus labeling, the student and its training."""

    labeling: LabelingConfig = Field(default_factory=LabelingConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        if self.distill.schedule == "road" and self.distill.road_k > len(self.tasks):
            raise ValueError(f"distill.road_k ({self.distill.road_k}) exceeds the number of tasks ({len(self.tasks)})")
        for name, t in self.tasks.items():
            objective = t.objective or self.distill.objective
            if objective == "mse_logits" and t.resolved_aggregation == "mean_probs":
                raise ValueError(f"tasks.{name}: objective mse_logits needs logits; aggregation mean_probs gives "
                                 "probabilities (use mean_logits or weighted)")
        binned = [n for n, t in self.tasks.items() if t.bins is not None]
        if binned and self.student.kind == "branched":
            raise ValueError(f"tasks {binned} set bins, which the end-to-end students use; student.kind is branched "
                             "(choose small_transformer, bilstm or cmow, or drop bins)")
        return self


def load_run_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Validate a YAML file plus `key=value` overrides into a RunConfig (errors name file, line and key)."""
    return load_config(RunConfig, path, list(overrides))
