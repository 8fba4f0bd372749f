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
from pathlib import Path
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


def hold_linear_weights(model: torch.nn.Module, precision: Precision) -> torch.nn.Module:
    """For inference under autocast(dev, precision): `model`'s linear layers keep their weights and biases in
    the precision's dtype, so autocast stops casting them again on every call (on a CPU, at one input per
    request, that cast costs more than the matmuls it saves). Autocast casts to the same values, so outputs
    are unchanged; every forward of `model` must then run under autocast. fp32: `model` as it is. For serving
    only: artifacts are saved from training, whose weights stay fp32."""
    if precision != "fp32":
        for m in model.modules():
            if type(m) is torch.nn.Linear:  # not dynamic-int8 linear layers (kdlib.serve.quantize)
                m.to(DTYPES[precision])
    return model


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


def cpu_bf16_support(cpuinfo: str | Path = "/proc/cpuinfo") -> str | None:
    """How this machine's CPU multiplies bf16: "amx" (AMX tiles, Intel Xeon from Sapphire Rapids on: several
    times its fp32 speed), "avx512_bf16" (bf16 dot products, about twice fp32), or None (no native bf16, or not
    Linux: autocast then converts in software, slower than fp32)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    flags = next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())
    return "amx" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else None


def precision_advice(precision: Precision, uses_gpus: bool, support: str | None, flag: str = "precision=") -> str | None:
    """A console line when the precision leaves a CPU-only run or replica slower than it could be, else None.

    Args:
        precision: the run's `precision` setting (or jobs/serve.py's --precision).
        uses_gpus: whether the work asks Ray for GPUs (then the CPU's bf16 is not what decides).
        support: cpu_bf16_support() of the machine the work runs on.
        flag: how the setting is written where the user sets it: "precision=" (a job's override),
            "--precision " (jobs/serve.py).
    """
    if uses_gpus:
        return None
    if precision == "fp32" and support == "amx":
        return (f"[device] this CPU multiplies bf16 natively (AMX): {flag}bf16 is faster here at the same scores "
                "(docs/benchmarks.md, \"bf16 on the CPU\"; jobs/benchmark.py precision measures it)")
    if precision == "bf16" and support is None:
        return (f"[device] {flag}bf16 on a CPU without native bf16: autocast converts in software, slower than "
                f"fp32; {flag}fp32 is faster here")
    return None
