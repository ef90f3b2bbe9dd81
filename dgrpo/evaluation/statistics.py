"""Means and standard errors over prompts.

The unit of replication is the prompt: with several samples per prompt, the samples of a
prompt are averaged first (they share the prompt, so they are not independent draws of
the evaluation), and the mean and standard error are taken over the per-prompt values.
Rows sampled on the same prompts are compared by paired differences, prompt by prompt.
"""

from __future__ import annotations

import math

import torch


def mean_stderr(values: torch.Tensor) -> dict:
    """{mean, stderr} of a 1-D tensor: the standard error is std (n - 1) / sqrt(n)."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    if v.numel() < 2:
        raise ValueError(f"a standard error needs at least 2 values, got {v.numel()}")
    return {"mean": float(v.mean()), "stderr": float(v.std(unbiased=True) / math.sqrt(v.numel()))}


def per_prompt_means(values: torch.Tensor) -> torch.Tensor:
    """(P, m) values of m samples per prompt -> (P,) float64 per-prompt means."""
    v = torch.as_tensor(values, dtype=torch.float64)
    if v.dim() != 2:
        raise ValueError(f"per-prompt values must be (prompts, samples), got shape {tuple(v.shape)}")
    return v.mean(dim=1)


def paired_difference(a: torch.Tensor, b: torch.Tensor) -> dict:
    """{mean, stderr} of a - b, paired by prompt: both (P,) in the same prompt order."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return mean_stderr(a - b)


def jackknife_stderr(leave_one_out: torch.Tensor) -> float:
    """Delete-one jackknife standard error from the P statistics computed without each prompt."""
    t = torch.as_tensor(leave_one_out, dtype=torch.float64).flatten()
    n = t.numel()
    if n < 2:
        raise ValueError(f"a jackknife needs at least 2 prompts, got {n}")
    return float(((n - 1) / n * (t - t.mean()).square().sum()).sqrt())
