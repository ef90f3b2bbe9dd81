"""diffusion-grpo: GRPO fine-tuning of masked-diffusion language models on Ray.

The layers, bottom up; each imports only layers below it (tests/test_layering.py):

    errors, precision   user errors; device and precision (bf16 only where it is native)
    config              the validated config tree of every command
    corpus, protocols   text, tokenizer, prompts; typed messages and their wire format
    models              networks, sampler, trajectory replay, rewards, checkpoints, optimizers
    training, learner   pretraining, judge and LM training, judge refresh; GRPO math and the learner core
    evaluation          the gold evaluation: proxy and gold judges, LM bits/char, diversity, KL, best-of-N
    actors              thin Ray shells: rollout, judge and learner workers, judge trainer, telemetry
    orchestration       driver, actor groups, CLI, Tune, reports, demo, cluster

Nothing below `actors` imports Ray.
"""
