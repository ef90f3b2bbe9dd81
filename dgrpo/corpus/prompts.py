"""Prompts for GRPO rollouts: corpus windows with some or all positions masked.

unconditional: every position is [MASK]; the model writes a window from scratch.
infill: a fixed number of positions per window are masked, the rest is real text.
"""

from __future__ import annotations

import torch

from .data import CorpusError, random_windows

PROMPT_KINDS = ("unconditional", "infill")


def _check_kind(kind: str, mask_fraction: float) -> None:
    if kind not in PROMPT_KINDS:
        raise ValueError(f"unknown prompt kind {kind!r}; use one of {', '.join(PROMPT_KINDS)}")
    if not 0 < mask_fraction <= 1:
        raise ValueError(f"mask_fraction must be in (0, 1], got {mask_fraction}; e.g. 0.5 masks "
                         f"half of each window")


def make_prompts(windows: torch.Tensor, mask_id: int, kind: str = "unconditional",
                 mask_fraction: float = 0.5,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """windows (B, T) of clean ids -> prompts (B, T) with mask_id at the positions to fill."""
    _check_kind(kind, mask_fraction)
    if windows.dim() != 2:
        raise ValueError(f"windows must be 2-D (batch, block_size), got shape "
                         f"{tuple(windows.shape)}")
    if kind == "unconditional":
        return torch.full_like(windows, mask_id)
    B, T = windows.shape
    k = max(1, round(mask_fraction * T))
    # Exactly k masked per row: the k positions with the smallest random scores.
    device = generator.device if generator is not None else torch.device("cpu")
    scores = torch.rand(B, T, generator=generator, device=device)
    masked = torch.zeros(B, T, dtype=torch.bool, device=device)
    masked.scatter_(1, scores.argsort(dim=1)[:, :k], True)
    return windows.masked_fill(masked.to(windows.device), mask_id)


class PromptStream:
    """Deterministic stream of prompt windows from a split, resumable."""

    def __init__(self, data: torch.Tensor, block_size: int, mask_id: int, kind: str,
                 mask_fraction: float, seed: int):
        _check_kind(kind, mask_fraction)
        if len(data) < block_size:
            raise CorpusError(f"the prompt split has {len(data)} characters, fewer than "
                              f"block_size = {block_size}; use a longer corpus or a smaller "
                              f"block size / val_fraction")
        self.data = data
        self.block_size = block_size
        self.mask_id = mask_id
        self.kind = kind
        self.mask_fraction = mask_fraction
        self.seed = seed
        self.drawn = 0  # windows handed out so far
        self.generator = torch.Generator().manual_seed(seed)

    def next(self, n: int) -> torch.Tensor:
        windows = random_windows(self.data, n, self.block_size, self.generator)
        prompts = make_prompts(windows, self.mask_id, self.kind, self.mask_fraction,
                               self.generator)
        self.drawn += n
        return prompts

    def _settings(self) -> dict:
        return {"seed": self.seed, "kind": self.kind, "block_size": self.block_size,
                "mask_fraction": self.mask_fraction, "n_data": len(self.data)}

    def state_dict(self) -> dict:
        return {**self._settings(), "drawn": self.drawn,
                "generator_state": self.generator.get_state().tolist()}

    def load_state_dict(self, d: dict) -> None:
        # A resumed stream only repeats the original if it samples the same way.
        for key, ours in self._settings().items():
            if key in d and d[key] != ours:
                raise ValueError(f"prompt stream state was saved with {key}={d[key]!r} but this "
                                 f"run has {key}={ours!r}; resume with the same corpus and prompt "
                                 f"settings, or start a fresh run")
        self.generator.set_state(torch.tensor(d["generator_state"], dtype=torch.uint8))
        self.drawn = int(d["drawn"])
