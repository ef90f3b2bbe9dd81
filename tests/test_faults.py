"""Actor faults: rollout workers and the judge die or hang mid-run (issue 6).

Each run is the sync mode, fixed seed, tiny preset, 2 rollout workers, 4 steps.
A lost request is re-issued with the same seed to a worker at the same policy
version, so a run with faults must train exactly the batches of a fault-free
run: every step trains prompts_per_step * group_size samples, every request id
is consumed exactly once (rollouts.msgpack), and the final weights equal the
fault-free run's.

Failing actors are subclasses defined inside factory functions so that Ray
ships them by value; state that must survive a restart (die only once) lives
in a marker file.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file

from dgrpo.actors.judge_worker import JudgeWorker
from dgrpo.actors.learner import LearnerActor
from dgrpo.actors.rollout import RolloutWorker
from dgrpo.config import TrainConfig
from dgrpo.errors import RunError
from dgrpo.orchestration.driver import Driver
from dgrpo.orchestration.metrics import read_jsonl
from dgrpo.protocols.rollout_log import read_rollout_log
from conftest import tiny_run_config

# Ray workers cannot import this test module: ship its functions and classes by value
ray.cloudpickle.register_pickle_by_value(__import__(__name__))

STEPS = 4


def fault_config(tmp_path: Path, corpus: str, name: str = "run", **over) -> TrainConfig:
    run = {"steps": STEPS, "eval_every": 100, "keep_checkpoints": 1, "log_rollouts": True, "actor_timeout_s": 60,
           "max_worker_failures": 5, "seed": 3, **over.pop("run", {})}
    # temperature 1: the elastic runs train a tiny policy at a high rate for hundreds of steps, and at the
    # default 0.5 its groups can collapse to one text (run.max_zero_signal_steps then stops the run)
    sampler = {"steps": 4, "temperature": 1.0, **over.pop("sampler", {})}
    grpo = {"group_size": 4, "prompts_per_step": 4, "minibatch_size": 16, "lr": 3e-3, **over.pop("grpo", {})}
    prompts = {"length": 16, **over.pop("prompts", {})}
    return tiny_run_config(tmp_path / name, corpus, run=run, sampler=sampler, grpo=grpo, prompts=prompts, **over)


def driver_class(rollout=None, judge=None, learner=None) -> type[Driver]:
    attrs = {}
    if rollout is not None:
        attrs["rollout_cls"] = rollout
    if judge is not None:
        attrs["judge_cls"] = judge
    if learner is not None:
        attrs["learner_cls"] = learner
    return type("FaultyDriver", (Driver,), attrs)


def run_driver(cfg: TrainConfig, cls: type[Driver] = Driver, on_step=None, prepare=None, warm: bool = False):
    """Run to the end with `cls`; on_step(driver, record) runs after each step. -> (summary, driver state)."""
    holder = {}
    report = (lambda record: on_step(holder["driver"], record)) if on_step else None
    driver = cls(cfg, report=report)
    holder["driver"] = driver
    try:
        if warm:  # wait for every actor to start, so that a short actor_timeout_s only measures the calls
            handles = [h for group in driver.actors.groups for h in group.handles()]
            ray.get([h.info.remote() for h in handles], timeout=120)
        if prepare is not None:
            prepare(driver)
        summary = driver.run()
        state = {"requests": driver.request_counter,
                 "in_flight": sorted(driver.requests_in_flight()),
                 "ready": sorted(b.request_id for b in driver.ready),
                 "replacements": [s.replacements for s in driver.workers.slots],
                 "judge_replacements": [s.replacements for s in driver.judges.slots]}
    finally:
        driver.close()
    return summary, state


def wait_back(driver: Driver, slot, timeout_s: float = 120) -> None:
    """Waits until a recovered slot is placed again and holds the published weights."""
    deadline = time.monotonic() + timeout_s
    while not driver.workers.usable(slot):
        assert time.monotonic() < deadline, f"slot {slot.index} did not come back in {timeout_s} s"
        driver.actors.results(methods=(), timeout=0.2)


def final_weights(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    return load_file(Path(cfg.run.out_dir) / "checkpoints" / f"step_{cfg.run.steps:06d}" / "model.safetensors")


def check_every_batch_trained_once(cfg: TrainConfig, summary: dict, state: dict) -> None:
    """Sync mode: each step trains a full step of fresh samples; each issued request is trained exactly once."""
    out = Path(cfg.run.out_dir)
    assert summary["steps"] == cfg.run.steps
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "num_samples" in r]
    assert [r["step"] for r in rows] == list(range(1, cfg.run.steps + 1))
    per_step = cfg.grpo.prompts_per_step * cfg.grpo.group_size
    assert [r["num_samples"] for r in rows] == [per_step] * cfg.run.steps
    # restarted workers got the current weights: each step's samples come from the policy the step before it left
    # (a step whose groups all tied skips its update and leaves the version as it was)
    versions_before = [0] + [r["policy_version"] for r in rows[:-1]]
    assert [r["batch_versions"] for r in rows] == [[v] for v in versions_before]
    ids = [b.rollout.request_id for b in read_rollout_log(out / "rollouts.msgpack")]
    assert sorted(ids) == list(range(state["requests"])), ids  # none twice, none lost
    assert summary["batches_trained"] == len(ids)
    assert summary["duplicate_batches"] == 0 and summary["dropped_stale_batches"] == 0
    assert state["in_flight"] == [] and state["ready"] == []


def assert_same_weights(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= tol, worst


def marker_once(path: str) -> bool:
    """True the first time it is called for `path` (across processes and actor restarts)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


# -- failing actors ---------------------------------------------------------------


def faulty_rollout(marker_dir: str, exit_on: int | None = None, slow: tuple = (), slow_s: float = 0.0,
                   hang_on: int | None = None):
    """A rollout worker whose process exits in the middle of request `exit_on` (once), that takes
    `slow_s` longer on the requests in `slow`, and that hangs forever on request `hang_on` (once)."""
    class FaultyRollout(RolloutWorker):
        def generate(self, request, reference=None):
            rid = request.request_id
            if rid == exit_on and marker_once(os.path.join(marker_dir, "exited")):
                os._exit(1)
            if rid == hang_on and marker_once(os.path.join(marker_dir, "hung")):
                time.sleep(3600)
            if rid in slow:
                time.sleep(slow_s)
            return super().generate(request, reference)
    return FaultyRollout


def always_dying_rollout():
    class AlwaysDyingRollout(RolloutWorker):
        def generate(self, request, reference=None):
            os._exit(1)
    return AlwaysDyingRollout


def dying_judge(marker: str, call: int):
    """A judge whose process exits on its `call`-th score call (first incarnation only)."""
    class DyingJudge(JudgeWorker):
        calls = 0

        def score(self, batch):
            DyingJudge.calls += 1
            if DyingJudge.calls == call and marker_once(marker):
                os._exit(1)
            return super().score(batch)
    return DyingJudge


def hanging_learner():
    class HangingLearner(LearnerActor):
        def train(self, *batches):
            if self.core.step >= 1:
                time.sleep(3600)
            return super().train(*batches)
    return HangingLearner


def learner_dying_before_placed(marker: str, every_time: bool = False):
    """A learner whose process exits when first asked where it runs (the probe every new actor gets): the first
    incarnation only, or every one."""
    class LearnerDyingBeforePlaced(LearnerActor):
        def info(self):
            if marker_once(marker) or every_time:
                os._exit(1)
            return super().info()
    return LearnerDyingBeforePlaced


# -- tests -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def baseline(ray_cluster, tiny_corpus_file, tmp_path_factory):
    """A fault-free run: its final weights are what every faulty run must reproduce."""
    cfg = fault_config(tmp_path_factory.mktemp("baseline"), tiny_corpus_file)
    summary, state = run_driver(cfg)
    check_every_batch_trained_once(cfg, summary, state)
    assert summary["worker_restarts"] == summary["judge_restarts"] == summary["reissued_requests"] == 0
    return final_weights(cfg)


def test_rollout_workers_die_three_ways(baseline, tiny_corpus_file, tmp_path):
    """Sync mode, 2 workers with one Ray restart each; requests 2k and 2k+1 are step k+1's, slot 0 gets 2k.

    step 2: worker 0's process exits inside request 2             -> Ray restarts it (its last restart)
    step 3: worker 0 is SIGKILLed 0.5 s into its 1.5 s request 4 -> no restart left: a brand-new actor
    after step 3: ray.kill(worker 1, no_restart=False)            -> Ray restarts it; the next request reaches
              the dead actor (RayActorError) or the weightless new one (StaleWorkerError): both recover
    """
    cfg = fault_config(tmp_path, tiny_corpus_file, resources={"rollout": {"num_workers": 2, "max_restarts": 1}})
    cls = driver_class(rollout=faulty_rollout(str(tmp_path), exit_on=2, slow=(4, 5), slow_s=1.5))
    killed = []

    def on_step(driver, record):
        if record["step"] == 2:  # worker 0 is recovered while the run goes on: wait until it is back
            wait_back(driver, driver.workers.slots[0])
            pid = ray.get(driver.workers.slots[0].handle.info.remote(), timeout=60)["pid"]
            timer = threading.Timer(0.5, lambda: (os.kill(pid, signal.SIGKILL), killed.append(pid)))
            timer.daemon = True
            timer.start()
        if record["step"] == 3:
            ray.kill(driver.workers.slots[1].handle, no_restart=False)

    summary, state = run_driver(cfg, cls, on_step)
    assert (tmp_path / "exited").exists() and killed
    assert summary["worker_restarts"] == 3 and summary["judge_restarts"] == 0
    assert state["replacements"] == [1, 0]
    # the requests lost with the process exit and the SIGKILL, and the one sent to the ray.kill-ed worker
    # unless it finished before the kill landed (then the death shows at the next weight sync)
    assert summary["reissued_requests"] in (2, 3)
    check_every_batch_trained_once(cfg, summary, state)
    assert_same_weights(final_weights(cfg), baseline)


def test_judge_dies_and_rollout_hangs(baseline, tiny_corpus_file, tmp_path):
    """The judge's process exits inside a score call; a worker hangs on request 5 and is killed
    after run.actor_timeout_s, restarted by Ray, given the weights, and its request re-issued."""
    cfg = fault_config(tmp_path, tiny_corpus_file, run={"actor_timeout_s": 5})
    cls = driver_class(rollout=faulty_rollout(str(tmp_path), hang_on=5),
                       judge=dying_judge(str(tmp_path / "judge_died"), call=4))  # call 1 is the step-0 eval

    def prepare(driver):  # calls time out after 5 s; waiting for a restarted actor to answer may take longer here
        driver.workers.restart_timeout_s = driver.judges.restart_timeout_s = 120

    t0 = time.perf_counter()
    summary, state = run_driver(cfg, cls, prepare=prepare, warm=True)
    assert (tmp_path / "judge_died").exists() and (tmp_path / "hung").exists()
    assert summary["judge_restarts"] == 1 and summary["worker_restarts"] == 1
    # the hung rollout request, the score request lost in the judge, and the next one if it was
    # sent before the judge's death was seen
    assert summary["reissued_requests"] in (2, 3)
    assert state["replacements"] == [0, 0] and state["judge_replacements"] == [0]
    check_every_batch_trained_once(cfg, summary, state)
    assert_same_weights(final_weights(cfg), baseline)
    assert time.perf_counter() - t0 < 600  # the hung call sleeps an hour: recovered, not waited out


def test_learner_dying_before_it_is_placed_is_started_once_more(baseline, tiny_corpus_file, tmp_path):
    """Seen on loaded machines: Ray reports the learner's process dead of a system error before it answered
    its first call. It held nothing yet, so one new learner is started and the run is the fault-free one;
    a second death before placement stops the run, naming the learner and the resume command."""
    cfg = fault_config(tmp_path, tiny_corpus_file)
    summary, state = run_driver(cfg, driver_class(learner=learner_dying_before_placed(str(tmp_path / "died"))))
    assert (tmp_path / "died").exists()
    check_every_batch_trained_once(cfg, summary, state)
    assert_same_weights(final_weights(cfg), baseline)
    cfg = fault_config(tmp_path, tiny_corpus_file, name="run2")
    cls = driver_class(learner=learner_dying_before_placed(str(tmp_path / "died2"), every_time=True))
    with pytest.raises(RunError, match=r"the learner actor died during learner.info .*--resume"):
        run_driver(cfg, cls)


def test_worker_dying_past_the_limit_stops_the_run(ray_cluster, tiny_corpus_file, tmp_path):
    cfg = fault_config(tmp_path, tiny_corpus_file, run={"max_worker_failures": 1},
                       resources={"rollout": {"num_workers": 1}})
    cls = driver_class(rollout=always_dying_rollout())
    with pytest.raises(RunError, match=r"2 actor failures exceed run.max_worker_failures=1") as err:
        run_driver(cfg, cls)
    assert "--resume" in str(err.value)


def test_hung_learner_stops_the_run_with_a_timeout(ray_cluster, tiny_corpus_file, tmp_path):
    cfg = fault_config(tmp_path, tiny_corpus_file, run={"actor_timeout_s": 5}, resources={"rollout": {"num_workers": 1}})
    cls = driver_class(learner=hanging_learner())
    t0 = time.perf_counter()
    with pytest.raises(RunError, match=r"the learner did not finish a step within 5 s"):
        run_driver(cfg, cls, warm=True)
    assert time.perf_counter() - t0 < 600  # the learner sleeps an hour: stopped by the deadline, not waited out


def test_async_run_with_kills_accounts_for_every_batch(ray_cluster, tiny_corpus_file, tmp_path):
    cfg = fault_config(tmp_path, tiny_corpus_file, run={"mode": "async", "steps": 6, "max_staleness": 1})

    def on_step(driver, record):
        if record["step"] in (2, 4):
            slot = driver.workers.slots[record["step"] // 2 - 1]
            pid = ray.get(slot.handle.info.remote(), timeout=60)["pid"]
            os.kill(pid, signal.SIGKILL)

    summary, state = run_driver(cfg, Driver, on_step)
    assert summary["steps"] == 6
    assert 1 <= summary["worker_restarts"] <= 2  # a kill near the end may go unnoticed until a next call
    out = Path(cfg.run.out_dir)
    ids = [b.rollout.request_id for b in read_rollout_log(out / "rollouts.msgpack")]
    assert len(ids) == len(set(ids))
    # every issued request was consumed (trained, dropped as stale or waiting) or is still in flight
    assert sorted(ids + state["in_flight"]) == list(range(state["requests"]))
    assert len(ids) == summary["batches_trained"] + summary["dropped_stale_batches"] + len(state["ready"])
    assert summary["duplicate_batches"] == 0
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "num_samples" in r]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(r["num_samples"] >= cfg.grpo.prompts_per_step * cfg.grpo.group_size for r in rows)
    assert all(r["step"] - 1 - min(r["batch_versions"]) <= cfg.run.max_staleness for r in rows)
