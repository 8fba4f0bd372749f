"""Teacher ensembles by partial fine-tuning (flexible-multitask-bert-serving, sec. 3.1).

Per task, K members (seeds) each fine-tune the top L layers of the pretrained encoder plus a head;
the embeddings and bottom N - L layers stay frozen and are shared, so the members are stored as one
trunk-less artifact with K branches, and their frozen features are computed once for all of them.
Every member's training loss and dev score per epoch go to `history.json` in the artifact folder (the
teachers' curves, kdlib.curves). Each member can also be written as a standard transformers checkpoint
(kdlib.teacher_export), which `tasks.<t>.teacher_checkpoints` accepts.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from kdlib.artifact import save_model
from kdlib.branched import BranchedModel, BranchSpec, member_name
from kdlib.device import autocast, describe, device, model_device, out_of_memory_names
from kdlib.encoder import load_encoder, load_tokenizer
from kdlib.features import TrunkFeatures, length_grouped_batches
from kdlib.losses import hard_loss
from kdlib.metrics import task_metrics
from kdlib.optim import Optimization
from kdlib.teacher_export import export_ensemble

HISTORY = "history.json"  # {"stage": "teachers", "task": ..., "metric": ..., "epochs": [per-epoch rows]}


def train_ensemble(*, task: str, kind: str, label_names: list[str], metric: str, train: pd.DataFrame,
                   encoder_source: str, random_init: bool, config_overrides: dict, pooling: str,
                   max_length: int, fine_tune_layers: int, members: int, epochs: int, batch_size: int,
                   lr: float, head_lr: float, weight_decay: float, seed: int, out_dir: str,
                   dev: pd.DataFrame | None = None, precision: str = "fp32", checkpoints_dir: str | None = None,
                   log=print) -> dict:
    """Train a task's K-member teacher ensemble and save it as a trunk-less artifact in `out_dir`.

    Args:
        train: examples with columns text, text_pair, label (class id or float target).
        fine_tune_layers: L; the members' branches hold the encoder's top L layers.
        members: K; member k uses seed `seed + k` for its head, dropout and data order.
        dev: examples (text, text_pair, label) each member is scored on after every epoch (`metric`; eval
            mode, no gradient: the training is the same without it), into history.json; None: losses only.
        precision: fp32, bf16 or fp16 (kdlib.device): the trunk features and every member's steps run under
            its autocast, on the GPU Ray assigned this task if any.
        checkpoints_dir: also write every member there as a transformers checkpoint (kdlib.teacher_export).
    Returns:
        {"seconds", "final_loss": [per member]} for the run log.
    """
    start = time.perf_counter()
    encoder = load_encoder(encoder_source, random_init, config_overrides, seed=seed)
    tokenizer = load_tokenizer(encoder_source)
    n_layers = encoder.config.num_hidden_layers
    if not 1 <= fine_tune_layers <= n_layers:
        raise ValueError(f"tasks.{task}.fine_tune_layers={fine_tune_layers}: the encoder has {n_layers} layers")
    depth = n_layers - fine_tune_layers
    num_outputs = len(label_names) if kind == "classification" else 1
    specs = [BranchSpec(member_name(task, k), kind, num_outputs, depth, fine_tune_layers) for k in range(members)]
    model = BranchedModel.from_encoder(encoder, specs, pooling, seed=seed).to(device())
    model.freeze_trunk()
    dev_type = model_device(model)

    texts = train["text"].tolist()
    pairs = train["text_pair"].tolist()
    labels = torch.tensor(train["label"].to_numpy(), dtype=torch.long if kind == "classification" else torch.float32)
    feats = TrunkFeatures.compute(model, tokenizer, texts, pairs, depth=depth, max_length=max_length,
                                  precision=precision)
    dev_feats = None if dev is None else TrunkFeatures.compute(
        model, tokenizer, dev["text"].tolist(), dev["text_pair"].tolist(), depth=depth, max_length=max_length,
        precision=precision)
    log(f"[teachers:{task}] on {describe(dev_type)} in {precision}: trunk features for {len(feats)} examples at depth {depth} "
        f"in {time.perf_counter() - start:.1f}s; training {members} members x {epochs} epochs")

    final_losses = []
    history = [{"epoch": e + 1} for e in range(epochs)]  # per epoch: loss/<member>, dev/<member>
    for k, spec in enumerate(specs):
        torch.manual_seed(seed + k)
        rng = np.random.default_rng(seed + k)
        branch = model.branches[spec.name]
        opt = Optimization([{"params": branch.layers.parameters(), "lr": lr},
                            {"params": branch.head.parameters(), "lr": head_lr}],
                           lr=lr, weight_decay=weight_decay, schedule="warmup_linear",
                           total_steps=epochs * int(np.ceil(len(feats) / batch_size)), precision=precision,
                           device=dev_type)
        branch.train()
        for epoch in range(epochs):
            total, seen = 0.0, 0
            for idx in length_grouped_batches(feats.lengths, batch_size, rng):
                h, mask = feats.batch(idx)
                opt.zero_grad()
                with out_of_memory_names("teachers.batch_size", batch_size, task, dev_type):
                    with autocast(dev_type, precision):
                        out = model.branch_forward(spec.name, h.to(dev_type), mask.to(dev_type))
                    loss = hard_loss(kind, out.float(), labels[idx].to(dev_type))
                    opt.backward(loss)
                opt.step()
                total, seen = total + loss.item() * len(idx), seen + len(idx)
            history[epoch][f"loss/{spec.name}"] = total / seen
            if dev_feats is not None:
                history[epoch][f"dev/{spec.name}"] = member_dev_score(model, spec.name, dev_feats, kind, metric,
                                                                      dev["label"].to_numpy(), precision=precision)
                branch.train()
            log(f"[teachers:{task}] member {k} epoch {epoch + 1}/{epochs} loss {total / seen:.4f}"
                + (f", dev {metric} {history[epoch][f'dev/{spec.name}']:.2f}" if dev_feats is not None else ""))
        final_losses.append(total / seen)
        branch.eval()

    save_model(model, out_dir, include_trunk=False,
               tasks={task: {"kind": kind, "label_names": label_names, "metric": metric}},
               extra={"role": "teacher_ensemble", "task": task, "fine_tune_layers": fine_tune_layers,
                      "members": members})
    if checkpoints_dir is not None:  # each member as a standard transformers checkpoint too
        export_ensemble(model, checkpoints_dir, kind=kind, label_names=label_names, tokenizer=tokenizer)
    # After the artifact: save_model replaces the folder.
    (Path(out_dir) / HISTORY).write_text(json.dumps({"stage": "teachers", "task": task, "metric": metric,
                                                     "epochs": history}, indent=1))
    return {"seconds": round(time.perf_counter() - start, 1), "final_loss": final_losses}


@torch.no_grad()
def member_dev_score(model: BranchedModel, name: str, feats: TrunkFeatures, kind: str, metric: str,
                     labels: np.ndarray, batch_size: int = 256, precision: str = "fp32") -> float:
    """Member `name`'s `metric` on the dev examples' trunk states (eval mode: no dropout, no RNG draw)."""
    model.branches[name].eval()
    dev = model_device(model)
    idx = np.arange(len(feats))
    outs = []
    for s in range(0, len(idx), batch_size):
        h, mask = feats.batch(idx[s:s + batch_size])
        with autocast(dev, precision):
            outs.append(model.branch_forward(name, h.to(dev), mask.to(dev)).float().cpu())
    return task_metrics(kind, torch.cat(outs).numpy(), labels)[metric]
