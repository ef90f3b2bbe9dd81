"""Exact log-probabilities of a sampler trajectory, replayed from (tokens, reveal_step).

The state before step s is rebuilt exactly: position p is visible iff
reveal_step[p] < s (prompt positions have reveal_step -1, so always). The
tokens revealed at step s are scored under the sampling distribution of that
state. Summed over steps this is the true log-likelihood of what the sampler
drew, given the positions it chose: no one-step or ELBO approximation.

Every (sample, step) pair that revealed at least one token becomes one row of
a replay batch, so a trajectory of S steps costs at most S forward rows; rows
are processed in chunks to bound memory. Subsampling steps (`steps_per_sample`)
keeps each chosen token's log-prob exact and makes the token-mean loss an
unbiased estimate of the full one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..precision import autocast_context
from .sampler import sampling_logprobs


@dataclass
class ReplayRows:
    sample_idx: torch.Tensor  # (P,) which sample each row replays
    step_idx: torch.Tensor  # (P,) which step

    def __len__(self) -> int:
        return int(self.sample_idx.numel())

    def chunks(self, rows_per_chunk: int):
        for start in range(0, len(self), rows_per_chunk):
            yield ReplayRows(self.sample_idx[start:start + rows_per_chunk],
                             self.step_idx[start:start + rows_per_chunk])


def replay_rows(reveal_step: torch.Tensor, steps: int, steps_per_sample: int | None = None,
                generator: torch.Generator | None = None) -> ReplayRows:
    """The (sample, step) pairs that revealed tokens; optionally a random subset per sample."""
    B = reveal_step.shape[0]
    s_range = torch.arange(steps, device=reveal_step.device)
    has_tokens = (reveal_step[:, None, :] == s_range[None, :, None]).any(-1)  # (B, S)
    if steps_per_sample is not None:
        # drawn on the CPU (the learner's generator lives there), then moved
        noise = torch.rand(has_tokens.shape, generator=generator).to(reveal_step.device)
        noise = noise.masked_fill(~has_tokens, 2.0)
        rank = noise.argsort(1).argsort(1)
        has_tokens &= rank < steps_per_sample
    sample_idx, step_idx = has_tokens.nonzero(as_tuple=True)
    assert sample_idx.numel() <= B * steps
    return ReplayRows(sample_idx, step_idx)


def replay_states(tokens: torch.Tensor, reveal_step: torch.Tensor, rows: ReplayRows,
                  mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, T) model inputs before each row's step, and (P, T) targets revealed at that step."""
    rs = reveal_step[rows.sample_idx]
    s = rows.step_idx[:, None]
    inputs = torch.where(rs < s, tokens[rows.sample_idx], torch.full_like(rs, mask_id))
    return inputs, rs == s


@dataclass
class RowLogprobs:
    logprobs: torch.Tensor  # (P, T) log-prob of the revealed token, 0 where not a target
    targets: torch.Tensor  # (P, T) bool
    entropy: torch.Tensor | None  # (P, T) entropy of the sampling distribution at targets


def row_logprobs(model, tokens: torch.Tensor, reveal_step: torch.Tensor, rows: ReplayRows,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 autocast_dtype: torch.dtype | None = None, with_entropy: bool = False) -> RowLogprobs:
    """Replay a chunk of rows through `model` (with gradients if enabled)."""
    inputs, targets = replay_states(tokens, reveal_step, rows, model.mask_id)
    with autocast_context(tokens.device, autocast_dtype):
        logits = model(inputs)
    logp_all = sampling_logprobs(logits, temperature, top_k, top_p)
    logp = logp_all.gather(-1, tokens[rows.sample_idx][..., None]).squeeze(-1)
    logp = torch.where(targets, logp, torch.zeros_like(logp))
    entropy = None
    if with_entropy:
        p = logp_all.exp()
        ent = -(p * logp_all.masked_fill(p == 0, 0.0)).sum(-1)
        entropy = torch.where(targets, ent, torch.zeros_like(ent))
    return RowLogprobs(logp, targets, entropy)


def scatter_rows(values: torch.Tensor, rows: ReplayRows, batch_size: int) -> torch.Tensor:
    """Sum (P, T) per-row values back into (B, T): each token belongs to exactly one row."""
    out = torch.zeros((batch_size, values.shape[1]), dtype=values.dtype, device=values.device)
    return out.index_add(0, rows.sample_idx, values)


def trajectory_logprobs(model, tokens: torch.Tensor, reveal_step: torch.Tensor, steps: int,
                        temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                        rows_per_chunk: int = 256, autocast_dtype: torch.dtype | None = None,
                        rows: ReplayRows | None = None) -> torch.Tensor:
    """(B, T) per-token log-probs of every revealed token (0 at prompt positions)."""
    rows = replay_rows(reveal_step, steps) if rows is None else rows
    out = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
    for chunk in rows.chunks(rows_per_chunk):
        r = row_logprobs(model, tokens, reveal_step, chunk, temperature, top_k, top_p, autocast_dtype)
        out = out + scatter_rows(r.logprobs, chunk, tokens.shape[0])
    return out
