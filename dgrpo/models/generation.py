"""Sampling texts from a generator checkpoint, optionally best-of-N under the judge (`dgrpo sample`)."""

from __future__ import annotations

import torch

from ..config import SamplerConfig
from ..errors import ConfigError
from ..precision import resolve_precision
from .diffusion import load_generator
from .judge import load_judge
from .rewards import JudgeReward, compute_rewards
from .sampler import sample


def generate_texts(checkpoint, num: int = 3, length: int | None = None, prompt: str | None = None,
                   mask_char: str = "_", seed: int = 0, judge_checkpoint=None, best_of: int = 1,
                   precision: str = "auto", sampler: SamplerConfig | None = None,
                   **sampler_keys) -> list[tuple[str, float | None]]:
    """`num` texts, each as (text, judge reward or None).

    The sampler is `sampler` (default: SamplerConfig(), training's), with `sampler_keys` (steps=8, ...) over it.

    Unconditional (no prompt): windows of `length` [MASK]s (default: the block size).
    Infill: `prompt` with `mask_char` at the positions to fill, the same prompt `num` times.
    best_of > 1 draws num * best_of samples in one batched sampler call, scores them with the
    judge (reward = 1 - score) and keeps, per prompt, the one with the highest reward.
    """
    if num < 1:
        raise ConfigError(f"--num must be >= 1, got {num}")
    if best_of < 1:
        raise ConfigError(f"--best-of must be >= 1, got {best_of}")
    if best_of > 1 and not judge_checkpoint:
        raise ConfigError(f"--best-of {best_of} needs a judge to choose the best sample: pass --judge CKPT "
                     f"(a `dgrpo judge train --out` directory)")
    model, tokenizer, _ = load_generator(checkpoint)
    block = model.cfg.block_size
    if prompt is None:
        L = block if length is None else length
        if not 1 <= L <= block:
            raise ConfigError(f"--length must be between 1 and the generator's block size {block}, got {L}")
        row = torch.full((L,), model.mask_id, dtype=torch.long)
    else:
        row = tokenizer.encode_prompt(prompt, mask_char)
        L = len(row)
        if not 1 <= L <= block:
            raise ConfigError(f"the prompt has {L} characters; it must have 1 to {block} (the generator's block size)")
        if length is not None and length != L:
            raise ConfigError(f"--length {length} does not match the prompt's {L} characters; pass only one of them")
        if not bool((row == model.mask_id).any()):
            raise ConfigError(f"the prompt has no {mask_char!r} to fill; mark the positions to infill with "
                         f"--mask-char (currently {mask_char!r})")
    reward_fn = None
    if judge_checkpoint:
        judge, _, _ = load_judge(judge_checkpoint, tokenizer=tokenizer)
        if judge.cfg.block_size != L:
            raise ConfigError(f"the judge scores windows of exactly {judge.cfg.block_size} characters, the samples "
                         f"have {L}; use --length {judge.cfg.block_size} (or a prompt of that length)")
        reward_fn = JudgeReward(judge, tokenizer, autocast_dtype=resolve_precision(precision))
    prompts = row.expand(num * best_of, L).clone()
    settings = {**(sampler or SamplerConfig()).model_dump(), **sampler_keys}
    out = sample(model, prompts, **settings, generator=torch.Generator().manual_seed(seed),
                 autocast_dtype=resolve_precision(precision))
    tokens = out.tokens
    if reward_fn is None:
        return [(text, None) for text in tokenizer.decode_batch(tokens)]
    rewards = compute_rewards(reward_fn, tokens).view(num, best_of)
    best = rewards.argmax(dim=1)
    rows = torch.arange(num)
    chosen = tokens.view(num, best_of, L)[rows, best]
    return list(zip(tokenizer.decode_batch(chosen), rewards[rows, best].tolist()))
