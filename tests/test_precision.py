"""Precision: the policy (auto, DGRPO_PRECISION), exact replay in one precision, bf16 rollouts beside an
fp32 learner, bf16 pretraining and judge training, and the CUDA path where a GPU exists.

Every test here pins the precisions it tests, so it runs the same on an AVX2-only CPU (bf16 emulated:
slow, but fine at the tiny preset), on a CPU with native bf16 and on a GPU.
"""

import math

import pytest
import torch
from click.testing import CliRunner

from dgrpo import precision
from dgrpo.actors.judge_worker import JudgeWorker
from dgrpo.actors.rollout import RolloutWorker
from dgrpo.config import GRPOConfig, JudgeTrainConfig, PretrainConfig, RewardConfig, SamplerConfig, to_dict
from dgrpo.corpus import fixed_windows, load_corpus, make_prompts, random_windows
from dgrpo.learner.core import LearnerCore
from dgrpo.models.diffusion import DiffusionLM
from dgrpo.models.judge import load_judge
from dgrpo.models.sampler import sample
from dgrpo.models.trajectory import trajectory_logprobs
from dgrpo.models.transformer import preset_config
from dgrpo.entrypoints.cli import main
from dgrpo.protocols import RolloutRequest, WeightSnapshot
from dgrpo.training.train_judge import train_judge
from dgrpo.training.pretrain import pretrain

DTYPES = {"fp32": None, "bf16": torch.bfloat16}
# With one precision on both sides the learner's replay is the sampler's computation again: measured
# exactly 0 here (tiny and small presets, AMX CPU). Kernels may block a differently shaped batch
# differently and round one bf16 activation the other way, which moves a log-prob by about 2^-8 of its
# logit's scale; 2e-3 allows that and nothing more.
SAME_PRECISION_TOL = {"fp32": 1e-5, "bf16": 2e-3}


# --- the policy ---------------------------------------------------------------------------------


def test_the_config_offers_the_precisions_there_are():
    import typing
    from dgrpo.config import Precision
    assert typing.get_args(Precision) == precision.PRECISIONS

def test_auto_follows_the_hardware_unless_the_environment_sets_it(monkeypatch):
    monkeypatch.delenv(precision.FORCE_ENV, raising=False)
    for native in (True, False):
        monkeypatch.setattr(precision, "bf16_is_fast", lambda device, native=native: native)
        assert precision.effective_precision("auto") == ("bf16" if native else "fp32")
        assert precision.resolve_precision("auto") is (torch.bfloat16 if native else None)
        assert precision.effective_precision("fp32") == "fp32"
        assert precision.effective_precision("bf16") == "bf16"
    for forced in ("fp32", "bf16"):
        monkeypatch.setenv(precision.FORCE_ENV, forced)
        assert precision.effective_precision("auto") == forced
        assert precision.effective_precision("fp32") == "fp32"  # explicit settings stay pinned
        assert f"{precision.FORCE_ENV}={forced}" in precision.describe_precision("auto")
    monkeypatch.setenv(precision.FORCE_ENV, "fp16")
    with pytest.raises(ValueError, match="DGRPO_PRECISION"):
        precision.effective_precision("auto")
    with pytest.raises(ValueError, match="precision must be one of"):
        precision.effective_precision("half")


def test_the_policy_says_what_auto_picked_and_why(monkeypatch):
    monkeypatch.delenv(precision.FORCE_ENV, raising=False)
    monkeypatch.setattr(precision, "bf16_is_fast", lambda device: False)
    line = precision.describe_precision("auto", "cpu")
    assert line.startswith("fp32 on cpu") and "no native bf16" in line
    monkeypatch.setattr(precision, "bf16_is_fast", lambda device: True)
    report = precision.precision_report({"rollout": "auto", "learner": "fp32"}, "cpu")
    assert "rollout" in report and "bf16 on cpu (auto" in report and "fp32 on cpu (as configured)" in report
    assert "stay fp32" in report


def test_commands_print_the_policy_and_reject_a_bad_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(precision.FORCE_ENV, "fp32")
    out = CliRunner().invoke(main, ["config", "train"])
    assert out.exit_code == 0
    monkeypatch.setenv(precision.FORCE_ENV, "bogus")
    out = CliRunner().invoke(main, ["config", "train"])
    assert out.exit_code == 2 and "DGRPO_PRECISION" in out.output


# --- the sampler and the learner's replay ---------------------------------------------------------

def scored_rollouts(corpus_file, rollout_precision: str, seed: int = 0):
    corpus = load_corpus(corpus_file)
    torch.manual_seed(seed)
    model = DiffusionLM(preset_config("tiny", corpus.tokenizer.vocab_size))
    worker = RolloutWorker(0, model.cfg, SamplerConfig(steps=6), precision=rollout_precision)
    worker.set_weights(WeightSnapshot.from_module(model, 0))
    windows = random_windows(corpus.train, 4, model.cfg.block_size, torch.Generator().manual_seed(seed))
    prompts = make_prompts(windows, corpus.tokenizer.mask_id, "infill", 0.5, torch.Generator().manual_seed(seed))
    judge = JudgeWorker(0, RewardConfig(kind="char_frequency", chars="e "), corpus.tokenizer.to_dict())
    return model, judge.score(worker.generate(RolloutRequest(request_id=0, prompts=prompts, group_size=4, seed=seed)))


def learner_for(model, learner_precision: str, old_logprob: str) -> LearnerCore:
    cfg = GRPOConfig(group_size=4, prompts_per_step=4, minibatch_size=16, lr=1e-2, kl_coef=0.1,
                     old_logprob=old_logprob)
    return LearnerCore(model, cfg, seed=0, autocast_dtype=DTYPES[learner_precision])


@pytest.mark.parametrize("old_logprob", ["behaviour", "recompute"])
@pytest.mark.parametrize("prec", ["fp32", "bf16"])
def test_replay_equals_the_sampler_in_one_precision(tiny_corpus_file, prec, old_logprob):
    model, scored = scored_rollouts(tiny_corpus_file, prec)
    learner = learner_for(model, prec, old_logprob)
    first = learner.train([scored])
    assert first["skipped_update"] == 0.0
    assert first["first_step_ratio_dev"] <= SAME_PRECISION_TOL[prec]
    assert first["logp_mismatch"] <= SAME_PRECISION_TOL[prec]
    assert first["kl"] == pytest.approx(0.0, abs=1e-7)  # one minibatch: policy == reference
    for _ in range(3):
        later = learner.train([scored])
    assert later["kl"] > 1e-6 and learner.version == 4


@pytest.mark.parametrize("old_logprob", ["behaviour", "recompute"])
def test_bf16_rollouts_beside_an_fp32_learner_show_their_mismatch(tiny_corpus_file, old_logprob):
    model, scored = scored_rollouts(tiny_corpus_file, "bf16")
    first = learner_for(model, "fp32", old_logprob).train([scored])
    assert 0.0 < first["logp_mismatch"] < 0.02  # measured, logged, and small
    if old_logprob == "behaviour":  # PPO's ratio starts at pi_fp32 / mu_bf16
        assert 0.0 < first["first_step_ratio_dev"] < 0.1
    else:  # the ratio is against the learner's own recomputation; the mismatch sits in the IS weight
        assert first["first_step_ratio_dev"] <= 1e-5
        assert first["tis_mean"] == pytest.approx(1.0, abs=0.02)


def test_bf16_learns_the_same_gradient_as_fp32():
    torch.manual_seed(0)
    model = DiffusionLM(preset_config("tiny", 66))
    out = sample(model, torch.full((16, 32), model.mask_id), steps=8, generator=torch.Generator().manual_seed(0))
    advantages = torch.randn(16, generator=torch.Generator().manual_seed(1))
    grads = {}
    for prec, dtype in DTYPES.items():
        model.zero_grad()
        logp = trajectory_logprobs(model, out.tokens, out.reveal_step, 8, autocast_dtype=dtype)
        (-(advantages[:, None] * logp).sum()).backward()
        grads[prec] = torch.cat([p.grad.flatten() for p in model.parameters()])
    cosine = torch.nn.functional.cosine_similarity(grads["fp32"], grads["bf16"], dim=0)
    assert cosine > 0.999, cosine


# --- pretraining and judge training under bf16 autocast --------------------------------------------

def test_bf16_pretraining_reaches_the_fp32_loss(tmp_path, tiny_corpus_file):
    corpus = load_corpus(tiny_corpus_file)
    final = {}
    for prec in ("fp32", "bf16"):
        cfg = PretrainConfig(preset="tiny", out=str(tmp_path / prec), max_iters=40, batch_size=16, lr=1e-2,
                             min_lr=1e-3, warmup_iters=5, eval_every=40, eval_windows=64, precision=prec,
                             compile=False, ema_decay=0.0, corpus={"path": tiny_corpus_file})
        state = pretrain(cfg, corpus, to_dict(cfg), progress=False, log=lambda *a: None)
        final[prec] = state["val_loss"]
    assert all(math.isfinite(v) for v in final.values())
    assert abs(final["bf16"] - final["fp32"]) < 0.05, final  # measured 0.008 here


def test_bf16_judge_training_ends_where_fp32_does(tmp_path, tiny_generator, tiny_corpus_file):
    scores = {}
    windows = fixed_windows(load_corpus(tiny_corpus_file).val, 64, 32, seed=3)
    for prec in ("fp32", "bf16"):
        cfg = JudgeTrainConfig(generator=tiny_generator, preset="tiny", out=str(tmp_path / prec), max_iters=40,
                               batch_size=16, warmup_iters=2, lr=5e-4, refill_pool=32, refill_every=10,
                               eval_every=40, eval_windows=16, precision=prec, sampler={"steps": 4, "order": "random"},
                               corpus={"path": tiny_corpus_file})
        train_judge(cfg, to_dict(cfg), progress=False, log=lambda *a: None)
        scores[prec] = load_judge(tmp_path / prec)[0].score(windows)
    gap = float((scores["bf16"] - scores["fp32"]).abs().mean())
    assert gap < 0.05, gap  # the two judges score held-out windows alike: measured 0.017 (another seed: 0.17)
