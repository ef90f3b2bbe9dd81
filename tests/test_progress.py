"""Live progress of `dgrpo train`: one flushed line per step (throttled when steps are fast), --quiet."""

from __future__ import annotations

import io

import pytest

from dgrpo.orchestration.progress import ProgressPrinter, eta_seconds, format_duration, step_line

RECORD = {"step": 12, "reward_mean": 0.41234, "kl": 0.021349, "steps_per_min": 5.7, "staleness_mean": 0.0}


def test_the_line_holds_step_reward_kl_pace_staleness_and_eta():
    line = step_line(RECORD, total_steps=50, elapsed_s=130.0)
    assert line == "step 12/50  reward 0.412  kl 0.0213  5.70 steps/min  staleness 0.00  ETA 6m40s"
    evaluated = step_line({**RECORD, "eval_reward_mean": 0.5311, "eval_reward_stderr": 0.0184}, 50, 130.0)
    assert "  eval 0.531 ± 0.018  ETA 6m40s" in evaluated
    assert step_line({**RECORD, "step": 50}, 50, 125.0).endswith("done in 2m05s")
    # a step whose groups all had equal rewards trains nothing: no KL to show
    assert "kl -" in step_line({k: v for k, v in RECORD.items() if k != "kl"}, 50, 130.0)


def test_the_line_shows_the_kl_budget_and_the_best_checkpoint():
    record = {**RECORD, "kl_seq": 3.2149, "kl_coef": 0.0412}
    assert "  kl 0.0213 (3.21/seq, coef 0.0412)  5.70 steps/min" in step_line(record, 50, 130.0)
    evaluated = {**record, "eval_reward_mean": 0.5311, "eval_reward_stderr": 0.0184, "eval_kl_seq": 2.904,
                 "best_step": 10}
    assert "  eval 0.531 ± 0.018 (KL 2.90/seq, best step 10)  ETA" in step_line(evaluated, 50, 130.0)
    out = io.StringIO()
    ProgressPrinter(50, out=out).best({"checkpoint": "runs/x/checkpoints/step_000010", "step": 10,
                                       "selection": "eval_reward", "value": 0.5311, "eval_kl_seq": 2.904})
    assert out.getvalue() == ("best checkpoint: runs/x/checkpoints/step_000010 (step 10, eval_reward 0.531, "
                              "held-out KL 2.90 nats/seq)\n")
    out = io.StringIO()
    ProgressPrinter(50, out=out).best(None)
    ProgressPrinter(50, out=out, enabled=False).best({"checkpoint": "c"})
    assert out.getvalue() == ""


def test_eta_is_whichever_of_steps_and_time_budget_ends_first():
    assert eta_seconds(12, 50, 5.7, 130.0, None) == (pytest.approx(400.0), "steps")
    assert eta_seconds(12, 50, 5.7, 130.0, max_minutes=4.0) == (pytest.approx(110.0), "time limit")
    assert eta_seconds(12, 50, 5.7, 130.0, max_minutes=60.0)[1] == "steps"
    assert "ETA 1m50s (time limit)" in step_line(RECORD, 50, 130.0, max_minutes=4.0)
    assert [format_duration(s) for s in (0, 59.6, 61, 3725)] == ["0s", "1m00s", "1m01s", "1h02m"]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_fast_steps_print_a_line_per_interval_and_always_evaluations_and_the_last():
    out, clock = io.StringIO(), Clock()
    progress = ProgressPrinter(total_steps=10, interval_s=2.0, out=out, clock=clock)
    progress.start(0, {"step": 0, "eval_reward_mean": 0.25, "eval_reward_stderr": 0.01})
    for step in range(1, 11):
        clock.now += 0.5  # two steps a second, a line at most every 2 s
        record = {**RECORD, "step": step}
        if step == 3:
            record["eval_reward_mean"] = 0.3
        progress.step(record, elapsed_s=clock.now, last=step == 10)
    lines = out.getvalue().splitlines()
    assert lines[0] == "training from step 0 to 10; held-out reward at step 0: 0.250 ± 0.010"
    # the first step, the evaluated one, 2 s after it, and the last
    assert [line.split()[1] for line in lines[1:]] == ["1/10", "3/10", "7/10", "10/10"]


def test_quiet_prints_nothing(capsys):
    progress = ProgressPrinter(total_steps=3, enabled=False)
    progress.start(0)
    progress.step(RECORD, elapsed_s=1.0, last=True)
    assert capsys.readouterr().out == ""
