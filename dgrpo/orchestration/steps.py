"""One step's record (what metrics.jsonl, the progress line, Tune and the dashboard read) and the checks that
stop a run that can no longer learn.

StepClock times the run: each step's wall and driver-CPU seconds, the rollout workers' generate seconds
within it, steps per minute since the loop started. step_record joins the learner's metrics with those
times, the batches' receipts, the actor groups' sizes and the run's counters. LearningGuard raises
TrainingHalted on a non-finite update or after run.max_zero_signal_steps steps without a signal.
"""

from __future__ import annotations

import time

from ..config import TrainConfig
from ..errors import TrainingHalted


class StepClock:
    def __init__(self, step: int):
        self.t0 = self.started = self.loop_t0 = time.perf_counter()
        self.cpu_started = time.process_time()
        self.start_step = step
        self.generate_s = 0.0  # rollout workers' generate seconds since the last step ended

    def loop_started(self) -> None:
        self.started = self.loop_t0 = time.perf_counter()

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.t0

    def lap(self, step: int, learn_s: float, workers_placed: int) -> dict:
        """The step that just ended: its times and the roles' idle shares; the clock starts the next one."""
        now, cpu = time.perf_counter(), time.process_time()
        wall, driver_cpu = now - self.started, cpu - self.cpu_started
        self.started, self.cpu_started = now, cpu
        generate_s, self.generate_s = self.generate_s, 0.0
        return {"wall_time": now - self.t0, "time/step_s": wall, "time/learn_s": learn_s,
                "time/driver_cpu_s": driver_cpu, "driver_cpu_ratio": driver_cpu / wall,
                "learner_idle_ratio": max(0.0, 1 - learn_s / wall),
                "rollout_idle_ratio": max(0.0, 1 - generate_s / (max(workers_placed, 1) * wall)),
                "steps_per_min": 60.0 * (step - self.start_step) / (now - self.loop_t0)}


def step_record(step: int, version: int, metrics: dict, sync: dict, times: dict, receipts: list, workers,
                judges, counters: dict) -> dict:
    return {"step": step, "policy_version": version, "wall_time": times["wall_time"], **metrics, **sync, **times,
            "time/generate_s": sum(r.generate_s for r in receipts),
            "time/score_s": sum(r.score_s for r in receipts),
            "rollout_workers": workers.placed(), "rollout_workers_target": workers.target,
            "judge_workers": judges.placed(),
            "batch_versions": sorted({r.policy_version for r in receipts}), **counters}


class LearningGuard:
    def __init__(self, cfg: TrainConfig):
        self.lr, self.limit = cfg.grpo.lr, cfg.run.max_zero_signal_steps
        self.zero_signal_steps = 0  # consecutive steps in which every group's rewards were equal

    def check(self, step: int, metrics: dict) -> None:
        if metrics.get("nonfinite_updates"):
            raise TrainingHalted(
                f"step {step}: the loss or gradient was not finite in {metrics['nonfinite_updates']:.0f} of "
                f"{metrics['nonfinite_updates'] + metrics['optimizer_steps']:.0f} updates (skipped, the weights are "
                f"those before them): the policy diverged; lower grpo.lr (now {self.lr:g}) or raise "
                f"grpo.kl_coef, then resume from the last checkpoint (--resume) or start afresh")
        self.zero_signal_steps = self.zero_signal_steps + 1 if metrics["zero_std_ratio"] >= 1.0 else 0
        limit = self.limit
        if limit and self.zero_signal_steps >= limit:
            raise TrainingHalted(
                f"steps {step - limit + 1}-{step}: every group's rewards were equal (mean reward "
                f"{metrics['reward_mean']:.4g}) in {limit} steps in a row (run.max_zero_signal_steps), so nothing is "
                f"left to learn: the policy collapsed (it samples the same text; lower grpo.lr, now "
                f"{self.lr:g}, or raise grpo.kl_coef) or the reward saturated")
