"""Students cut from teachers, per-task student artifacts, and merging them onto one trunk.

Student initialisation follows flexible-multitask-bert-serving, sec. 3.2: a task's student keeps the
teacher's frozen bottom (N - L layers) and the first l of its L fine-tuned layers, plus its head, so
it starts as the bottommost N - L + l layers of the teacher. Merging (sec. 3.3) loads every task's
branch into one graph whose shared trunk runs once, up to the deepest branch point.
"""

from __future__ import annotations

from transformers import PreTrainedModel

from kdlib.branched import BranchedModel, BranchSpec


def student_specs(teacher_specs: dict[str, BranchSpec], branch_layers: dict[str, int]) -> list[BranchSpec]:
    """Each task's student branch: at its teacher's depth, `branch_layers[task]` layers deep."""
    specs = []
    for task, t in teacher_specs.items():
        l = branch_layers[task]
        if not 1 <= l <= t.layers:
            raise ValueError(f"tasks.{task}.branch_layers={l}: must be within 1..{t.layers} (the teacher's L)")
        specs.append(BranchSpec(task, t.kind, t.num_outputs, t.depth, l))
    return specs


def build_student(encoder: PreTrainedModel, teachers: dict[str, tuple[BranchedModel, str]],
                  branch_layers: dict[str, int], pooling: str, untaught: list[BranchSpec] = ()) -> BranchedModel:
    """A multi-task student whose task branches are initialised from one teacher member each.

    Args:
        encoder: the pretrained encoder (trunk weights).
        teachers: {task: (ensemble model, name of the member branch to copy)}.
        branch_layers: {task: l}.
        untaught: branches of tasks without a teacher, initialised from the encoder's own layers at
            their depth, with a fresh head.
    """
    specs = student_specs({t: m.specs[name] for t, (m, name) in teachers.items()}, branch_layers) + list(untaught)
    student = BranchedModel.from_encoder(encoder, specs, pooling)
    for spec in specs:
        if spec.name not in teachers:
            continue
        model, member = teachers[spec.name]
        src, dst = model.branches[member], student.branches[spec.name]
        for j in range(spec.layers):
            dst.layers[j].load_state_dict(src.layers[j].state_dict())
        dst.head.load_state_dict(src.head.state_dict())
    student.freeze_trunk()
    return student


def single_task(model: BranchedModel, task: str) -> BranchedModel:
    """The one-task model holding `task`'s branch of a multi-task model (weights copied, trunk shared)."""
    single = BranchedModel(model.config, [model.specs[task]], model.pooling)
    single.embeddings, single.shared = model.embeddings, model.shared
    single.trunk = model.trunk[: model.specs[task].depth]
    single.branches[task].load_state_dict(model.branches[task].state_dict())
    return single.eval()


def merge(encoder: PreTrainedModel, students: list[BranchedModel], pooling: str) -> BranchedModel:
    """One model with every student's branches on the encoder's trunk, as deep as the deepest branch needs."""
    specs = [s for m in students for s in m.specs.values()]
    merged = BranchedModel.from_encoder(encoder, specs, pooling)
    for m in students:
        for name in m.specs:
            merged.branches[name].load_state_dict(m.branches[name].state_dict())
    return merged.eval()


def overhead(depths_and_layers: list[tuple[int, int]], encoder_layers: int) -> float:
    """Transformer layers the merged model runs for all tasks / (encoder layers x tasks) (paper sec. 4.1)."""
    total = max(d for d, _ in depths_and_layers) + sum(l for _, l in depths_and_layers)
    return total / (encoder_layers * len(depths_and_layers))
