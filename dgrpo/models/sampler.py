"""Diffusion sampler that records its own trajectory, and the exact probability of each step.

Start from a prompt in which some positions are [MASK] (all of them for unconditional generation). At each of
S steps the model predicts every masked position, a token is drawn at every masked position from the sampling
distribution (temperature, optional top-k / top-p), and a scheduled number n of those positions is revealed:

- `random` order: n positions chosen uniformly at random;
- `confidence` order: the n positions whose drawn tokens are most likely; with probability `random_reveal`
  a step reveals n positions chosen at random instead (see "Support" below). With a `reveal_threshold` theta
  the step also reveals every masked position whose drawn token is at least theta likely, and n is a floor:
  the linear schedule's count for the step, at least 1; a sample whose tokens are sure gets ahead of the
  schedule and finishes in fewer steps (fewer forwards to sample and to replay);
- `gumbel_confidence` order: n positions drawn one after another without replacement, each with probability
  proportional to p_max^(1 / reveal_temperature), p_max the probability of the position's likeliest token
  (Gumbel-top-n on log p_max / reveal_temperature); the order of the draws is recorded (`reveal_rank`).

The sampler records, per position, the step that revealed it (`reveal_step`, -1 for prompt positions) and the
log-probability of the revealed token (`logprobs`), and, per step, the log-probability of the choice of
positions given the drawn tokens (`selection`). A step's probability is the product of the two:

    P(step reveals R with tokens x_R) = prod_{j in R} p_j(x_j) * Sel(R | x_R)

Random order: Sel = 1 / C(m, n) for m masked positions, the same for every model, so it is recorded as 0
(only ratios between models matter: the learner's, the KL's). Confidence order: the step
reveals R exactly when the draws there are x_R and every other masked position draws a token less likely than
tau = min_{j in R} p_j(x_j) (or exactly as likely, for a position after the last revealed one at tau: ties go to
the lower position), so with the random share eps

    Sel = (1 - eps) * prod_{i masked, not in R} p_i(tokens less likely than tau) + eps / C(m, n)

With a threshold theta and floor f (the step reveals max(f, #positions at or above theta) by confidence), the
hidden positions must have drawn tokens less likely than min(tau, theta) (strictly below theta: a token at theta
is revealed), and a step revealing more than f must have tau >= theta. Its random share reveals f + g positions
at random, g drawn from a geometric law halved at each count and cut at m - f, so that a step of any size stays
possible under any model:

    Sel = (1 - eps) * [n == f or n > f, tau >= theta] * prod_{i hidden} p_i(tokens less likely than min(tau, theta))
          + eps * P(g = n - f) / C(m, n)

gumbel_confidence: Sel is the Plackett-Luce probability of the recorded order, a product over the draws of
w_j / (sum of w over the positions still masked), w = p_max^(1 / reveal_temperature) (`selection_logprob`). Summed over steps, token and selection terms give the log-likelihood of the trajectory
(up to the model-independent constant of random order), which is all the learner needs to replay it exactly
(trajectory.py).

The two confidence rules differ in how the step probability depends on the model. Under `confidence` it jumps
where a hidden position's likeliest token crosses tau (tau is a drawn token's probability), so models that differ
a little can give a trajectory very different probabilities: the trajectory KL between them is large next to the
KL between their texts. Under `gumbel_confidence` it is smooth in the model.

Support: without the random share, a confidence step is impossible under a model for which some hidden position
has no token less likely than tau (a model very sure of a position the trajectory left hidden): its probability
is 0, and the KL of a policy that takes such steps to that model is infinite. With eps > 0 every step keeps at
least the probability eps / C(m, n) times its tokens' under every model, so log-ratios and the KL stay finite.

Given a reference model, the sampler also measures KL(model || reference) between the two trajectory
distributions along each trajectory it draws (`kl_to_reference`; its mean over samples is the KL, an upper bound
of the KL between the final texts): under random order the exact KL of the two token distributions at the
revealed positions (positions do not depend on the model); under the confidence rules the log of the whole step
probability under the model minus under the reference.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import RevealOrder, SamplerConfig
from ..precision import autocast_context

PROMPT_STEP = -1
REVEAL_ORDERS = typing.get_args(RevealOrder)
DEFAULTS = SamplerConfig()
# log 0 as a finite number: the mass of a hidden position that has no token below tau (exp of it is 0, and
# unlike -inf it passes no NaN gradient through logsumexp)
LOG_ZERO = -1e30


@dataclass(frozen=True)
class RevealRule:
    """How a step chooses which masked positions to reveal (SamplerConfig.order and its options)."""
    order: str = DEFAULTS.order
    random_reveal: float = DEFAULTS.random_reveal  # confidence: the share of steps revealing at random
    reveal_temperature: float = DEFAULTS.reveal_temperature  # gumbel_confidence
    reveal_threshold: float | None = DEFAULTS.reveal_threshold  # confidence: reveal every token this likely
    steps: int | None = None  # the schedule's steps: the threshold's floor depends on them

    def __post_init__(self):
        if self.reveal_threshold is not None and self.steps is None:
            raise ValueError("a reveal rule with a reveal_threshold needs the sampler's steps (its floor follows "
                             "the linear schedule)")

    @property
    def log_threshold(self) -> float | None:
        """log theta under confidence order with a threshold, else None."""
        if self.order != "confidence" or self.reveal_threshold is None:
            return None
        return math.log(self.reveal_threshold)

    @classmethod
    def of(cls, settings: dict) -> "RevealRule":
        """The rule among sampler settings (a SamplerConfig dump or a RolloutBatch's fields)."""
        keys = ("order", "random_reveal", "reveal_temperature", "reveal_threshold", "steps")
        rule = {k: settings[k] for k in keys if k in settings}
        rule["reveal_threshold"] = rule.get("reveal_threshold") or None  # a RolloutBatch writes 0 for off
        return cls(**rule)


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # (B, T) long, no [MASK] left
    reveal_step: torch.Tensor  # (B, T) long, -1 for prompt positions
    reveal_rank: torch.Tensor  # (B, T) long, order of the position among its step's reveals, -1 for prompt positions
    logprobs: torch.Tensor  # (B, T) float32 log-prob of each revealed token, 0 at prompt positions
    selection: torch.Tensor  # (B, S) float32 log-prob of each step's choice of positions, 0 where none revealed
    # (B,) float64 nats, when sampled with a reference: this trajectory's term of KL(model || reference)
    kl_to_reference: torch.Tensor | None = None


def validate_sampling(steps: int, temperature: float, top_k: int, top_p: float, order: str,
                      random_reveal: float = 0.0, reveal_temperature: float = 1.0,
                      reveal_threshold: float | None = None) -> None:
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
    if not 0 <= random_reveal < 1:
        raise ValueError(f"sampler random_reveal must be in [0, 1), got {random_reveal}")
    if not reveal_temperature > 0:
        raise ValueError(f"sampler reveal_temperature must be > 0, got {reveal_temperature}")
    if reveal_threshold is not None:
        if not 0 < reveal_threshold <= 1:
            raise ValueError(f"sampler reveal_threshold must be in (0, 1] (or None: off), got {reveal_threshold}")
        if order != "confidence":
            raise ValueError(f"sampler reveal_threshold applies to confidence order only, got order={order!r}; "
                             "set order=confidence or reveal_threshold=null")


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


def log_choose(n: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """log C(n, k) elementwise, float32 (computed in float64)."""
    n, k = n.double(), k.double()
    return (torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)).float()


def extra_count_logprob(extra: torch.Tensor, most: torch.Tensor) -> torch.Tensor:
    """log P(g = extra) for g in 0..most with P(g) proportional to 2^-(g + 1): how many positions beyond the floor
    a random step of the threshold rule reveals."""
    extra, most = extra.double(), most.double()
    logp = -(extra + 1) * math.log(2) - torch.log1p(-torch.exp2(-(most + 1)))
    return torch.where((extra >= 0) & (extra <= most), logp, LOG_ZERO).float()


def draw_extra_count(most: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(B,) g in 0..most with P(g) proportional to 2^-(g + 1) (inverse CDF)."""
    u = torch.rand(most.shape, generator=generator, device=most.device, dtype=torch.float64)
    v = u * -torch.expm1(-(most.double() + 1) * math.log(2))
    return torch.minimum(torch.floor(-torch.log2(1 - v)).long(), most)


def reveal_floor(n_total: torch.Tensor, n_masked: torch.Tensor, step: torch.Tensor | int, steps: int) -> torch.Tensor:
    """The fewest positions a threshold step reveals: the linear schedule's count at `step` (at least 1), or every
    masked position left if fewer. A step that reveals more than its count (tokens above the threshold) puts the
    sample ahead of the schedule for good, so it finishes in fewer steps; without one it keeps to the schedule."""
    step = torch.as_tensor(step, device=n_total.device)
    count = (n_total * (step + 1)) // steps - (n_total * step) // steps
    return torch.minimum(count.clamp_min(1), n_masked)


def log_mass_below(logp: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """(B, T) log of the probability of the tokens with log-prob below `bound` (B, T), LOG_ZERO where there are none.
    A log-sum-exp whose exponents are kept above -80: below that exp takes a slow path on the CPU (many times the
    time of the rest), and what it drops is under e^-80 of the largest term."""
    above = logp >= bound[..., None]
    top = logp.masked_fill(above, float("-inf")).amax(-1)
    some = top > float("-inf")
    top = torch.where(some, top, 0.0)
    terms = (logp - top[..., None]).clamp_min_(-80.0).exp_()
    terms = terms.masked_fill(above, 0.0) if terms.requires_grad else terms.masked_fill_(above, 0.0)  # exp saved it
    return torch.where(some, top + terms.sum(-1).clamp_min(1e-30).log(), LOG_ZERO)


def confidence_selection(logp: torch.Tensor, token: torch.Tensor, reveal: torch.Tensor, masked: torch.Tensor,
                         random_reveal: float, log_threshold: float | None = None,
                         floor: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) log-probability of the confidence rule's choice: every hidden masked position drew a token less likely
    than tau, the least likely revealed token (ties go to the lower position), or, with probability
    random_reveal, a uniformly random choice. With a threshold (log_threshold, and the step's floor) the hidden
    positions' tokens lie below min(tau, theta) and the random choice's size is floor + a geometric count."""
    token_logp = logp.gather(-1, token[..., None]).squeeze(-1)
    tau = torch.where(reveal, token_logp, float("inf")).amin(1)
    # ties go to the lower position (the sampler's stable sort): a hidden position after the last revealed one
    # at tau may also have drawn a token exactly at tau
    positions = torch.arange(reveal.shape[1], device=reveal.device)
    last_at_tau = torch.where(reveal & (token_logp == tau[:, None]), positions, -1).amax(1)
    after = positions[None, :] > last_at_tau[:, None]
    cut = tau
    if log_threshold is not None:  # a token at theta would have been revealed: no ties there
        cut = tau.clamp_max(log_threshold)
        after = after & (tau < log_threshold)[:, None]
    # "less likely than cut, or as likely after the last tie" is "below the next float up" there
    bound = torch.where(after, torch.nextafter(cut[:, None], torch.tensor(float("inf"))), cut[:, None])
    below = log_mass_below(logp, bound)
    by_confidence = torch.where(masked & ~reveal, below, 0.0).sum(1).clamp_min(LOG_ZERO)
    n, m = reveal.sum(1), masked.sum(1)
    if log_threshold is not None:
        if floor is None:
            raise ValueError("the threshold rule's selection term needs each step's floor")
        by_confidence = torch.where((n == floor) | ((n > floor) & (tau >= log_threshold)), by_confidence, LOG_ZERO)
    if random_reveal > 0:
        uniform = -log_choose(m, n)
        if log_threshold is not None:
            uniform = uniform + extra_count_logprob(n - floor, m - floor)
        by_confidence = torch.logaddexp(by_confidence + math.log1p(-random_reveal),
                                        uniform + math.log(random_reveal))
    return by_confidence


def gumbel_scores(logp: torch.Tensor, reveal_temperature: float) -> torch.Tensor:
    """(B, T) Plackett-Luce log-weights of the positions: log p_max / reveal_temperature."""
    return logp.amax(-1) / reveal_temperature


def plackett_luce_selection(score: torch.Tensor, reveal: torch.Tensor, masked: torch.Tensor,
                            rank: torch.Tensor) -> torch.Tensor:
    """(B,) log-probability of drawing the revealed positions in the order `rank` (0 first) without replacement,
    each draw among the masked positions not drawn yet with probability softmax(score)."""
    B, T = score.shape
    hidden = masked & ~reveal
    rest = torch.logsumexp(score.masked_fill(~hidden, LOG_ZERO), dim=1)  # the hidden positions' total weight
    slot = torch.where(reveal, rank, T)  # revealed positions by rank, the others into a spare column
    by_rank = torch.full((B, T + 1), LOG_ZERO, dtype=score.dtype, device=score.device)
    by_rank = by_rank.scatter(1, slot, torch.where(reveal, score, LOG_ZERO))[:, :T]
    remaining = torch.logcumsumexp(by_rank.flip(1), dim=1).flip(1)  # weight of the reveals from rank k on
    denominator = torch.logaddexp(rest[:, None], remaining)
    drawn = torch.arange(T, device=score.device)[None, :] < reveal.sum(1, keepdim=True)
    return torch.where(drawn, by_rank - denominator, 0.0).sum(1)


def selection_logprob(logp: torch.Tensor, token: torch.Tensor, reveal: torch.Tensor, masked: torch.Tensor,
                      rank: torch.Tensor | None, rule: RevealRule, floor: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) log-probability that a step, from a state whose masked positions are `masked` (B, T) and whose
    sampling log-probs are `logp` (B, T, V), chooses exactly the positions `reveal` (in the order `rank`, which
    only gumbel_confidence needs; with a threshold, `floor` is the step's `reveal_floor`) given the tokens `token`
    drawn there (see the module docstring). Differentiable in `logp`. A row that reveals nothing scores 0."""
    if rule.order == "random":  # 1 / C(m, n) for every model: only ratios between models matter, so 0
        return torch.zeros(logp.shape[0], dtype=torch.float32, device=logp.device)
    if rule.order == "confidence":
        chosen = confidence_selection(logp, token, reveal, masked, rule.random_reveal, rule.log_threshold, floor)
    else:
        chosen = plackett_luce_selection(gumbel_scores(logp, rule.reveal_temperature), reveal, masked, rank)
    return torch.where(reveal.any(1), chosen, 0.0)


def confidence_step_logprob(logp: torch.Tensor, token: torch.Tensor, reveal: torch.Tensor,
                            masked: torch.Tensor, random_reveal: float = 0.0) -> torch.Tensor:
    """(B,) log-probability that one confidence-order step reveals exactly the positions `reveal` with `token`
    there: its tokens' log-probs plus the selection term. A row that reveals nothing scores 0."""
    token_logp = logp.gather(-1, token[..., None]).squeeze(-1)
    rule = RevealRule("confidence", random_reveal=random_reveal)
    return torch.where(reveal, token_logp, 0.0).sum(1) + selection_logprob(logp, token, reveal, masked, None, rule)


def reveal_schedule(n_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """(B,) masked counts -> (B, steps) number revealed at each step (linear schedule, sums to n)."""
    s = torch.arange(1, steps + 1, device=n_masked.device)
    cumulative = (n_masked[:, None] * s[None, :]) // steps
    return torch.diff(cumulative, dim=1, prepend=torch.zeros_like(cumulative[:, :1]))


@torch.no_grad()
def sample(model, prompt: torch.Tensor, steps: int = DEFAULTS.steps, temperature: float = DEFAULTS.temperature,
           top_k: int = DEFAULTS.top_k, top_p: float = DEFAULTS.top_p, order: str = DEFAULTS.order,
           random_reveal: float = DEFAULTS.random_reveal, reveal_temperature: float = DEFAULTS.reveal_temperature,
           reveal_threshold: float | None = DEFAULTS.reveal_threshold, generator: torch.Generator | None = None,
           autocast_dtype: torch.dtype | None = None, reference=None) -> SampleOutput:
    """Fill every [MASK] of `prompt` (B, T) in at most `steps` denoising steps, batched over B (a step runs the
    model on the rows with positions left to reveal). With a `reference` model, also log model(trajectory) -
    log reference(trajectory) of each trajectory (`kl_to_reference`)."""
    validate_sampling(steps, temperature, top_k, top_p, order, random_reveal, reveal_temperature, reveal_threshold)
    rule = RevealRule(order, random_reveal, reveal_temperature, reveal_threshold, steps)
    log_threshold = rule.log_threshold
    mask_id = model.mask_id
    x = prompt.clone()
    B, T = x.shape
    masked = x == mask_id
    reveal_step = torch.full_like(x, PROMPT_STEP)
    reveal_rank = torch.full_like(x, PROMPT_STEP)
    logprobs = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    selection = torch.zeros((B, steps), dtype=torch.float32, device=x.device)
    n_total = masked.sum(1)
    counts = reveal_schedule(n_total, steps)
    positions = torch.arange(T, device=x.device).expand_as(x)
    kl = None if reference is None else torch.zeros(B, dtype=torch.float64, device=x.device)
    floor = None
    for s in range(steps):
        if log_threshold is None:
            n_reveal = counts[:, s]
        else:
            n_reveal = floor = reveal_floor(n_total, masked.sum(1), s, steps)
        if not bool(n_reveal.any()):
            continue
        logits = forward_rows(model, x, n_reveal > 0, autocast_dtype)
        logp = sampling_logprobs(logits, temperature, top_k, top_p)
        token = (logp + gumbel_noise(logp.shape, generator, x.device)).argmax(-1)
        token_logp = logp.gather(-1, token[..., None]).squeeze(-1)
        if order == "random":
            score = torch.rand(x.shape, generator=generator, device=x.device)
        elif order == "gumbel_confidence":  # Gumbel-top-n: draws without replacement, in order
            score = gumbel_scores(logp, reveal_temperature) + gumbel_noise(x.shape, generator, x.device)
        else:
            score = token_logp.clone()
            if log_threshold is not None:
                n_reveal = torch.maximum(n_reveal, (masked & (token_logp >= log_threshold)).sum(1))
            if random_reveal > 0:
                at_random = torch.rand(B, generator=generator, device=x.device) < random_reveal
                if bool(at_random.any()):
                    noise = torch.rand(x.shape, generator=generator, device=x.device)
                    score = torch.where(at_random[:, None], noise, score)
                    if log_threshold is not None:
                        extra = draw_extra_count(masked.sum(1) - floor, generator)
                        n_reveal = torch.where(at_random, floor + extra, n_reveal)
        score = score.masked_fill(~masked, float("-inf"))
        ranked = score.argsort(dim=1, descending=True, stable=True)  # ties: the lower position first
        rank = torch.empty_like(ranked).scatter_(1, ranked, positions)
        reveal = masked & (rank < n_reveal[:, None])
        step_selection = selection_logprob(logp, token, reveal, masked, rank, rule, floor)
        if reference is not None:
            ref_logits = forward_rows(reference, x, n_reveal > 0, autocast_dtype)
            ref_logp = sampling_logprobs(ref_logits, temperature, top_k, top_p)
            if order == "random":
                kl += torch.where(reveal, position_kl(logp, ref_logp), 0.0).sum(1, dtype=torch.float64)
            else:
                ref_token_logp = ref_logp.gather(-1, token[..., None]).squeeze(-1)
                ref_selection = selection_logprob(ref_logp, token, reveal, masked, rank, rule, floor)
                kl += (torch.where(reveal, token_logp - ref_token_logp, 0.0).sum(1)
                       + step_selection - ref_selection).double()
        x = torch.where(reveal, token, x)
        reveal_step = torch.where(reveal, torch.full_like(x, s), reveal_step)
        reveal_rank = torch.where(reveal, rank, reveal_rank)
        logprobs = torch.where(reveal, token_logp, logprobs)
        selection[:, s] = step_selection
        masked &= ~reveal
    assert not bool(masked.any()), "reveal schedule left masked positions"
    return SampleOutput(tokens=x, reveal_step=reveal_step, reveal_rank=reveal_rank, logprobs=logprobs,
                        selection=selection, kl_to_reference=kl)


def forward_rows(model, x: torch.Tensor, rows: torch.Tensor, autocast_dtype: torch.dtype | None) -> torch.Tensor:
    """The model's logits on the rows of `x` marked in `rows` (B,); zeros on the others, which reveal nothing."""
    every = bool(rows.all())
    with autocast_context(x.device, autocast_dtype):
        logits = model(x if every else x[rows])
    if every:
        return logits
    out = logits.new_zeros((x.shape[0], *logits.shape[1:]))
    out[rows] = logits
    return out


def gumbel_noise(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    return -torch.log(-torch.log(torch.rand(shape, generator=generator, device=device).clamp_(1e-20, 1.0)))
