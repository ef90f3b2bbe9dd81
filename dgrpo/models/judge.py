"""The judge: a frozen scorer of how synthetic a character window is.

Same bidirectional trunk as the generator, with one extra input id, [CLS],
prepended at position 0, and a scalar head on that position's hidden state
(plus pooled per-position evidence, below).

Input vocabulary (vocab_size = n_chars + 2): ids 0..n_chars-1 are the corpus
characters (the generator's ids), n_chars is [MASK] (shared with the generator
so a tokenizer's ids carry over unchanged; never seen in training) and
n_chars + 1 is [CLS].

score(tokens) = sigmoid(logit) in [0, 1]: the judge's estimate of the fraction
of positions re-filled by the generator (target g(x) = x, see
training.judge.judge_targets), so higher = more synthetic and the reward is
1 - score.

The window logit is head(h[CLS]) + mean over positions of token_head(h[p]).
token_head also gets its own training signal: it predicts which characters the
generator replaced (ELECTRA's replaced-token detection), one label per character
instead of one per window. The pooled term is a linear read-out of local
evidence (like a bag of n-gram detectors) that learns much faster than the [CLS]
head alone (docs/RESULTS.md, the judge); [CLS] can add what needs the whole window.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from ..corpus import CharTokenizer, VocabularyError
from ..precision import autocast_context, fp32_region
from .checkpoint import CheckpointError, load_checkpoint
from .transformer import ModelConfig, Trunk, preset_config


class Judge(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size < 3:
            raise ValueError(f"a judge needs vocab_size = n_chars + 2 >= 3, got {cfg.vocab_size}")
        self.cfg = cfg
        self.trunk = Trunk(cfg)  # rotary covers block_size + 1 positions: room for [CLS]
        self.head = nn.Linear(cfg.n_embd, 1)
        self.token_head = nn.Linear(cfg.n_embd, 1)  # per position: replaced by the generator?
        for head in (self.head, self.token_head):
            nn.init.normal_(head.weight, mean=0.0, std=0.02)
            nn.init.zeros_(head.bias)

    @property
    def n_chars(self) -> int:
        return self.cfg.vocab_size - 2

    @property
    def mask_id(self) -> int:
        return self.cfg.vocab_size - 2

    @property
    def cls_id(self) -> int:
        return self.cfg.vocab_size - 1

    @property
    def block_size(self) -> int:
        return self.cfg.block_size

    def _check(self, tokens: torch.Tensor) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"the judge takes token ids of shape (batch, length), got {shape}")
        if tokens.dtype != torch.long:
            raise ValueError(f"the judge takes long token ids, got dtype {tokens.dtype}")
        if tokens.shape[1] > self.cfg.block_size:
            raise ValueError(f"windows of {tokens.shape[1]} characters are longer than the judge's "
                             f"block of {self.cfg.block_size}")
        if tokens.numel():
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi > self.mask_id:
                raise VocabularyError(
                    f"token ids must lie in 0..{self.mask_id} (characters, {self.mask_id} = [MASK]); got "
                    f"ids in {lo}..{hi}: the tokens come from a different tokenizer than the judge's")

    def forward(self, tokens: torch.Tensor, token_logits: bool = False):
        """tokens (B, T) character ids -> logits (B,); sigmoid(logit) = the judge's score.

        logit = head(h[CLS]) + mean_p token_head(h[p]). With token_logits=True also returns the
        (B, T) per-position logits of "this character was replaced by the generator".
        """
        self._check(tokens)
        cls = torch.full((tokens.shape[0], 1), self.cls_id, dtype=tokens.dtype, device=tokens.device)
        h = self.trunk(torch.cat([cls, tokens], dim=1))
        with fp32_region(h.device):  # the heads in fp32 even under bf16 autocast (see DiffusionLM.forward)
            h = h.float()
            per_token = self.token_head(h[:, 1:]).squeeze(-1)
            logits = self.head(h[:, 0]).squeeze(-1) + per_token.mean(dim=1)
        if token_logits:
            return logits, per_token
        return logits

    @torch.no_grad()
    def score(self, tokens: torch.Tensor, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
        """(B, T) ids -> (B,) float32 in [0, 1], higher = more synthetic. Runs in eval mode."""
        was_training = self.training
        self.eval()
        try:
            with autocast_context(tokens.device, autocast_dtype):
                logits = self(tokens)
        finally:
            self.train(was_training)
        return torch.sigmoid(logits.float())


def judge_config(preset: str, n_chars: int, block_size: int) -> ModelConfig:
    """A judge of preset width/depth over n_chars characters (+[MASK], +[CLS]) and windows of block_size."""
    return preset_config(preset, n_chars + 2, block_size=block_size)


def load_judge(path: str | os.PathLike, tokenizer: CharTokenizer | None = None,
               device: torch.device | str = "cpu"):
    """Load a frozen judge: returns (judge in eval mode without gradients, its tokenizer, checkpoint).

    With `tokenizer` (the generator's), the vocabularies must match exactly.
    """
    ckpt = load_checkpoint(path, expect_kind="judge")
    judge_tok = CharTokenizer.from_dict(ckpt.vocab)
    if ckpt.model_config.vocab_size != judge_tok.n_chars + 2:
        raise CheckpointError(f"judge checkpoint {path}: model vocab_size {ckpt.model_config.vocab_size} does "
                              f"not equal its {judge_tok.n_chars} characters + 2 ([MASK], [CLS]); it is corrupt")
    if tokenizer is not None:
        try:
            tokenizer.check_same(judge_tok, "generator vs judge")
        except VocabularyError as e:
            raise VocabularyError(f"the judge {path} and the generator were built on different corpora: {e}; "
                                  f"train the judge against this generator (dgrpo judge train --generator ...)"
                                  ) from None
    judge = Judge(ckpt.model_config)
    ckpt.load_weights_into(judge)
    judge.to(device).eval().requires_grad_(False)
    return judge, judge_tok, ckpt
