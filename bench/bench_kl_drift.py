"""How much of GRPO's KL is bought by the reward, and how much is gradient noise?

GRPO with a small batch moves the policy away from its reference along the reward's gradient and
also along the noise of its estimate; both cost KL, only the first buys reward. This bench runs the
same GRPO updates (no Ray, one process, fresh samples every step) twice from the same generator:

* ``judge``: the judge's rewards, as in training;
* ``shuffled``: the same rewards permuted at random across the step's samples, so advantages keep
  their distribution but carry no information about the text.

Every `--eval-every` steps it draws held-out samples from the policy (a fixed seed) and measures
KL(policy || generator) per sequence of the sampling process (as `dgrpo evaluate` does), the judge's
reward, and, beside the KL, the sum of the revealed tokens' log-ratios (what the learner's `kl_seq`
sums): under confidence order that is not a KL estimate, and the bench shows by how much it differs. The shuffled run's KL is what noise alone spends at that learning rate and batch;
set against the judge run's KL it says how much of the KL budget the reward could have used.

    python -m bench.bench_kl_drift --generator runs/headline/generator --judge runs/headline/proxy_judge \
        [--steps 40] [--lrs 1e-4,3e-5] [--kl-coef 0] [--out bench/results/kl_drift.json]
"""

from __future__ import annotations

import argparse
import copy

import torch

from bench.bench_precision import rollouts, scored
from bench.common import default_out, machine_info, print_table, write_json
from dgrpo.config import GRPOConfig
from dgrpo.evaluation.statistics import mean_stderr
from dgrpo.learner.core import LearnerCore
from dgrpo.models.diffusion import load_generator
from dgrpo.models.judge import load_judge
from dgrpo.models.trajectory import trajectory_logprobs
from dgrpo.precision import machine_summary, resolve_precision
from dgrpo.training.train_judge import judge_scores

REWARD_KINDS = ("judge", "shuffled")


def draw(model, n: int, sampler: dict, seed: int, dtype, reference=None):
    """n unconditional samples in eval mode (the learner trains the same module)."""
    model.eval()
    try:
        return rollouts(model, n, sampler["steps"], dtype, seed, sampler["order"], reference)
    finally:
        model.train()


def held_out(policy, reference, judge, n: int, sampler: dict, seed: int, dtype) -> dict:
    out = draw(policy, n, sampler, seed, dtype, reference)
    with torch.no_grad():
        ref_revealed = trajectory_logprobs(reference, out.tokens, out.reveal_step, sampler["steps"],
                                           autocast_dtype=dtype)
    measured = {"kl_seq": out.kl_to_reference, "reward": 1.0 - judge_scores(judge, out.tokens, dtype),
                "revealed_log_ratio": out.logprobs.double().sum(1) - ref_revealed.double().sum(1)}
    row = {}
    for name, values in measured.items():
        summary = mean_stderr(values)
        row.update({name: summary["mean"], f"{name}_se": summary["stderr"]})
    return row


def run(args, reward_kind: str, lr: float, dtype) -> list[dict]:
    generator, _, _ = load_generator(args.generator)
    judge = load_judge(args.judge)[0]
    reference = copy.deepcopy(generator)
    policy = copy.deepcopy(generator).requires_grad_(True).train()
    cfg = GRPOConfig(group_size=args.group_size, prompts_per_step=args.prompts_per_step, lr=lr,
                     kl_coef=args.kl_coef, replay_steps=args.replay_steps, minibatch_size=args.group_size
                     * args.prompts_per_step)
    core = LearnerCore(policy, cfg, seed=args.seed, autocast_dtype=dtype, reference=reference)
    sampler = {"steps": args.sampler_steps, "order": args.order}
    shuffle = torch.Generator().manual_seed(args.seed + 1)
    n = args.group_size * args.prompts_per_step
    rows = [{"reward_kind": reward_kind, "lr": lr, "step": 0,
             **held_out(policy, reference, judge, args.eval_samples, sampler, args.seed + 99, dtype)}]
    for step in range(1, args.steps + 1):
        out = draw(policy, n, sampler, args.seed * 100_000 + step, dtype)
        rewards = 1.0 - judge_scores(judge, out.tokens, dtype)
        if reward_kind == "shuffled":
            rewards = rewards[torch.randperm(n, generator=shuffle)]
        core.train([scored(out, args.sampler_steps, args.group_size, rewards, args.order)])
        if step % args.eval_every == 0:
            rows.append({"reward_kind": reward_kind, "lr": lr, "step": step,
                         **held_out(policy, reference, judge, args.eval_samples, sampler, args.seed + 99, dtype)})
            r = rows[-1]
            print(f"{reward_kind:8s} lr {lr:.0e} step {step:3d}: KL {r['kl_seq']:6.2f} +- {r['kl_seq_se']:.2f}  "
                  f"(revealed tokens' log-ratio {r['revealed_log_ratio']:6.2f} +- {r['revealed_log_ratio_se']:.2f})  "
                  f"reward {r['reward']:.3f} +- {r['reward_se']:.3f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--generator", required=True)
    ap.add_argument("--judge", required=True)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--eval-samples", type=int, default=128)
    ap.add_argument("--lrs", default="1e-4", help="comma-separated learning rates")
    ap.add_argument("--kl-coef", type=float, default=0.0, help="0 measures the drift without a pull back")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--replay-steps", type=int, default=4)
    ap.add_argument("--sampler-steps", type=int, default=16)
    ap.add_argument("--order", default="confidence", choices=["random", "confidence"])
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(default_out("kl_drift")))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = resolve_precision(args.precision)
    rows = []
    for lr in [float(v) for v in args.lrs.split(",")]:
        for kind in REWARD_KINDS:
            rows += run(args, kind, lr, dtype)
    by = {(r["lr"], r["step"], r["reward_kind"]): r for r in rows}
    table = []
    for (lr, step, kind), r in sorted(by.items()):
        if kind != "judge" or step == 0:
            continue
        noise = by[(lr, step, "shuffled")]
        table.append({"lr": lr, "step": step, "kl_judge": r["kl_seq"], "kl_shuffled": noise["kl_seq"],
                      "noise_share": noise["kl_seq"] / r["kl_seq"] if r["kl_seq"] > 0 else float("nan"),
                      "reward_judge": r["reward"], "reward_shuffled": noise["reward"]})
    print_table(table, [("lr", "lr", ".0e"), ("step", "step"), ("kl_judge", "KL judge", ".2f"),
                        ("kl_shuffled", "KL shuffled", ".2f"), ("noise_share", "shuffled/judge", ".2f"),
                        ("reward_judge", "reward judge", ".3f"), ("reward_shuffled", "reward shuffled", ".3f")],
                title="KL per sequence spent by the judge's rewards and by shuffled ones (held-out samples)")
    report = {"bench": "kl_drift", "machine": machine_info(args.threads), "cpu_flags": machine_summary(),
              "args": vars(args), "base": rows[0], "rows": rows, "table": table}
    write_json(report, args.out)
    return report


if __name__ == "__main__":
    main()
