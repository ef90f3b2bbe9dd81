"""Elastic rollout workers (issue 17): resources.rollout.min_workers / max_workers and `dgrpo scale`.

The runs here use the session's one-node cluster and move the target with `dgrpo scale RUN_DIR`
(tests/test_multinode.py grows and shrinks by nodes joining and leaving a real multi-node cluster).
Grow 1 -> 3 and shrink to 2 in both modes: every batch is accounted for, new workers hold the
current weights before their first request, and the step records show the live worker count.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from dgrpo.config import TrainConfig, to_yaml
from dgrpo.entrypoints.cli import main
from dgrpo.orchestration.metrics import read_jsonl
from dgrpo.orchestration.scale import read_targets
from dgrpo.protocols.rollout_log import read_rollout_log
from test_faults import check_every_batch_trained_once, fault_config, run_driver

ELASTIC = {"rollout": {"min_workers": 1, "max_workers": 3, "num_workers": 1}}
SIX = {"prompts_per_step": 6}  # a step splits evenly over 1, 2 and 3 workers


def scale(run_dir: Path, n: int) -> str:
    result = CliRunner().invoke(main, ["scale", str(run_dir), "--rollout-workers", str(n)])
    assert result.exit_code == 0, result.output
    return result.output


def wait_placed(driver, n: int, timeout_s: float = 180) -> None:
    """Lets the driver place the new workers (the run would go on without them meanwhile)."""
    deadline = time.monotonic() + timeout_s
    while sum(driver.workers.usable(s) for s in driver.workers.slots) < n:
        assert time.monotonic() < deadline, f"{n} rollout workers not placed within {timeout_s} s"
        driver.actors.results(methods=(), timeout=0.2)


def grow_then_shrink(driver, record) -> None:
    """After step 2: target 3, and wait until the two new workers are placed with the weights;
    after step 4: target 2."""
    out = Path(driver.cfg.run.out_dir)
    if record["step"] == 2:
        print(scale(out, 3).strip())
        driver.scale.poll(force=True)
        wait_placed(driver, 3)
    if record["step"] == 4:
        print(scale(out, 2).strip())
        driver.scale.poll(force=True)


def write_config(driver) -> None:
    """The resolved config in the run directory, as `dgrpo train` leaves it (dgrpo scale reads the bounds there)."""
    (Path(driver.cfg.run.out_dir) / "config.yaml").write_text(to_yaml(driver.cfg))


def worker_counts(cfg: TrainConfig) -> list[tuple[int, int, int]]:
    rows = [r for r in read_jsonl(Path(cfg.run.out_dir) / "metrics.jsonl") if "num_samples" in r]
    return [(r["step"], r["rollout_workers"], r["rollout_workers_target"]) for r in rows]


def test_sync_run_grows_to_three_workers_and_shrinks_to_two(ray_cluster, tiny_corpus_file, tmp_path):
    cfg = fault_config(tmp_path, tiny_corpus_file, run={"steps": 7, "membership_check_s": 0.5},
                       resources=ELASTIC, grpo=SIX)
    summary, state = run_driver(cfg, on_step=grow_then_shrink, prepare=write_config)
    counts = worker_counts(cfg)
    print(f"(step, rollout workers, target): {counts}")
    assert [c[1:] for c in counts[:2]] == [(1, 1), (1, 1)]
    assert counts[2][1:] == (3, 3) and counts[-1][1:] == (2, 2)
    check_every_batch_trained_once(cfg, summary, state)  # and each step's batches from the policy before it
    workers = {b.rollout.worker_id for b in read_rollout_log(Path(cfg.run.out_dir) / "rollouts.msgpack")}
    assert workers == {0, 1, 2}  # the new workers produced batches
    assert summary["worker_restarts"] == 0 and summary["reissued_requests"] == 0


def test_async_run_grows_to_three_workers_and_shrinks_to_two(ray_cluster, tiny_corpus_file, tmp_path):
    cfg = fault_config(tmp_path, tiny_corpus_file, run={"steps": 7, "mode": "async", "max_staleness": 1,
                                                        "membership_check_s": 0.5}, resources=ELASTIC, grpo=SIX)
    summary, state = run_driver(cfg, on_step=grow_then_shrink, prepare=write_config)
    counts = worker_counts(cfg)
    print(f"(step, rollout workers, target): {counts}")
    assert counts[2][1:] == (3, 3) and counts[-1][1:] == (2, 2)
    out = Path(cfg.run.out_dir)
    batches = list(read_rollout_log(out / "rollouts.msgpack"))
    ids = [b.rollout.request_id for b in batches]
    assert len(ids) == len(set(ids))
    assert sorted(ids + state["in_flight"]) == list(range(state["requests"]))  # none lost
    assert len(ids) == summary["batches_trained"] + summary["dropped_stale_batches"] + len(state["ready"])
    assert summary["duplicate_batches"] == 0
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "num_samples" in r]
    assert all(r["step"] - 1 - min(r["batch_versions"]) <= cfg.run.max_staleness for r in rows)
    assert {b.rollout.worker_id for b in batches} == {0, 1, 2}


def test_elastic_config_is_validated():
    r = TrainConfig.model_validate({"resources": {"rollout": {"min_workers": 2, "max_workers": 5}}}).resources.rollout
    assert r.bounds == (2, 5) and r.num_workers == 5  # the target starts at max_workers
    fixed = TrainConfig().resources.rollout
    assert fixed.bounds == (2, 2)
    again = TrainConfig.model_validate(TrainConfig.model_validate(
        {"resources": {"rollout": {"min_workers": 1, "max_workers": 3}}}).model_dump())
    assert again.resources.rollout.bounds == (1, 3)  # configs round-trip through their stored dicts
    for bad, message in [({"min_workers": 2}, "give min_workers and max_workers together"),
                         ({"min_workers": 3, "max_workers": 2}, "must be at most max_workers"),
                         ({"num_workers": 4, "min_workers": 1, "max_workers": 3}, "must lie within")]:
        with pytest.raises(Exception, match=message):
            TrainConfig.model_validate({"resources": {"rollout": bad}})


def test_scale_command_checks_the_run_and_its_bounds(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    cfg = TrainConfig.model_validate({"run": {"out_dir": str(run)}, "resources": {
        "rollout": {"min_workers": 1, "max_workers": 4}}})
    (run / "config.yaml").write_text(to_yaml(cfg))
    runner = CliRunner()
    ok = runner.invoke(main, ["scale", str(run), "--rollout-workers", "3"])
    assert ok.exit_code == 0 and "target 3 (the run allows 1..4)" in ok.output
    assert read_targets(run) == {"rollout": 3}
    for args, message in [(["--rollout-workers", "9"], r"--rollout-workers 9 is outside the run's rollout workers "
                                                       r"\(1..4"),
                          (["--judge-workers", "2"], r"--judge-workers 2 is outside .* \(a fixed 1")]:
        bad = runner.invoke(main, ["scale", str(run), *args])
        assert bad.exit_code == 2 and "Traceback" not in bad.output, bad.output
        assert re.search(message, bad.output), bad.output
    assert read_targets(run) == {"rollout": 3}  # nothing written by a refused command
    state = runner.invoke(main, ["scale", str(run)])  # alone: the run's state
    assert state.exit_code == 0 and "rollout workers: ? placed (as last logged), target 3, allowed 1..4" in state.output
    missing = runner.invoke(main, ["scale", str(tmp_path / "nowhere"), "--rollout-workers", "2"])
    assert missing.exit_code == 2 and "is not a dgrpo train run directory" in missing.output
    (run / "config.yaml").write_text("resources: {rollout: {min_workers: 5, max_workers: 2}}\n")
    broken = runner.invoke(main, ["scale", str(run), "--rollout-workers", "2"])
    assert broken.exit_code == 2 and "Traceback" not in broken.output, broken.output
    assert f"invalid configuration in {run / 'config.yaml'}" in broken.output, broken.output
    assert read_targets(run) == {"rollout": 3}
