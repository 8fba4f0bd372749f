"""Where a stage's model runs and in which precision: the one place that decides both.

Ray hands a task, actor, Train worker, trial or replica the GPUs it asked for by setting
CUDA_VISIBLE_DEVICES, and hides GPUs from work that asked for none; so "CUDA is visible" is the same as
"Ray assigned a GPU here" (or, outside Ray, "this machine has one"). Every stage asks `device()`.

Precision (the run's `precision` setting): fp32; bf16 (autocast, on CUDA and on CPU alike); fp16
(autocast with a gradient scaler in training, kdlib.optim.Optimization). Weights always stay fp32 in
memory and on disk, so an artifact trained in bf16 on a GPU loads unchanged on a CPU and the other way
round.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

from kdlib.errors import DeviceOutOfMemory

Precision = Literal["fp32", "bf16", "fp16"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def device() -> torch.device:
    """The GPU Ray assigned to this process, else the CPU. A Ray Train worker on a node with several GPUs sees
    all of them and has its own made current by Ray Train (torch.cuda.set_device); a task, actor or replica
    sees only its own."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def model_device(model: torch.nn.Module) -> torch.device:
    """Where `model`'s parameters are (the CPU for a model without any)."""
    return next(model.parameters(), torch.empty(0)).device


def autocast(dev: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    """Mixed precision for forward passes on `dev`: nothing for fp32, torch.autocast to bf16/fp16 otherwise."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=dev.type, dtype=DTYPES[precision])


def is_out_of_memory(error: BaseException) -> bool:
    """A device allocation failure (CUDA's OutOfMemoryError, or an allocator's 'out of memory' RuntimeError)."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


@contextlib.contextmanager
def out_of_memory_names(setting: str, batch_size: int, task: str, dev: torch.device):
    """Turn the device running out of memory in a training step into an error naming the setting to lower."""
    try:
        yield
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        raise DeviceOutOfMemory(f"out of memory on {describe(dev)} in a training step of task {task!r} with "
                                f"batches of {batch_size} rows: lower {setting} (now {batch_size})") from e


def describe(dev: torch.device) -> str:
    """'cuda:0 (NVIDIA H200)' or 'cpu' for stage lines and logs."""
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return str(dev)
