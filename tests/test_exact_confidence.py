"""The exact step probability of confidence-ordered unmasking, in the sampler and in the learner.

A confidence step reveals set R with tokens x_R exactly when the draws there are x_R and every other masked
position draws a token less likely than the least likely revealed one; with the random share eps a step
reveals random positions instead (sampler.py). These tests check that probability against enumeration and
against the sampler's frequencies, its gradient against finite differences, and that the learner replays it:
first ratio exactly 1, kl_seq equal to the sampler's measured trajectory KL, nothing infinite where the
reference could not have taken a step.
"""

import copy
import itertools
import math

import pytest
import torch

from dgrpo.actors.judge_worker import JudgeWorker
from dgrpo.actors.rollout import RolloutWorker
from dgrpo.config import GRPOConfig, RewardConfig, SamplerConfig
from dgrpo.corpus import CharTokenizer
from dgrpo.learner.core import LearnerCore
from dgrpo.models.diffusion import DiffusionLM
from dgrpo.models.sampler import (LOG_ZERO, RevealRule, confidence_step_logprob, gumbel_scores,
                                  plackett_luce_selection, sample, sampling_logprobs, selection_logprob)
from dgrpo.models.trajectory import replay_rows, row_logprobs, token_shares, trajectory_step_logprobs
from dgrpo.models.transformer import preset_config
from dgrpo.protocols import RolloutRequest

TOK = CharTokenizer.from_text("abcde \n")
LENGTH = 16


class FixedLogits(torch.nn.Module):
    """A model whose every state gets the same (T, V) logits; [MASK] is token V."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits, self.mask_id = logits, logits.shape[-1]

    def forward(self, idx):
        return self.logits[None].expand(idx.shape[0], -1, -1)


def enumerate_step(logp: torch.Tensor, masked: torch.Tensor, n: int, random_reveal: float) -> float:
    """Sum of the step probability over every (set of n masked positions, tokens there)."""
    T, V = logp.shape[1:]
    total = 0.0
    for R in itertools.combinations(masked[0].nonzero().flatten().tolist(), n):
        for tokens in itertools.product(range(V), repeat=n):
            reveal = torch.zeros(1, T, dtype=torch.bool)
            token = torch.zeros(1, T, dtype=torch.long)
            reveal[0, list(R)] = True
            token[0, list(R)] = torch.tensor(tokens)
            total += float(confidence_step_logprob(logp, token, reveal, masked, random_reveal).double().exp())
    return total


@pytest.mark.parametrize("random_reveal", [0.0, 0.3])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_step_probabilities_sum_to_one_over_every_outcome(random_reveal, n):
    g = torch.Generator().manual_seed(n)
    T, V = 5, 3
    logp = (torch.randn(1, T, V, generator=g) * 2).log_softmax(-1)
    masked = torch.tensor([[True, True, False, True, True]])
    assert enumerate_step(logp, masked, n, random_reveal) == pytest.approx(1.0, abs=1e-5)


def test_step_probabilities_sum_to_one_with_a_very_confident_hidden_position():
    """A position whose every token is likelier than some revealed token (the case without support): the
    probabilities still sum to 1, and with a random share no outcome of the step has probability 0."""
    T = 4
    logp = torch.tensor([[[-0.01, -5.3, -5.3], [-1.1, -1.1, -1.1], [-1.1, -1.1, -1.1], [-0.7, -0.9, -2.1]]])
    logp = logp.log_softmax(-1)
    masked = torch.ones(1, T, dtype=torch.bool)
    for eps in (0.0, 0.1):
        assert enumerate_step(logp, masked, 2, eps) == pytest.approx(1.0, abs=1e-5)
    # reveal positions 1 and 2 with a token of p = 1/3, leaving position 0 (p(argmax) ~ 0.99) hidden: position 0
    # has tokens below 1/3, so that is possible; leaving position 3 hidden needs a token below 1/3 there: 0.12
    reveal = torch.tensor([[False, True, True, False]])
    token = torch.zeros(1, T, dtype=torch.long)
    sel0 = selection_logprob(logp, token, reveal, masked, None, RevealRule("confidence", 0.0))
    assert math.isfinite(float(sel0))
    # now a revealed token less likely than every token of a hidden position: impossible by confidence
    token[0, 1] = 1
    logp2 = logp.clone()
    logp2[0, 1] = torch.tensor([-0.05, -6.0, -3.0]).log_softmax(-1)  # token 1 at position 1: p ~ 0.0025
    sel = selection_logprob(logp2, token, reveal, masked, None, RevealRule("confidence", 0.0))
    assert float(sel) <= LOG_ZERO / 2  # log 0, as a finite number
    eps = 0.1
    sel_mixed = selection_logprob(logp2, token, reveal, masked, None, RevealRule("confidence", eps))
    expected = math.log(eps) - math.log(math.comb(4, 2))  # only the random branch can do it
    assert float(sel_mixed) == pytest.approx(expected, abs=1e-5)


def test_sampler_frequencies_match_the_mixture():
    """The first step of the sampler with a large random share lands on each (position, token) as often as
    the step probability says."""
    g = torch.Generator().manual_seed(1)
    T, V, n, eps = 3, 2, 30000, 0.4
    logits = torch.randn(T, V, generator=g) * 1.5

    out = sample(FixedLogits(logits), torch.full((n, T), V), steps=T, order="confidence", random_reveal=eps, temperature=1.0,
                 generator=torch.Generator().manual_seed(0))
    first = (out.reveal_step == 0).float().argmax(1)
    outcome = first * V + out.tokens.gather(1, first[:, None]).squeeze(1)
    freq = torch.bincount(outcome, minlength=T * V).double() / n
    logp = sampling_logprobs(logits[None])
    for pos in range(T):
        for tok in range(V):
            reveal = torch.zeros(1, T, dtype=torch.bool)
            reveal[0, pos] = True
            token = torch.full((1, T), tok)
            p = float(confidence_step_logprob(logp, token, reveal, torch.ones(1, T, dtype=torch.bool), eps).exp())
            assert float(freq[pos * V + tok]) == pytest.approx(p, abs=0.01)
    # the recorded selection term of the first step is the one the formula gives
    row = 0
    reveal = (out.reveal_step[row:row + 1] == 0)
    expected = selection_logprob(logp, out.tokens[row:row + 1], reveal, torch.ones(1, T, dtype=torch.bool), None,
                                 RevealRule("confidence", eps))
    assert float(out.selection[row, 0]) == pytest.approx(float(expected), abs=1e-6)


def assert_gradient_matches_finite_differences(f, x: torch.Tensor, h: float = 1e-6, atol: float = 1e-5) -> torch.Tensor:
    """f's autograd gradient at x (float64) against central differences in every coordinate; returns those."""
    leaf = x.clone().requires_grad_(True)
    f(leaf).backward()
    numeric = torch.zeros_like(x)
    for idx in itertools.product(*(range(n) for n in x.shape)):
        plus, minus = x.clone(), x.clone()
        plus[idx] += h
        minus[idx] -= h
        numeric[idx] = (f(plus) - f(minus)) / (2 * h)
    assert torch.allclose(leaf.grad, numeric, atol=atol), (leaf.grad - numeric).abs().max()
    return numeric


def toy_step(reveal: torch.Tensor, boosts: tuple[float, float]):
    """(logits, masked, token) of a two-row step (T 6, V 4, float64) revealing `reveal`, the revealed tokens'
    logits raised by boosts[row] (towards the likeliest at their positions, so tau sits inside the distributions)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 4, generator=g, dtype=torch.float64)
    masked = torch.tensor([[True] * 6, [True, False, True, True, False, True]])
    token = torch.randint(0, 4, (2, 6), generator=g)
    for row, boost in enumerate(boosts):
        logits[row][reveal[row].nonzero(as_tuple=True) + (token[row][reveal[row]],)] += boost
    return logits, masked, token


@pytest.mark.parametrize("random_reveal", [0.0, 0.05])
def test_selection_gradient_matches_finite_differences(random_reveal):
    reveal = torch.tensor([[True, False, False, True, False, False], [False, False, True, False, False, False]])
    logits, masked, token = toy_step(reveal, (2.0, 2.0))

    def f(lg):
        lp = lg.log_softmax(-1)
        tok_lp = torch.where(reveal, lp.gather(-1, token[..., None]).squeeze(-1), 0.0).sum()
        return tok_lp + selection_logprob(lp, token, reveal, masked, None, RevealRule("confidence", random_reveal)).sum()

    numeric = assert_gradient_matches_finite_differences(f, logits)
    assert float(numeric.abs().sum()) > 0


@pytest.fixture(scope="module")
def policy_and_reference():
    torch.manual_seed(0)
    reference = DiffusionLM(preset_config("tiny", TOK.vocab_size, block_size=LENGTH)).eval()
    with torch.no_grad():
        reference.lm_head.weight.mul_(4.0)  # far from uniform, so the selection terms matter
    policy = copy.deepcopy(reference)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return policy, reference


ORDERS = ["random", "confidence", "gumbel_confidence", "threshold"]
THRESHOLD = 0.4  # the tiny toy's tokens are seldom surer than this: steps of one, two and more reveals


def rule_settings(order: str) -> dict:
    """The sampler settings of a rule by its test name ("threshold": confidence order with a reveal_threshold)."""
    if order == "threshold":
        return {"order": "confidence", "reveal_threshold": THRESHOLD}
    return {"order": order}


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_replay_reproduces_the_recorded_step_probabilities(policy_and_reference, order, dtype):
    policy, _ = policy_and_reference
    prompt = torch.full((6, LENGTH), TOK.mask_id)
    prompt[3:, :5] = TOK.encode("abcde")
    settings = {**rule_settings(order), "random_reveal": 0.2, "reveal_temperature": 0.3}
    rule = RevealRule.of({**settings, "steps": 5})
    out = sample(policy, prompt, steps=5, **settings, autocast_dtype=dtype, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        tokens_lp, selection = trajectory_step_logprobs(policy, out.tokens, out.reveal_step, 5, rule=rule,
                                                        reveal_rank=out.reveal_rank, autocast_dtype=dtype,
                                                        rows_per_chunk=4)
    tol = 1e-5 if dtype is None else 2e-3
    assert float((tokens_lp - out.logprobs).abs().max()) <= tol
    assert float((selection - out.selection).abs().max()) <= tol
    if order == "random":
        assert float(out.selection.abs().max()) == 0
    else:
        assert float(out.selection.abs().max()) > 0.1  # the selection terms are not trivially 0


def one_batch(policy, order: str, seed: int = 0, random_reveal: float = 0.05, dtype: str = "fp32",
              measure_kl: bool = False, reference=None, reference_on: str = "learner",
              replay_steps: int | None = None):
    """A scored batch; with reference_on="rollout" the worker holds `reference` from the start and sends its
    terms on `replay_steps` rows per sample (None: every step), as grpo.reference_on=rollout has it."""
    from dgrpo.protocols import WeightSnapshot
    ref_snapshot = None if reference is None else WeightSnapshot.from_module(reference, 0)
    worker = RolloutWorker(0, policy.cfg, SamplerConfig(steps=4, random_reveal=random_reveal, **rule_settings(order)),
                           precision=dtype, reference=ref_snapshot if reference_on == "rollout" else None)
    worker.set_weights(WeightSnapshot.from_module(policy, 0))
    judge = JudgeWorker(0, RewardConfig(kind="char_frequency", chars="e"), TOK.to_dict())
    request = RolloutRequest(request_id=seed, prompts=torch.full((4, LENGTH), TOK.mask_id), group_size=8,
                             seed=seed, measure_kl=measure_kl, reference_terms=reference_on == "rollout",
                             replay_steps=replay_steps or 0)
    return judge.score(worker.generate(request, ref_snapshot))


REFERENCE_ON = ["learner", "rollout"]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("reference_on", REFERENCE_ON)
def test_first_ratio_is_exactly_one(policy_and_reference, order, precision, reference_on):
    policy, reference = policy_and_reference
    batch = one_batch(policy, order, dtype=precision, reference=reference, reference_on=reference_on)
    core = LearnerCore(copy.deepcopy(policy), GRPOConfig(group_size=8, prompts_per_step=4, minibatch_size=8,
                                                         lr=1e-3, reference_on=reference_on),
                       reference=copy.deepcopy(reference),
                       autocast_dtype=torch.bfloat16 if precision == "bf16" else None)
    metrics = core.train([batch])
    assert (metrics["ref_replay_s"] == 0) == (reference_on == "rollout")
    assert metrics["first_step_ratio_dev"] <= (1e-5 if precision == "fp32" else 2e-3)
    assert metrics["logp_mismatch"] <= (1e-6 if precision == "fp32" else 1e-3)
    if order != "random":
        assert abs(metrics["kl_seq_selection"]) > 0.1  # the policy moved the choice of positions too


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("reference_on", REFERENCE_ON)
def test_learner_kl_seq_equals_the_samplers_measured_trajectory_kl(policy_and_reference, order, reference_on):
    """The same samples: the learner's kl_seq (k1 on the replayed shares) and the sampler's kl_to_reference
    (measured beside the reference while sampling). Under confidence order both are the trajectory log-ratio,
    per sample; under random order the sampler's is Rao-Blackwellised, equal in expectation. With
    reference_on=rollout the reference's shares are the ones the worker sent."""
    policy, reference = policy_and_reference
    batch = one_batch(policy, order, seed=7, measure_kl=True, reference=reference, reference_on=reference_on)
    core = LearnerCore(copy.deepcopy(policy), GRPOConfig(group_size=8, prompts_per_step=4, reference_on=reference_on),
                       reference=reference)
    data, _ = core.prepare([batch])
    assert (data.ref_terms is not None) == (reference_on == "rollout")
    core.reference_pass(data)
    from dgrpo.learner.grpo import sequence_kl
    learner_kl = sequence_kl(data.old, data.ref, data.mask, data.scale).double()
    sampler_kl = batch.rollout.kl_to_reference
    assert float(sampler_kl.mean()) > 1.0
    if order != "random":
        assert torch.allclose(learner_kl, sampler_kl, atol=1e-3, rtol=1e-4)
    else:
        se = float(learner_kl.std()) / len(learner_kl) ** 0.5
        assert float(learner_kl.mean()) == pytest.approx(float(sampler_kl.mean()), abs=4 * se)


def test_the_learner_never_sees_an_infinite_term(policy_and_reference):
    """A reference sure of every position (one token at p ~ 1 everywhere) cannot leave a position hidden while
    revealing a token it finds unlikely: without the random share such steps have probability 0 under it. With
    the share every term stays finite, and an update on them is finite."""
    policy, _ = policy_and_reference

    class Sure(torch.nn.Module):
        mask_id = policy.mask_id

        def forward(self, idx):
            logits = torch.full((*idx.shape, TOK.vocab_size - 1), -30.0)
            logits[..., TOK.encode("a")[0]] = 30.0
            return logits

    sure = Sure()
    batch = one_batch(policy, "confidence", seed=11, random_reveal=0.01)
    rows = replay_rows(batch.rollout.reveal_step, 4)
    with torch.no_grad():
        r = row_logprobs(sure, batch.rollout.tokens, batch.rollout.reveal_step, rows,
                         rule=RevealRule("confidence", 0.0))
        assert float(r.selection.min()) <= LOG_ZERO / 2  # impossible by confidence alone
        r = row_logprobs(sure, batch.rollout.tokens, batch.rollout.reveal_step, rows,
                         rule=RevealRule("confidence", 0.01))
    assert bool(torch.isfinite(r.selection).all()) and float(r.selection.min()) > -100
    core = LearnerCore(copy.deepcopy(policy), GRPOConfig(group_size=8, prompts_per_step=4, lr=1e-3, kl_coef=0.5),
                       reference=sure)
    metrics = core.train([batch])
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert metrics["kl_seq"] > 10 and metrics["nonfinite_updates"] == 0 and metrics["skipped_update"] == 0
    assert all(bool(torch.isfinite(p).all()) for p in core.policy.parameters())


def test_token_shares_sum_to_the_trajectory_log_likelihood():
    logprobs = torch.tensor([[-1.0, -2.0, 0.0, -0.5, -0.25]])
    reveal_step = torch.tensor([[0, 0, -1, 1, 0]])
    selection = torch.tensor([[-3.0, -1.0, 0.0]])
    shares = token_shares(logprobs, selection, reveal_step)
    assert shares[0].tolist() == pytest.approx([-2.0, -3.0, 0.0, -1.5, -1.25])
    assert float(shares.sum()) == pytest.approx(float(logprobs.sum() + selection.sum()))


def test_diversity_coef_lowers_the_advantage_of_samples_their_group_repeats(policy_and_reference):
    """Two samples of a group made identical: with grpo.diversity_coef their shaped rewards, and so their
    advantages, fall against the rest of the group; without it nothing changes."""
    policy, reference = policy_and_reference
    batch = one_batch(policy, "confidence", seed=3)
    r = batch.rollout
    for name in ("tokens", "reveal_step", "logprobs", "selection"):
        getattr(r, name)[1] = getattr(r, name)[0]
    r.tokens[2:8] = torch.randint(0, TOK.n_chars, r.tokens[2:8].shape, generator=torch.Generator().manual_seed(0))
    batch.rewards[:] = torch.linspace(0.2, 0.8, len(batch.rewards))
    batch.rewards[1] = batch.rewards[0]
    cfg = dict(group_size=8, prompts_per_step=4, advantage="center")
    plain = LearnerCore(copy.deepcopy(policy), GRPOConfig(**cfg), reference=reference)
    shaped = LearnerCore(copy.deepcopy(policy), GRPOConfig(**cfg, diversity_coef=1.0), reference=reference)
    data_plain, m_plain = plain.prepare([batch])
    data_shaped, m_shaped = shaped.prepare([batch])
    assert "group_similarity" not in m_plain and 0 < m_shaped["group_similarity"] < 1
    drop = data_plain.advantages[:8] - data_shaped.advantages[:8]
    assert float(drop[:2].min()) > float(drop[2:].max())  # the duplicated pair loses the most


@pytest.mark.parametrize("n", [1, 2, 3])
def test_gumbel_confidence_order_probabilities_sum_to_one(n):
    """Every ordered choice of n of the masked positions: the Plackett-Luce probabilities add up to 1."""
    g = torch.Generator().manual_seed(n)
    T = 5
    score = torch.randn(1, T, generator=g) * 2
    masked = torch.tensor([[True, True, False, True, True]])
    total = 0.0
    for picks in itertools.permutations(masked[0].nonzero().flatten().tolist(), n):
        reveal = torch.zeros(1, T, dtype=torch.bool)
        rank = torch.full((1, T), -1)
        for k, pos in enumerate(picks):
            reveal[0, pos], rank[0, pos] = True, k
        total += float(plackett_luce_selection(score, reveal, masked, rank).double().exp())
    assert total == pytest.approx(1.0, abs=1e-5)


def test_gumbel_confidence_sampler_matches_its_probabilities():
    """The first two reveals of the sampler (two per step) in each order, against plackett_luce_selection."""
    g = torch.Generator().manual_seed(2)
    T, V, n = 3, 4, 30000
    logits = torch.randn(T, V, generator=g) * 2

    temp = 0.7
    out = sample(FixedLogits(logits), torch.full((n, T), V), steps=2, order="gumbel_confidence", reveal_temperature=temp,
                 temperature=1.0, generator=torch.Generator().manual_seed(0))
    first = out.reveal_step == 0
    assert bool((first.sum(1) == 1).all())  # schedule: 1 then 2 of 3 positions
    pos = first.float().argmax(1)
    freq = torch.bincount(pos, minlength=T).double() / n
    score = gumbel_scores(sampling_logprobs(logits[None]), temp)
    for p in range(T):
        reveal = torch.zeros(1, T, dtype=torch.bool)
        reveal[0, p] = True
        rank = torch.where(reveal, 0, -1)
        prob = float(plackett_luce_selection(score, reveal, torch.ones(1, T, dtype=torch.bool), rank).exp())
        assert float(freq[p]) == pytest.approx(prob, abs=0.01)


def test_gumbel_confidence_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(0)
    T, V = 6, 4
    logits = torch.randn(2, T, V, generator=g, dtype=torch.float64)
    masked = torch.tensor([[True] * 6, [True, False, True, True, False, True]])
    reveal = torch.tensor([[True, False, False, True, True, False], [False, False, True, False, False, True]])
    rank = torch.tensor([[2, -1, -1, 0, 1, -1], [-1, -1, 1, -1, -1, 0]])
    rule = RevealRule("gumbel_confidence", reveal_temperature=0.5)
    token = torch.zeros(2, T, dtype=torch.long)

    def f(lg):
        return selection_logprob(lg.log_softmax(-1), token, reveal, masked, rank, rule).sum()

    numeric = assert_gradient_matches_finite_differences(f, logits)
    assert float(numeric.abs().sum()) > 0
