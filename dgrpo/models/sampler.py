"""Diffusion sampler that records its own trajectory.

Start from a prompt in which some positions are [MASK] (all of them for
unconditional generation). At each of S steps the model predicts every
masked position, a token is drawn at every masked position from the
sampling distribution (temperature, optional top-k / top-p), and a scheduled
number of those positions is revealed, chosen at random or by confidence
(probability of the drawn token). The sampler records, per position, the step
at which it was revealed (`reveal_step`, -1 for prompt positions) and the
log-probability of the revealed token under the sampling distribution. That
is all the learner needs to rebuild every intermediate state exactly
(see trajectory.py).

Given a reference model, the sampler also measures KL(model || reference) between the two
trajectory distributions, along each trajectory it draws (`kl_to_reference`; its mean over samples
is the KL, an upper bound of the KL between the final texts). Under random order the positions do
not depend on the model, so a step's term is the exact KL of the two token distributions at the
revealed positions. Under confidence order the positions do: a step reveals the set R with tokens
x_R exactly when the draws there are x_R and every other masked position draws a token less likely
than tau = min_R p(x_j); that probability is the product over R of p(x_j) times, for each other masked
position, the mass of its tokens below tau. The step's term is the log of that probability under the
model minus under the reference (`confidence_step_logprob`). The revealed tokens' log-probs alone
leave out the choice of positions and are not a KL estimate under confidence order (their
log-ratio can be negative on average).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..precision import autocast_context

PROMPT_STEP = -1
REVEAL_ORDERS = ("random", "confidence")


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # (B, T) long, no [MASK] left
    reveal_step: torch.Tensor  # (B, T) long, -1 for prompt positions
    logprobs: torch.Tensor  # (B, T) float32, 0 at prompt positions
    # (B,) float64 nats, when sampled with a reference: this trajectory's term of KL(model || reference)
    kl_to_reference: torch.Tensor | None = None


def validate_sampling(steps: int, temperature: float, top_k: int, top_p: float, order: str) -> None:
    if steps < 1:
        raise ValueError(f"sampler steps must be >= 1, got {steps}")
    if not temperature > 0:
        raise ValueError(f"sampler temperature must be > 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"sampler top_k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"sampler top_p must be in (0, 1], got {top_p}")
    if order not in REVEAL_ORDERS:
        raise ValueError(f"sampler order must be one of {REVEAL_ORDERS}, got {order!r}")


def sampling_logprobs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0) -> torch.Tensor:
    """Log-probabilities of the sampling distribution, in float32.

    Shared by the sampler and the learner's replay so both see the same
    distribution; tokens removed by top-k / top-p get -inf.
    """
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p  # keep the first token that crosses top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return F.log_softmax(logits, dim=-1)


def position_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """(..., V) log-probs of two distributions -> (...) KL(p || ref) in nats; +inf where ref excludes a
    token p can draw (top-k / top-p), 0 contribution from tokens p excludes."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - ref_logp), 0.0).sum(-1)


def confidence_step_logprob(logp: torch.Tensor, token: torch.Tensor, reveal: torch.Tensor,
                            masked: torch.Tensor) -> torch.Tensor:
    """(B,) log-probability that one confidence-order step, from a state whose masked positions are `masked`
    and whose token log-probs are `logp` (B, T, V), reveals exactly the positions `reveal` with `token` there:
    sum over revealed j of log p_j(token_j) plus, for each other masked position, the log of the mass of its
    tokens below tau = min over revealed j of p_j(token_j). A row that reveals nothing scores 0."""
    token_logp = logp.gather(-1, token[..., None]).squeeze(-1)
    revealed = torch.where(reveal, token_logp, 0.0).sum(1)
    tau = torch.where(reveal, token_logp, float("inf")).amin(1)
    below = torch.logsumexp(logp.masked_fill(logp >= tau[:, None, None], float("-inf")), dim=-1)
    return revealed + torch.where(masked & ~reveal, below, 0.0).sum(1)


def reveal_schedule(n_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """(B,) masked counts -> (B, steps) number revealed at each step (linear schedule, sums to n)."""
    s = torch.arange(1, steps + 1, device=n_masked.device)
    cumulative = (n_masked[:, None] * s[None, :]) // steps
    return torch.diff(cumulative, dim=1, prepend=torch.zeros_like(cumulative[:, :1]))


@torch.no_grad()
def sample(model, prompt: torch.Tensor, steps: int = 32, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, order: str = "random", generator: torch.Generator | None = None,
           autocast_dtype: torch.dtype | None = None, reference=None) -> SampleOutput:
    """Fill every [MASK] of `prompt` (B, T) in `steps` denoising steps, batched over B. With a `reference`
    model, also log model(trajectory) - log reference(trajectory) of each trajectory (`kl_to_reference`)."""
    validate_sampling(steps, temperature, top_k, top_p, order)
    mask_id = model.mask_id
    x = prompt.clone()
    masked = x == mask_id
    reveal_step = torch.full_like(x, PROMPT_STEP)
    logprobs = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    counts = reveal_schedule(masked.sum(1), steps)
    positions = torch.arange(x.shape[1], device=x.device).expand_as(x)
    kl = None if reference is None else torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for s in range(steps):
        n_reveal = counts[:, s]
        if not bool(n_reveal.any()):
            continue
        with autocast_context(x.device, autocast_dtype):
            logits = model(x)
        logp = sampling_logprobs(logits, temperature, top_k, top_p)
        gumbel = -torch.log(-torch.log(torch.rand(logp.shape, generator=generator, device=x.device)
                                       .clamp_(1e-20, 1.0)))
        token = (logp + gumbel).argmax(-1)
        token_logp = logp.gather(-1, token[..., None]).squeeze(-1)
        if order == "random":
            score = torch.rand(x.shape, generator=generator, device=x.device)
        else:
            score = token_logp.clone()
        score = score.masked_fill(~masked, float("-inf"))
        ranked = score.argsort(dim=1, descending=True)
        rank = torch.empty_like(ranked).scatter_(1, ranked, positions)
        reveal = masked & (rank < n_reveal[:, None])
        if reference is not None:
            with autocast_context(x.device, autocast_dtype):
                ref_logits = reference(x)
            ref_logp = sampling_logprobs(ref_logits, temperature, top_k, top_p)
            if order == "confidence":
                kl += (confidence_step_logprob(logp, token, reveal, masked)
                       - confidence_step_logprob(ref_logp, token, reveal, masked)).double()
            else:
                kl += torch.where(reveal, position_kl(logp, ref_logp), 0.0).sum(1, dtype=torch.float64)
        x = torch.where(reveal, token, x)
        reveal_step = torch.where(reveal, torch.full_like(x, s), reveal_step)
        logprobs = torch.where(reveal, token_logp, logprobs)
        masked &= ~reveal
    assert not bool(masked.any()), "reveal schedule left masked positions"
    return SampleOutput(tokens=x, reveal_step=reveal_step, logprobs=logprobs, kl_to_reference=kl)
