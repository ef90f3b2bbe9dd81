"""Learning quality: held-out judge reward of the GRPO policy vs best-of-N from the starting generator.

Best-of-N sampling from the starting generator (the reference) is the
classical baseline for a KL-regularised policy: its KL to the generator is
at most log N - (N-1)/N nats per *sequence* (exact for continuous rewards
without ties). The policy is compared with best-of-N at the N whose KL bound
matches the policy's KL to the reference:

    KL_seq = kl_per_token x generated tokens per sample,
    N = round(solve(log N - (N-1)/N = KL_seq)), clipped to [1, --max-n].

Where the KL comes from (`--kl-source`, reported in the output):

- `metrics` (default): the last `kl` in the run's metrics.jsonl two levels
  above the policy checkpoint (runs/<run>/metrics.jsonl; the row of the
  checkpoint's step when present). The learner logs it **per token** (k3
  estimator, mean over trained tokens, measured during that step's update),
  so it is multiplied by the generated tokens per sample.
- `measured`: estimated here on the held-out prompts from the policy's own
  samples, KL_seq = mean over samples of [log pi(traj) - log ref(traj)], the
  exact trajectory log-probs (sampler's recorded log-probs for the policy, the
  reference's replayed with `trajectory_logprobs`). This is the token part of
  the trajectory KL; with `order=random` the reveal positions do not depend on
  the model, so it is the whole trajectory KL. Always computed and reported.
- `--kl X` overrides both (per token unless `--kl-per-sequence`).

Evaluation, on fixed held-out validation windows (`fixed_windows` of the
validation split, same seed and prompt kind as the run's evaluation):
the starting generator draws a pool of N samples per prompt; "generator (N=1)"
is the mean pool reward per prompt, "best-of-N" the best of the pool per
prompt (the judge picks), "best-of-n" for smaller n the unbiased estimate from
the same pool (dgrpo.evaluation.best_of_n); the policy draws `--policy-samples`
per prompt. Means and standard errors are over prompts; the policy vs best-of-N
difference is paired by prompt. The full gold evaluation (independent judge,
language model, diversity, over-optimisation curves) is `dgrpo evaluate`.

    python -m bench.bench_quality --generator CKPT --judge CKPT --policy runs/R/checkpoints/step_N
        [--kl X [--kl-per-sequence]] [--kl-source metrics|measured] [--prompts 64] [--policy-samples 4]
        [--max-n 256] [--quick] [--out bench/results/quality.json]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from bench.common import corpus_path, default_out, machine_info, print_table, write_json
from dgrpo.corpus import CharTokenizer, fixed_windows, load_corpus, make_prompts
from dgrpo.evaluation.best_of_n import best_of_n_expectation, bon_kl_bound, n_for_kl  # noqa: F401 (n_for_kl: tests)
from dgrpo.evaluation.evaluate import sample_per_prompt
from dgrpo.evaluation.statistics import mean_stderr
from dgrpo.models.checkpoint import load_checkpoint, save_checkpoint
from dgrpo.models.diffusion import DiffusionLM
from dgrpo.models.judge import Judge, judge_config, load_judge
from dgrpo.training.train_judge import judge_scores
from dgrpo.models.transformer import preset_config

SAMPLER_DEFAULTS = {"steps": 32, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "order": "random"}


def mean_se(x: torch.Tensor) -> tuple[float, float]:
    m = mean_stderr(x)
    return m["mean"], m["stderr"]


def kl_from_metrics(policy_dir: Path, step: int | None) -> tuple[float | None, Path]:
    path = policy_dir.parent.parent / "metrics.jsonl"
    if not path.is_file():
        return None, path
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    rows = [r for r in rows if isinstance(r.get("kl"), (int, float))]
    at_step = [r for r in rows if step is not None and r.get("step") == step]
    pick = at_step[-1] if at_step else (rows[-1] if rows else None)
    return (float(pick["kl"]) if pick else None), path


def judge_rewards(judge: Judge, tokens: torch.Tensor, chunk: int) -> torch.Tensor:
    return 1.0 - judge_scores(judge, tokens, chunk_rows=chunk)


def make_quick_checkpoints(root: Path, corpus: str) -> dict:
    """Tiny random-init generator, a perturbed copy as the 'policy' (with a run metrics.jsonl), a random judge."""
    c = load_corpus(corpus)
    tok = c.tokenizer
    torch.manual_seed(0)
    gen = DiffusionLM(preset_config("tiny", tok.vocab_size))
    save_checkpoint(root / "gen", kind="generator", model_config=gen.cfg, vocab=tok.to_dict(), weights=gen)
    policy = DiffusionLM(gen.cfg)
    policy.load_state_dict(gen.state_dict())
    with torch.no_grad():
        policy.lm_head.weight.add_(0.05 * torch.randn_like(policy.lm_head.weight))
    run = root / "run"
    run_cfg = {"corpus": {"path": corpus, "val_fraction": 0.1}, "sampler": {**SAMPLER_DEFAULTS, "steps": 4},
               "prompts": {"kind": "unconditional", "mask_fraction": 0.5, "length": None},
               "run": {"eval_seed": 1234}}
    save_checkpoint(run / "checkpoints" / "step_000002", kind="generator", model_config=gen.cfg,
                    vocab=tok.to_dict(), weights=policy, state={"step": 2, "version": 2}, config=run_cfg)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "kl": 0.005}) + "\n"
                                       + json.dumps({"step": 2, "kl": 0.01}) + "\n")
    torch.manual_seed(1)
    judge = Judge(judge_config("tiny", tok.n_chars, gen.cfg.block_size))
    save_checkpoint(root / "judge", kind="judge", model_config=judge.cfg, vocab=tok.to_dict(), weights=judge)
    return {"generator": str(root / "gen"), "judge": str(root / "judge"),
            "policy": str(run / "checkpoints" / "step_000002")}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--generator", help="starting generator checkpoint (the GRPO reference)")
    ap.add_argument("--judge", help="judge checkpoint (reward = 1 - score)")
    ap.add_argument("--policy", help="GRPO checkpoint: runs/<run>/checkpoints/step_N")
    ap.add_argument("--kl", type=float, default=None, help="policy KL to the reference (per token by default)")
    ap.add_argument("--kl-per-sequence", action="store_true", help="--kl is already per sequence")
    ap.add_argument("--kl-source", default="metrics", choices=["metrics", "measured"],
                    help="without --kl: the run's last logged per-token kl, or the KL measured here")
    ap.add_argument("--max-n", type=int, default=256, help="largest best-of-N (N is clipped to [1, max-n])")
    ap.add_argument("--prompts", type=int, default=64, help="held-out prompts")
    ap.add_argument("--policy-samples", type=int, default=4, help="policy samples per prompt")
    ap.add_argument("--seed", type=int, default=None, help="prompt/eval seed (default: the run's run.eval_seed)")
    ap.add_argument("--corpus", default=None, help="corpus file (default: the run's corpus.path)")
    ap.add_argument("--prompt-kind", default=None, choices=["unconditional", "infill"],
                    help="default: the run's prompts.kind")
    ap.add_argument("--sampler-steps", type=int, default=None, help="default: the run's sampler.steps")
    ap.add_argument("--chunk", type=int, default=256, help="samples per sampler / judge call")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="tiny random checkpoints made on the fly: seconds")
    ap.add_argument("--out", default=str(default_out("quality")), help="JSON output file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory(prefix="bench_quality_")
    if args.quick:
        made = make_quick_checkpoints(Path(tmp.name), corpus_path(args.corpus, True, tmp.name))
        args.generator, args.judge, args.policy = made["generator"], made["judge"], made["policy"]
        args.prompts, args.policy_samples, args.max_n = 8, 2, 8
    if not (args.generator and args.judge and args.policy):
        ap.error("--generator, --judge and --policy are required (or --quick)")
    info = machine_info()
    t_start = time.perf_counter()

    gen_ck = load_checkpoint(args.generator, expect_kind="generator")
    pol_ck = load_checkpoint(args.policy, expect_kind="generator")
    tok = CharTokenizer.from_dict(gen_ck.vocab)
    CharTokenizer.from_dict(pol_ck.vocab).check_same(tok, "policy vs generator")
    generator = gen_ck.load_weights_into(DiffusionLM(gen_ck.model_config)).eval()
    policy = pol_ck.load_weights_into(DiffusionLM(pol_ck.model_config)).eval()
    judge, _, _ = load_judge(args.judge, tokenizer=tok)
    run_cfg = pol_ck.config or {}
    sampler = {**SAMPLER_DEFAULTS, **{k: v for k, v in run_cfg.get("sampler", {}).items() if k in SAMPLER_DEFAULTS}}
    if args.sampler_steps:
        sampler["steps"] = args.sampler_steps
    pcfg = run_cfg.get("prompts", {})
    kind = args.prompt_kind or pcfg.get("kind", "unconditional")
    mask_fraction = float(pcfg.get("mask_fraction", 0.5))
    length = pcfg.get("length") or generator.cfg.block_size
    seed = args.seed if args.seed is not None else int(run_cfg.get("run", {}).get("eval_seed", 1234))
    ccfg = run_cfg.get("corpus", {})
    corpus_file = args.corpus or ccfg.get("path")
    corpus = load_corpus(corpus_file, ccfg.get("cache_dir"), float(ccfg.get("val_fraction", 0.1)), tokenizer=tok)
    if judge.block_size != length:
        raise SystemExit(f"the judge scores windows of {judge.block_size} characters, prompts are {length}")

    windows = fixed_windows(corpus.val, args.prompts, length, seed=seed)
    prompts = make_prompts(windows, tok.mask_id, kind, mask_fraction, generator=torch.Generator().manual_seed(seed))
    gen_tokens = float((prompts == tok.mask_id).sum(1).float().mean())

    # policy samples, their rewards and the measured KL to the reference
    P, m = args.prompts, args.policy_samples
    p_tokens, p_kl = sample_per_prompt(policy, prompts, m, sampler, seed + 1, args.chunk, reference=generator)
    kl_measured, kl_measured_se = mean_se(p_kl)
    policy_r = judge_rewards(judge, p_tokens, args.chunk).view(P, m)

    # which KL picks N
    step = pol_ck.state.get("step")
    metrics_kl, metrics_path = kl_from_metrics(Path(args.policy), step)
    if args.kl is not None:
        source = "--kl (per sequence)" if args.kl_per_sequence else f"--kl (per token x {gen_tokens:g})"
        kl_seq = args.kl if args.kl_per_sequence else args.kl * gen_tokens
        kl_token_in = None if args.kl_per_sequence else args.kl
    elif args.kl_source == "metrics" and metrics_kl is not None:
        source, kl_token_in, kl_seq = f"metrics ({metrics_path}, per token x {gen_tokens:g})", metrics_kl, \
            metrics_kl * gen_tokens
    else:
        if args.kl_source == "metrics":
            print(f"no kl in {metrics_path}; using the KL measured on the held-out prompts")
        source, kl_token_in, kl_seq = "measured (per sequence)", None, max(kl_measured, 0.0)
    n_best, n_exact = n_for_kl(kl_seq, args.max_n)
    clipped = n_exact == math.inf or n_exact > args.max_n

    # best-of-N pool from the starting generator
    print(f"sampling {P} x {n_best} from the generator and {P} x {m} from the policy "
          f"(T={length}, S={sampler['steps']})", flush=True)
    g_tokens, _ = sample_per_prompt(generator, prompts, n_best, sampler, seed + 2, args.chunk)
    pool = judge_rewards(judge, g_tokens, args.chunk).view(P, n_best)

    base_mean, base_se = mean_se(pool.mean(1))
    bon = pool.max(1).values
    bon_mean, bon_se = mean_se(bon)
    pol_mean, pol_se = mean_se(policy_r.mean(1))
    diff_mean, diff_se = mean_se(policy_r.mean(1) - bon)
    first_mean, first_se = mean_se(pool[:, 0])
    rows = [
        {"method": "generator (N=1)", "n": 1, "kl_seq": 0.0, "reward_mean": base_mean, "reward_se": base_se,
         "samples": P * n_best, "note": f"mean of the {n_best}-sample pool per prompt"},
        {"method": f"best-of-{n_best}", "n": n_best, "kl_seq": bon_kl_bound(n_best), "reward_mean": bon_mean,
         "reward_se": bon_se, "samples": P * n_best, "note": "KL is the bound log N - (N-1)/N"},
        {"method": "policy", "n": None, "kl_seq": kl_seq, "reward_mean": pol_mean, "reward_se": pol_se,
         "samples": P * m, "note": f"KL: {source.split(' (')[0]}"},
    ]
    curve = []
    for n in sorted({2 ** i for i in range(n_best.bit_length()) if 2 ** i <= n_best} | {n_best}):
        r_mean, r_se = mean_se(best_of_n_expectation(pool, pool, n))
        curve.append({"n": n, "kl_bound": bon_kl_bound(n), "reward_mean": r_mean, "reward_se": r_se})
    report = {
        "bench": "quality", "threads": torch.get_num_threads(), "machine": info,
        "checkpoints": {"generator": args.generator, "judge": args.judge, "policy": args.policy,
                        "policy_step": step},
        "eval": {"prompts": P, "prompt_kind": kind, "mask_fraction": mask_fraction, "length": length,
                 "seed": seed, "generated_tokens_per_sample": gen_tokens, "sampler": sampler,
                 "policy_samples_per_prompt": m, "corpus": corpus_file},
        "kl": {"source": source, "kl_per_token_input": kl_token_in, "kl_seq": kl_seq,
               "metrics_kl_per_token": metrics_kl, "measured_kl_seq": kl_measured,
               "measured_kl_seq_se": kl_measured_se, "measured_kl_per_token": kl_measured / gen_tokens,
               "n": n_best, "n_continuous": n_exact if math.isfinite(n_exact) else None, "n_clipped": clipped,
               "max_n": args.max_n},
        "results": rows, "best_of_n_curve": curve,
        "policy_minus_best_of_n": {"mean": diff_mean, "se": diff_se},
        "generator_first_sample": {"mean": first_mean, "se": first_se},
        "seconds": time.perf_counter() - t_start,
    }
    print(f"\nlearning quality on {P} held-out {kind} prompts (T={length}, {gen_tokens:g} generated tokens, "
          f"S={sampler['steps']}, seed {seed}); judge reward = 1 - score, mean +- s.e. over prompts")
    print(f"KL to the reference: {source}: {kl_seq:.3f} nats/seq -> N = {n_best}"
          f"{' (clipped at --max-n)' if clipped else ''}; measured on the policy's samples: "
          f"{kl_measured:.3f} +- {kl_measured_se:.3f} nats/seq ({kl_measured / gen_tokens:.4f}/token)")
    print_table(rows, [("method", "method"), ("n", "N"), ("kl_seq", "KL nats/seq", ".3f"),
                       ("reward_mean", "reward", ".4f"), ("reward_se", "s.e.", ".4f"), ("samples", "samples"),
                       ("note", "note")])
    print(f"policy - best-of-{n_best} (paired by prompt): {diff_mean:+.4f} +- {diff_se:.4f}")
    print()
    print_table(curve, [("n", "best-of-n"), ("kl_bound", "KL bound", ".3f"), ("reward_mean", "reward", ".4f"),
                        ("reward_se", "s.e.", ".4f")])
    write_json(report, args.out)
    tmp.cleanup()
    return report


if __name__ == "__main__":
    main()
