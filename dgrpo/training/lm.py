"""Training the autoregressive evaluation language model (models/char_lm.py) by maximum likelihood.

Train split only; held-out bits per character on fixed validation windows at every
evaluation. The loop (resume, time budget, lr schedule, checkpoints) is the one
pretraining and judge training share.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..corpus import Corpus, CharTokenizer, check_length, fixed_windows, random_windows
from ..models.char_lm import KIND, CharLM, bits_per_char, char_logprobs, lm_config
from ..models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ..models.optim import make_optimizer
from ..precision import resolve_precision
from .loop import TrainingLoop


class LMTrainer:
    def __init__(self, cfg, corpus: Corpus, config_dict: dict, resume: bool = False, log=print):
        torch.manual_seed(cfg.seed)
        self.cfg, self.corpus, self.config_dict, self.log = cfg, corpus, config_dict, log
        self.out = Path(cfg.out)
        overrides = {"block_size": cfg.block_size} if cfg.block_size else {}
        if cfg.dropout is not None:
            overrides["dropout"] = cfg.dropout
        self.model_cfg = lm_config(cfg.preset, corpus.tokenizer.n_chars, **overrides)
        T = self.model_cfg.block_size
        check_length(corpus.train, T, "train")
        check_length(corpus.val, T, "validation")
        self.lm = CharLM(self.model_cfg)
        self.optimizer = make_optimizer(self.lm, cfg.lr, cfg.weight_decay, cfg.betas, "adamw")
        self.data_gen = torch.Generator().manual_seed(cfg.seed)
        self.loop = TrainingLoop(cfg, self.optimizer, {"data": self.data_gen}, "lm", log)
        self.tokens_seen, self.train_bpc, self.state = 0, None, {}
        if resume and (self.out / "config.json").exists():
            ckpt = load_checkpoint(self.out, expect_kind=KIND)
            CharTokenizer.from_dict(ckpt.vocab).check_same(corpus.tokenizer, "language model checkpoint vs corpus")
            if ckpt.model_config != self.model_cfg:
                raise CheckpointError(f"{self.out} holds a model {ckpt.model_config.to_dict()}, this run builds "
                                      f"{self.model_cfg.to_dict()}; resume with the same preset or use a new --out")
            ckpt.load_weights_into(self.lm)
            self.state = dict(self.loop.resume(ckpt))
            self.tokens_seen = self.state["tokens_seen"]
        self.autocast_dtype = resolve_precision(cfg.precision)
        self.val_windows = fixed_windows(corpus.val, cfg.eval_windows, T, seed=cfg.seed)

    def step(self, it: int) -> dict:
        cfg = self.cfg
        x = random_windows(self.corpus.train, cfg.batch_size, self.model_cfg.block_size, self.data_gen)
        loss = -char_logprobs(self.lm, x, self.autocast_dtype).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.lm.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.tokens_seen += x.numel()
        self.train_bpc = float(loss.detach()) / math.log(2)
        return {"bpc": f"{self.train_bpc:.3f}"}

    def checkpoint(self, iters: int) -> None:
        cfg, elapsed = self.cfg, self.loop.elapsed
        val_bpc = float(bits_per_char(self.lm, self.val_windows, self.autocast_dtype).mean())
        self.loop.history.append({"iter": iters, "val_bits_per_char": val_bpc, "train_bits_per_char": self.train_bpc,
                                  "wall_time_s": elapsed})
        self.log(f"iter {iters}: held-out {val_bpc:.4f} bits/char, {elapsed:.0f} s, "
                 f"{self.tokens_seen / max(elapsed, 1e-9):.0f} tokens/s")
        self.state = {**self.loop.state(iters), "tokens_seen": self.tokens_seen, "val_bits_per_char": val_bpc,
                      "preset": cfg.preset, "history": self.loop.history}
        save_checkpoint(self.out, kind=KIND, model_config=self.model_cfg, vocab=self.corpus.tokenizer.to_dict(),
                        weights=self.lm, state=self.state, config=self.config_dict, optimizer=self.optimizer,
                        extra_tensors=self.loop.rng_tensors())

    def run(self, progress: bool = True) -> dict:
        self.lm.train()
        self.loop.run(self.step, self.checkpoint, progress)
        return self.state


def train_char_lm(cfg, corpus: Corpus, config_dict: dict, resume: bool = False, progress: bool = True,
                  log=print) -> dict:
    """Train a CharLM per `cfg` (LMTrainConfig) on corpus.train; checkpoint (kind "lm") in cfg.out. Returns the
    state of the last checkpoint (iter, wall_time_s, tokens_seen, val_bits_per_char, history)."""
    return LMTrainer(cfg, corpus, config_dict, resume, log).run(progress)
