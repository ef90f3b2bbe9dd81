"""The KL budget (adaptive kl_coef), the learner's KL per sequence, and reference resets.

Tolerances stated here are the claims of docs/LEVERS.md: on the simulated problem the controller
holds the target within 5% (mean of the last 200 of 600 steps) and every 25-step mean within 15%;
in a tiny real GRPO run (char_frequency reward, where a fixed kl_coef lets the KL settle near 3x
the target) the mean of the last 100 of 200 steps is within 15% of the target and every 25-step
mean within 35%.
"""

from __future__ import annotations

import math
import random
import statistics

import pytest
import torch

from dgrpo.actors.judge_worker import JudgeWorker
from dgrpo.actors.learner import LearnerActor
from dgrpo.actors.rollout import RolloutWorker
from dgrpo.config import GRPOConfig, RewardConfig, SamplerConfig, TrainConfig, load_config
from dgrpo.corpus import CharTokenizer
from dgrpo.errors import ConfigError
from dgrpo.learner.core import LearnerCore, revealed_mask, stack_batches
from dgrpo.learner.grpo import sequence_kl
from dgrpo.learner.kl_control import AdaptiveKLController
from dgrpo.models.diffusion import DiffusionLM
from dgrpo.models.trajectory import replay_rows, subsample_scale, token_shares, trajectory_step_logprobs
from dgrpo.models.transformer import preset_config
from dgrpo.protocols import RolloutRequest, WeightSnapshot

TOK = CharTokenizer.from_text("abcde \n")
LENGTH = 16


def test_controller_update_by_hand():
    c = AdaptiveKLController(0.1, target=2.0, horizon=10)
    assert c.update(3.0, step=0) == pytest.approx(0.1 * (1 + 0.2 / 10))  # error 0.5 clipped to 0.2
    assert c.update(1.9, step=1) == pytest.approx(0.102 * (1 - 0.05 / 10))  # error -0.05
    coef = c.coef
    assert c.update(float("nan"), step=2) == coef and c.last_step == 1  # ignored
    assert c.update(0.0, step=4) == pytest.approx(coef * (1 - 0.2 * 3 / 10))  # n = 3 steps since the last
    coef = c.coef
    assert c.update(100.0, step=100) == pytest.approx(coef * (1 + 0.2 * 10 / 10))  # n capped at the horizon
    restored = AdaptiveKLController(0.5, target=2.0, horizon=10)
    restored.load_state_dict(c.state_dict())
    assert restored.update(2.5, 101) == c.update(2.5, 101)
    with pytest.raises(ValueError, match="start value > 0"):
        AdaptiveKLController(0.0, 1.0, 10)
    with pytest.raises(ValueError, match="horizon >= 1"):
        AdaptiveKLController(0.1, 1.0, 0.5)


def test_controller_holds_a_simulated_kl():
    """A policy whose KL relaxes towards 1 / kl_coef (stronger penalty, smaller KL), with 10% noise per step:
    from a coefficient 20x too small (KL 20x the target) and from one 4x too large."""
    target = 5.0
    for start in (0.01, 0.8):
        rng = random.Random(0)
        c = AdaptiveKLController(start, target=target, horizon=10)
        kl, history = 1.0 / start, []
        for step in range(600):
            measured = kl * (1 + 0.1 * rng.gauss(0, 1))
            history.append(measured)
            c.update(measured, step)
            kl += 0.3 * (1.0 / c.coef - kl)
        tail = history[400:]
        assert abs(statistics.mean(tail) / target - 1) < 0.05, (start, statistics.mean(tail))
        for i in range(0, len(tail), 25):
            assert abs(statistics.mean(tail[i:i + 25]) / target - 1) < 0.15, (start, i)
        assert c.coef == pytest.approx(1.0 / target, rel=0.1)


def test_sequence_kl_by_hand():
    logp = torch.tensor([[-1.0, -2.0, 0.0, -0.5], [-1.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -3.0, -1.5], [-2.0, -2.0, -2.0, -2.0]])
    full = torch.tensor([[True, True, False, True], [True, True, True, True]])
    # sample 0: 0.5 - 1.0 + 1.0 (position 2 is a prompt position); sample 1: 4 x 1.0
    assert sequence_kl(logp, ref, full).tolist() == pytest.approx([0.5, 4.0])
    # part of the steps replayed: the sum over their tokens times steps with tokens / steps replayed
    half = torch.tensor([[True, False, False, False], [True, True, False, False]])
    assert sequence_kl(logp, ref, half, torch.tensor([3.0, 2.0])).tolist() == pytest.approx([0.5 * 3, 2.0 * 2])
    assert sequence_kl(logp, ref, torch.zeros_like(full)).tolist() == [0.0, 0.0]


def make_loop(seed: int, order: str = "confidence", **grpo):
    """(learner, one_step) of a tiny GRPO loop without Ray: unconditional prompts, reward = share of 'e'. With
    grpo reference_on="rollout" the worker holds the starting weights and sends the reference's terms."""
    torch.manual_seed(seed)
    model = DiffusionLM(preset_config("tiny", TOK.vocab_size, block_size=LENGTH))
    cfg = GRPOConfig(**{"group_size": 8, "prompts_per_step": 4, "minibatch_size": 32, "lr": 1e-3, **grpo})
    start = WeightSnapshot.from_module(model, 0) if cfg.reference_on_rollout else None
    worker = RolloutWorker(0, model.cfg, SamplerConfig(steps=4, order=order), precision="fp32", reference=start)
    judge = JudgeWorker(0, RewardConfig(kind="char_frequency", chars="e"), TOK.to_dict())
    learner = LearnerCore(model, cfg, seed=seed)
    prompts = torch.full((cfg.prompts_per_step, LENGTH), TOK.mask_id)

    def one_step(i: int) -> dict:
        worker.set_weights(learner.snapshot())
        batch = worker.generate(RolloutRequest(request_id=i, prompts=prompts, group_size=cfg.group_size,
                                               seed=1000 * seed + i, reference_terms=cfg.reference_on_rollout,
                                               replay_steps=cfg.replay_steps or 0))
        return learner.train([judge.score(batch)])

    return learner, one_step


# the rollout workers' reference pass under confidence order, the order whose selection terms it must carry
@pytest.mark.parametrize("order, reference_on", [("random", "learner"), ("confidence", "learner"),
                                                 ("confidence", "rollout")])
def test_kl_controller_holds_the_target_in_a_tiny_grpo_run(order, reference_on):
    """The budget holds the learner's kl_seq, the exact trajectory KL in both orders (under confidence order
    with the choice of positions), whichever side replays the reference."""
    target, steps = 4.0, 200
    _, fixed_step = make_loop(0, order, kl_coef=0.2, reference_on=reference_on)
    fixed = [fixed_step(i)["kl_seq"] for i in range(steps)]
    learner, step = make_loop(0, order, kl_coef=0.2, kl_target=target, kl_horizon=10, reference_on=reference_on)
    rows = [step(i) for i in range(steps)]
    held = [r["kl_seq"] for r in rows]
    assert statistics.mean(fixed[steps // 2:]) > 2 * target  # without the controller the KL settles far above
    tail = held[steps // 2:]
    assert abs(statistics.mean(tail) / target - 1) < 0.15, statistics.mean(tail)
    for i in range(0, len(tail), 25):
        assert abs(statistics.mean(tail[i:i + 25]) / target - 1) < 0.35, (i, tail[i:i + 25])
    assert rows[-1]["kl_coef"] > 0.2 and learner.kl_coef == pytest.approx(learner.kl_controller.coef)
    assert rows[0]["kl_seq"] == pytest.approx(0.0, abs=1e-4)  # the first batch comes from the reference itself
    assert all((r["ref_replay_s"] == 0) == (reference_on == "rollout") for r in rows)


@pytest.mark.parametrize("order", ["random", "confidence"])
def test_replay_subsample_gives_an_estimate_of_the_kl(order):
    """With replay_steps, kl_seq scales each sample's replayed steps up to all of them: on the same batches
    it agrees with the full replay on average."""
    learner, step = make_loop(1, order, kl_coef=0.01)
    for i in range(15):
        step(i)  # move away from the reference
    worker = RolloutWorker(0, learner.policy.cfg, SamplerConfig(steps=4, order=order), precision="fp32")
    worker.set_weights(learner.snapshot())
    judge = JudgeWorker(0, RewardConfig(kind="char_frequency", chars="e"), TOK.to_dict())
    batch = judge.score(worker.generate(RolloutRequest(request_id=99, prompts=torch.full((4, LENGTH), TOK.mask_id),
                                                       group_size=8, seed=5)))
    data = stack_batches([batch], 0)
    with torch.no_grad():
        ref_tokens, ref_selection = trajectory_step_logprobs(learner.reference, data.tokens, data.reveal_step,
                                                             data.steps, **data.sampling)
    ref = token_shares(ref_tokens, ref_selection, data.reveal_step)
    behaviour = token_shares(data.behaviour, data.selection, data.reveal_step)
    exact = sequence_kl(behaviour, ref, data.reveal_step >= 0)
    assert float(exact.mean()) > 1.0
    estimates = []
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        rows = replay_rows(data.reveal_step, data.steps, 1, g)
        mask = revealed_mask(data.reveal_step, rows, data.steps)
        scale = subsample_scale(data.reveal_step, rows, data.steps)
        estimates.append(float(sequence_kl(behaviour, ref, mask, scale).mean()))
    assert statistics.mean(estimates) == pytest.approx(float(exact.mean()), rel=0.1)
    assert statistics.pstdev(estimates) > 0  # an estimate, not the exact value


@pytest.mark.parametrize("reference_on", ["learner", "rollout"])
def test_reference_reset_copies_the_policy_and_is_checkpointed(tmp_path, reference_on):
    """(reference_on=rollout falls back to the learner's pass: the reference moves.)"""
    learner, step = make_loop(2, kl_coef=0.01, reference_reset_every=3, kl_target=2.0, kl_horizon=2,
                              reference_on=reference_on)
    rows = [step(i) for i in range(7)]
    assert all(r["ref_replay_s"] > 0 for r in rows)
    assert [r["reference_resets"] for r in rows] == [0, 0, 1, 1, 1, 2, 2]
    assert rows[2]["kl_seq"] > 0.1  # measured against the starting reference
    assert rows[3]["kl_seq"] == pytest.approx(0.0, abs=1e-4)  # the batch of step 4 came from the new reference
    policy, reference = learner.policy.state_dict(), learner.reference.state_dict()
    assert any(not torch.equal(policy[k], reference[k]) for k in policy)  # step 7 moved on from the step-6 reset

    # a checkpoint holds the reset reference, the count and the controller; loading restores them
    actor = LearnerActor.__new__(LearnerActor)
    actor.core, actor.model_config, actor.vocab = learner, learner.policy.cfg, TOK.to_dict()
    path = str(tmp_path / "ckpt")
    actor.save(path, {"step": 7}, {})
    fresh_model = DiffusionLM(learner.policy.cfg)
    other = LearnerActor(learner.cfg, learner.policy.cfg, TOK.to_dict(), WeightSnapshot.from_module(fresh_model, 0),
                         precision="fp32")
    assert other.load(path) == {"step": 7}
    core = other.core
    assert core.reference_resets == 2 and core.step == 7
    assert core.kl_controller.state_dict() == learner.kl_controller.state_dict()
    assert all(torch.equal(core.reference.state_dict()[k], reference[k]) for k in reference)


@pytest.mark.parametrize("overrides, message", [
    (["grpo.kl_target=4", "grpo.kl_coef=0"], "set grpo.kl_coef > 0 as its start value"),
    (["grpo.kl_target=0"], "greater than 0"),
    (["grpo.kl_horizon=0.5"], "greater than or equal to 1"),
    (["grpo.reference_reset_every=0"], "greater than or equal to 1"),
])
def test_kl_budget_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, overrides=overrides)


def test_defaults_keep_kl_coef_fixed():
    cfg = GRPOConfig()
    assert cfg.kl_target is None and cfg.reference_reset_every is None
    assert math.isclose(LearnerCore(DiffusionLM(preset_config("tiny", TOK.vocab_size)), cfg).kl_coef, cfg.kl_coef)


@pytest.mark.parametrize("sampler, kl_target, warned", [({"top_k": 5}, 4, True), ({"top_p": 0.9}, None, True),
                                                        ({}, 4, False), ({"order": "random"}, 4, False)])
def test_truncated_sampling_with_a_kl_penalty_is_warned_about(sampler, kl_target, warned):
    """Tokens outside the reference's top-k/top-p make the KL infinite; the learner clamps their log-ratios."""
    cfg = TrainConfig(sampler=SamplerConfig(**sampler), grpo=GRPOConfig(kl_target=kl_target))
    found = cfg.warnings()
    assert len(found) == int(warned)
    assert not warned or "undercount the KL" in found[0]


def test_confidence_order_training_needs_a_random_share():
    with pytest.raises(ConfigError, match="sampler.random_reveal must be > 0 under confidence order"):
        load_config(TrainConfig, overrides=["sampler.order=confidence", "sampler.random_reveal=0"])
    assert load_config(TrainConfig, overrides=["sampler.random_reveal=0", "sampler.order=random"])


@pytest.mark.parametrize("order", ["random", "confidence"])
def test_a_rollout_worker_measures_the_kl_to_the_reference_it_is_sent(order):
    """Held-out evaluations ask the worker to measure each sample's trajectory KL to the starting generator:
    0 while it holds those weights, positive after an update; the reference comes with the first such request."""
    torch.manual_seed(0)
    model = DiffusionLM(preset_config("tiny", TOK.vocab_size, block_size=LENGTH))
    start = WeightSnapshot.from_module(model, version=0)
    worker = RolloutWorker(0, model.cfg, SamplerConfig(steps=4, order=order), precision="fp32")
    worker.set_weights(start)
    request = RolloutRequest(request_id=-1, prompts=torch.full((8, LENGTH), TOK.mask_id), group_size=2, seed=0,
                             measure_kl=True)
    with pytest.raises(ValueError, match="sends no reference weights"):
        worker.generate(request)
    assert worker.generate(RolloutRequest(request_id=0, prompts=request.prompts, group_size=2, seed=0)) \
        .kl_to_reference.numel() == 0  # training requests do not measure it
    batch = worker.generate(request, start)
    batch.validate()
    assert batch.kl_to_reference.shape == (16,) and batch.kl_to_reference.abs().max() == 0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    worker.set_weights(WeightSnapshot.from_module(model, version=1))
    moved = worker.generate(RolloutRequest(request_id=-2, prompts=request.prompts, group_size=2, seed=0,
                                           min_version=1, measure_kl=True))  # the reference was kept
    assert float(moved.kl_to_reference.mean()) > 0
