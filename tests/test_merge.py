import pytest
import torch

from kdlib.artifact import ArtifactError, load_model, read_manifest, save_model
from kdlib.branched import BranchedModel, BranchSpec, member_name
from kdlib.merge import build_student, merge, overhead, single_task


def _trained_like(model: BranchedModel, seed: int) -> BranchedModel:
    """Perturb branch weights so that tasks differ from the encoder and from each other."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith("branches."):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_merged_outputs_equal_each_students_outputs(tiny_encoder, tiny_batch, tmp_path):
    """Students at different depths, saved trunk-less and merged: every task's output is unchanged."""
    students = []
    for k, (name, kind, n_out, depth, layers) in enumerate(
            [("a", "classification", 3, 2, 1), ("b", "regression", 1, 1, 2), ("c", "classification", 2, 3, 1)]):
        s = _trained_like(BranchedModel.from_encoder(tiny_encoder, [BranchSpec(name, kind, n_out, depth, layers)]), k)
        save_model(s, tmp_path / name, include_trunk=False)
        students.append(s)
    reloaded = [load_model(tmp_path / s_name, encoder=tiny_encoder)[0] for s_name in "abc"]
    merged = merge(tiny_encoder, reloaded, "mean")
    save_model(merged, tmp_path / "merged")
    merged, manifest = load_model(tmp_path / "merged")  # self-contained: no encoder needed
    assert manifest["trunk_depth"] == 3
    with torch.no_grad():
        out = merged(**tiny_batch)
        for s in students:
            (name,) = s.specs
            torch.testing.assert_close(out[name], s(**tiny_batch)[name], atol=1e-5, rtol=0)


def test_student_starts_from_the_teachers_bottom_layers(tiny_encoder, tiny_batch):
    """Paper sec. 3.2: student = teacher's frozen bottom + first l fine-tuned layers + head."""
    teacher = _trained_like(BranchedModel.from_encoder(
        tiny_encoder, [BranchSpec(member_name("t", k), "classification", 2, 1, 3) for k in range(2)]), 7)
    student = build_student(tiny_encoder, {"t": (teacher, member_name("t", 1))}, {"t": 2}, "mean")
    assert student.specs["t"].depth == 1 and student.specs["t"].layers == 2
    src, dst = teacher.branches[member_name("t", 1)], student.branches["t"]
    for j in range(2):
        for (n, a), (_, b) in zip(src.layers[j].state_dict().items(), dst.layers[j].state_dict().items()):
            torch.testing.assert_close(a, b, msg=n)
    torch.testing.assert_close(src.head.out.weight, dst.head.out.weight)
    with pytest.raises(ValueError, match="branch_layers=4"):
        build_student(tiny_encoder, {"t": (teacher, member_name("t", 0))}, {"t": 4}, "mean")


def test_a_task_without_teacher_starts_from_the_encoders_own_layers(tiny_encoder):
    """teacher: false: the branch sits at depth N - L and copies the pretrained layers there; the taught
    task's branch still comes from its teacher."""
    teacher = _trained_like(BranchedModel.from_encoder(
        tiny_encoder, [BranchSpec(member_name("t", 0), "classification", 2, 2, 2)]), 7)
    student = build_student(tiny_encoder, {"t": (teacher, member_name("t", 0))}, {"t": 1}, "mean",
                            untaught=[BranchSpec("u", "regression", 1, 1, 2)])
    assert {n: (s.depth, s.layers) for n, s in student.specs.items()} == {"t": (2, 1), "u": (1, 2)}
    for j in range(2):
        want = tiny_encoder.encoder.layer[1 + j].state_dict()
        for n, v in student.branches["u"].layers[j].state_dict().items():
            torch.testing.assert_close(v, want[n], msg=n)
    torch.testing.assert_close(student.branches["t"].head.out.weight,
                               teacher.branches[member_name("t", 0)].head.out.weight)


def test_single_task_view_matches_multitask_model(tiny_encoder, tiny_batch):
    model = _trained_like(BranchedModel.from_encoder(
        tiny_encoder, [BranchSpec("a", "classification", 2, 1, 1), BranchSpec("b", "regression", 1, 3, 1)]), 3)
    with torch.no_grad():
        torch.testing.assert_close(single_task(model, "b")(**tiny_batch)["b"], model(**tiny_batch)["b"])


def test_overhead_counts_shared_trunk_once():
    # Paper's notation 7 + 2 x 8: 7 shared layers and 2 per task for 8 tasks on a 12-layer BERT.
    assert overhead([(7, 2)] * 8, 12) == pytest.approx((7 + 16) / 96)
    assert overhead([(4, 1), (4, 1), (3, 2)], 6) == pytest.approx((4 + 4) / 18)


def test_artifact_checksums_are_verified(tiny_encoder, tmp_path):
    model = BranchedModel.from_encoder(tiny_encoder, [BranchSpec("a", "classification", 2, 1, 1)])
    save_model(model, tmp_path / "m", tasks={"a": {"kind": "classification", "label_names": ["x", "y"]}})
    manifest = read_manifest(tmp_path / "m")
    assert manifest["tasks"]["a"]["label_names"] == ["x", "y"]
    assert not list((tmp_path / "m").glob("*.pt")) and not list((tmp_path / "m").glob("*.bin"))
    with open(tmp_path / "m" / "weights.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        load_model(tmp_path / "m")
    save_model(model, tmp_path / "t", include_trunk=False)
    with pytest.raises(ArtifactError, match="stores no trunk"):
        load_model(tmp_path / "t")
