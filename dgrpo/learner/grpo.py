"""GRPO math as pure torch functions: advantages, PPO surrogate, KL, loss aggregation.

No Ray and no model code here. Conventions:

* per-token tensors are (B, T), with a boolean ``mask`` (B, T) marking the tokens
  that count (the tokens revealed along a diffusion trajectory); a token's log-prob is its
  share of the trajectory's (its own log-prob plus an equal part of its step's selection
  term, models/trajectory.py), so per-token log-ratios sum to the trajectory's;
* per-sequence tensors are (B,);
* group rewards are (G, k): G prompts, k completions each.

Every function returns new tensors and never modifies its inputs in place.

Loss aggregation is expressed as a weight tensor ``w`` with
``loss = (w * per_token).sum()``. The learner computes the loss in chunks of rows
and backpropagates each chunk on its own, so the normaliser (total token count,
number of non-empty rows) must be fixed before the first chunk: with weights the
chunk losses ``(w[rows] * per_token[rows]).sum()`` add up exactly to the full loss.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import AdvantageMode, KLEstimator, LossAggregation

ADVANTAGE_MODES = typing.get_args(AdvantageMode)
KL_ESTIMATORS = typing.get_args(KLEstimator)
LOSS_AGGREGATIONS = typing.get_args(LossAggregation)

# log-ratios are clamped to +- this before an exponential (the PPO ratio, the k3 estimator) or a KL penalty.
KL_LOG_RATIO_CLAMP = 20.0


def _float_of(x: Tensor) -> Tensor:
    """x as a floating tensor (integer/bool rewards are promoted to the default float dtype)."""
    return x if x.is_floating_point() else x.to(torch.get_default_dtype())


# --------------------------------------------------------------------------- advantages


def group_advantages(rewards: Tensor, mode: str = "zscore", eps: float = 1e-6) -> Tensor:
    """Group-relative advantages. rewards (G, k) -> (G, k).

    * ``zscore``: ``(r - mean) / (std + eps)``. ``std`` is the *population* standard
      deviation (``unbiased=False``, divide by k): it is the natural scale of the k
      rewards actually observed, it is defined for every k >= 2 without a k-1
      correction, and it matches the usual GRPO implementations. A constant group
      has numerator 0 and so advantage 0 (``eps`` keeps it from being 0/0 = NaN).
    * ``center``: ``r - mean`` (Dr. GRPO: no division by the std).
    * ``loo``: leave-one-out baseline (RLOO), ``r_i - mean_{j != i} r_j``, which
      equals ``k / (k - 1) * (r_i - mean)``.

    Raises ValueError for a non-2-D input, k < 2 or an unknown mode.
    """
    if mode not in ADVANTAGE_MODES:
        raise ValueError(f"unknown advantage mode {mode!r}; expected one of {ADVANTAGE_MODES}")
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape (G, k); got shape {tuple(rewards.shape)}")
    k = rewards.shape[1]
    if k < 2:
        raise ValueError(f"group-relative advantages need k >= 2 completions per group; got k={k}")
    r = _float_of(rewards)
    centred = r - r.mean(dim=1, keepdim=True)
    if mode == "center":
        return centred
    if mode == "loo":
        return centred * (k / (k - 1))
    std = r.std(dim=1, unbiased=False, keepdim=True)
    return centred / (std + eps)


def group_similarity(tokens: Tensor, group_size: int, ngram: int, vocab_size: int) -> Tensor:
    """(N,) for each sample, the mean over the other samples of its group of the share of its distinct
    token n-grams that also occur in the other sample. tokens (N, T) long, groups of ``group_size`` contiguous
    rows. 1 for a sample whose every n-gram its group-mates repeat, 0 for one that shares none."""
    N, T = tokens.shape
    if N % group_size:
        raise ValueError(f"{N} samples do not split into groups of {group_size}")
    if ngram * math.log2(vocab_size) >= 63:
        raise ValueError(f"{ngram}-grams of a {vocab_size}-token vocabulary do not fit a 64-bit hash; "
                         f"use a shorter n-gram")
    if T < ngram:
        return torch.zeros(N, dtype=torch.float32, device=tokens.device)
    powers = vocab_size ** torch.arange(ngram, device=tokens.device, dtype=torch.int64)
    hashes = (tokens.unfold(1, ngram, 1).to(torch.int64) * powers).sum(-1)  # (N, T - n + 1)
    grams = [torch.unique(h) for h in hashes]
    sim = torch.zeros(N, dtype=torch.float32, device=tokens.device)
    for start in range(0, N, group_size):
        members = range(start, start + group_size)
        for i in members:
            shared = [torch.isin(grams[i], grams[j]).float().mean() for j in members if j != i]
            sim[i] = torch.stack(shared).mean()
    return sim


def zero_std_groups(rewards: Tensor, tol: float = 0.0) -> Tensor:
    """(G,) bool: groups whose k rewards are all equal (max - min <= tol).

    Such groups carry no learning signal (all advantages are 0).
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape (G, k); got shape {tuple(rewards.shape)}")
    if rewards.shape[1] == 0:
        return torch.ones(rewards.shape[0], dtype=torch.bool, device=rewards.device)
    spread = rewards.amax(dim=1) - rewards.amin(dim=1)
    return spread <= tol


# --------------------------------------------------------------------------- policy loss


def token_ratio(logp_new: Tensor, logp_old: Tensor) -> Tensor:
    """Per-token importance ratio pi_new / pi_old = exp(logp_new - logp_old)."""
    return torch.exp(logp_new - logp_old)


def clipped_surrogate(ratio: Tensor, advantages: Tensor, clip_low: float = 0.2,
                      clip_high: float | None = None) -> tuple[Tensor, Tensor]:
    """Per-token PPO clipped surrogate, as a loss to minimise.

    ``loss = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)``.
    ``clip_high`` defaults to ``clip_low``; a larger value gives the asymmetric
    "clip-higher" range. ``advantages`` must broadcast to ``ratio`` (pass (B, 1)
    for per-sequence advantages with (B, T) ratios).

    Returns ``(loss, clipped)``; ``clipped`` (bool, shape of the broadcast) is True
    where the clipped term is strictly smaller than the unclipped one, i.e. where the
    clipped branch is active and the gradient w.r.t. ``ratio`` is exactly zero.
    Ties (ratio inside the range, A == 0) take the unclipped branch.
    """
    if clip_high is None:
        clip_high = clip_low
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip ranges must be >= 0; got clip_low={clip_low}, clip_high={clip_high}")
    unclipped = ratio * advantages
    clipped_obj = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages
    clipped = clipped_obj < unclipped
    # torch.where rather than torch.minimum: where ``clipped`` holds, ratio lies outside
    # the clip range, so the clamp passes no gradient and the result is exactly zero.
    objective = torch.where(clipped, clipped_obj, unclipped)
    return -objective, clipped


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) on tokens sampled from pi.

    With ``d = ref_logp - logp`` (the log of pi_ref / pi):

    * ``k1 = -d = logp - ref_logp`` (unbiased, can be negative);
    * ``k2 = 0.5 * d**2`` (biased, >= 0);
    * ``k3 = exp(d) - d - 1`` (unbiased, >= 0).

    ``d`` is clamped to [-20, 20] first (for k3 both in the exponential and in the
    linear term) so that a wild log-ratio, e.g. a token the reference's top-k excludes,
    cannot overflow; clamping the whole expression keeps ``exp(x) - x - 1 >= 0`` exactly.
    Outside the clamp the estimate is constant and its gradient is zero.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")
    d = torch.clamp(ref_logp - logp, -KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP)
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    return torch.exp(d) - d - 1.0


def truncated_importance_weight(logp_old: Tensor, logp_behaviour: Tensor, cap: float) -> Tensor:
    """Truncated importance weight ``min(exp(logp_old - logp_behaviour), cap)``, detached.

    Corrects for the mismatch between the policy that generated the samples (the
    behaviour policy, e.g. a stale or lower-precision actor) and the learner's old
    policy. Raises ValueError for ``cap <= 0``.
    """
    if not cap > 0:
        raise ValueError(f"importance-weight cap must be > 0; got {cap}")
    with torch.no_grad():
        return torch.clamp(torch.exp(logp_old - logp_behaviour), max=cap).detach()


# --------------------------------------------------------------------------- aggregation


def aggregation_weights(mask: Tensor, mode: str = "token-mean", *,
                        dtype: torch.dtype | None = None) -> Tensor:
    """(B, T) float weights ``w`` such that the aggregated loss is ``(w * per_token).sum()``.

    * ``token-mean``: ``mask / mask.sum()`` (every counted token weighs the same);
    * ``seq-mean-token-mean``: ``mask / (B_eff * n_row)``: mean over the row's tokens,
      then mean over the B_eff rows that have at least one token (rows with no token
      get weight 0 and do not count in B_eff);
    * ``seq-mean-token-sum``: ``mask / B_eff``: sum over the row's tokens, mean over rows.

    An all-zero mask gives all-zero weights (no NaN). ``dtype`` defaults to the
    default float dtype.
    """
    if mode not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {LOSS_AGGREGATIONS}")
    if mask.dim() != 2:
        raise ValueError(f"mask must have shape (B, T); got shape {tuple(mask.shape)}")
    m = (mask != 0).to(dtype or torch.get_default_dtype())
    if mode == "token-mean":
        return m / m.sum().clamp_min(1.0)
    n_row = m.sum(dim=1, keepdim=True)
    b_eff = (n_row > 0).sum().to(m.dtype).clamp_min(1.0)
    if mode == "seq-mean-token-sum":
        return m / b_eff
    return m / (n_row.clamp_min(1.0) * b_eff)


def aggregate(per_token: Tensor, mask: Tensor, mode: str = "token-mean") -> Tensor:
    """Scalar ``(aggregation_weights(mask, mode) * per_token).sum()``.

    Positions outside ``mask`` are dropped with ``torch.where`` rather than multiplied
    by 0, so garbage there (inf/NaN from padding) cannot leak into the result.
    """
    if per_token.shape != mask.shape:
        raise ValueError(f"per_token shape {tuple(per_token.shape)} != mask shape {tuple(mask.shape)}")
    dtype = per_token.dtype if per_token.is_floating_point() else None
    w = aggregation_weights(mask, mode, dtype=dtype)
    return torch.where(mask != 0, w * per_token, torch.zeros((), dtype=w.dtype, device=w.device)).sum()


def sequence_kl(logp: Tensor, ref_logp: Tensor, mask: Tensor, scale: Tensor | None = None) -> Tensor:
    """(B,) KL(pi || pi_ref) per sequence, k1 on a trajectory: the sum over a sample's masked tokens of
    logp - ref_logp (their shares, trajectory.py: token and selection terms), for samples drawn from pi; its
    mean over samples estimates the trajectory KL without bias.

    ``scale`` (B,) multiplies each sum: when only some of a sample's steps were replayed, the steps with tokens
    over the steps replayed (trajectory.subsample_scale) makes the sum an unbiased estimate of the whole
    trajectory's. A sample without masked tokens counts 0.
    """
    m = mask != 0
    per_sample = torch.where(m, logp - ref_logp, torch.zeros((), dtype=logp.dtype, device=logp.device)).sum(dim=1)
    return per_sample if scale is None else per_sample * scale.to(per_sample.dtype)


@dataclass
class TokenLoss:
    loss: Tensor  # scalar: (weights * per-token loss).sum(), to backpropagate
    pg: Tensor  # (P, T) importance-weighted clipped surrogate per token
    kl: Tensor  # (P, T) KL penalty per token (before kl_coef)
    ratio: Tensor  # (P, T)
    clipped: Tensor  # (P, T) bool


def token_loss(new_logp: Tensor, old_logp: Tensor, ref_logp: Tensor, advantages: Tensor, weights: Tensor,
               targets: Tensor, *, clip_low: float, clip_high: float | None, kl_coef: float, kl_estimator: str,
               importance: Tensor | None = None, surrogate_logps: tuple[Tensor, Tensor] | None = None) -> TokenLoss:
    """The GRPO loss of a chunk of replayed rows: per token, ``importance * clip-surrogate(ratio, A) + kl_coef *
    KL-penalty(new, ref)``, summed with the aggregation ``weights`` over ``targets``.

    All log-probs are (P, T) per-token shares of their trajectory (trajectory.token_shares), ``advantages`` is
    (P, 1); ``importance`` (P, T), the truncated importance weight of recompute mode, defaults to 1. The ratio is
    exp(new - old), or of the pair ``surrogate_logps`` (new, old) when given (shares with the selection terms
    weighted down, GRPOConfig.selection_weight); the KL penalty always takes the whole shares. The log-ratio in
    the ratio is clamped to +-KL_LOG_RATIO_CLAMP, so a far-off token cannot overflow it.
    """
    new_s, old_s = surrogate_logps if surrogate_logps is not None else (new_logp, old_logp)
    d = torch.clamp(new_s - old_s, -KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP)
    ratio = torch.exp(d)
    pg, clipped = clipped_surrogate(ratio, advantages, clip_low, clip_high)
    if importance is not None:
        pg = importance * pg
    kl = kl_penalty(new_logp, ref_logp, kl_estimator)
    zero = torch.zeros((), dtype=pg.dtype, device=pg.device)
    loss = torch.where(targets, weights * (pg + kl_coef * kl), zero).sum()
    return TokenLoss(loss, pg, kl, ratio, clipped)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over ``mask`` (0 when the mask is empty); differentiable."""
    x = _float_of(x)
    m = mask != 0
    total = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum()
    return total / m.sum().clamp_min(1).to(x.dtype)


def masked_moments(x: Tensor, mask: Tensor) -> dict[str, float]:
    """Mean, std, min and max of ``x`` over ``mask``, as Python floats (for logging).

    ``std`` is the population std (``unbiased=False``), 0 for a single entry. All
    four are 0.0 when the mask is empty.
    """
    with torch.no_grad():
        vals = x.detach()[mask != 0].to(torch.float64)
        if vals.numel() == 0:
            return {"mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0}
        return {
            "mean": float(vals.mean()),
            "std": float(vals.std(unbiased=False)),
            "min": float(vals.min()),
            "max": float(vals.max()),
        }
