"""Precision: how far bf16 moves what GRPO depends on, and what it buys in speed, per role.

For a generator checkpoint (and optionally a judge), on real sampler trajectories:

* replay mismatch: mean and max |log-prob recorded by the sampler - log-prob replayed by
  the learner| over every revealed token (each token's share of its trajectory: its own
  log-prob and its part of its step's selection term), for each (rollout, learner) precision
  pair, and the first PPO ratio's largest deviation from 1 (what `first_step_ratio_dev` logs);
* judge: mean |reward in bf16 - reward in fp32| against the spread of rewards within a
  GRPO group (the signal the advantages are made of);
* speed: seconds per sampler call, per learner step and per judge batch in each precision.

All configurations are timed round-robin so ratios survive a shared machine.

    python -m bench.bench_precision --generator CKPT [--judge CKPT] [--samples 32] [--steps 16]
        [--reps 3] [--threads 1] [--out bench/results/precision.json]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import default_out, machine_info, print_table, write_json
from dgrpo.config import GRPOConfig, SamplerConfig
from dgrpo.learner.core import LearnerCore
from dgrpo.models.diffusion import load_generator
from dgrpo.models.judge import load_judge
from dgrpo.models.sampler import sample
from dgrpo.models.trajectory import token_shares, trajectory_step_logprobs
from dgrpo.precision import machine_summary
from dgrpo.protocols import RolloutBatch, ScoredBatch

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


RANDOM_REVEAL = SamplerConfig().random_reveal


def rollouts(model, n: int, steps: int, dtype, seed: int, order: str, reference=None):
    """n unconditional samples (every position masked); with a reference, their trajectory KL terms to it."""
    prompts = torch.full((n, model.cfg.block_size), model.mask_id, dtype=torch.long)
    return sample(model, prompts, steps=steps, order=order, random_reveal=RANDOM_REVEAL,
                  generator=torch.Generator().manual_seed(seed), autocast_dtype=dtype, reference=reference)


def scored(out, steps: int, group_size: int, rewards: torch.Tensor, order: str) -> ScoredBatch:
    n = out.tokens.shape[0]
    batch = RolloutBatch(request_id=0, tokens=out.tokens, reveal_step=out.reveal_step, logprobs=out.logprobs,
                         group_index=torch.arange(n // group_size).repeat_interleave(group_size), policy_version=0,
                         worker_id=0, steps=steps, temperature=1.0, top_k=0, top_p=1.0, order=order,
                         random_reveal=RANDOM_REVEAL, selection=out.selection)
    return ScoredBatch(rollout=batch, rewards=rewards, judge_id=0)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--generator", required=True)
    ap.add_argument("--judge", default=None)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--order", default="confidence", choices=["random", "confidence"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(default_out("precision")))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer, _ = load_generator(args.generator)
    judge = load_judge(args.judge, tokenizer=tokenizer)[0] if args.judge else None
    n, S = args.samples, args.steps

    mismatch = []
    for rollout_p, learner_p in [("fp32", "fp32"), ("bf16", "bf16"), ("bf16", "fp32")]:
        out = rollouts(model, n, S, DTYPES[rollout_p], 0, args.order)
        with torch.no_grad():
            tokens_lp, selection = trajectory_step_logprobs(model, out.tokens, out.reveal_step, S, order=args.order,
                                                            random_reveal=RANDOM_REVEAL,
                                                            autocast_dtype=DTYPES[learner_p])
        replay = token_shares(tokens_lp, selection, out.reveal_step)  # what the learner's ratio compares
        recorded = token_shares(out.logprobs, out.selection, out.reveal_step)
        revealed = out.reveal_step >= 0
        diff = (replay - recorded).abs()[revealed]
        mismatch.append({"rollout": rollout_p, "learner": learner_p, "mean_abs_dlogp": float(diff.mean()),
                         "max_abs_dlogp": float(diff.max()), "first_ratio_dev": float(diff.max().exp() - 1)})
    print_table(mismatch, [("rollout", "rollout"), ("learner", "learner"),
                           ("mean_abs_dlogp", "mean |dlogp|", ".2e"), ("max_abs_dlogp", "max |dlogp|", ".2e"),
                           ("first_ratio_dev", "first ratio dev", ".2e")], title="replay mismatch")

    judge_row = None
    out32 = rollouts(model, n, S, None, 1, args.order)
    if judge is not None:
        with torch.no_grad():
            r32 = 1 - judge.score(out32.tokens)
            r16 = 1 - judge.score(out32.tokens, torch.bfloat16)
        group_std = r32.view(-1, args.group_size).std(dim=1, unbiased=False).mean()
        judge_row = {"mean_abs_dreward": float((r16 - r32).abs().mean()), "max_abs_dreward": float((r16 - r32).abs().max()),
                     "within_group_reward_std": float(group_std), "reward_mean": float(r32.mean())}
        print_table([judge_row], [(k, k.replace("_", " "), ".4f") for k in judge_row], title="judge reward, bf16 vs fp32")

    rewards = torch.rand(n, generator=torch.Generator().manual_seed(2))
    batch = scored(out32, S, args.group_size, rewards, args.order)
    cfg = GRPOConfig(group_size=args.group_size, prompts_per_step=n // args.group_size, minibatch_size=n,
                     replay_steps=4, lr=1e-12)
    times = {f"{role}_{p}": [] for role in ("sampler", "learner", "judge") for p in DTYPES}
    for _ in range(args.reps):
        for p, dtype in DTYPES.items():
            t0 = time.perf_counter()
            rollouts(model, n, S, dtype, 3, args.order)
            times[f"sampler_{p}"].append(time.perf_counter() - t0)
            learner = LearnerCore(load_generator(args.generator)[0].requires_grad_(True), cfg, autocast_dtype=dtype)
            t0 = time.perf_counter()
            learner.train([batch])
            times[f"learner_{p}"].append(time.perf_counter() - t0)
            if judge is not None:
                t0 = time.perf_counter()
                with torch.no_grad():
                    judge.score(out32.tokens, dtype)
                times[f"judge_{p}"].append(time.perf_counter() - t0)
    speed = []
    for role in ("sampler", "learner", "judge"):
        if not times[f"{role}_fp32"]:
            continue
        fp32, bf16 = statistics.median(times[f"{role}_fp32"]), statistics.median(times[f"{role}_bf16"])
        speed.append({"role": role, "fp32_s": fp32, "bf16_s": bf16, "bf16_speedup": fp32 / bf16})
    print_table(speed, [("role", "role"), ("fp32_s", "fp32 s", ".3f"), ("bf16_s", "bf16 s", ".3f"),
                        ("bf16_speedup", "bf16 speed-up", ".2f")],
                title=f"seconds per call ({n} samples, {S} steps; learner: one GRPO step, replay_steps 4)")
    report = {"bench": "precision", "machine": {**machine_info(args.threads), **machine_summary()},
              "generator": args.generator, "judge": args.judge, "samples": n, "steps": S, "order": args.order,
              "replay_mismatch": mismatch, "judge_reward": judge_row, "speed": speed, "times": times}
    write_json(report, args.out)
    return report


if __name__ == "__main__":
    main()
