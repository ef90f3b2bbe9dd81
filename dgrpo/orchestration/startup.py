"""Run set-up: the starting policy, its corpus and prompts, and the checks made before any actor starts.

RunInputs(cfg) loads the generator (or makes a fresh one), the corpus with the generator's vocabulary,
the training prompt stream and the fixed held-out prompts, and checks what a run would otherwise find
out late: the prompt length against the generator, the corpus and the judges, the judges' vocabulary,
judge refresh's refill pool, and run.selection_judge.
"""

from __future__ import annotations

import torch

from ..config import TrainConfig
from ..corpus import (CharTokenizer, PromptStream, VocabularyError, check_length, fixed_windows, load_corpus,
                      make_prompts)
from ..errors import RunError
from ..models.checkpoint import load_checkpoint
from ..models.diffusion import DiffusionLM, load_generator
from ..models.rewards import JudgeReward
from ..models.transformer import preset_config
from .judge_refresh_role import check_judge_refresh


class RunInputs:
    """tokenizer, model (the starting policy), corpus, length (of prompts), selection_judge, prompts (the
    training stream) and eval_prompts (the held-out ones), checked."""

    def __init__(self, cfg: TrainConfig):
        run = cfg.run
        self.tokenizer, self.model, self.corpus = tokenizer, model, corpus = initial_policy(cfg)
        self.length = length = cfg.prompts.length or model.cfg.block_size
        if length > model.cfg.block_size:
            raise RunError(f"prompts.length={length} exceeds the generator's block size {model.cfg.block_size}")
        check_length(corpus.train, length, "train")
        check_length(corpus.val, length, "validation")
        check_judge_vocabulary(cfg, tokenizer, length)
        check_judge_refresh(cfg)
        self.selection_judge = load_selection_judge(cfg, tokenizer, length)
        self.prompts = PromptStream(corpus.train, length, tokenizer.mask_id, cfg.prompts.kind,
                                    cfg.prompts.mask_fraction, seed=run.seed)
        eval_windows = fixed_windows(corpus.val, run.eval_prompts, length, seed=run.eval_seed)
        self.eval_prompts = make_prompts(eval_windows, tokenizer.mask_id, cfg.prompts.kind, cfg.prompts.mask_fraction,
                                         generator=torch.Generator().manual_seed(run.eval_seed))


def initial_policy(cfg: TrainConfig):
    """(tokenizer, initial policy, corpus): the pretrained generator, or a fresh `generator.preset`."""
    c = cfg.corpus
    if cfg.generator.checkpoint:
        model, tokenizer, _ = load_generator(cfg.generator.checkpoint)
        return tokenizer, model, load_corpus(c.path, c.cache_dir, c.val_fraction, tokenizer=tokenizer)
    corpus = load_corpus(c.path, c.cache_dir, c.val_fraction)
    torch.manual_seed(cfg.run.seed)
    return corpus.tokenizer, DiffusionLM(preset_config(cfg.generator.preset, corpus.tokenizer.vocab_size)), corpus


def check_judge_vocabulary(cfg: TrainConfig, tokenizer: CharTokenizer, length: int) -> None:
    for path in cfg.reward.judge_paths:
        judge = load_checkpoint(path, expect_kind="judge")
        try:
            CharTokenizer.from_dict(judge.vocab).check_same(tokenizer, "judge vs generator")
        except VocabularyError as e:
            raise VocabularyError(f"{path}: {e}") from None
        if judge.model_config.block_size < length:
            raise RunError(f"the judge {path} scores windows of at most {judge.model_config.block_size} characters "
                           f"but prompts are {length} long; set prompts.length <= {judge.model_config.block_size}")


def load_selection_judge(cfg: TrainConfig, tokenizer: CharTokenizer, length: int) -> JudgeReward | None:
    """run.selection_judge, checked: the generator's vocabulary, the prompts' length, and a training seed
    that no reward judge shares (the same seed gives the same initial weights and refill samples)."""
    path = cfg.run.selection_judge
    if not path:
        return None
    judge = JudgeReward.from_checkpoint(path, tokenizer=tokenizer)
    if judge.block_size != length:
        raise RunError(f"run.selection_judge {path} scores windows of {judge.block_size} characters, the prompts "
                       f"have {length}; train it for prompts.length")
    seed = (load_checkpoint(path, expect_kind="judge").config or {}).get("seed")
    for reward_path in cfg.reward.judge_paths:
        if seed is not None and seed == (load_checkpoint(reward_path, expect_kind="judge").config or {}).get("seed"):
            raise RunError(f"run.selection_judge {path} was trained with the seed {seed} of the reward judge "
                           f"{reward_path}: the same initial weights and refill samples; train it with another seed")
    return judge
