"""Where a role computes and in which precision: the device, bf16 or fp32, autocast.

Every role (pretraining, judge training, rollout, judge, learner) asks here, so a
CPU and a GPU take one code path, and bf16 is used only where the hardware runs it
natively.
"""

from __future__ import annotations

import contextlib

import torch

def pick_device() -> torch.device:
    """The GPU Ray assigned to this process if any, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def bf16_is_fast(device: torch.device | str) -> bool:
    """bf16 pays off on CUDA and on CPUs with native bf16 matmul (AMX / AVX512-BF16);
    on a CPU without them (AVX2 only) bf16 matmul is emulated and far slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(name: str, device: torch.device | str = "cpu") -> torch.dtype | None:
    """'fp32' -> None (no autocast), 'bf16' -> bfloat16, 'auto' -> bf16 only where it is fast."""
    if name == "fp32":
        return None
    if name == "bf16":
        return torch.bfloat16
    if name == "auto":
        return torch.bfloat16 if bf16_is_fast(device) else None
    raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {name!r}")


def autocast_context(device: torch.device | str, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
