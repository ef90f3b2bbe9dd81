"""grpo.reference_on=rollout: the rollout worker replays the reference on the rows it chose, the learner uses
exactly those rows and terms, and they equal what the learner's own reference pass gives."""

import copy

import pytest
import torch

from dgrpo.config import GRPOConfig
from dgrpo.learner.core import LearnerCore
from dgrpo.models.trajectory import ReplayRows, replay_rows, trajectory_step_logprobs

from test_exact_confidence import ORDERS, one_batch, policy_and_reference  # noqa: F401 (a fixture)


def learner(policy, reference, **grpo) -> LearnerCore:
    cfg = GRPOConfig(**{"group_size": 8, "prompts_per_step": 4, "minibatch_size": 8, "lr": 1e-3, **grpo})
    return LearnerCore(copy.deepcopy(policy), cfg, reference=copy.deepcopy(reference))


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("replay_steps", [None, 2])
def test_worker_terms_equal_the_learners_own(policy_and_reference, order, replay_steps):
    """fp32: the reference's token log-probs, selection terms, shares and kl_seq the worker sent equal the
    learner's own replay of its reference on the same rows to 1e-6; the rows are the worker's, drawn from the
    request's seed (the same request gives the same rows), replay_steps per sample."""
    policy, reference = policy_and_reference
    batch = one_batch(policy, order, seed=3, reference=reference, reference_on="rollout", replay_steps=replay_steps)
    again = one_batch(policy, order, seed=3, reference=reference, reference_on="rollout", replay_steps=replay_steps)
    assert torch.equal(batch.rollout.replay_mask, again.rollout.replay_mask)
    mask = batch.rollout.replay_mask
    with_tokens = (batch.rollout.reveal_step[:, None, :] == torch.arange(4)[None, :, None]).any(-1).sum(1)
    assert torch.equal(mask.sum(1), with_tokens if replay_steps is None else with_tokens.clamp_max(replay_steps))
    if replay_steps is not None:
        assert bool((mask.sum(1) < with_tokens).any())  # a subsample, not every step

    core = learner(policy, reference, reference_on="rollout", replay_steps=replay_steps)
    data, _ = core.prepare([batch])
    expected_rows = ReplayRows.from_mask(mask)  # one batch: the learner keeps its sample order
    assert torch.equal(data.rows.sample_idx, expected_rows.sample_idx)
    assert torch.equal(data.rows.step_idx, expected_rows.step_idx)
    sent_tokens, sent_selection = data.ref_terms
    with torch.no_grad():
        own_tokens, own_selection = trajectory_step_logprobs(core.reference, data.tokens, data.reveal, data.steps,
                                                             reveal_rank=data.reveal_rank, rows=data.rows,
                                                             **data.sampling)
    assert float((sent_tokens - own_tokens).abs().max()) <= 1e-6
    assert float((sent_selection - own_selection).abs().max()) <= 1e-6
    if order != "random":
        assert float(sent_selection.abs().max()) > 0.1
    sent = core.reference_pass(data)
    sent_ref = data.ref
    data.ref_terms = None  # the learner's own pass on the same rows
    own = core.reference_pass(data)
    assert float((sent_ref - data.ref).abs().max()) <= 1e-6
    assert sent["kl_seq"] == pytest.approx(own["kl_seq"], abs=1e-6)
    assert sent["kl_seq_selection"] == pytest.approx(own["kl_seq_selection"], abs=1e-6)
    assert sent["ref_replay_s"] == 0 and own["ref_replay_s"] > 0


def test_rows_are_not_drawn_from_the_samplers_numbers(policy_and_reference):
    """The sampler drew the trajectory from the request's seed; rows drawn from the same numbers would depend
    on it (a biased subsample). 32 samples x 2 of 4 steps: equal masks by chance are out of the question."""
    policy, reference = policy_and_reference
    batch = one_batch(policy, "random", seed=11, reference=reference, reference_on="rollout", replay_steps=2).rollout
    same_numbers = replay_rows(batch.reveal_step, batch.steps, 2, torch.Generator().manual_seed(11))
    assert not torch.equal(batch.replay_mask, same_numbers.mask(batch.num_samples, batch.steps))


@pytest.mark.parametrize("order", ["confidence", "gumbel_confidence"])
def test_recompute_mode_with_worker_terms(policy_and_reference, order):
    """old_logprob=recompute replays the policy only: the recomputed log-probs match the sampler's."""
    policy, reference = policy_and_reference
    batch = one_batch(policy, order, reference=reference, reference_on="rollout", replay_steps=2)
    metrics = learner(policy, reference, reference_on="rollout", replay_steps=2, old_logprob="recompute").train([batch])
    assert metrics["ref_replay_s"] == 0
    assert metrics["logp_mismatch"] <= 1e-6 and metrics["first_step_ratio_dev"] <= 1e-5
    assert metrics["optimizer_steps"] > 0


def test_bad_input_names_the_setting(policy_and_reference):
    policy, reference = policy_and_reference
    plain = one_batch(policy, "confidence", reference=reference)
    with pytest.raises(ValueError, match="grpo.reference_on=rollout: the learner expects every rollout batch"):
        learner(policy, reference, reference_on="rollout").train([plain])
    with_terms = one_batch(policy, "confidence", seed=1, reference=reference, reference_on="rollout",
                           replay_steps=2)
    with pytest.raises(ValueError, match=r"grpo.replay_steps=None asks for"):
        learner(policy, reference, reference_on="rollout").train([with_terms])
    with pytest.raises(ValueError, match="carry the reference's terms and others do not"):
        learner(policy, reference, reference_on="rollout", prompts_per_step=8).train([plain, with_terms])
    from dgrpo.actors.rollout import RolloutWorker
    from dgrpo.config import SamplerConfig
    from dgrpo.protocols import RolloutRequest
    worker = RolloutWorker(0, policy.cfg, SamplerConfig(steps=4), precision="fp32")
    worker.version = 0
    with pytest.raises(ValueError, match="started without the reference"):
        worker.generate(RolloutRequest(request_id=0, prompts=plain.rollout.tokens[:1], group_size=2, seed=0,
                                       reference_terms=True))


def test_a_moving_reference_falls_back_to_the_learner(policy_and_reference):
    """With reference_reset_every the workers' reference would go stale: the learner replays its own, and the
    driver's requests ask for no terms (reference_on_rollout is what batches.py and roles.py read)."""
    policy, reference = policy_and_reference
    cfg = GRPOConfig(reference_on="rollout", reference_reset_every=2)
    assert not cfg.reference_on_rollout and GRPOConfig(reference_on="rollout").reference_on_rollout
    core = learner(policy, reference, reference_on="rollout", reference_reset_every=2)
    metrics = core.train([one_batch(policy, "confidence", reference=reference)])
    assert metrics["ref_replay_s"] > 0
