"""Mixed precision on the CPU (CI has no GPU): bf16 autocast against fp32, fp16 with its gradient scaler, and
a device running out of memory in training turned into an error that names the batch-size setting."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from kdlib.branched import BranchedModel, BranchSpec
from kdlib.config import load_run_config
from kdlib.device import autocast, cpu_bf16_support, is_out_of_memory, precision_advice
from kdlib.errors import DeviceOutOfMemory
from kdlib.features import TrunkFeatures
from kdlib.optim import Optimization, sparse_embeddings
from kdlib.train_loop import run_epochs
from kdlib.trainees import make_trainee

from conftest import JOBS, benchmark_module
from test_student_training import TEXTS, cmow_spec


class Bag(nn.Module):
    """A vocabulary table (sparse gradients) and a dense layer: what CMOW and the BiLSTM train."""

    def __init__(self, vocab: int = 50):
        super().__init__()
        self.vocab_size = vocab
        self.embed = nn.Embedding(vocab, 16)
        self.out = nn.Linear(16, 2)

    def forward(self, ids):
        return self.out(self.embed(ids).mean(1))


def train_bag(precision: str, steps: int = 30, poison_step: int | None = None):
    torch.manual_seed(0)
    model = Bag()
    sparse_embeddings(model, model.vocab_size)
    opt = Optimization(model.parameters(), lr=1e-2, weight_decay=0.0, total_steps=steps, precision=precision)
    g = torch.Generator().manual_seed(1)
    ids, y = torch.randint(0, 50, (64, 7), generator=g), torch.randint(0, 2, (64,), generator=g)
    losses, weights = [], None
    for step in range(steps):
        opt.zero_grad()
        with autocast(torch.device("cpu"), precision):
            out = model(ids)
        loss = nn.functional.cross_entropy(out.float(), y)
        if step == poison_step:
            loss = loss * float("inf")
            weights = [p.detach().clone() for p in model.parameters()]
        opt.backward(loss)
        opt.step()
        if step == poison_step:
            assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters())), "an inf step moved weights"
        losses.append(loss.item())
    return losses, model, opt


def test_bf16_training_follows_fp32():
    """30 AdamW steps under CPU bf16 autocast end within 0.02 of fp32's loss (bf16 keeps 8 bits of mantissa:
    each op rounds to ~0.4% relative; measured gap 0.0001 on this problem); both learn."""
    fp32, _, _ = train_bag("fp32")
    bf16, _, _ = train_bag("bf16")
    assert fp32[-1] < fp32[0] - 0.1 and bf16[-1] < bf16[0] - 0.1
    assert abs(bf16[-1] - fp32[-1]) < 0.02, (bf16[-1], fp32[-1])


def test_fp16_scales_gradients_skips_an_overflowing_step_and_still_learns():
    """fp16 with the GradScaler: sparse and dense gradients are unscaled before the update (the result tracks
    fp32 within 0.05; measured 0.007), and a step whose gradients are inf changes no weight and lowers the scale."""
    fp32, _, _ = train_bag("fp32")
    fp16, _, opt = train_bag("fp16", poison_step=5)
    assert opt.scaler.is_enabled() and opt.skipped_steps == 1
    assert fp16[-1] < fp16[0] - 0.1 and abs(fp16[-1] - fp32[-1]) < 0.05, (fp16[-1], fp32[-1])


def test_bf16_trunk_states_agree_with_fp32(tiny_encoder, tiny_batch):
    """Frozen trunk states (the branched student's features) in bf16 stay within 0.01 of fp32's (LayerNorm'd
    states of magnitude ~1 after 3 layers, bf16 matmuls rounding to ~0.4% of their small contributions on a
    0.02-std random init: measured max 0.0003), and come back as fp32 on the CPU."""
    specs = [BranchSpec("t", "classification", 2, 3, 1)]
    model = BranchedModel.from_encoder(tiny_encoder, specs).eval()
    fp32 = TrunkFeatures.from_inputs(model, tiny_batch, depth=3)
    bf16 = TrunkFeatures.from_inputs(model, tiny_batch, depth=3, precision="bf16")
    for a, b in zip(fp32.states, bf16.states):
        assert b.dtype == torch.float32 and b.device.type == "cpu" and a.shape == b.shape
        assert (a - b).abs().max() < 0.01
    assert max((a - b).abs().max().item() for a, b in zip(fp32.states, bf16.states)) > 0  # bf16 really ran


def test_out_of_memory_in_a_distillation_step_names_the_batch_size_setting(monkeypatch):
    """The training loop turns a device OOM into DeviceOutOfMemory naming distill.batch_size and its value;
    other errors pass through unchanged."""
    spec = cmow_spec(per_task=False).model_copy(update={"precision": "bf16"})
    trainee = make_trainee(spec)
    data = {}
    for t, task in spec.tasks.items():
        pairs = [None] * 4 if not task.pair else TEXTS[::-1]
        feats = trainee.collate(trainee.features(t, TEXTS, pairs, 16))
        logits = torch.zeros(4, 1, task.num_outputs if task.kind == "classification" else 1)
        data[t] = (feats, torch.tensor([1.0, 0.0, 1.0, 0.0]), logits)
    opt = Optimization(list(trainee.model.parameters()), lr=1e-3, weight_decay=0.0, precision="bf16")
    run_epochs(trainee, data, spec, opt)  # bf16 on the CPU trains
    assert opt.steps_done > 0

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainee, "forward", oom)
    with pytest.raises(DeviceOutOfMemory, match=r"lower distill\.batch_size \(now 4\)"):
        run_epochs(trainee, data, spec, opt)

    def bug(*args, **kwargs):
        raise ValueError("a bug, not memory")

    monkeypatch.setattr(trainee, "forward", bug)
    with pytest.raises(ValueError, match="a bug"):
        run_epochs(trainee, data, spec, opt)


def test_out_of_memory_in_teacher_training_names_teachers_batch_size(monkeypatch, tokenizer, tmp_path):
    from kdlib.encoder import resolve_encoder_path
    from kdlib.teachers import train_ensemble

    def oom(self, *args, **kwargs):
        if torch.is_grad_enabled():  # training steps; trunk features and dev scoring run without gradients
            raise RuntimeError("CUDA error: out of memory")
        return real(self, *args, **kwargs)

    real = BranchedModel.branch_forward
    monkeypatch.setattr(BranchedModel, "branch_forward", oom)
    train = pd.DataFrame({"text": TEXTS, "text_pair": [None] * 4, "label": [1, 0, 1, 0]})
    with pytest.raises(DeviceOutOfMemory, match=r"task 'sent'.*lower teachers\.batch_size \(now 2\)"):
        train_ensemble(task="sent", kind="classification", label_names=["neg", "pos"], metric="accuracy",
                       train=train, encoder_source=resolve_encoder_path("all-MiniLM-L6-v2"), random_init=True,
                       config_overrides={"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2,
                                         "intermediate_size": 64},
                       pooling="mean", max_length=16, fine_tune_layers=1, members=1, epochs=1, batch_size=2,
                       lr=1e-3, head_lr=1e-3, weight_decay=0.0, seed=0, out_dir=str(tmp_path / "t"),
                       precision="bf16")


def test_out_of_memory_is_recognised():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


@pytest.mark.parametrize("flags, support", [
    ("fpu sse avx512f avx512_bf16 amx_bf16 amx_tile", "amx"),
    ("fpu sse avx512f avx512_bf16", "avx512_bf16"),
    ("fpu sse avx2", None),
])
def test_the_cpus_bf16_support_is_read_from_its_flags(tmp_path, flags, support):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    assert cpu_bf16_support(cpuinfo) == support
    assert cpu_bf16_support(tmp_path / "absent") is None  # not Linux: nothing to say


def test_the_precision_advice_speaks_only_where_the_cpus_bf16_would_change_the_run():
    assert "precision=bf16 is faster here" in precision_advice("fp32", uses_gpus=False, support="amx")
    assert "slower than fp32; precision=fp32" in precision_advice("bf16", uses_gpus=False, support=None)
    assert "(AMX): --precision bf16 is faster" in precision_advice("fp32", False, "amx", flag="--precision ")
    for precision, gpus, support in [("fp32", True, "amx"), ("bf16", False, "amx"), ("fp32", False, None),
                                     ("fp32", False, "avx512_bf16"), ("bf16", True, None), ("fp16", False, "amx")]:
        assert precision_advice(precision, uses_gpus=gpus, support=support) is None


def test_the_precision_benchmark_compares_soft_targets_and_rounds_as_documented():
    """jobs/benchmark.py precision: the soft-target agreement and a round's bf16 / fp32 ratios by hand."""
    bench = benchmark_module("precision")
    fp32 = np.array([[[1.0, 2.0], [0.5, 0.4]], [[3.0, -1.0], [0.0, 0.1]]])  # (N=2, K=2, C=2)
    bf16 = fp32 + np.array([[[0.0, 0.01], [0.0, 0.2]], [[0.0, 0.0], [0.0, -0.3]]])  # flips (0, 1) and (1, 1)
    a = bench.agreement(fp32, bf16)
    assert a["max_abs_logit_diff"] == pytest.approx(0.3) and a["argmax"] == 0.5
    assert a["mean_abs_logit_diff"] == pytest.approx(0.51 / 8) and a["fp32_logit_std"] == pytest.approx(fp32.std())
    assert a["max_relative"] == pytest.approx(0.3 / fp32.std())
    with pytest.raises(ValueError, match="not the same inputs"):
        bench.agreement(fp32, bf16[:1])

    def labels(rate, busy):
        return {"examples_per_s": rate, "steady_examples_per_s": busy, "logits": fp32}

    def demo(seconds, stages, sst2):
        return {"seconds": seconds, "stages": stages, "student": {"sst2": sst2}, "metric": {"sst2": "accuracy"},
                "model_dir": "/m"}

    r = bench.summarize_round({
        "labeling": {"fp32": labels(100.0, 120.0), "bf16": labels(300.0, 480.0)},
        "demo": {"fp32": demo(200.0, {"teachers": 60.0, "distill": 90.0}, 90.0),
                 "bf16": demo(125.0, {"teachers": 40.0, "distill": 45.0}, 89.5)},
        "serve": {}})
    assert (r["labeling_gain"], r["labeling_busy_gain"], r["demo_gain"]) == (3.0, 4.0, 1.6)
    assert r["stage_gains"] == {"teachers": 1.5, "distill": 2.0} and r["student_points"] == {"sst2": -0.5}
    assert r["agreement"]["argmax"] == 1.0 and "logits" not in r["labeling"]["fp32"]


def test_a_runs_precision_note_reads_its_precision_and_gpu_settings(monkeypatch):
    """jobs/distill.py and jobs/tune_depth.py print kdlib.resources.precision_note(cfg) after the GPU check."""
    import kdlib.resources as resources

    monkeypatch.setattr(resources, "cpu_bf16_support", lambda: "amx")
    demo = JOBS.parent / "configs" / "demo.yaml"
    assert "precision=bf16" in resources.precision_note(load_run_config(demo, []))
    assert resources.precision_note(load_run_config(demo, ["precision=bf16"])) is None
    gpu = load_run_config(JOBS.parent / "configs" / "glue_mini_gpu.yaml", ["precision=fp32"])  # its stages ask for GPUs
    assert resources.gpu_asks(gpu) and resources.precision_note(gpu) is None
    monkeypatch.setattr(resources, "cpu_bf16_support", lambda: None)
    assert "slower than fp32" in resources.precision_note(load_run_config(demo, ["precision=bf16"]))
