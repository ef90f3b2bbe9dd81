"""`dgrpo demo`: the whole chain at a small size on an embedded local Ray cluster.

pretrain the generator -> train the judge against it -> GRPO against the judge,
then print the judge reward of held-out samples before and after GRPO.
Each stage has a wall-time budget so the demo ends in about `minutes`.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import JudgeTrainConfig, PretrainConfig, TrainConfig, to_dict


def demo_configs(out: Path, corpus: str | None, minutes: float, threads: int):
    corpus_cfg = {"path": corpus}
    pretrain = PretrainConfig.model_validate({
        "preset": "small", "out": str(out / "generator"), "max_iters": 100_000,
        "max_minutes": 0.35 * minutes, "eval_every": 200, "corpus": corpus_cfg})
    judge = JudgeTrainConfig.model_validate({
        "generator": str(out / "generator"), "preset": "small", "out": str(out / "judge"), "max_iters": 100_000,
        "max_minutes": 0.25 * minutes, "eval_every": 200, "eval_windows": 64,
        "corpus": corpus_cfg})
    grpo = TrainConfig.model_validate({
        "run": {"out_dir": str(out / "grpo"), "steps": 1_000, "mode": "async", "eval_every": 10,
                "eval_prompts": 64, "checkpoint_every": 20, "max_minutes": 0.3 * minutes,
                "metrics_export": False},
        "corpus": corpus_cfg,
        "generator": {"checkpoint": str(out / "generator")},
        "reward": {"kind": "judge", "judge_checkpoint": str(out / "judge")},
        "sampler": {"steps": 16, "order": "confidence"},
        "grpo": {"group_size": 8, "prompts_per_step": 4, "minibatch_size": 32, "lr": 1e-4,
                 "kl_coef": 0.04, "replay_steps": 4},
        "resources": {"rollout": {"num_workers": 2, "num_cpus": 0.5}, "torch_threads": threads},
    })
    return pretrain, judge, grpo


def run_demo(out: str, corpus: str | None, minutes: float = 14.0, threads: int = 1, echo=print,
             overwrite: bool = False) -> dict:
    import torch

    from ..corpus import load_corpus
    from ..training.judge import train_judge
    from ..training.pretrain import pretrain
    from .driver import run_training
    from .rundir import check_directory

    out_dir = Path(out)
    pre_cfg, judge_cfg, grpo_cfg = demo_configs(out_dir, corpus, minutes, threads)
    check_directory(Path(grpo_cfg.run.out_dir), overwrite=overwrite)  # before the stages it would come after
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    echo(f"== 1/3 pretraining the generator ({pre_cfg.max_minutes:.1f} min budget)")
    corpus_data = load_corpus(corpus, val_fraction=pre_cfg.corpus.val_fraction)
    pre_state = pretrain(pre_cfg, corpus_data, to_dict(pre_cfg), progress=False, log=echo)
    echo(f"== 2/3 training the judge ({judge_cfg.max_minutes:.1f} min budget)")
    judge_state = train_judge(judge_cfg, to_dict(judge_cfg), progress=False, log=echo)
    echo(f"== 3/3 GRPO against the judge on Ray ({grpo_cfg.run.max_minutes:.1f} min budget)")
    summary = run_training(grpo_cfg, overwrite=overwrite)
    samples = [json.loads(line) for line in (out_dir / "grpo" / "samples.jsonl").read_text().splitlines()]
    result = {
        "generator_val_ce": pre_state.get("val_loss"),
        "judge": {k: judge_state.get(k) for k in ("auc", "spearman", "score_real", "score_generated")},
        "grpo_steps": summary["steps"],
        "judge_reward_before": summary["eval_reward_before"],
        "judge_reward_after": summary["eval_reward_after"],
        "judge_reward_after_stderr": summary["eval_reward_after_stderr"],
        "sample_before": samples[0]["texts"][0],
        "sample_after": samples[-1]["texts"][0],
        "out_dir": str(out_dir),
    }
    (out_dir / "demo.json").write_text(json.dumps(result, indent=2))
    echo("== result")
    echo(f"judge reward of held-out samples: before GRPO {result['judge_reward_before']:.4f} -> after "
         f"{result['judge_reward_after']:.4f} (± {result['judge_reward_after_stderr']:.4f}) "
         f"in {summary['steps']} GRPO steps")
    echo(f"--- a held-out sample before GRPO:\n{result['sample_before']}")
    echo(f"--- after GRPO:\n{result['sample_after']}")
    return result
