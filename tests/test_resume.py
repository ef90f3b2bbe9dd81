"""Resume and checkpoints (issue 6).

A run resumed with --resume (run_training(cfg, resume=True)) continues from its
last usable checkpoint with the same step counter, policy version, optimizer
state, reference weights, RNG and prompt position, so in the synchronous mode
with a fixed seed 2 + 2 steps give the weights of 4 uninterrupted steps, and the
metrics log holds every step exactly once. Checkpoints are written atomically;
the last `keep_checkpoints` are kept.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from dgrpo.config import TrainConfig
from dgrpo.errors import RunError
from dgrpo.models.checkpoint import load_checkpoint
from dgrpo.entrypoints.cli import main
from dgrpo.orchestration.driver import run_training
from dgrpo.orchestration.metrics import read_jsonl
from dgrpo.orchestration.rundir import find_checkpoints
from dgrpo.protocols.rollout_log import read_rollout_log

STEPS = 4
TENSOR_FILES = ("model", "reference", "optimizer", "learner_rng")


def resume_config(tmp_path: Path, corpus: str, name: str, **run) -> TrainConfig:
    return TrainConfig.model_validate({
        "run": {"out_dir": str(tmp_path / name), "steps": STEPS, "eval_every": 100, "eval_prompts": 8,
                "checkpoint_every": 1, "keep_checkpoints": 2, "metrics_export": False, "log_rollouts": True,
                "actor_timeout_s": 120, "seed": 5, "selection": "none", **run},  # best checkpoints: test_levers.py
        "corpus": {"path": corpus},
        "generator": {"preset": "tiny"},
        "reward": {"kind": "char_frequency", "chars": "e"},
        "prompts": {"length": 16},
        "sampler": {"steps": 4},
        # the KL budget and a reference reset (step 3) have state of their own to resume
        "grpo": {"group_size": 4, "prompts_per_step": 4, "minibatch_size": 8, "lr": 3e-3, "kl_coef": 0.05,
                 "kl_target": 0.5, "kl_horizon": 1, "reference_reset_every": 3},
        "resources": {"rollout": {"num_workers": 2}},
    })


def checkpoint_contents(out: str, step: int) -> dict:
    """Everything a checkpoint holds: its tensor files, the optimizer's non-tensor state, the run state."""
    path = Path(out) / "checkpoints" / f"step_{step:06d}"
    got = {name: load_file(path / f"{name}.safetensors") for name in TENSOR_FILES}
    with safe_open(path / "optimizer.safetensors", framework="pt") as fh:
        got["optimizer_meta"] = fh.metadata()
    state = json.loads((path / "config.json").read_text())["state"]
    got["state"] = state
    return got


def assert_same_checkpoint(a: dict, b: dict, tol: float = 1e-5) -> None:
    for name in TENSOR_FILES:
        assert a[name].keys() == b[name].keys(), name
        for k in a[name]:
            x, y = a[name][k], b[name][k]
            assert x.dtype == y.dtype and x.shape == y.shape, (name, k)
            if x.is_floating_point():
                assert float((x.double() - y.double()).abs().max()) <= tol, (name, k)
            else:
                assert torch.equal(x, y), (name, k)  # RNG states, step counts
    assert a["optimizer_meta"] == b["optimizer_meta"]
    sa, sb = dict(a["state"]), dict(b["state"])
    da, db = sa.pop("driver"), sb.pop("driver")
    assert sa == sb  # step, version
    for key in ("step", "request_counter", "prompts"):
        assert da[key] == db[key], key
    for key in ("batches_trained", "duplicate_batches", "dropped_stale_batches"):
        assert da["counters"][key] == db["counters"][key], key


def step_rows(out: str) -> list[dict]:
    return [r for r in read_jsonl(Path(out) / "metrics.jsonl") if "num_samples" in r]


def assert_metrics_match(resumed: str, full: str, evals: list[int]) -> None:
    rows, ref = step_rows(resumed), step_rows(full)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # none duplicated, none missing
    for r, f in zip(rows, ref):
        for key in ("reward_mean", "loss", "kl", "policy_version", "num_samples", "batches_trained", "kl_seq", "kl_coef",
                    "reference_resets"):
            assert r[key] == pytest.approx(f[key], rel=1e-5, abs=1e-7), (r["step"], key)
    assert [r["step"] for r in read_jsonl(Path(resumed) / "metrics.jsonl") if "eval_reward_mean" in r] == evals


def assert_each_request_logged_once(out: str) -> None:
    ids = [b.rollout.request_id for b in read_rollout_log(Path(out) / "rollouts.msgpack")]
    assert sorted(ids) == list(range(2 * STEPS)), ids  # 2 requests a step, each once


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, tiny_corpus_file, tmp_path_factory):
    cfg = resume_config(tmp_path_factory.mktemp("full"), tiny_corpus_file, "run")
    summary = run_training(cfg)
    assert summary["steps"] == STEPS
    return cfg.run.out_dir


def test_keeps_the_last_checkpoints(uninterrupted):
    ckpts = [p.name for p in (Path(uninterrupted) / "checkpoints").iterdir()]
    assert sorted(ckpts) == ["step_000003", "step_000004"]  # keep_checkpoints=2, nothing half-written left
    state = checkpoint_contents(uninterrupted, STEPS)["state"]
    assert state["step"] == STEPS and state["version"] == STEPS and state["driver"]["request_counter"] == 2 * STEPS


def test_two_plus_two_steps_equal_four(uninterrupted, tiny_corpus_file, tmp_path):
    first = run_training(resume_config(tmp_path, tiny_corpus_file, "split", steps=2))
    assert first["steps"] == 2
    second = run_training(resume_config(tmp_path, tiny_corpus_file, "split"), resume=True)
    assert second["steps"] == STEPS and second["policy_version"] == STEPS
    out = str(tmp_path / "split")
    assert_same_checkpoint(checkpoint_contents(out, STEPS), checkpoint_contents(uninterrupted, STEPS))
    assert_metrics_match(out, uninterrupted, evals=[0, 2, STEPS])  # the 2-step run ended with an evaluation
    assert_each_request_logged_once(out)
    assert sorted(p.name for p in (Path(out) / "checkpoints").iterdir()) == ["step_000003", "step_000004"]


class Crash(Exception):
    pass


def test_crash_between_steps_then_resume(uninterrupted, tiny_corpus_file, tmp_path, capsys):
    """Killed after step 3 was logged but before its checkpoint; the step-2 checkpoint is then
    found corrupt, so the run resumes from step 1 and redoes steps 2 and 3 without duplicating them."""
    cfg = resume_config(tmp_path, tiny_corpus_file, "crashed", keep_checkpoints=3)

    def crash_after_step_3(record):
        if record["step"] == 3:
            raise Crash("killed between steps")

    with pytest.raises(Crash):
        run_training(cfg, report=crash_after_step_3)
    out = Path(cfg.run.out_dir)
    assert [r["step"] for r in step_rows(out)] == [1, 2, 3]
    assert [p.name for p in find_checkpoints(out)] == ["step_000001", "step_000002"]
    model = out / "checkpoints" / "step_000002" / "model.safetensors"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])  # torn by a disk fault

    summary = run_training(cfg, resume=True)
    assert "skipping unusable checkpoint" in capsys.readouterr().out
    assert summary["steps"] == STEPS
    assert_same_checkpoint(checkpoint_contents(out, STEPS), checkpoint_contents(uninterrupted, STEPS))
    assert_metrics_match(str(out), uninterrupted, evals=[0, STEPS])
    assert_each_request_logged_once(str(out))


def live_dgrpo_actors() -> list[str]:
    import ray
    from ray.core.generated import gcs_pb2
    accessor = ray._private.state.state._connect_and_get_accessor()
    return [a.class_name for a in map(gcs_pb2.ActorTableData.FromString, accessor.get_actor_table(None, None))
            if a.class_name in ("LearnerActor", "RolloutWorker", "JudgeWorker")
            and a.state != gcs_pb2.ActorTableData.DEAD]


def test_resume_without_a_checkpoint_is_a_clear_error(ray_cluster, tiny_corpus_file, tmp_path):
    assert not live_dgrpo_actors()
    with pytest.raises(RunError, match=r"--resume: no checkpoint under .*; start without --resume"):
        run_training(resume_config(tmp_path, tiny_corpus_file, "empty"), resume=True)
    result = CliRunner().invoke(main, ["train", "--resume", "--set", f"run.out_dir={tmp_path / 'empty'}",
                                       "--set", f"corpus.path={tiny_corpus_file}", "--set", "run.metrics_export=false"])
    assert result.exit_code == 2 and "error: --resume: no checkpoint under" in result.output, result.output
    assert not live_dgrpo_actors()  # checked before any actor started


def test_resume_with_only_torn_checkpoints_stops_its_actors(uninterrupted, tiny_corpus_file, tmp_path, capsys):
    """The actors are up when the last checkpoint turns out unusable; the error must not leave them running."""
    cfg = resume_config(tmp_path, tiny_corpus_file, "torn")
    torn = Path(cfg.run.out_dir) / "checkpoints" / f"step_{STEPS:06d}"
    shutil.copytree(Path(uninterrupted) / "checkpoints" / f"step_{STEPS:06d}", torn)
    model = torn / "model.safetensors"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    with pytest.raises(RunError, match=r"--resume: no usable checkpoint under .*; start without --resume"):
        run_training(cfg, resume=True)
    assert "skipping unusable checkpoint" in capsys.readouterr().out
    deadline = time.monotonic() + 30
    while live_dgrpo_actors() and time.monotonic() < deadline:  # ray.kill is asynchronous
        time.sleep(0.2)
    assert not live_dgrpo_actors()


WRITER = textwrap.dedent("""
    import os, signal, sys, time, torch
    from dgrpo.models.checkpoint import save_checkpoint
    from dgrpo.models.transformer import preset_config
    out, delays = sys.argv[1], [float(d) for d in sys.argv[2:]]
    cfg = preset_config("tiny", 10)
    step = 1
    for delay in delays:  # one torch import, several writers killed mid-write
        pid = os.fork()
        if pid == 0:
            while True:
                fill = torch.full((256, 1024), float(step))  # 1 MiB per tensor: a write takes a while
                save_checkpoint(f"{out}/step_{step:06d}", kind="generator", model_config=cfg,
                                vocab={"chars": list("abcdefghij")}, weights={"w": fill}, state={"step": step},
                                extra_tensors={"reference": {"w": fill.clone()}, "learner_rng": {"g": fill[:1].clone()}})
                step += 1
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        step = 1 + max([int(n.split("_")[1]) for n in os.listdir(out) if n.startswith("step_")] or [0])
    print("killed", len(delays), flush=True)
""")


def test_checkpoints_survive_sigkill_mid_write(tmp_path):
    """Writers are SIGKILLed at arbitrary moments: every checkpoint directory that looks like one
    loads completely and holds the values of its step; a half-written one never appears under its name."""
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    proc = subprocess.run([sys.executable, "-c", WRITER, str(ckpts), "0.43", "0.61", "0.37"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and "killed 3" in proc.stdout, proc.stderr[-3000:]
    found = find_checkpoints(tmp_path)
    assert len(found) >= 3
    for path in found:
        ckpt = load_checkpoint(path, expect_kind="generator")
        step = ckpt.state["step"]
        assert path.name == f"step_{step:06d}"
        for name in ("model", "reference", "learner_rng"):
            for t in ckpt.load_tensors(name).values():
                assert bool((t == float(step)).all())
    # whatever the kills left behind is hidden (.step_*.tmp-*) and never taken for a checkpoint
    leftovers = [p.name for p in ckpts.iterdir() if not p.name.startswith("step_")]
    assert all(name.startswith(".step_") and ".tmp-" in name for name in leftovers), leftovers
    assert leftovers  # at least one kill landed mid-write (each write is most of the writer's loop)
