"""old_logprob=recompute with one update per step: PPO's old policy comes from the update's own forward (the same
weights), not from a replay of its own, and the step is the one the separate replay gives."""

import copy

import pytest
import torch

from dgrpo.config import GRPOConfig
from dgrpo.learner.core import LearnerCore

from test_exact_confidence import one_batch, policy_and_reference  # noqa: F401 (a fixture)


def learner(policy, reference, **grpo) -> LearnerCore:
    cfg = GRPOConfig(**{"group_size": 8, "prompts_per_step": 4, "minibatch_size": 32, "lr": 1e-3,
                        "old_logprob": "recompute", "kl_target": 5.0, **grpo})
    return LearnerCore(copy.deepcopy(policy), cfg, reference=copy.deepcopy(reference))


def stale(policy, scale: float = 0.05):
    """The learner's policy one update ahead of the sampler's (so the truncated importance weight is not 1)."""
    moved = copy.deepcopy(policy)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return moved


@pytest.mark.parametrize("order,selection_weight,flat_group", [("random", 1.0, False), ("confidence", 1.0, False),
                                                               ("confidence", 0.0, False), ("confidence", 1.0, True)])
def test_old_from_the_update_is_the_separate_replays(policy_and_reference, monkeypatch, order, selection_weight,
                                                      flat_group):
    """flat_group: a group whose rewards are all equal is left out of the update; its pi_old is replayed on its
    own and still counts in kl_seq."""
    policy, reference = policy_and_reference
    batch = one_batch(policy, order, seed=2, reference=reference)
    if flat_group:
        batch.rewards[:8] = 0.5
    trained = {}
    for how in ("from_update", "own_replay"):
        core = learner(stale(policy), reference, selection_weight=selection_weight, replay_steps=2)
        if how == "own_replay":
            monkeypatch.setattr(core, "old_from_update", lambda data: False)
        torch.manual_seed(0)
        metrics = core.train([batch])
        trained[how] = (metrics, core.policy.state_dict(), core.kl_controller.coef)
    (m_free, w_free, coef_free), (m_own, w_own, coef_own) = trained["from_update"], trained["own_replay"]
    assert m_own["old_replay_s"] > 0  # each took its path: the replay of its own is of left-out samples only
    assert (m_free["old_replay_s"] > 0) == flat_group and m_free["zero_std_ratio"] == (0.25 if flat_group else 0)
    for key in ("kl_seq", "kl_seq_selection", "logp_lag", "tis_mean", "pg_loss", "kl"):
        assert m_free[key] == pytest.approx(m_own[key], rel=1e-4, abs=1e-6), key
    assert m_free["logp_lag"] > 0.01 and m_free["tis_mean"] != pytest.approx(1.0, abs=1e-3)  # the lag is there
    assert m_free["clip_frac"] == 0 and m_free["ratio_max"] == pytest.approx(1.0, abs=1e-6)  # ratio 1: one update
    assert coef_free == pytest.approx(coef_own, rel=1e-5)  # the KL budget read the same kl_seq
    for name in w_own:
        assert torch.allclose(w_free[name], w_own[name], atol=1e-5), name


def test_the_separate_replay_stays_where_the_update_cannot_give_old(policy_and_reference):
    """Two minibatches (the second sees changed weights), or samples the update leaves out: a replay of its own."""
    policy, reference = policy_and_reference
    batch = one_batch(policy, "confidence", seed=4, reference=reference)
    core = learner(policy, reference, minibatch_size=8)
    data, _ = core.prepare([batch])
    assert not core.old_from_update(data)
    core = learner(policy, reference)
    data, _ = core.prepare([batch])
    assert core.old_from_update(data)
    data.keep[:] = False
    assert not core.old_from_update(data)  # nothing to update: no forward to take pi_old from
    assert not learner(policy, reference, epochs=2).old_from_update(core.prepare([batch])[0])
    metrics = learner(policy, reference, minibatch_size=8).train([batch])
    assert metrics["logp_mismatch"] <= 1e-6 and metrics["optimizer_steps"] == 4
