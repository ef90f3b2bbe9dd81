"""How the reveal order and the temperature shape a generator's text, on measures no reward sees.

For one generator, each sampler setting draws the same held-out prompts (`dgrpo evaluate`'s base row) and is
measured by a separate character LM (bits per character), distinct word 2-grams across samples, repeated word
2-grams within a sample, and, when given, judges' rewards. A judge is trained on refills from one sampler and
learns that sampler's artefacts, so its reward of other samplers is not neutral: the LM and the diversity
measures are the fair comparison.

    python -m bench.bench_reveal_orders --generator runs/headline/generator --lm runs/headline/lm \\
        --judge runs/headline/proxy_judge [--gold runs/headline/gold_judge] \\
        [--settings "confidence:1.0,random:0.5"] [--prompts 128] [--out bench/results/reveal_orders.json]

A setting is ORDER:TEMPERATURE[:STEPS[:THRESHOLD]] (orders: random, confidence, gumbel_confidence; STEPS
defaults to --steps; THRESHOLD is confidence order's reveal_threshold). Each row states the model forwards a
sample took (fewer than its steps under a threshold) and the sampler's seconds per sample.
"""

from __future__ import annotations

import argparse

from bench.common import default_out, machine_info, print_table, write_json
from dgrpo.evaluation import EvaluateOptions, evaluate

DEFAULT_SETTINGS = ("confidence:0.7,confidence:0.85,confidence:1.0,confidence:1.3,confidence:1.6,confidence:2.0,"
                    "random:0.4,random:0.5,random:0.6,random:0.7,random:1.0")
MEASURES = ("lm_bits_per_char", "char_2gram_js", "distinct_2", "repeated_word_2grams", "proxy_reward", "gold_reward")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--generator", required=True)
    ap.add_argument("--lm", required=True)
    ap.add_argument("--judge", required=True, help="a proxy judge (its reward is shown, not neutral)")
    ap.add_argument("--gold", default=None, help="a gold judge (its reward is shown, not neutral)")
    ap.add_argument("--settings", default=DEFAULT_SETTINGS)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--samples-per-prompt", type=int, default=2)
    ap.add_argument("--corpus", default=None)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--out", default=str(default_out("reveal_orders")))
    args = ap.parse_args(argv)

    rows, real = [], None
    for setting in args.settings.split(","):
        order, temperature, *rest = setting.split(":")
        steps = int(rest[0]) if rest else args.steps
        threshold = float(rest[1]) if len(rest) > 1 else None
        sampler = {"order": order, "temperature": float(temperature), "steps": steps, "reveal_threshold": threshold}
        report = evaluate(EvaluateOptions(
            generator=args.generator, judges=[args.judge], gold=args.gold, lm=args.lm,
            prompts=args.prompts, samples_per_prompt=args.samples_per_prompt, precision=args.precision,
            corpus=args.corpus, sampler=sampler, examples=3), log=lambda *a: None)
        base, real = report["rows"][0], report["real_text"]
        n_samples = args.prompts * args.samples_per_prompt
        row = {"order": order, "temperature": float(temperature), "steps": steps, "reveal_threshold": threshold,
               "setting": setting, "sampler": report["sampler"], "forwards_per_sample": base["forwards_per_sample"],
               "sample_s_per_sample": report["timings"]["sample_s"] / n_samples, "examples": base["examples"]}
        for key in MEASURES:
            row[key] = base.get(key)
        rows.append(row)
        print(f"{setting}: forwards {row['forwards_per_sample']['mean']:.2f}, "
              f"{1e3 * row['sample_s_per_sample']:.1f} ms/sample, "
              + ", ".join(f"{k} {row[k]['mean']:.4f}" for k in MEASURES if row[k]), flush=True)

    def cell(metric):
        return "-" if metric is None else f"{metric['mean']:.4f} ± {metric['stderr']:.4f}"
    print_table([{"order": r["setting"], "temperature": r["temperature"], "forwards": cell(r["forwards_per_sample"]),
                  "ms": f"{1e3 * r['sample_s_per_sample']:.1f}", **{k: cell(r[k]) for k in MEASURES}}
                 for r in rows] + [{"order": "held-out text", "temperature": "-", "forwards": "-", "ms": "-",
                                    **{k: cell(real.get(k)) for k in MEASURES}}],
                [("order", "setting"), ("temperature", "T"), ("forwards", "forwards/sample"),
                 ("ms", "ms/sample"), ("lm_bits_per_char", "LM bits/char"),
                 ("char_2gram_js", "char 2g JS to real"), ("distinct_2", "distinct-2"), ("repeated_word_2grams", "rep. word 2g"),
                 ("proxy_reward", "proxy"), ("gold_reward", "gold")])
    report = {"bench": "reveal_orders", "machine": machine_info(), "generator": args.generator, "lm": args.lm,
              "judge": args.judge, "gold": args.gold, "steps": args.steps, "prompts": args.prompts,
              "samples_per_prompt": args.samples_per_prompt, "rows": rows, "real_text": real}
    write_json(report, args.out)
    return report


if __name__ == "__main__":
    main()
