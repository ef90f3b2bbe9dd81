"""Levers against reward exploitation in real runs (Ray, tiny preset): judge ensembles score with every member,
and checkpoint selection on a held-out measure keeps checkpoints/best.json, through pruning and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dgrpo.config import TrainConfig, load_config
from dgrpo.errors import ConfigError, RunError
from dgrpo.models.checkpoint import load_checkpoint, save_checkpoint
from dgrpo.models.judge import Judge, judge_config
from dgrpo.models.rewards import combine_member_rewards, member_std
from dgrpo.orchestration.driver import Driver, run_training
from dgrpo.orchestration.metrics import read_jsonl
from dgrpo.orchestration.rundir import find_checkpoints, read_best
from dgrpo.protocols.rollout_log import read_rollout_log
from conftest import tiny_run_config

LENGTH = 16


def levers_config(tmp_path: Path, corpus: str, name: str = "run", **over) -> TrainConfig:
    run = {"steps": 6, "eval_every": 1, "keep_checkpoints": 1, "seed": 4, **over.pop("run", {})}
    grpo = {"group_size": 4, "prompts_per_step": 4, "minibatch_size": 16, "lr": 3e-3, **over.pop("grpo", {})}
    prompts = {"length": LENGTH, **over.pop("prompts", {})}
    resources = {"rollout": {"num_workers": 1, "precision": "fp32"}, **over.pop("resources", {})}
    return tiny_run_config(tmp_path / name, corpus, run=run, grpo=grpo, prompts=prompts, resources=resources, **over)


@pytest.fixture(scope="module")
def judges(tmp_path_factory, tiny_corpus_file):
    """Random tiny judges of the corpus' vocabulary for windows of LENGTH, each saved with its seed."""
    from dgrpo.corpus import load_corpus
    tok = load_corpus(tiny_corpus_file).tokenizer
    root = tmp_path_factory.mktemp("judges")
    paths = {}
    for name, seed in (("a", 1), ("b", 2), ("select", 3), ("select_seed_of_a", 1)):
        torch.manual_seed(seed + (100 if name == "select_seed_of_a" else 0))
        judge = Judge(judge_config("tiny", tok.n_chars, LENGTH))
        paths[name] = str(root / name)
        save_checkpoint(paths[name], kind="judge", model_config=judge.cfg, vocab=tok.to_dict(), weights=judge,
                        config={"seed": seed})
    return paths


# -- judge ensembles ---------------------------------------------------------------------------------------------

def test_an_ensemble_reward_scores_with_every_member(ray_cluster, tiny_corpus_file, judges, tmp_path):
    cfg = levers_config(tmp_path, tiny_corpus_file, run={"steps": 2, "eval_every": 2, "log_rollouts": True},
                        reward={"kind": "judge", "judge_checkpoints": [judges["a"], judges["b"]],
                                "ensemble": "mean_minus_std", "ensemble_std_coef": 0.5})
    assert run_training(cfg)["steps"] == 2
    out = Path(cfg.run.out_dir)
    batches = list(read_rollout_log(out / "rollouts.msgpack"))
    assert len(batches) == 2
    for b in batches:
        assert b.member_rewards.shape == (2, b.num_samples)
        assert torch.allclose(b.rewards, combine_member_rewards(b.member_rewards, "mean_minus_std", 0.5))
        assert float(member_std(b.member_rewards).mean()) > 0  # two judges of different seeds disagree
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "num_samples" in r]
    for row, batch in zip(rows, batches):  # one batch a step
        assert row["judge_disagreement"] == pytest.approx(float(member_std(batch.member_rewards).mean()), rel=1e-5)
    assert rows[-1]["eval_judge_disagreement"] > 0


# -- checkpoint selection ------------------------------------------------------------------------------------------

# held-out values per step, made up so that the best is known: the KL budget (4) excludes steps 3 and 5
REWARD = {0: 0.1, 1: 0.3, 2: 0.2, 3: 0.9, 4: 0.5, 5: 0.8, 6: 0.4}
KL = {0: 0.0, 1: 1.0, 2: 2.0, 3: 5.0, 4: 3.0, 5: 6.0, 6: 2.0}
BEST = {0: 0, 1: 1, 2: 1, 3: 1, 4: 4, 5: 4, 6: 4}  # the best step after each evaluation


class MadeUpEvaluations(Driver):
    """The real evaluation, its reward and KL replaced by the made-up sequences."""

    def evaluate(self) -> dict:
        result = super().evaluate()
        result.update(eval_reward_mean=REWARD[self.step], eval_kl_seq=KL[self.step])
        return result


class Crash(Exception):
    pass


def run_made_up(cfg: TrainConfig, resume: bool = False, crash_at: int | None = None) -> dict:
    def crash(record):
        if record["step"] == crash_at:
            raise Crash(f"killed after step {crash_at}")

    driver = MadeUpEvaluations(cfg, resume=resume, report=crash if crash_at else None, quiet=True)
    try:
        return driver.run()
    finally:
        driver.close()


def checkpoint_names(out: str) -> list[str]:
    return [p.name for p in find_checkpoints(Path(out))]


@pytest.fixture(scope="module")
def selected(ray_cluster, tiny_corpus_file, tmp_path_factory):
    cfg = levers_config(tmp_path_factory.mktemp("selected"), tiny_corpus_file, run={"selection_kl_max": 4.0})
    return cfg, run_made_up(cfg)


def test_the_best_pointer_follows_the_selection_measure(selected):
    cfg, summary = selected
    out = cfg.run.out_dir
    rows = read_jsonl(Path(out) / "metrics.jsonl")
    assert [r["best_step"] for r in rows] == [BEST[r["step"]] for r in rows] == list(BEST.values())
    assert summary["best"]["step"] == 4 and summary["best"]["value"] == REWARD[4]
    assert summary["best"]["checkpoint"] == str(Path(out) / "checkpoints" / "step_000004")
    best = read_best(Path(out))
    assert best == {**summary["best"], "checkpoint": "step_000004"}
    assert best["eval_kl_seq"] == KL[4] and best["selection"] == "eval_reward"
    # keep_checkpoints=1 keeps the newest and, besides it, the best; the checkpoints of earlier bests are gone
    assert checkpoint_names(out) == ["step_000004", "step_000006"]
    ckpt = load_checkpoint(Path(out) / "checkpoints" / "step_000004", expect_kind="generator")
    assert ckpt.state["step"] == 4 and ckpt.state["driver"]["best"]["step"] == 4


def test_the_best_pointer_survives_a_crash_and_resume(selected, tmp_path):
    cfg, summary = selected
    crashed = levers_config(tmp_path, cfg.corpus.path, run={"selection_kl_max": 4.0})
    with pytest.raises(Crash):
        run_made_up(crashed, crash_at=5)  # after step 5 was logged, before anything of it was saved
    out = crashed.run.out_dir
    assert checkpoint_names(out) == ["step_000001", "step_000004"] and read_best(Path(out))["step"] == 4
    (Path(out) / "checkpoints" / "best.json").write_text(json.dumps({"step": 99, "checkpoint": "step_000099"}))
    resumed = run_made_up(crashed, resume=True)  # from step 4, the newest checkpoint
    assert resumed["best"]["step"] == 4 and read_best(Path(out))["step"] == 4  # the pointer follows the state
    assert checkpoint_names(out) == checkpoint_names(cfg.run.out_dir)
    steps = [r["step"] for r in read_jsonl(Path(out) / "metrics.jsonl")]
    assert steps == [0, 1, 2, 3, 4, 5, 6]  # each step (and its evaluation) logged once


def test_selection_off_keeps_no_best(ray_cluster, tiny_corpus_file, tmp_path):
    cfg = levers_config(tmp_path, tiny_corpus_file, run={"steps": 2, "selection": "none"})
    summary = run_training(cfg, quiet=True)
    assert summary["best"] is None and read_best(Path(cfg.run.out_dir)) is None
    assert checkpoint_names(cfg.run.out_dir) == ["step_000002"]
    rows = read_jsonl(Path(cfg.run.out_dir) / "metrics.jsonl")
    assert all("best_step" not in r for r in rows)
    assert all("eval_kl_seq" in r for r in rows)  # the held-out KL is measured at every evaluation regardless
    assert rows[0]["eval_kl_seq"] == 0.0  # step 0: the starting generator, run beside itself by the sampler


def test_selection_on_a_judge_of_its_own(ray_cluster, tiny_corpus_file, judges, tmp_path, capsys):
    cfg = levers_config(tmp_path, tiny_corpus_file, run={"steps": 2, "selection": "selection_judge",
                                                         "selection_judge": judges["select"]})
    summary = run_training(cfg)
    rows = [r for r in read_jsonl(Path(cfg.run.out_dir) / "metrics.jsonl") if "eval_reward_mean" in r]
    values = [r["eval_selection_reward_mean"] for r in rows]
    assert summary["best"]["selection"] == "selection_judge"
    assert summary["best"]["value"] == max(values)
    assert summary["best"]["step"] == rows[values.index(max(values))]["step"]
    assert f"best checkpoint: {summary['best']['checkpoint']}" in capsys.readouterr().out


@pytest.mark.parametrize("overrides, error, message", [
    (["run.selection=selection_judge"], ConfigError, "needs run.selection_judge"),
    (["run.selection_judge={select}"], ConfigError, "only used with run.selection=selection_judge"),
    (["reward.kind=judge", "reward.judge_checkpoints=[{a},{b}]", "run.selection=selection_judge",
      "run.selection_judge={b}"], ConfigError, "is a reward judge"),
    (["reward.kind=judge", "reward.judge_checkpoint={a}", "run.selection=selection_judge",
      "run.selection_judge={select_seed_of_a}"], RunError, "was trained with the seed 1 of the reward judge"),
    (["run.selection_kl_max=0"], ConfigError, "greater than 0"),
])
def test_selection_config_errors(tiny_corpus_file, judges, tmp_path, overrides, error, message):
    overrides = [o.format(**judges) for o in overrides]
    with pytest.raises(error, match=message):
        cfg = load_config(TrainConfig, overrides=[f"run.out_dir={tmp_path / 'run'}", f"corpus.path={tiny_corpus_file}",
                                                  "generator.preset=tiny", f"prompts.length={LENGTH}", *overrides])
        Driver(cfg)  # checks the selection judge before any actor starts
