"""The device paths, on the CPU and where a GPU exists on CUDA: the sampler and its replay, the learner's first
step with the reference's terms a rollout worker sends, and weights that travel through the host. Only the layers
below the actors are imported, so that a GPU machine without Ray runs this file (bench/gpu_check.sh)."""

import copy

import numpy as np
import pytest
import torch

from dgrpo.config import GRPOConfig
from dgrpo.learner.core import LearnerCore
from dgrpo.models.diffusion import DiffusionLM
from dgrpo.models.sampler import DEFAULTS, RevealRule, sample
from dgrpo.models.trajectory import reference_terms, trajectory_logprobs
from dgrpo.models.transformer import preset_config
from dgrpo.protocols import RolloutBatch, ScoredBatch, WeightSnapshot

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="needs a CUDA GPU"))]
DTYPES = {"fp32": None, "bf16": torch.bfloat16}
SAME_PRECISION_TOL = {"fp32": 1e-5, "bf16": 2e-3}  # as tests/test_precision.py


def sampled(model, device: str, prec: str, order: str = "random", n: int = 16, steps: int = 8):
    prompts = torch.full((n, model.cfg.block_size), model.mask_id, device=device)
    return sample(model, prompts, steps=steps, order=order, autocast_dtype=DTYPES[prec],
                  generator=torch.Generator(device=device).manual_seed(0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prec", ["fp32", "bf16"])
def test_replay_equals_the_sampler_on_the_device(device, prec):
    torch.manual_seed(0)
    model = DiffusionLM(preset_config("tiny", 66)).to(device)
    out = sampled(model, device, prec)
    replay = trajectory_logprobs(model, out.tokens, out.reveal_step, 8, autocast_dtype=DTYPES[prec])
    assert replay.device.type == device
    assert float((replay - out.logprobs).abs().max()) <= SAME_PRECISION_TOL[prec]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prec", ["fp32", "bf16"])
@pytest.mark.parametrize("order", ["random", "confidence"])
def test_first_ratio_is_one_with_the_workers_reference_terms_on_the_device(device, prec, order):
    """A batch sampled on the device, the reference's terms computed there as a rollout worker does, a learner on
    the device: its first ratio is 1 and its kl_seq 0 (the policy is its reference)."""
    torch.manual_seed(0)
    model = DiffusionLM(preset_config("tiny", 66)).to(device)
    out = sampled(model, device, prec, order)
    rule = RevealRule(order=order)  # the sampler's default random_reveal, as sampled above
    mask, logprobs, selection = reference_terms(model, out.tokens, out.reveal_step, 8, 4, 1, rule=rule,
                                                reveal_rank=out.reveal_rank, autocast_dtype=DTYPES[prec])
    batch = RolloutBatch(request_id=0, tokens=out.tokens.cpu(), reveal_step=out.reveal_step.cpu(),
                         logprobs=out.logprobs.cpu(), group_index=torch.arange(4).repeat_interleave(4),
                         policy_version=0, worker_id=0, steps=8, temperature=DEFAULTS.temperature, top_k=0, top_p=1.0,
                         order=order,
                         random_reveal=rule.random_reveal, selection=out.selection.cpu(),
                         reveal_rank=out.reveal_rank.cpu(), replay_mask=mask.cpu(),
                         reference_logprobs=logprobs.cpu(), reference_selection=selection.cpu())
    rewards = torch.rand(16, generator=torch.Generator().manual_seed(0))
    cfg = GRPOConfig(group_size=4, prompts_per_step=4, minibatch_size=16, replay_steps=4, reference_on="rollout")
    core = LearnerCore(copy.deepcopy(model), cfg, device=device, autocast_dtype=DTYPES[prec])
    metrics = core.train([ScoredBatch(rollout=batch, rewards=rewards, judge_id=0)])
    assert metrics["ref_replay_s"] == 0
    assert metrics["first_step_ratio_dev"] <= (1e-5 if prec == "fp32" else 2e-3)
    assert abs(metrics["kl_seq"]) <= (1e-4 if prec == "fp32" else 0.05)


@pytest.mark.parametrize("device", DEVICES)
def test_a_snapshot_travels_through_the_host(device):
    model = DiffusionLM(preset_config("tiny", 66)).to(device)
    snap = WeightSnapshot.from_module(model, 3)  # host arrays for the object store
    assert all(isinstance(t, np.ndarray) for t in snap.tensors.values())
    target = DiffusionLM(preset_config("tiny", 66)).to(device)
    snap.load_into(target)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), target.state_dict().values()))
