"""Training checkpoints without pickle: trainable weights and AdamW state in safetensors, counters in JSON."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE, META = "train_state.safetensors", "train_state.json"


def save_train_state(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     meta: dict) -> None:
    """Save the trainable parameters, the optimizer's per-parameter tensors and `meta` into `folder`."""
    folder = Path(folder)
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {f"param.{n}": p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                tensors[f"optim.{names[id(p)]}.{key}"] = torch.as_tensor(value).detach().contiguous()
    save_file(tensors, str(folder / STATE))
    (folder / META).write_text(json.dumps(meta))


def load_train_state(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore what `save_train_state` wrote; returns its `meta`."""
    folder = Path(folder)
    tensors = load_file(str(folder / STATE))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            if key.startswith("param."):
                params[key[len("param."):]].copy_(value)
    for key, value in tensors.items():
        if key.startswith("optim."):
            name, slot = key[len("optim."):].rsplit(".", 1)
            optimizer.state[params[name]][slot] = value
    return json.loads((folder / META).read_text())
