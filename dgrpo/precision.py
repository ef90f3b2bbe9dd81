"""Where a role computes and in which precision: the device, bf16 or fp32, autocast.

Every role (pretraining, judge and LM training, rollout, judge, learner, evaluation)
asks here, so a CPU and a GPU take one code path. The policy:

* `fp32` and `bf16` are taken as asked; `auto` picks bf16 only where the hardware
  multiplies bf16 natively (CUDA with bf16 support; a CPU with AMX-BF16 or AVX512-BF16)
  and fp32 elsewhere (an AVX2-only CPU emulates bf16 matmuls, far slower than fp32).
* The environment variable DGRPO_PRECISION=fp32|bf16 decides what `auto` means, for
  every role left at `auto` (the default), whatever the hardware: tests and CI use it to
  run the suite one way or the other on any CPU. Explicit fp32/bf16 settings stay pinned.
* Under bf16 only the matmuls of the trunk run in bf16 (torch.autocast); the output
  heads, log-softmax, log-probabilities, ratios, KL, losses and optimizer state stay in
  fp32 (see DiffusionLM.forward and the learner).

`describe_precision` says what a setting resolved to and why; every command prints it.
"""

from __future__ import annotations

import contextlib
import os
from functools import lru_cache
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16")
FORCE_ENV = "DGRPO_PRECISION"


def pick_device() -> torch.device:
    """The GPU Ray assigned to this process if any, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@lru_cache(maxsize=1)
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def machine_summary() -> dict:
    """The CPU model and the features that decide bf16 speed; quote them beside any figure."""
    flags = cpu_flags()
    return {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "avx2": "avx2" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def bf16_is_fast(device: torch.device | str) -> bool:
    """bf16 pays off on CUDA and on CPUs with native bf16 matmul (AMX / AVX512-BF16);
    on a CPU without them (AVX2 only) bf16 matmul is emulated and far slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def forced_precision() -> str | None:
    """DGRPO_PRECISION if set (fp32 or bf16), else None."""
    value = os.environ.get(FORCE_ENV, "").strip().lower()
    if not value:
        return None
    if value not in ("fp32", "bf16"):
        raise ValueError(f"{FORCE_ENV}={value!r}: set it to fp32 or bf16, or unset it")
    return value


def effective_precision(name: str, device: torch.device | str = "cpu") -> str:
    """'fp32' or 'bf16': the setting with 'auto' resolved (by DGRPO_PRECISION if set, else the hardware)."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {name!r}")
    if name == "auto":
        return forced_precision() or ("bf16" if bf16_is_fast(device) else "fp32")
    return name


def resolve_precision(name: str, device: torch.device | str = "cpu") -> torch.dtype | None:
    """The autocast dtype of a setting: None (fp32, no autocast) or torch.bfloat16."""
    return torch.bfloat16 if effective_precision(name, device) == "bf16" else None


def describe_precision(name: str, device: torch.device | str = "cpu") -> str:
    """One line: what `name` resolves to on `device`, and why."""
    device = torch.device(device)
    chosen = effective_precision(name, device)
    forced = forced_precision()
    if name != "auto":
        why = "as configured"
    elif forced:
        why = f"auto, set by {FORCE_ENV}={forced}"
    elif device.type == "cuda":
        why = f"auto: CUDA {'with' if chosen == 'bf16' else 'without'} bf16 support"
    else:
        flags = cpu_flags()
        native = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
        why = (f"auto: the CPU multiplies bf16 natively ({', '.join(native) or 'oneDNN reports it'})"
               if chosen == "bf16" else "auto: no native bf16 on this CPU (bf16 would be emulated, slower than fp32)")
    return f"{chosen} on {device.type} ({why})"


def precision_report(roles: dict[str, str], device: torch.device | str | None = None) -> str:
    """The precision policy of a command, one line per role, for printing at its start."""
    device = pick_device() if device is None else device
    width = max(len(role) for role in roles)
    lines = [f"precision: {role:<{width}}  {describe_precision(name, device)}" for role, name in roles.items()]
    if any(effective_precision(name, device) == "bf16" for name in roles.values()):
        lines.append("precision: bf16 covers the trunk's matmuls; heads, log-probs, losses and optimizers stay fp32")
    return "\n".join(lines)


def autocast_context(device: torch.device | str, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def fp32_region(device: torch.device | str):
    """A block computed in fp32 even inside a bf16 autocast region."""
    return torch.autocast(device_type=torch.device(device).type, enabled=False)
