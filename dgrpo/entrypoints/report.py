"""`dgrpo report RUN_DIR [--out DIR]`: PNG plots and a Markdown summary from a run's metrics log."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import RunError
from ..orchestration.metrics import read_jsonl

PHASE_KEYS = [("time/generate_s", "generation (worker-s)"), ("time/score_s", "scoring"),
              ("time/learn_s", "learning"), ("time/sync_s", "weight sync")]


def _series(rows: list[dict], key: str, x: str = "step"):
    pts = [(r[x], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and x in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def make_report(run_dir: str | Path, out: str | Path | None = None) -> dict:
    """Plots, report.md and summary.json of a run, written into `out` (default RUN/report)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run_dir)
    rows = read_jsonl(run / "metrics.jsonl")
    train_rows = [r for r in rows if "reward_mean" in r]
    if not train_rows:
        raise RunError(f"{run / 'metrics.jsonl'} has no training steps; is {run} a `dgrpo train` run directory?")
    out = Path(out) if out is not None else run / "report"
    out.mkdir(parents=True, exist_ok=True)
    plots = {}

    def save(fig, name):
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        plots[name] = str(path)

    fig, ax = plt.subplots(figsize=(7, 4))
    x, mean = _series(train_rows, "reward_mean")
    _, std = _series(train_rows, "reward_std")
    ax.plot(x, mean, label="rollout reward (mean)")
    ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
    ex, ev = _series(rows, "eval_reward_mean")
    _, es = _series(rows, "eval_reward_stderr")
    if ex:
        ax.errorbar(ex, ev, yerr=es, fmt="o-", capsize=3, label="held-out eval reward (± s.e.)")
    ax.set_xlabel("GRPO step"), ax.set_ylabel("reward"), ax.legend(), ax.set_title("Reward")
    save(fig, "reward")

    fig, axes = plt.subplots(2, 2, figsize=(9, 6))
    for ax, (key, title) in zip(axes.flat, [("kl", "KL(policy ‖ reference)"), ("loss", "loss"),
                                           ("clip_frac", "clip fraction"), ("entropy", "entropy (nats/token)")]):
        ax.plot(*_series(train_rows, key))
        ax.set_title(title), ax.set_xlabel("step")
    save(fig, "training")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    steps = [r["step"] for r in train_rows]
    bottom = [0.0] * len(steps)
    for key, label in PHASE_KEYS:
        vals = [r.get(key, 0.0) for r in train_rows]
        axes[0].bar(steps, vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    axes[0].plot(*_series(train_rows, "time/step_s"), "k.-", label="step wall time")
    axes[0].set_title("time per step (s)"), axes[0].set_xlabel("step"), axes[0].legend(fontsize=8)
    axes[1].plot(*_series(train_rows, "steps_per_min", x="wall_time"), label="steps/min")
    axes[1].set_xlabel("wall time (s)"), axes[1].set_title("throughput"), axes[1].legend()
    save(fig, "throughput")

    last = train_rows[-1]
    wall = last.get("wall_time", 0.0)
    totals = {label: sum(r.get(key, 0.0) for r in train_rows) for key, label in PHASE_KEYS}
    evals = [r for r in rows if "eval_reward_mean" in r]
    summary = {
        "steps": last["step"], "wall_time_s": wall, "steps_per_min": last.get("steps_per_min"),
        "eval_reward_first": evals[0]["eval_reward_mean"] if evals else None,
        "eval_reward_last": evals[-1]["eval_reward_mean"] if evals else None,
        "eval_reward_last_stderr": evals[-1].get("eval_reward_stderr") if evals else None,
        "kl_last": last.get("kl"), "phase_seconds": totals, "plots": plots,
    }
    lines = [f"# GRPO run report: `{run}`", "",
             f"- steps: {summary['steps']}, wall time {wall:.0f} s, {summary['steps_per_min'] or 0:.2f} steps/min",
             f"- held-out reward: {summary['eval_reward_first']} → {summary['eval_reward_last']} "
             f"(± {summary['eval_reward_last_stderr']})",
             f"- final KL to reference: {summary['kl_last']}", "",
             "| phase | seconds (summed over steps) | share of wall time |", "| --- | --- | --- |"]
    for label, sec in totals.items():
        lines.append(f"| {label} | {sec:.1f} | {sec / wall:.1%} |" if wall else f"| {label} | {sec:.1f} | |")
    lines += ["", "Generation seconds are summed over rollout workers (they run in parallel).", ""]
    lines += [f"![{name}]({name}.png)" for name in plots]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
