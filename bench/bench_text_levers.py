"""Which GRPO settings make the text better per nat of KL? Each variant runs GRPO from the same built models (the
output directory of `dgrpo demo` or `dgrpo pipeline`: generator, proxy judge, gold judge, LM) for the same wall
time or number of steps, then the gold evaluation measures its selected checkpoint against the generator on held-out prompts: the
proxy and gold judges, the LM's bits per character, distinct-2 and repeated word 2-grams, and the exact
trajectory KL, with the gold gain per nat of it.

    python -m bench.bench_text_levers --models runs/demo --config demo --variants base,loo,diversity \\
        (--minutes 3 | --steps 40) [--seed 0] [--prompts 64] [--samples-per-prompt 2] \\
        [--out bench/results/text_levers.json]

`--config demo` takes the demo's GRPO section (dgrpo/entrypoints/demo.py), a YAML path a pipeline config's.
A variant is a name in VARIANTS or `name:key.path=value;key.path=value` (TrainConfig keys over the GRPO section).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.common import default_out, machine_info, print_table, write_json
from dgrpo.config import PipelineConfig, TrainConfig, deep_merge, load_config, parse_override, to_dict
from dgrpo.evaluation import EvaluateOptions, evaluate
from dgrpo.evaluation.verdict import text_verdict
from dgrpo.entrypoints.demo import demo_config
from dgrpo.orchestration.driver import run_training
from dgrpo.entrypoints.pipeline import stage_configs
from dgrpo.orchestration.rundir import read_best

VARIANTS = {
    "base": {},
    "no_budget": {"grpo": {"kl_target": None, "kl_coef": 0.04}},
    "samples_x2": {"grpo": {"prompts_per_step": 8, "minibatch_size": 64, "lr": 7e-5}},
    "group16": {"grpo": {"group_size": 16, "prompts_per_step": 2}},
    "loo": {"grpo": {"advantage": "loo"}},
    "diversity": {"grpo": {"diversity_coef": 0.5}},
    "random_order": {"sampler": {"order": "random"}},
}


def variant(spec: str) -> tuple[str, dict]:
    if ":" not in spec:
        if spec not in VARIANTS:
            raise SystemExit(f"unknown variant {spec!r}; known: {sorted(VARIANTS)} or name:key=value;key=value")
        return spec, VARIANTS[spec]
    name, keys = spec.split(":", 1)
    tree: dict = {}
    for item in filter(None, keys.split(";")):
        path, value = parse_override(item)
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return name, tree


def pipeline_config(args) -> PipelineConfig:
    if args.config == "demo":
        return demo_config(args.models, args.corpus, args.demo_minutes, threads=1)
    return load_config(PipelineConfig, args.config, overrides=[f"out={args.models}"] +
                       ([f"corpus.path={args.corpus}"] if args.corpus else []))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", required=True, help="a `dgrpo demo` / `dgrpo pipeline` output directory")
    ap.add_argument("--config", default="demo", help="demo, or a pipeline YAML whose grpo section is the base")
    ap.add_argument("--variants", default="base")
    ap.add_argument("--minutes", type=float, default=None, help="GRPO wall time of each variant")
    ap.add_argument("--steps", type=int, default=None, help="GRPO steps of each variant (instead of --minutes)")
    ap.add_argument("--demo-minutes", type=float, default=12.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples-per-prompt", type=int, default=2)
    ap.add_argument("--corpus", default=None)
    ap.add_argument("--runs", default=None, help="where the variants' runs go (default: MODELS/levers)")
    ap.add_argument("--checkpoint", choices=["last", "best"], default="last",
                    help="evaluate each run's last checkpoint or the one its held-out selection picked")
    ap.add_argument("--evaluate-only", action="store_true",
                    help="evaluate runs already in --runs instead of training them")
    ap.add_argument("--out", default=str(default_out("text_levers")))
    args = ap.parse_args()
    if (args.minutes is None) == (args.steps is None):
        raise SystemExit("give --minutes or --steps (one of them)")

    stages = stage_configs(pipeline_config(args))
    runs = Path(args.runs or Path(args.models) / "levers")
    results = []
    for spec in args.variants.split(","):
        name, tree = variant(spec)
        base = to_dict(stages.grpo)
        run = {"out_dir": str(runs / f"{name}_seed{args.seed}"), "seed": args.seed, "max_minutes": args.minutes,
               "steps": args.steps or 100_000, "dashboard": False, "metrics_export": False}
        cfg = TrainConfig.model_validate(deep_merge(deep_merge(base, tree), {"run": run}))
        t0 = time.perf_counter()
        if args.evaluate_only:
            summary = json.loads((Path(cfg.run.out_dir) / "summary.json").read_text())
        else:
            summary = run_training(cfg, quiet=True)
        train_s = time.perf_counter() - t0
        best = read_best(cfg.run.out_dir)
        ckpts = sorted((Path(cfg.run.out_dir) / "checkpoints").glob("step_*"))
        use_best = args.checkpoint == "best" and best is not None
        policy = str(Path(cfg.run.out_dir) / "checkpoints" / best["checkpoint"]) if use_best else str(ckpts[-1])
        report = evaluate(EvaluateOptions(
            policies=[policy], generator=stages.generator.out, judges=list(cfg.reward.judge_paths),
            gold=stages.gold_judge.out if stages.gold_judge else None, lm=stages.lm.out if stages.lm else None,
            prompts=args.prompts, samples_per_prompt=args.samples_per_prompt, precision="auto",
            corpus=args.corpus or stages.generator.corpus.path, examples=5), log=lambda *a: None)
        base_row, row = report["rows"][0], report["rows"][-1]
        paired = row["paired_vs_base"]
        keys = ("proxy_reward", "gold_reward", "lm_bits_per_char", "distinct_2", "repeated_word_2grams")
        verdict = text_verdict({k: base_row.get(k) for k in keys}, {k: row.get(k) for k in keys}, paired)
        kl = row["kl_per_sequence"]
        gold = paired.get("gold_reward")
        result = {
            "variant": name, "overrides": tree, "seed": args.seed, "policy": policy, "steps": summary.get("steps"),
            "train_s": train_s, "kl": kl, "gold_gain": gold, "proxy_gain": paired.get("proxy_reward"),
            "lm_gain": paired.get("lm_bits_per_char"), "repeated_word_2grams_gain": paired.get("repeated_word_2grams"),
            "distinct_2": {"base": base_row.get("distinct_2"), "policy": row.get("distinct_2")},
            "gold_gain_per_nat": gold["mean"] / kl["mean"] if gold and kl["mean"] > 0 else None,
            "warnings": verdict["warnings"], "distinct_2_relative": verdict["distinct_2_relative"],
            "examples_before": base_row.get("examples"), "examples_after": row.get("examples"),
        }
        results.append(result)
        print(f"{name}: {summary.get('steps')} steps, KL {kl['mean']:.2f}, gold {gold['mean']:+.4f} ± "
              f"{gold['stderr']:.4f}, warnings {verdict['warnings']}", flush=True)
        write_json({"bench": "text_levers", "machine": machine_info(), "models": args.models,
                    "config": args.config, "minutes": args.minutes, "steps": args.steps, "results": results}, args.out)

    def cell(m, fmt="+.4f"):
        return "-" if m is None else f"{m['mean']:{fmt}} ± {m['stderr']:.4f}"
    print_table([{"variant": r["variant"], "steps": r["steps"], "kl": cell(r["kl"], ".2f"),
                  "gold": cell(r["gold_gain"]), "proxy": cell(r["proxy_gain"]), "lm": cell(r["lm_gain"]),
                  "d2": r["distinct_2_relative"], "rep": cell(r["repeated_word_2grams_gain"]),
                  "per_nat": r["gold_gain_per_nat"]} for r in results],
                [("variant", "variant"), ("steps", "steps"), ("kl", "KL nats/seq"), ("gold", "gold gain"),
                 ("proxy", "proxy gain"), ("lm", "LM bits/char gain"), ("d2", "distinct-2 rel", ".3f"),
                 ("rep", "rep. word 2g gain"), ("per_nat", "gold/nat", ".4f")])


if __name__ == "__main__":
    main()
