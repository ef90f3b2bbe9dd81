"""GRPO on Ray: exact first ratio, KL from zero, learning in sync and async modes, weight versions."""

import json

import pytest
import ray
import torch

from dgrpo.actors.judge_worker import JudgeWorker
from dgrpo.actors.rollout import RolloutWorker
from dgrpo.config import GRPOConfig, RewardConfig, SamplerConfig, TrainConfig
from dgrpo.corpus import load_corpus, make_prompts, random_windows
from dgrpo.learner.core import LearnerCore
from dgrpo.models.diffusion import DiffusionLM
from dgrpo.models.transformer import preset_config
from dgrpo.orchestration.driver import run_training
from dgrpo.protocols import RolloutRequest, WeightSnapshot
from dgrpo.protocols.rollout_log import read_rollout_log
from conftest import tiny_run_config


def train_config(tmp_path, corpus, **over) -> TrainConfig:
    run = {"steps": 20, "eval_every": 20, "eval_prompts": 32, **over.pop("run", {})}
    sampler = {"steps": 8, **over.pop("sampler", {})}
    grpo = {"group_size": 8, "prompts_per_step": 4, "minibatch_size": 32, "lr": 3e-3, "kl_coef": 0.0,
            **over.pop("grpo", {})}
    return tiny_run_config(tmp_path / "run", corpus, run=run, sampler=sampler, grpo=grpo, **over)


def local_rollouts(corpus_file, n_prompts=4, k=4, steps=6, seed=0):
    corpus = load_corpus(corpus_file)
    torch.manual_seed(seed)
    model = DiffusionLM(preset_config("tiny", corpus.tokenizer.vocab_size))
    worker = RolloutWorker(0, model.cfg, SamplerConfig(steps=steps), precision="fp32")  # as the learner below
    worker.set_weights(WeightSnapshot.from_module(model, 0))
    windows = random_windows(corpus.train, n_prompts, model.cfg.block_size, torch.Generator().manual_seed(seed))
    prompts = make_prompts(windows, corpus.tokenizer.mask_id, "infill", 0.5, torch.Generator().manual_seed(seed))
    judge = JudgeWorker(0, RewardConfig(kind="char_frequency", chars="e "), corpus.tokenizer.to_dict())
    batch = worker.generate(RolloutRequest(request_id=0, prompts=prompts, group_size=k, seed=seed))
    return model, judge.score(batch)


def test_learner_skips_groups_without_signal(tiny_corpus_file):
    model, scored = local_rollouts(tiny_corpus_file)
    scored.rewards = torch.ones_like(scored.rewards)
    learner = LearnerCore(model, GRPOConfig(group_size=4, prompts_per_step=4), seed=0)
    before = [p.clone() for p in model.parameters()]
    m = learner.train([scored])
    assert m["zero_std_ratio"] == 1.0 and m["skipped_update"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_weight_versions_reach_every_worker(ray_cluster, tiny_corpus_file):
    corpus = load_corpus(tiny_corpus_file)
    model = DiffusionLM(preset_config("tiny", corpus.tokenizer.vocab_size))
    Worker = ray.remote(RolloutWorker).options(num_cpus=0.5)
    workers = [Worker.remote(i, model.cfg, SamplerConfig(steps=4)) for i in range(3)]
    prompts = torch.full((2, model.cfg.block_size), corpus.tokenizer.mask_id)
    for version in (1, 2):
        ref = ray.put(WeightSnapshot.from_module(model, version))
        acks = ray.get([w.set_weights.remote(ref) for w in workers], timeout=60)
        assert [a["version"] for a in acks] == [version] * 3
        batches = ray.get([w.generate.remote(RolloutRequest(request_id=i, prompts=prompts, group_size=2, seed=i,
                                                            min_version=version))
                           for i, w in enumerate(workers)], timeout=60)
        assert [b.policy_version for b in batches] == [version] * 3
        assert [b.worker_id for b in batches] == [0, 1, 2]
    with pytest.raises(ray.exceptions.RayTaskError, match="holds policy v2"):
        ray.get(workers[0].generate.remote(RolloutRequest(request_id=9, prompts=prompts, group_size=2, seed=0,
                                                          min_version=3)), timeout=60)
    for w in workers:
        ray.kill(w)


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode, rollout_precision, learner_precision",
                         [("sync", "auto", "auto"), ("async", "auto", "auto"), ("async", "bf16", "fp32")])
def test_grpo_raises_reward_with_two_workers(ray_cluster, tiny_corpus_file, tmp_path, mode, rollout_precision,
                                             learner_precision):
    cfg = train_config(tmp_path, tiny_corpus_file, run={"mode": mode, "log_rollouts": True},
                       resources={"rollout": {"num_workers": 2, "precision": rollout_precision},
                                  "learner": {"precision": learner_precision}})
    summary = run_training(cfg)
    assert summary["steps"] == 20
    assert summary["worker_restarts"] == 0  # a request sent with the wrong weights would read as a restart
    before, after = summary["eval_reward_before"], summary["eval_reward_after"]
    assert after - before > 3 * summary["eval_reward_after_stderr"], summary
    rows = read_metrics(tmp_path / "run")
    steps = [r["step"] for r in rows if "reward_mean" in r]
    assert steps == list(range(1, 21))
    for r in rows:
        if "batch_versions" not in r:
            continue
        assert max(r["batch_versions"]) <= r["step"] - 1
        if mode == "sync":
            assert r["batch_versions"] == [r["step"] - 1]  # fresh rollouts from the current policy
        else:
            assert r["step"] - 1 - min(r["batch_versions"]) <= cfg.run.max_staleness
    # every logged batch is tagged by the version that generated it, and each request appears once
    logged = list(read_rollout_log(tmp_path / "run" / "rollouts.msgpack"))
    ids = [b.rollout.request_id for b in logged]
    assert len(ids) == len(set(ids))
    assert {b.rollout.policy_version for b in logged} <= set(range(0, 21))
    assert {b.rollout.worker_id for b in logged} == {0, 1}
    if (rollout_precision, learner_precision) == ("bf16", "fp32"):  # the mismatch is measured and logged
        mismatch = [r["logp_mismatch"] for r in rows if "logp_mismatch" in r]  # steps with fresh samples
        assert mismatch and 0 < max(mismatch) < 0.02


@pytest.mark.parametrize("mode, rollout_precision, old_logprob",
                         [("sync", "fp32", "behaviour"), ("async", "bf16", "recompute")])
def test_grpo_with_the_reference_pass_on_the_rollout_workers(ray_cluster, tiny_corpus_file, tmp_path, mode,
                                                             rollout_precision, old_logprob):
    """grpo.reference_on=rollout: the workers hold the starting generator from the start and send the reference's
    terms on the rows they chose; the learner replays no reference, and the run learns. In fp32 the first step's
    kl_seq is 0: the workers' reference is the learner's (the first batches come from it)."""
    cfg = train_config(tmp_path, tiny_corpus_file, run={"mode": mode, "log_rollouts": True},
                       grpo={"reference_on": "rollout", "replay_steps": 4, "kl_coef": 0.01, "old_logprob": old_logprob},
                       resources={"rollout": {"num_workers": 2, "precision": rollout_precision},
                                  "learner": {"precision": "fp32"}})
    summary = run_training(cfg)
    assert summary["steps"] == 20
    assert summary["eval_reward_after"] - summary["eval_reward_before"] > 3 * summary["eval_reward_after_stderr"]
    rows = [r for r in read_metrics(tmp_path / "run") if "reward_mean" in r]
    assert len(rows) == 20 and all(r["ref_replay_s"] == 0 for r in rows)
    if rollout_precision == "fp32":
        assert rows[0]["kl_seq"] == pytest.approx(0.0, abs=1e-4)
    assert rows[-1]["kl_seq"] > 0.01
    logged = list(read_rollout_log(tmp_path / "run" / "rollouts.msgpack"))
    for b in logged:
        r = b.rollout
        with_tokens = (r.reveal_step[:, None, :] == torch.arange(r.steps)[None, :, None]).any(-1).sum(1)
        assert torch.equal(r.replay_mask.sum(1), with_tokens.clamp_max(4))


@pytest.mark.parametrize("quiet", [False, True])
def test_train_cli_prints_a_line_per_step_unless_quiet(ray_cluster, tiny_corpus_file, tmp_path, quiet):
    from click.testing import CliRunner

    from dgrpo.entrypoints.cli import main
    args = ["train", "--set", f"run.out_dir={tmp_path / 'run'}", "--set", f"corpus.path={tiny_corpus_file}",
            "--set", "generator.preset=tiny", "--set", "reward.kind=char_frequency", "--set", "run.steps=3",
            "--set", "run.eval_every=2", "--set", "run.eval_prompts=4", "--set", "run.metrics_export=false",
            "--set", "sampler.steps=4", "--set", "grpo.group_size=4", "--set", "grpo.prompts_per_step=2",
            "--set", "resources.rollout.num_workers=1"] + (["--quiet"] if quiet else [])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, (result.output[-3000:], result.exception)
    summary = json.loads(result.output[result.output.rindex("\n{"):])
    assert summary["steps"] == 3
    lines = [line for line in result.output.splitlines() if line.startswith("step ")]
    if quiet:
        assert lines == [] and "training from step" not in result.output
        return
    assert "training from step 0 to 3; held-out reward at step 0: " in result.output
    assert lines[0].startswith("step 1/3  reward ") and " steps/min  staleness 0.00  ETA " in lines[0]
    assert [line.split()[1] for line in lines][-2:] == ["2/3", "3/3"]  # step 2 evaluated, step 3 the last
    assert " eval " in lines[-2] and lines[-1].split("  ")[-1].startswith("done in ")
