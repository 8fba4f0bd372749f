"""Training checkpoints without pickle: trainable weights and AdamW state in safetensors, counters in JSON.

Tensors are saved from CPU copies and loaded onto the device of the model that reads them, so a checkpoint
written by a GPU worker resumes on a CPU one and the other way round."""

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
    tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                tensors[f"optim.{names[id(p)]}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    save_file(tensors, str(folder / STATE))
    (folder / META).write_text(json.dumps(meta))


def load_train_state(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore what `save_train_state` wrote; returns its `meta`."""
    folder = Path(folder)
    tensors = load_file(str(folder / STATE))
    _copy_params(tensors, model, folder)
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        if key.startswith("optim."):
            name, slot = key[len("optim."):].rsplit(".", 1)
            # The moments live with their parameter; LazyAdamW keeps its step counter on the CPU.
            optimizer.state[params[name]][slot] = value if slot == "step" else value.to(params[name].device)
    return json.loads((folder / META).read_text())


def load_weights(folder: str | Path, model: torch.nn.Module) -> list[str]:
    """Load only the parameters `save_train_state` wrote that `model` has (a one-task fine-tuning run starts
    from a multi-task checkpoint); returns the names loaded. Every trainable parameter must be among them."""
    return _copy_params(load_file(str(Path(folder) / STATE)), model, folder)


def _copy_params(tensors: dict[str, torch.Tensor], model: torch.nn.Module, folder) -> list[str]:
    """Copy the saved `param.*` tensors into the model's parameters of the same names (every trainable one
    must be there); returns the names copied."""
    saved = {k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")}
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in saved]
    if missing:
        raise ValueError(f"{folder}: the checkpoint has no weights for {missing[:5]}")
    with torch.no_grad():
        for name in saved.keys() & params.keys():
            params[name].copy_(saved[name])
    return sorted(saved.keys() & params.keys())
