"""Judge refresh (issue 14): a judge trainer keeps training the judge against the current policy.

Pure part (training/judge_refresh.py): batches of real windows, policy samples and the judge
checkpoint's refills with the right targets; training separates what the policy writes from
real text; the state round-trips exactly.

Ray runs (sync mode, fixed seed, tiny generator and a tiny judge trained here, 4 steps, a new
judge version every 2 steps): every judge actor receives each version and every scored batch
records the version that scored it (and its rewards are that version's); killing the judge
trainer inside a refresh and again between steps loses no batch and gives the judge and the
policy of the fault-free run; 2 + 2 resumed steps equal 4 uninterrupted ones.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import ray
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from dgrpo.actors.judge_refresh_trainer import JudgeTrainerActor
from dgrpo.config import JudgeRefreshConfig, JudgeTrainConfig, TrainConfig, load_config, to_dict
from dgrpo.corpus import load_corpus
from dgrpo.errors import ConfigError, RunError
from dgrpo.models.checkpoint import load_checkpoint
from dgrpo.models.judge import Judge
from dgrpo.entrypoints.cli import main
from dgrpo.orchestration.driver import Driver, run_training
from dgrpo.orchestration.metrics import read_jsonl
from dgrpo.protocols.rollout_log import read_rollout_log
from dgrpo.training.train_judge import train_judge
from dgrpo.training.judge_refresh import STATE_SETS, refresher_from_checkpoint

ray.cloudpickle.register_pickle_by_value(__import__(__name__))  # Ray workers cannot import this module

STEPS = 4
PUBLISH_EVERY = 2


def refresh_cfg(**kw) -> JudgeRefreshConfig:
    base = dict(enabled=True, publish_every=PUBLISH_EVERY, iters_per_publish=3, lr=1e-3, batch_size=8, p_real=0.5,
                p_policy=0.25, policy_buffer=24, eval_windows=8)
    return JudgeRefreshConfig(**{**base, **kw})


def make_refresher(tiny_judge, tiny_generator, corpus_file, **kw):
    from dgrpo.models.diffusion import load_generator
    _, tokenizer, _ = load_generator(tiny_generator)
    corpus = load_corpus(corpus_file, tokenizer=tokenizer)
    return refresher_from_checkpoint(tiny_judge, refresh_cfg(**kw), corpus, seed=3), corpus


def policy_samples(n: int, T: int = 32, seed: int = 0, token: int | None = None):
    """n samples: each generated in its second half (x = 0.5), random ids or a constant `token`."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 20, (n, T), generator=g) if token is None else torch.full((n, T), token)
    generated = torch.zeros(n, T, dtype=torch.bool)
    generated[:, T // 2:] = True
    return tokens, generated


# -- the pure refresher -------------------------------------------------------------------------


def test_batches_mix_real_windows_policy_samples_and_refills(tiny_judge, tiny_generator, tiny_corpus_file):
    refresher, corpus = make_refresher(tiny_judge, tiny_generator, tiny_corpus_file)
    assert (refresher.n_real, refresher.n_policy, refresher.n_refill) == (4, 2, 2)
    pool = load_checkpoint(tiny_judge).load_tensors("pool")
    tokens, generated = policy_samples(5, token=7)
    assert refresher.add_policy_samples(tokens, generated) == 5
    x_tokens, x, changed = refresher.batch()
    assert x_tokens.shape == (8, 32) and changed.shape == (8, 32)
    # real windows: x = 0, nothing replaced, text of the train split
    assert x[:4].tolist() == [0.0] * 4 and not bool(changed[:4].any())
    text = corpus.tokenizer.decode(corpus.train)
    assert all(corpus.tokenizer.decode(row) in text for row in x_tokens[:4])
    # policy samples: x = the share the policy wrote, labels = the written positions
    assert x[4:6].tolist() == [0.5, 0.5] and bool((x_tokens[4:6] == 7).all())
    assert torch.equal(changed[4:6], generated[:2].float())
    # refills of the judge checkpoint's pool, with their own x and labels
    for row, xs, ch in zip(x_tokens[6:], x[6:], changed[6:]):
        match = (pool["tokens"] == row).all(dim=1).nonzero().flatten()
        assert len(match), "a refill row is not from the judge's pool"
        i = int(match[0])
        assert float(xs) == pytest.approx(float(pool["x"][i])) and torch.equal(ch, pool["changed"][i].float())
    with pytest.raises(ValueError, match=r"policy samples must be \(N, 32\)"):
        refresher.add_policy_samples(tokens[:, :16], generated[:, :16])


def test_the_buffer_keeps_the_newest_samples(tiny_judge, tiny_generator, tiny_corpus_file):
    refresher, _ = make_refresher(tiny_judge, tiny_generator, tiny_corpus_file, policy_buffer=6)
    for i in range(4):  # 4 x 2 samples into 6 places: the first pair is overwritten
        refresher.add_policy_samples(*policy_samples(2, token=i))
    buf = refresher.buffer
    assert buf.filled == 6 and refresher.fresh == 6 and refresher.samples_seen == 8
    assert sorted(buf.tokens[:, 0].tolist()) == [1, 1, 2, 2, 3, 3]
    assert buf.newest(3)[:, 0].tolist() == [3, 3, 2]
    refresher.add_policy_samples(*policy_samples(9, token=5))  # more than fit: the newest 6
    assert buf.tokens[:, 0].tolist() == [5] * 6 and buf.filled == 6


def test_refresh_learns_what_the_policy_writes(tiny_judge, tiny_generator, tiny_corpus_file):
    """A 'policy' that writes one repeated character: the refreshed judge learns to call it synthetic,
    while it keeps scoring held-out real windows as real."""
    refresher, corpus = make_refresher(tiny_judge, tiny_generator, tiny_corpus_file, batch_size=16, lr=3e-3)
    e = corpus.tokenizer.stoi["e"]
    tokens = torch.full((16, 32), e)
    refresher.add_policy_samples(tokens, torch.ones(16, 32, dtype=torch.bool))
    figures = refresher.train(40)
    assert refresher.version == 1 and refresher.fresh == 0 and refresher.iters == 40
    assert figures["fresh_samples"] == 8.0  # eval_windows of the 16 fresh samples
    assert figures["score_policy_after"] > figures["score_policy_before"] + 0.2, figures
    assert figures["score_policy_after"] > figures["score_real_after"] + 0.3, figures
    assert figures["auc_after"] >= max(figures["auc_before"], 0.9), figures
    assert figures["loss"] > 0 and figures["token_loss"] > 0
    snap = refresher.snapshot()
    assert snap.version == 1
    judge = Judge(refresher.judge.cfg)
    snap.load_into(judge)
    assert torch.allclose(judge.score(tokens[:2]), refresher.judge.score(tokens[:2]))


def test_state_round_trips_exactly(tiny_judge, tiny_generator, tiny_corpus_file):
    """A refresher restored from another's state() goes on exactly as the original."""
    a, _ = make_refresher(tiny_judge, tiny_generator, tiny_corpus_file)
    a.add_policy_samples(*policy_samples(10, seed=1))
    a.train(3)
    a.add_policy_samples(*policy_samples(4, seed=2))
    tensors, meta = a.state()
    assert set(tensors) == set(STATE_SETS) and meta["version"] == 1 and meta["samples_seen"] == 14
    b, _ = make_refresher(tiny_judge, tiny_generator, tiny_corpus_file)
    b.load_state(tensors, meta)
    for r in (a, b):
        r.add_policy_samples(*policy_samples(6, seed=3))
        r.train(3)
    assert a.version == b.version == 2
    for (name, pa), pb in zip(a.judge.state_dict().items(), b.judge.state_dict().values()):
        assert torch.equal(pa, pb), name
    with pytest.raises(ValueError, match="resume with the same judge_refresh.policy_buffer"):
        make_refresher(tiny_judge, tiny_generator, tiny_corpus_file, policy_buffer=8)[0].load_state(tensors, meta)


# -- config and start-up errors -----------------------------------------------------------------


def test_bad_configs_are_one_line_errors(tiny_judge, tiny_generator, tiny_corpus_file, tmp_path):
    with pytest.raises(ConfigError, match=r"judge_refresh.enabled trains a learned judge, but reward.kind is "
                                          r"'char_frequency'; set reward.kind=judge"):
        load_config(TrainConfig, overrides=["judge_refresh.enabled=true"])
    with pytest.raises(ConfigError, match=r"p_real \(0.8\) \+ p_policy \(0.5\) must be at most 1"):
        load_config(TrainConfig, overrides=["judge_refresh.p_real=0.8", "judge_refresh.p_policy=0.5"])
    with pytest.raises(ConfigError, match=r"judge_refresh.p_policy: Input should be greater than 0"):
        load_config(TrainConfig, overrides=["judge_refresh.p_policy=0"])
    res = CliRunner().invoke(main, ["train", "--set", "judge_refresh.enabled=true", "--set",
                                    f"corpus.path={tiny_corpus_file}", "--set", f"run.out_dir={tmp_path / 'r'}"])
    assert res.exit_code == 2 and "judge_refresh.enabled trains a learned judge" in res.output, res.output
    # a judge trained without a refill pool cannot give the refill share: said before any actor starts
    no_pool = tmp_path / "no_pool"
    cfg = JudgeTrainConfig(generator=tiny_generator, preset="tiny", out=str(no_pool), max_iters=1, batch_size=4,
                           p_real=1.0, p_generated=0.0, eval_every=1, eval_windows=8, precision="fp32",
                           sampler={"steps": 2}, corpus={"path": tiny_corpus_file})
    train_judge(cfg, to_dict(cfg), progress=False, log=lambda *a: None)
    assert not load_checkpoint(no_pool).has("pool")
    bad = train_config(tmp_path, tiny_corpus_file, tiny_generator, str(no_pool), "bad")
    with pytest.raises(RunError, match=r"refill pool of .*no_pool, which has none .* set judge_refresh.p_real \+ "
                                       r"judge_refresh.p_policy = 1"):
        Driver(bad, quiet=True)


# -- Ray runs -----------------------------------------------------------------------------------


def train_config(tmp_path: Path, corpus: str, generator: str, judge: str, name: str, **run) -> TrainConfig:
    return TrainConfig.model_validate({
        "run": {"out_dir": str(tmp_path / name), "steps": STEPS, "eval_every": 100, "eval_prompts": 4,
                "checkpoint_every": 1, "keep_checkpoints": 4, "metrics_export": False, "log_rollouts": True,
                "actor_timeout_s": 120, "max_worker_failures": 5, "seed": 7, **run},
        "corpus": {"path": corpus},
        "generator": {"checkpoint": generator},
        "reward": {"kind": "judge", "judge_checkpoint": judge},
        "sampler": {"steps": 4},
        "grpo": {"group_size": 4, "prompts_per_step": 4, "minibatch_size": 8, "lr": 3e-3},
        "judge_refresh": refresh_cfg().model_dump(),
        # one precision for the judges and the rewards this test recomputes from each version's weights
        "resources": {"rollout": {"num_workers": 2}, "judge": {"num_workers": 2, "precision": "fp32"},
                      "judge_trainer": {"max_restarts": 1}},
    })


def run_driver(cfg: TrainConfig, cls: type[Driver] = Driver, on_step=None, trainer_info: bool = True
               ) -> tuple[dict, dict]:
    """Run to the end; -> (summary, what the actors hold at the end)."""
    holder = {}
    driver = cls(cfg, report=(lambda record: on_step(holder["driver"], record)) if on_step else None, quiet=True)
    holder["driver"] = driver
    try:
        summary = driver.run()
        held = {"judges": ray.get([h.info.remote() for h in driver.judges.handles()], timeout=120),
                "trainer": ray.get(driver.judge_refresh.group.handles()[0].info.remote(), timeout=120) if trainer_info else {},
                "trainer_replacements": driver.judge_refresh.group.slots[0].replacements,
                "requests": driver.request_counter, "in_flight": sorted(driver.requests_in_flight())}
    finally:
        driver.close()
    return summary, held


def checkpoint(out: str, step: int) -> Path:
    return Path(out) / "checkpoints" / f"step_{step:06d}"


def step_rows(out: str) -> list[dict]:
    return [r for r in read_jsonl(Path(out) / "metrics.jsonl") if "num_samples" in r]


@pytest.fixture(scope="module")
def baseline(ray_cluster, tiny_corpus_file, tiny_generator, tiny_judge, tmp_path_factory):
    cfg = train_config(tmp_path_factory.mktemp("refresh_base"), tiny_corpus_file, tiny_generator, tiny_judge, "run")
    summary, held = run_driver(cfg)
    return cfg, summary, held


def assert_every_batch_trained_once(cfg: TrainConfig, summary: dict, held: dict) -> None:
    out = Path(cfg.run.out_dir)
    assert summary["steps"] == STEPS
    rows = step_rows(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(r["num_samples"] == cfg.grpo.prompts_per_step * cfg.grpo.group_size for r in rows)
    ids = [b.rollout.request_id for b in read_rollout_log(out / "rollouts.msgpack")]
    assert sorted(ids) == list(range(held["requests"])) and summary["batches_trained"] == len(ids)
    assert summary["duplicate_batches"] == 0 and held["in_flight"] == []


def test_versions_reach_every_judge_and_are_recorded_in_batches(baseline, tiny_judge):
    cfg, summary, held = baseline
    out = cfg.run.out_dir
    assert_every_batch_trained_once(cfg, summary, held)
    assert summary["judge_version"] == 2 and summary["judge_trainer_restarts"] == 0
    assert summary["judge_samples_dropped"] == 0 and summary["judge_refreshes_skipped"] == 0
    assert [j["judge_version"] for j in held["judges"]] == [2, 2]  # both judge actors hold the newest
    assert held["trainer"]["version"] == 2 and held["trainer"]["samples_seen"] == STEPS * 16
    rows = step_rows(out)
    assert [r["judge_version"] for r in rows] == [0, 1, 1, 2]  # a new version after steps 2 and 4
    assert [r["batch_judge_versions"] for r in rows] == [[0], [0], [1], [1]]
    assert [r["judge_age_steps"] for r in rows] == [1, 0, 1, 0]
    for r in rows:
        has = "judge_refresh/loss" in r
        assert has == (r["step"] % PUBLISH_EVERY == 0), r
        if has:
            assert 0 <= r["judge_refresh/auc_before"] <= 1 and 0 <= r["judge_refresh/auc_after"] <= 1
            assert r["judge_refresh/fresh_samples"] == 8.0 and r["judge_refresh/iters"] == 3 * r["judge_version"]
    # each batch records the version that scored it: steps 1-2 (requests 0-3) version 0, steps 3-4 version 1,
    # and its rewards are that judge's: 1 - score under the weights of the step-3 checkpoint's trainer
    batches = sorted(read_rollout_log(Path(out) / "rollouts.msgpack"), key=lambda b: b.rollout.request_id)
    assert [b.judge_version for b in batches] == [0, 0, 0, 0, 1, 1, 1, 1]
    ckpt = load_checkpoint(checkpoint(out, 3))
    assert ckpt.state["driver"]["judge_refresh"]["version"] == 1
    judge = Judge(load_checkpoint(tiny_judge).model_config)
    judge.load_state_dict(ckpt.load_tensors("judge_refresh_model"))
    original = Judge(judge.cfg)
    load_checkpoint(tiny_judge).load_weights_into(original)
    for b in batches:
        scorer = judge if b.judge_version == 1 else original
        assert torch.allclose(b.rewards, 1 - scorer.score(b.rollout.tokens), atol=1e-5), b.rollout.request_id
    assert not torch.allclose(judge.score(batches[0].rollout.tokens), original.score(batches[0].rollout.tokens))


def test_checkpoints_hold_the_trainer_state(baseline):
    """Each checkpoint holds the trainer's state at its newest version and the samples sent since."""
    cfg, _, _ = baseline
    for step, version, pending in ((3, 1, 16), (STEPS, 2, 0)):
        ckpt = load_checkpoint(checkpoint(cfg.run.out_dir, step))
        for name in (*STATE_SETS, "pending"):
            assert ckpt.has(f"judge_refresh_{name}")
        saved = ckpt.state["driver"]["judge_refresh"]
        assert saved["version"] == version and saved["samples_seen"] == (step - pending // 16) * 16
        assert saved["iters"] == 3 * version and saved["published_step"] == 2 * version
        assert len(ckpt.load_tensors("judge_refresh_pending")["tokens"]) == pending
    assert int(ckpt.load_tensors("judge_refresh_buffer")["filled"][0]) == cfg.judge_refresh.policy_buffer


def dying_trainer(marker: str):
    """A judge trainer whose process exits inside its first refresh (first incarnation only)."""
    class DyingTrainer(JudgeTrainerActor):
        def refresh(self):
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return super().refresh()
            os.close(fd)
            os._exit(1)
    return DyingTrainer


def same_tensors(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            assert float((a[k].double() - b[k].double()).abs().max()) <= tol, k
        else:
            assert torch.equal(a[k], b[k]), k


def test_killing_the_judge_trainer_loses_no_batch(baseline, tiny_corpus_file, tiny_generator, tiny_judge, tmp_path):
    """The trainer exits inside its refresh after step 2 (Ray restarts it: its last restart) and is
    SIGKILLed after step 3 (a brand-new actor replaces it when the next call finds it dead). Each time it
    goes on from the state of its last version plus the samples sent since, so the run trains every batch
    once and ends with the judge and the policy of the fault-free run."""
    cfg = train_config(tmp_path, tiny_corpus_file, tiny_generator, tiny_judge, "run")
    cls = type("TrainerDyingDriver", (Driver,), {"judge_trainer_cls": dying_trainer(str(tmp_path / "died"))})
    killed = []

    def on_step(driver, record):
        if record["step"] == 3:
            pid = ray.get(driver.judge_refresh.group.handles()[0].info.remote(), timeout=120)["pid"]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    summary, held = run_driver(cfg, cls, on_step)
    assert (tmp_path / "died").exists() and killed
    assert summary["judge_trainer_restarts"] == 2 and held["trainer_replacements"] == 1
    assert summary["worker_restarts"] == summary["judge_restarts"] == 0
    assert_every_batch_trained_once(cfg, summary, held)
    assert [r["judge_version"] for r in step_rows(cfg.run.out_dir)] == [0, 1, 1, 2]
    assert [j["judge_version"] for j in held["judges"]] == [2, 2]
    base = baseline[0].run.out_dir
    for name in ("model", "judge_refresh_model", "judge_refresh_buffer"):
        same_tensors(load_file(checkpoint(cfg.run.out_dir, STEPS) / f"{name}.safetensors"),
                     load_file(checkpoint(base, STEPS) / f"{name}.safetensors"))


def test_resume_equals_the_uninterrupted_run(baseline, tiny_corpus_file, tiny_generator, tiny_judge, tmp_path):
    """2 steps (a judge version published after step 2 and saved with the checkpoint), then --resume to 4:
    the judges get version 1 back before scoring, and every tensor of the step-4 checkpoint (policy,
    optimizer, reference, RNG, the trainer's judge, optimizer, buffer and RNG) equals the uninterrupted run's."""
    first = run_training(train_config(tmp_path, tiny_corpus_file, tiny_generator, tiny_judge, "split", steps=2))
    assert first["steps"] == 2 and first["judge_version"] == 1
    second = run_training(train_config(tmp_path, tiny_corpus_file, tiny_generator, tiny_judge, "split"), resume=True)
    assert second["steps"] == STEPS and second["judge_version"] == 2
    out, base = str(tmp_path / "split"), baseline[0].run.out_dir
    for name in ("model", "reference", "learner_rng", "optimizer",
                 *(f"judge_refresh_{s}" for s in (*STATE_SETS, "pending"))):
        same_tensors(load_file(checkpoint(out, STEPS) / f"{name}.safetensors"),
                     load_file(checkpoint(base, STEPS) / f"{name}.safetensors"))
    rows, ref = step_rows(out), step_rows(base)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r, f in zip(rows, ref):
        for key in ("reward_mean", "loss", "judge_version", "batch_judge_versions", "judge_age_steps"):
            assert r[key] == pytest.approx(f[key], rel=1e-5, abs=1e-7), (r["step"], key)
        if "judge_refresh/loss" in f:
            assert r["judge_refresh/loss"] == pytest.approx(f["judge_refresh/loss"], rel=1e-4)
    versions = [b.judge_version for b in sorted(read_rollout_log(Path(out) / "rollouts.msgpack"),
                                                key=lambda b: b.rollout.request_id)]
    assert versions == [0, 0, 0, 0, 1, 1, 1, 1]


def hanging_trainer():
    class HangingTrainer(JudgeTrainerActor):
        def refresh(self):
            time.sleep(3600)
    return HangingTrainer


def test_async_never_waits_for_a_slow_trainer(ray_cluster, tiny_corpus_file, tiny_generator, tiny_judge, tmp_path):
    """Async mode, a new version due every step, and a trainer whose refresh never returns: GRPO goes on
    with judge version 0; the versions due meanwhile are skipped and, with one step of samples waiting
    on the trainer, later steps' samples are dropped rather than queued (both counted)."""
    cfg = train_config(tmp_path, tiny_corpus_file, tiny_generator, tiny_judge, "async",
                       mode="async", actor_timeout_s=600, checkpoint_every=100)
    cfg.judge_refresh.publish_every, cfg.judge_refresh.max_pending_batches = 1, 1
    cls = type("SlowTrainerDriver", (Driver,), {"judge_trainer_cls": hanging_trainer()})
    summary, held = run_driver(cfg, cls, trainer_info=False)
    assert summary["steps"] == STEPS and summary["judge_version"] == 0
    assert summary["judge_refreshes_skipped"] == STEPS - 1  # the first one never came back
    assert summary["judge_samples_dropped"] >= (STEPS - 2) * 16  # steps 3 and 4 at least
    assert [j["judge_version"] for j in held["judges"]] == [0, 0]
    assert {b.judge_version for b in read_rollout_log(Path(cfg.run.out_dir) / "rollouts.msgpack")} == {0}
