"""Exact log-probabilities of a sampler trajectory, replayed from (tokens, reveal_step).

The state before step s is rebuilt exactly: position p is visible iff reveal_step[p] < s (prompt positions
have reveal_step -1, so always). From that state's sampling distribution the replay scores the tokens
revealed at step s and the choice of positions (`selection`, sampler.py: under confidence order it depends
on the model). Summed over steps this is the true log-likelihood of what the sampler did: no one-step or
ELBO approximation, in either reveal order.

A token-level loss needs per-token quantities: a token's *share* is its own log-prob plus an equal part of its
step's selection term (`token_shares`). The shares of a trajectory sum to its log-likelihood, so their
log-ratios sum to the trajectory's log-ratio and, at ratio 1, a per-token surrogate's gradient is the
trajectory's exact policy gradient.

Every (sample, step) pair that revealed at least one token becomes one row of a replay batch, so a
trajectory of S steps costs at most S forward rows; rows are processed in chunks to bound memory.
Subsampling steps (`steps_per_sample`) keeps each chosen step's log-probs exact and makes sums over a
trajectory estimates (`subsample_scale`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..precision import autocast_context
from .sampler import DEFAULTS, RevealRule, reveal_floor, selection_logprob, sampling_logprobs


@dataclass
class ReplayRows:
    sample_idx: torch.Tensor  # (P,) which sample each row replays
    step_idx: torch.Tensor  # (P,) which step

    def __len__(self) -> int:
        return int(self.sample_idx.numel())

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> "ReplayRows":
        """The rows marked in a (B, S) bool mask, in replay_rows' order (by sample, then step)."""
        sample_idx, step_idx = mask.nonzero(as_tuple=True)
        return cls(sample_idx, step_idx)

    def mask(self, batch_size: int, steps: int) -> torch.Tensor:
        """(B, S) bool: the rows as a mask."""
        out = torch.zeros((batch_size, steps), dtype=torch.bool, device=self.sample_idx.device)
        out[self.sample_idx, self.step_idx] = True
        return out

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
    selection: torch.Tensor  # (P,) log-prob of the row's choice of positions
    entropy: torch.Tensor | None  # (P, T) entropy of the sampling distribution at targets

    def shares(self, selection_weight: float = 1.0) -> torch.Tensor:
        """(P, T) each target's log-prob plus an equal share of its row's selection term (times
        `selection_weight`), 0 elsewhere."""
        per_token = selection_weight * self.selection / self.targets.sum(1).clamp_min(1)
        return torch.where(self.targets, self.logprobs + per_token[:, None], 0.0)


def row_logprobs(model, tokens: torch.Tensor, reveal_step: torch.Tensor, rows: ReplayRows,
                 temperature: float = DEFAULTS.temperature, top_k: int = DEFAULTS.top_k,
                 top_p: float = DEFAULTS.top_p, rule: RevealRule = RevealRule(),
                 reveal_rank: torch.Tensor | None = None, autocast_dtype: torch.dtype | None = None,
                 with_entropy: bool = False) -> RowLogprobs:
    """Replay a chunk of rows through `model` (with gradients if enabled). `reveal_rank` (B, T), the order of each
    position among its step's reveals, is needed by the gumbel_confidence rule only."""
    if rule.order == "gumbel_confidence" and (reveal_rank is None or not reveal_rank.numel()):
        raise ValueError("replaying gumbel_confidence steps needs the rollouts' reveal_rank")
    inputs, targets = replay_states(tokens, reveal_step, rows, model.mask_id)
    with autocast_context(tokens.device, autocast_dtype):
        logits = model(inputs)
    logp_all = sampling_logprobs(logits, temperature, top_k, top_p)
    row_tokens = tokens[rows.sample_idx]
    logp = logp_all.gather(-1, row_tokens[..., None]).squeeze(-1)
    logp = torch.where(targets, logp, torch.zeros_like(logp))
    rank = None if reveal_rank is None or not reveal_rank.numel() else reveal_rank[rows.sample_idx]
    masked = inputs == model.mask_id
    floor = None
    if rule.log_threshold is not None:
        n_total = (reveal_step[rows.sample_idx] >= 0).sum(1)
        floor = reveal_floor(n_total, masked.sum(1), rows.step_idx, rule.steps)
    selection = selection_logprob(logp_all, row_tokens, targets, masked, rank, rule, floor)
    entropy = None
    if with_entropy:
        p = logp_all.exp()
        ent = -(p * logp_all.masked_fill(p == 0, 0.0)).sum(-1)
        entropy = torch.where(targets, ent, torch.zeros_like(ent))
    return RowLogprobs(logp, targets, selection, entropy)


def scatter_rows(values: torch.Tensor, rows: ReplayRows, batch_size: int) -> torch.Tensor:
    """Sum (P, T) per-row values back into (B, T): each token belongs to exactly one row."""
    out = torch.zeros((batch_size, values.shape[1]), dtype=values.dtype, device=values.device)
    return out.index_add(0, rows.sample_idx, values)


def token_shares(logprobs: torch.Tensor, selection: torch.Tensor, reveal_step: torch.Tensor,
                 selection_weight: float = 1.0) -> torch.Tensor:
    """(B, T) each revealed token's log-prob plus an equal share of its step's selection term (B, S), times
    `selection_weight`; 0 at prompt positions. With weight 1 a trajectory's shares sum to its log-likelihood."""
    step = reveal_step.clamp_min(0)
    revealed = reveal_step >= 0
    counts = torch.zeros_like(selection).scatter_add(1, step, revealed.to(selection.dtype))
    per_token = (selection_weight * selection / counts.clamp_min(1)).gather(1, step)
    return torch.where(revealed, logprobs + per_token, 0.0)


def subsample_scale(reveal_step: torch.Tensor, rows: ReplayRows, steps: int) -> torch.Tensor:
    """(B,) steps that revealed tokens / steps replayed, per sample: a sum over the replayed steps times this
    estimates the sum over the whole trajectory without bias (each step is replayed with the same chance);
    1 when every step is replayed."""
    s_range = torch.arange(steps, device=reveal_step.device)
    with_tokens = (reveal_step[:, None, :] == s_range[None, :, None]).any(-1).sum(1)
    replayed = torch.bincount(rows.sample_idx, minlength=reveal_step.shape[0])
    return with_tokens.float() / replayed.clamp_min(1).float()


def trajectory_step_logprobs(model, tokens: torch.Tensor, reveal_step: torch.Tensor, steps: int,
                             temperature: float = DEFAULTS.temperature, top_k: int = DEFAULTS.top_k,
                             top_p: float = DEFAULTS.top_p, rule: RevealRule = RevealRule(),
                             reveal_rank: torch.Tensor | None = None, rows_per_chunk: int = 256,
                             autocast_dtype: torch.dtype | None = None,
                             rows: ReplayRows | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) log-probs of every revealed token (0 at prompt positions) and (B, S) the selection term of every
    step, replayed (0 for steps not replayed or that revealed nothing)."""
    rows = replay_rows(reveal_step, steps) if rows is None else rows
    out = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
    selection = torch.zeros((tokens.shape[0], steps), dtype=torch.float32, device=tokens.device)
    for chunk in rows.chunks(rows_per_chunk):
        r = row_logprobs(model, tokens, reveal_step, chunk, temperature, top_k, top_p, rule, reveal_rank,
                         autocast_dtype)
        out = out + scatter_rows(r.logprobs, chunk, tokens.shape[0])
        selection = selection.index_put((chunk.sample_idx, chunk.step_idx), r.selection)
    return out, selection


def trajectory_logprobs(model, tokens: torch.Tensor, reveal_step: torch.Tensor, steps: int,
                        temperature: float = DEFAULTS.temperature, top_k: int = DEFAULTS.top_k,
                        top_p: float = DEFAULTS.top_p, rows_per_chunk: int = 256,
                        autocast_dtype: torch.dtype | None = None, rows: ReplayRows | None = None) -> torch.Tensor:
    """(B, T) log-probs of every revealed token (0 at prompt positions); the selection terms left out."""
    return trajectory_step_logprobs(model, tokens, reveal_step, steps, temperature, top_k, top_p,
                                    rule=RevealRule("random"), rows_per_chunk=rows_per_chunk,
                                    autocast_dtype=autocast_dtype, rows=rows)[0]


ROWS_SEED_OFFSET = 0x2545F4914F6CDD1D  # far from any request's sampler seed (run.seed * 1_000_003 + request id)


@torch.no_grad()
def reference_terms(model, tokens: torch.Tensor, reveal_step: torch.Tensor, steps: int, replay_steps: int | None,
                    seed: int, rule: RevealRule = RevealRule(), reveal_rank: torch.Tensor | None = None,
                    rows_per_chunk: int = 256, autocast_dtype: torch.dtype | None = None,
                    **sampling) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a rollout worker sends for the learner's reference terms (grpo.reference_on=rollout): the replay rows,
    `replay_steps` per sample (None: every step that revealed tokens), drawn from the request's `seed` so that the
    same request always gives the same rows, as a (B, S) mask; `model`'s (B, T) token log-probs and (B, S)
    selection terms on them, computed by the learner's own replay function. Replaying only the rows the learner
    will use costs replay_steps / S of a full replay."""
    # not `seed` itself: the sampler drew the trajectory from it, and rows drawn from the same numbers would
    # depend on the trajectory (the subsampled sums would no longer be unbiased)
    rows_seed = (seed + ROWS_SEED_OFFSET) % 2 ** 64
    rows = replay_rows(reveal_step, steps, replay_steps, torch.Generator().manual_seed(rows_seed))
    logprobs, selection = trajectory_step_logprobs(model, tokens, reveal_step, steps, rule=rule,
                                                   reveal_rank=reveal_rank, rows_per_chunk=rows_per_chunk,
                                                   autocast_dtype=autocast_dtype, rows=rows, **sampling)
    return rows.mask(tokens.shape[0], steps), logprobs, selection
