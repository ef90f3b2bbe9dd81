"""Confidence order with a reveal threshold: a step reveals every masked position whose drawn token is at least
theta likely, and at least the floor that keeps up with the linear schedule (sampler.py). Its step probability
against enumeration and the sampler's frequencies, its gradient against finite differences, and what it saves:
samples the model is sure of finish in fewer forwards. The learner's exactness with it (first ratio 1, kl_seq
equal to the sampler's, replay equal to the recording) is tested with the other rules in test_exact_confidence.py
and test_reference_on_rollout.py."""

import itertools
import math

import pytest
import torch

from dgrpo.config import SamplerConfig, load_config
from dgrpo.errors import ConfigError
from dgrpo.models.sampler import (RevealRule, draw_extra_count, extra_count_logprob, reveal_floor, sample,
                                  sampling_logprobs, selection_logprob)
from dgrpo.protocols import RolloutBatch

from test_exact_confidence import FixedLogits, assert_gradient_matches_finite_differences, toy_step


def step_logprob(logp, token, reveal, masked, rule, floor):
    token_logp = torch.where(reveal, logp.gather(-1, token[..., None]).squeeze(-1), 0.0).sum(1)
    return token_logp + selection_logprob(logp, token, reveal, masked, None, rule, floor)


def outcomes(masked_positions, V, T):
    """Every (set of positions, tokens there) a step can reveal: non-empty subsets of the masked positions."""
    for size in range(1, len(masked_positions) + 1):
        for R in itertools.combinations(masked_positions, size):
            for tokens in itertools.product(range(V), repeat=size):
                reveal = torch.zeros(1, T, dtype=torch.bool)
                token = torch.zeros(1, T, dtype=torch.long)
                reveal[0, list(R)] = True
                token[0, list(R)] = torch.tensor(tokens)
                yield R, tokens, reveal, token


@pytest.mark.parametrize("random_reveal", [0.0, 0.3])
@pytest.mark.parametrize("floor", [1, 2])
@pytest.mark.parametrize("threshold", [0.3, 0.6])
def test_step_probabilities_sum_to_one_over_every_outcome(random_reveal, floor, threshold):
    g = torch.Generator().manual_seed(floor)
    T, V = 5, 3
    logp = (torch.randn(1, T, V, generator=g, dtype=torch.float64) * 2).log_softmax(-1)
    masked = torch.tensor([[True, True, False, True, True]])
    rule = RevealRule("confidence", random_reveal, reveal_threshold=threshold, steps=4)
    total, sizes = 0.0, set()
    for R, _, reveal, token in outcomes([0, 1, 3, 4], V, T):
        p = float(step_logprob(logp, token, reveal, masked, rule, torch.tensor([floor])).double().exp())
        total += p
        if p > 1e-9:
            sizes.add(len(R))
    assert total == pytest.approx(1.0, abs=1e-5)
    if random_reveal:  # every size from the floor up stays possible
        assert sizes == set(range(floor, 5))


def test_sampler_frequencies_match_the_step_probabilities():
    """The first step of the sampler (floor 1, threshold 0.45, a large random share) lands on each (set, tokens)
    as often as the step probability says, and records that probability's selection term."""
    g = torch.Generator().manual_seed(1)
    T, V, n, eps, theta = 3, 2, 40000, 0.3, 0.45
    logits = torch.randn(T, V, generator=g) * 1.5

    out = sample(FixedLogits(logits), torch.full((n, T), V), steps=T, order="confidence", random_reveal=eps, temperature=1.0,
                 reveal_threshold=theta, generator=torch.Generator().manual_seed(0))
    first = out.reveal_step == 0
    code = (first.long() * (1 + out.tokens)).mul(torch.tensor([1, 3, 9])).sum(1)  # 0: hidden, 1 + token: revealed
    freq = torch.bincount(code, minlength=27).double() / n
    logp = sampling_logprobs(logits[None])
    rule = RevealRule("confidence", eps, reveal_threshold=theta, steps=T)
    masked = torch.ones(1, T, dtype=torch.bool)
    sizes = set()
    for R, tokens, reveal, token in outcomes([0, 1, 2], V, T):
        p = float(step_logprob(logp, token, reveal, masked, rule, torch.tensor([1])).exp())
        c = sum((1 + t) * 3 ** pos for pos, t in zip(R, tokens))
        assert float(freq[c]) == pytest.approx(p, abs=0.01), (R, tokens)
        if float(freq[c]) > 0.01:
            sizes.add(len(R))
    assert sizes == {1, 2, 3}
    row = int(first.sum(1).argmax())  # a row whose first step revealed more than one position
    expected = selection_logprob(logp, out.tokens[row:row + 1], first[row:row + 1], masked, None, rule,
                                 torch.tensor([1]))
    assert float(out.selection[row, 0]) == pytest.approx(float(expected), abs=1e-6)


@pytest.mark.parametrize("random_reveal", [0.0, 0.05])
def test_selection_gradient_matches_finite_differences(random_reveal):
    """One row revealing its floor below theta, one revealing more than its floor, every token above theta."""
    reveal = torch.tensor([[True, False, False, True, False, False], [False, False, True, True, False, False]])
    logits, masked, token = toy_step(reveal, (1.0, 6.0))  # the second row's tokens well above theta
    rule = RevealRule("confidence", random_reveal, reveal_threshold=0.7, steps=4)
    floor = torch.tensor([2, 1])

    def f(lg):
        return step_logprob(lg.log_softmax(-1), token, reveal, masked, rule, floor).sum()

    lp = logits.log_softmax(-1)
    tau = torch.where(reveal, lp.gather(-1, token[..., None]).squeeze(-1), 0.0).min(1).values
    assert float(tau[0]) < math.log(0.7) <= float(tau[1])  # the two cases
    assert_gradient_matches_finite_differences(f, logits)
    assert float(f(logits)) > -50  # neither row impossible


def test_extra_count_law_sums_to_one_and_its_draws_follow_it():
    most = torch.tensor([0, 1, 5])
    for m in most.tolist():
        total = extra_count_logprob(torch.arange(m + 1), torch.full((m + 1,), m)).double().exp().sum()
        assert float(total) == pytest.approx(1.0, abs=1e-6)
    draws = draw_extra_count(torch.full((50000,), 5), torch.Generator().manual_seed(0))
    assert int(draws.min()) == 0 and int(draws.max()) == 5
    freq = torch.bincount(draws, minlength=6).double() / draws.numel()
    assert torch.allclose(freq, extra_count_logprob(torch.arange(6), torch.full((6,), 5)).double().exp(), atol=0.01)


def test_floor_is_the_schedules_count_and_reveals_the_rest_at_the_last_step():
    n_total = torch.tensor([12, 12, 12, 3])
    # on schedule; ahead of it (the count still); done: 0; 3 positions over 4 steps: at least 1 a step
    assert reveal_floor(n_total, torch.tensor([12, 4, 0, 3]), 0, 4).tolist() == [3, 3, 0, 1]
    assert reveal_floor(n_total, torch.tensor([3, 2, 0, 1]), 3, 4).tolist() == [3, 2, 0, 1]  # the rest


class Sure(torch.nn.Module):
    """Every position's first token at probability `p` (temperature 1), the rest sharing what is left."""
    mask_id = 4

    def __init__(self, p: float):
        super().__init__()
        self.logit = math.log(p / ((1 - p) / 3))

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, 4)
        logits[..., 0] = self.logit
        return logits


def test_a_sure_model_finishes_in_fewer_forwards_and_an_unsure_one_follows_the_schedule():
    calls = []

    class Counting(Sure):
        def forward(self, idx):
            calls.append(idx.shape[0])
            return super().forward(idx)

    prompt = torch.full((8, 32), Sure.mask_id)
    out = sample(Counting(0.99), prompt, steps=16, order="confidence", temperature=1.0, random_reveal=0.0,
                 reveal_threshold=0.9, generator=torch.Generator().manual_seed(0))
    assert (out.tokens != Sure.mask_id).all()
    steps_taken = torch.tensor([len(set(r.tolist())) for r in out.reveal_step])
    assert float(steps_taken.float().mean()) < 4  # 32 positions at p = 0.99: most in the first step
    assert len(calls) < 16 and sum(calls) == int(steps_taken.sum())  # finished rows cost no forward
    calls.clear()
    out = sample(Counting(0.5), prompt, steps=16, order="confidence", temperature=1.0, random_reveal=0.0,
                 reveal_threshold=0.9, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 16 and (out.reveal_step.max(1).values == 15).all()  # nothing above theta: the schedule


def test_threshold_needs_confidence_order_and_a_probability():
    with pytest.raises(ConfigError, match="reveal_threshold applies to confidence order only"):
        load_config(SamplerConfig, overrides=["order=random", "reveal_threshold=0.9"])
    with pytest.raises(ConfigError, match="reveal_threshold"):
        load_config(SamplerConfig, overrides=["order=confidence", "reveal_threshold=1.5"])
    assert load_config(SamplerConfig, overrides=["order=confidence", "reveal_threshold=0.9"]).reveal_threshold == 0.9
    with pytest.raises(ValueError, match="reveal_threshold applies to confidence order only"):
        sample(Sure(0.9), torch.full((1, 4), 4), steps=2, order="gumbel_confidence", reveal_threshold=0.9)
    with pytest.raises(ValueError, match="needs the sampler's steps"):
        RevealRule("confidence", reveal_threshold=0.9)


def test_a_rollout_batch_states_its_threshold():
    out = sample(Sure(0.99), torch.full((2, 8), 4), steps=4, order="confidence", temperature=1.0,
                 reveal_threshold=0.9, generator=torch.Generator().manual_seed(0))
    batch = RolloutBatch(request_id=0, tokens=out.tokens, reveal_step=out.reveal_step, logprobs=out.logprobs,
                         group_index=torch.tensor([0, 0]), policy_version=0, worker_id=0, steps=4, temperature=1.0,
                         top_k=0, top_p=1.0, order="confidence", random_reveal=0.01, reveal_threshold=0.9,
                         selection=out.selection, reveal_rank=out.reveal_rank)
    batch.validate()
    assert RevealRule.of(vars(batch)) == RevealRule("confidence", 0.01, batch.reveal_temperature, 0.9, 4)
    assert RevealRule.of({**vars(batch), "reveal_threshold": 0.0}).log_threshold is None  # 0: off
    batch.order = "random"
    with pytest.raises(ValueError, match="reveal_threshold"):
        batch.validate()


def test_log_mass_below_equals_a_plain_logsumexp_far_into_the_tail():
    """The selection terms' mass below a bound keeps exp's arguments above -80 (a slow path on the CPU below):
    against a float64 log-sum-exp on tokens from 0 to -300 nats, -inf (top-k) included, and no token below."""
    from dgrpo.models.sampler import LOG_ZERO, log_mass_below
    g = torch.Generator().manual_seed(0)
    logp = (torch.randn(4, 6, 9, generator=g, dtype=torch.float64) * 60).clamp_max(0)
    logp[0, 0, :4] = float("-inf")
    logp[1, 2] = torch.linspace(-300, -200, 9, dtype=torch.float64)  # every token far in the tail
    bound = torch.randn(4, 6, generator=g, dtype=torch.float64) * 40
    bound[2, 3] = -1e9  # nothing below
    expected = torch.logsumexp(logp.masked_fill(logp >= bound[..., None], float("-inf")), -1)
    expected = torch.where(torch.isfinite(expected), expected, LOG_ZERO)
    got = log_mass_below(logp, bound)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-9)
    assert float(got[2, 3]) == LOG_ZERO and float(got[1, 2]) < -199
    x = logp.clone().requires_grad_(True)
    log_mass_below(x, bound).clamp_min(-1e6).sum().backward()
    assert torch.isfinite(x.grad).all()
