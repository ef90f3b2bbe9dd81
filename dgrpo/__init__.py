"""diffusion-grpo: GRPO fine-tuning of masked-diffusion language models on Ray.

The Python API (dgrpo/entrypoints/api.py), loaded on first use so that `import dgrpo` imports neither
Ray nor torch:

    make_config(kind, source, overrides, **sections)   a validated config (train, pretrain, judge, lm, pipeline)
    pretrain, train_judge, train_lm                     the single-process trainers
    train                                               a GRPO run on Ray -> its summary
    evaluate, evaluate_judge                            the gold evaluation; a judge's held-out figures
    sample, load_policy                                 texts from a checkpoint or run; a policy as a torch module
    read_metrics, read_summary                          a run's metrics.jsonl rows and summary.json

The layers, bottom up; each imports only layers below it (tests/test_layering.py):

    errors, precision   user errors; device and precision (bf16 only where it is native)
    config              the validated config tree of every command
    corpus, protocols   text, tokenizer, prompts; typed messages and their wire format
    models              networks, sampler, trajectory replay, rewards, checkpoints, optimizers
    training, learner   pretraining, judge and LM training, judge refresh; GRPO math and the learner core
    evaluation          the gold evaluation: proxy and gold judges, LM bits/char, diversity, KL, best-of-N
    actors              thin Ray shells: rollout, judge and learner workers, judge trainer, telemetry
    orchestration       the run-time machinery: driver, roles, actor groups, batches, weight sync, cluster
    entrypoints         what users call: the Python API and the CLI over it, pipeline, demo, Tune, reports

Nothing below `actors` imports Ray.
"""

API = ("make_config", "check_config", "pretrain", "train_judge", "train_lm", "train", "evaluate", "evaluate_judge",
       "sample", "load_policy", "read_metrics", "read_summary", "resolve_checkpoint", "Policy", "Sample")
__all__ = list(API)


def __getattr__(name: str):
    if name in API:
        from .entrypoints import api
        return getattr(api, name)
    raise AttributeError(f"module 'dgrpo' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(API))
