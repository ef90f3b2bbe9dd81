"""Live progress of `dgrpo train` and `dgrpo tune`: one plain line per step, flushed.

A progress bar redraws one line with carriage returns; in `ray job logs`, a file or
a CI log that shows as one growing line or a heap of partial ones. A flushed line per
step reads the same in a terminal and in a log. When steps come faster than one per
`interval_s`, only a line every `interval_s` is printed (evaluations and the last step
always are), so fast runs do not flood the log.

    step 12/50  reward 0.412  kl 0.0213 (3.21/seq, coef 0.04)  5.70 steps/min  staleness 0.00  ETA 6m40s
    step 20/50  reward 0.455  kl 0.0251 (3.84/seq, coef 0.041)  5.70 steps/min  staleness 0.00  \
        eval 0.531 ± 0.018 (KL 2.90/seq, best step 10)  ETA 5m16s
"""

from __future__ import annotations

import sys
import time

from ..training.loop import UNBOUNDED_ITERS


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def eta_seconds(step: int, total_steps: int, steps_per_min: float | None, elapsed_s: float,
                max_minutes: float | None) -> tuple[float | None, str]:
    """(seconds left, what ends the run): the steps at the current pace or the time budget, whichever is first."""
    by_steps = 60.0 * (total_steps - step) / steps_per_min if steps_per_min else None
    by_time = max(0.0, 60.0 * max_minutes - elapsed_s) if max_minutes is not None else None
    if by_time is not None and (by_steps is None or by_time < by_steps):
        return by_time, "time limit"
    return by_steps, "steps"


def _number(record: dict, key: str, fmt: str) -> str:
    value = record.get(key)
    return format(value, fmt) if isinstance(value, (int, float)) else "-"


def step_line(record: dict, total_steps: int, elapsed_s: float, max_minutes: float | None = None,
              prefix: str = "") -> str:
    """One step's line from its metrics record (keys of metrics.jsonl; Tune's `/` as `_` work too)."""
    step = int(record["step"])
    spm = record.get("steps_per_min")
    kl = f"kl {_number(record, 'kl', '.4f')}"
    if "kl_seq" in record:
        kl += f" ({record['kl_seq']:.2f}/seq, coef {_number(record, 'kl_coef', '.3g')})"
    of_total = f"/{total_steps}" if total_steps < UNBOUNDED_ITERS else ""  # else only the time limit ends the run
    parts = [f"{prefix}step {step}{of_total}", f"reward {_number(record, 'reward_mean', '.3f')}", kl,
             f"{_number(record, 'steps_per_min', '.2f')} steps/min",
             f"staleness {_number(record, 'staleness_mean', '.2f')}"]
    if "eval_reward_mean" in record:
        stderr = record.get("eval_reward_stderr")
        text = f"eval {record['eval_reward_mean']:.3f}" + (f" ± {stderr:.3f}" if stderr is not None else "")
        notes = ([f"KL {record['eval_kl_seq']:.2f}/seq"] if "eval_kl_seq" in record else []) + \
                ([f"best step {record['best_step']}"] if "best_step" in record else [])
        parts.append(text + (f" ({', '.join(notes)})" if notes else ""))
    left, limit = eta_seconds(step, total_steps, spm, elapsed_s, max_minutes)
    if step >= total_steps:
        parts.append(f"done in {format_duration(elapsed_s)}")
    elif left is not None:
        parts.append(f"ETA {format_duration(left)}" + (" (time limit)" if limit == "time limit" else ""))
    return "  ".join(parts)


class ProgressPrinter:
    """Prints step lines for one run; `enabled=False` (--quiet) prints nothing."""

    def __init__(self, total_steps: int, max_minutes: float | None = None, enabled: bool = True,
                 interval_s: float = 2.0, out=None, clock=time.monotonic):
        self.total_steps, self.max_minutes = total_steps, max_minutes
        self.enabled, self.interval_s = enabled, interval_s
        self.out, self.clock = out, clock
        self.last_printed = None

    def _print(self, line: str) -> None:
        print(line, file=self.out or sys.stdout, flush=True)

    def start(self, step: int, first_eval: dict | None = None) -> None:
        if not self.enabled:
            return
        budget = f", at most {self.max_minutes:g} min" if self.max_minutes is not None else ""
        end = f"to {self.total_steps}" if self.total_steps < UNBOUNDED_ITERS else "until the time limit"
        head = f"training from step {step} {end}{budget}"
        if first_eval is not None:
            head += (f"; held-out reward at step {first_eval['step']}: {first_eval['eval_reward_mean']:.3f} "
                     f"± {first_eval['eval_reward_stderr']:.3f}")
        self._print(head)

    def best(self, best: dict | None) -> None:
        """The closing line: which checkpoint the held-out selection measure chose."""
        if self.enabled and best is not None:
            self._print(f"best checkpoint: {best['checkpoint']} (step {best['step']}, {best['selection']} "
                        f"{best['value']:.3f}, held-out KL {best['eval_kl_seq']:.2f} nats/seq)")

    def step(self, record: dict, elapsed_s: float, last: bool = False) -> None:
        """The line of a finished step, unless the previous line was printed under interval_s ago (the
        first, an evaluated and the last step always print)."""
        if not self.enabled:
            return
        due = self.last_printed is None or self.clock() - self.last_printed >= self.interval_s
        if due or last or "eval_reward_mean" in record:
            self._print(step_line(record, self.total_steps, elapsed_s, self.max_minutes))
            self.last_printed = self.clock()
