"""`dgrpo demo`: the whole chain at a small size on an embedded local Ray cluster.

pretrain the generator -> a proxy judge and an independent gold judge against it -> a small character LM
-> GRPO against the proxy, under the default sampler (random order at temperature 0.5) with a KL budget
-> the evaluation of the generator and the policy on held-out prompts by both judges, the LM and the diversity
measures, with warnings when the judges' gains are not gains of the text (evaluation/verdict.py).
It is the pipeline (pipeline.py) with short budgets: each stage gets a share of `minutes`. `seed` moves every
stage's seed (the gold judge's stays apart from the proxy's). The GRPO stage starts Ray's dashboard on
127.0.0.1 (run.dashboard) and prints its URL.
"""

from __future__ import annotations

from ..config import PipelineConfig
from ..training.loop import UNBOUNDED_ITERS
from .pipeline import GOLD_SEED

SHARES = {"generator": 0.30, "proxy_judge": 0.17, "gold_judge": 0.17, "lm": 0.08, "grpo": 0.28}
# the KL budget of the GRPO stage, nats per sequence of the exact trajectory KL (the one `dgrpo evaluate` reports)
KL_TARGET = 3.0


def demo_config(out: str, corpus: str | None, minutes: float, threads: int, seed: int = 0) -> PipelineConfig:
    judge = {"preset": "small", "eval_every": 200, "eval_windows": 64}
    return PipelineConfig.model_validate({
        "out": out, "corpus": {"path": corpus}, "threads": 2,
        "generator": {"preset": "small", "seed": seed, "max_minutes": SHARES["generator"] * minutes,
                      "eval_every": 200},
        "proxy_judges": [{**judge, "seed": seed, "max_minutes": SHARES["proxy_judge"] * minutes}],
        "gold_judge": {**judge, "seed": GOLD_SEED + seed, "max_minutes": SHARES["gold_judge"] * minutes},
        "lm": {"preset": "small", "seed": seed, "max_minutes": SHARES["lm"] * minutes, "eval_every": 200},
        "grpo": {
            "run": {"seed": seed, "steps": UNBOUNDED_ITERS, "mode": "async", "eval_every": 10, "eval_prompts": 64,
                    "checkpoint_every": 20, "max_minutes": SHARES["grpo"] * minutes, "dashboard": True,
                    "selection": "eval_reward", "selection_kl_max": 1.5 * KL_TARGET},
            "grpo": {"group_size": 8, "prompts_per_step": 4, "minibatch_size": 32, "lr": 1e-4, "kl_coef": 0.5,
                     "kl_target": KL_TARGET, "kl_horizon": 5, "replay_steps": 4,
                     "reference_on": "rollout"},
            "resources": {"rollout": {"num_workers": 2, "num_cpus": 0.5}, "torch_threads": threads}},
        "evaluate": {"prompts": 64, "samples_per_prompt": 2, "best_of": [], "samples_shown": 2},
    })


def run_demo(out: str, corpus: str | None, minutes: float = 11.0, threads: int = 1, echo=print,
             overwrite: bool = False, seed: int = 0) -> dict:
    from .pipeline import run_pipeline, stage_configs
    cfg = demo_config(out, corpus, minutes, threads, seed)
    port = stage_configs(cfg).grpo.run.dashboard_port
    echo(f"Watch the GRPO stage in Ray's dashboard: http://127.0.0.1:{port} (up while the stage runs; Ray takes the "
         f"next free port if that one is taken, and the stage's 'Ray dashboard:' line says which; sign in with the "
         f"token `ray get-auth-token` prints)")
    return run_pipeline(cfg, echo=echo, overwrite=overwrite)
