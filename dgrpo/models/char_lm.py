"""An autoregressive character language model for the gold evaluation (pure torch, no Ray).

It gives the evaluation its likelihood measure: bits per character of a text under a
causal transformer trained by maximum likelihood on the corpus's train split. It shares
nothing with the generator or the judge but the tokenizer: its own weights, its own
objective (next-character likelihood, not masked denoising and not discrimination), and
GRPO never sees it, so a policy cannot have learned to please it.

Input ids: the corpus characters 0..n_chars-1 and one start id, BOS = n_chars (the id the
generator uses for [MASK]; here it never stands inside a text). A text x_0..x_{T-1} is read
as BOS, x_0, ..., x_{T-2} and position t predicts x_t, so

    log p(text) = sum_t log p(x_t | BOS, x_<t),    bits/char = -log2 p(text) / T,

the first character scored from BOS alone. Training windows are random slices of the
train split read the same way, so BOS means "a window starts here, anywhere in the text":
the setting in which evaluated samples, windows themselves, are scored.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from ..corpus import CharTokenizer, VocabularyError
from ..precision import autocast_context
from .checkpoint import CheckpointError, load_checkpoint
from .diffusion import DiffusionLM
from .transformer import ModelConfig, preset_config

KIND = "lm"
SCORE_CHUNK_ROWS = 256


class CharLM(DiffusionLM):
    """DiffusionLM's trunk and character head with a causal mask; its extra input id is BOS, not [MASK]."""

    def __init__(self, cfg: ModelConfig):
        if not cfg.causal:
            raise ValueError("the evaluation language model is autoregressive: its config needs causal=True")
        super().__init__(cfg)

    @property
    def bos_id(self) -> int:
        return self.cfg.vocab_size - 1

    def shifted_inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """BOS, x_0, ..., x_{T-2}: the inputs under which position t predicts x_t."""
        bos = torch.full_like(tokens[:, :1], self.bos_id)
        return torch.cat([bos, tokens[:, :-1]], dim=1)

    def check_tokens(self, tokens: torch.Tensor) -> None:
        if tokens.dim() != 2 or tokens.dtype != torch.long:
            raise ValueError(f"the language model takes long ids of shape (batch, length), got "
                             f"{tuple(tokens.shape)} {tokens.dtype}")
        if tokens.shape[1] > self.cfg.block_size:
            raise ValueError(f"texts of {tokens.shape[1]} characters are longer than the language model's "
                             f"block of {self.cfg.block_size}; train it with a larger block_size")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.n_chars):
            raise VocabularyError(f"character ids must lie in 0..{self.n_chars - 1}; got "
                                  f"{int(tokens.min())}..{int(tokens.max())} (a [MASK] left, or another tokenizer)")


def lm_config(preset: str, n_chars: int, **overrides) -> ModelConfig:
    """A causal model of preset width/depth over n_chars characters + BOS."""
    return preset_config(preset, n_chars + 1, causal=True, **overrides)


def char_logprobs(lm: CharLM, tokens: torch.Tensor, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B, T) ids -> (B, T) float32 log p(x_t | BOS, x_<t) (with gradients if enabled)."""
    lm.check_tokens(tokens)
    with autocast_context(tokens.device, autocast_dtype):
        logits = lm(lm.shifted_inputs(tokens))
    return F.log_softmax(logits.float(), dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


@torch.no_grad()
def bits_per_char(lm: CharLM, tokens: torch.Tensor, autocast_dtype: torch.dtype | None = None,
                  chunk_rows: int = SCORE_CHUNK_ROWS) -> torch.Tensor:
    """(B, T) ids -> (B,) float64 bits per character of each text, -log2 p(text) / T."""
    was_training = lm.training
    lm.eval()
    try:
        nats = torch.cat([-char_logprobs(lm, tokens[i:i + chunk_rows], autocast_dtype).double().sum(1)
                          for i in range(0, len(tokens), chunk_rows)])
    finally:
        lm.train(was_training)
    return nats / (tokens.shape[1] * math.log(2))


def load_char_lm(path: str | os.PathLike, tokenizer: CharTokenizer | None = None,
                 device: torch.device | str = "cpu"):
    """(frozen CharLM in eval mode, its tokenizer, checkpoint); with `tokenizer` the vocabularies must match."""
    ckpt = load_checkpoint(path, expect_kind=KIND)
    lm_tok = CharTokenizer.from_dict(ckpt.vocab)
    if ckpt.model_config.vocab_size != lm_tok.n_chars + 1 or not ckpt.model_config.causal:
        raise CheckpointError(f"language model checkpoint {path}: expected a causal model over its "
                              f"{lm_tok.n_chars} characters + BOS; it is corrupt")
    if tokenizer is not None:
        try:
            tokenizer.check_same(lm_tok, "generator vs language model")
        except VocabularyError as e:
            raise VocabularyError(f"the language model {path} was trained on another corpus: {e}") from None
    lm = ckpt.load_weights_into(CharLM(ckpt.model_config))
    lm.to(device).eval().requires_grad_(False)
    return lm, lm_tok, ckpt
