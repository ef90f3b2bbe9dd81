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
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..corpus import Corpus, CharTokenizer, VocabularyError, check_length, fixed_windows, random_windows
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .diffusion import DiffusionLM
from .pretrain import make_optimizer, scheduled_lr
from .sampler import autocast_context, resolve_precision
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


def train_char_lm(cfg, corpus: Corpus, config_dict: dict, resume: bool = False, progress: bool = True,
                  log=print) -> dict:
    """Train a CharLM per `cfg` (LMTrainConfig) on corpus.train; checkpoint (kind "lm") in cfg.out.

    Held-out bits/char on fixed validation windows is logged every cfg.eval_every iterations
    and stored in the checkpoint's state (val_bits_per_char)."""
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    overrides = {"block_size": cfg.block_size} if cfg.block_size else {}
    if cfg.dropout is not None:
        overrides["dropout"] = cfg.dropout
    model_cfg = lm_config(cfg.preset, corpus.tokenizer.n_chars, **overrides)
    T = model_cfg.block_size
    check_length(corpus.train, T, "train")
    check_length(corpus.val, T, "validation")
    lm = CharLM(model_cfg)
    optimizer = make_optimizer(lm, cfg.lr, cfg.weight_decay, cfg.betas, "adamw")
    data_gen = torch.Generator().manual_seed(cfg.seed)
    start_iter, tokens_seen, elapsed, history, state = 0, 0, 0.0, [], {}
    if resume and (out / "config.json").exists():
        ckpt = load_checkpoint(out, expect_kind=KIND)
        CharTokenizer.from_dict(ckpt.vocab).check_same(corpus.tokenizer, "language model checkpoint vs corpus")
        if ckpt.model_config != model_cfg:
            raise CheckpointError(f"{out} holds a model {ckpt.model_config.to_dict()}, this run builds "
                                  f"{model_cfg.to_dict()}; resume with the same preset or use a new --out")
        ckpt.load_weights_into(lm)
        ckpt.load_optimizer_into(optimizer)
        data_gen.set_state(ckpt.load_tensors("rng")["data"])
        state = dict(ckpt.state)
        start_iter, tokens_seen, elapsed = state["iter"], state["tokens_seen"], state["wall_time_s"]
        history = state.get("history", [])
        log(f"resumed from {out} at iter {start_iter}")
    autocast_dtype = resolve_precision(cfg.precision)
    val_windows = fixed_windows(corpus.val, cfg.eval_windows, T, seed=cfg.seed)

    def save(it: int, val_bpc: float) -> None:
        nonlocal state
        state = {"iter": it, "tokens_seen": tokens_seen, "wall_time_s": elapsed, "val_bits_per_char": val_bpc,
                 "preset": cfg.preset, "history": history}
        save_checkpoint(out, kind=KIND, model_config=model_cfg, vocab=corpus.tokenizer.to_dict(), weights=lm,
                        state=state, config=config_dict, optimizer=optimizer,
                        extra_tensors={"rng": {"data": data_gen.get_state()}})

    lm.train()
    t_start = time.perf_counter() - elapsed
    bar = tqdm(range(start_iter, cfg.max_iters), initial=start_iter, total=cfg.max_iters,
               disable=not progress, desc="lm", dynamic_ncols=True, mininterval=5.0)
    for it in bar:
        time_fraction = elapsed / (60 * cfg.max_minutes) if cfg.max_minutes else 0.0
        for group in optimizer.param_groups:
            group["lr"] = scheduled_lr(it, cfg.max_iters, cfg.lr, cfg.min_lr, cfg.warmup_iters, time_fraction)
        x = random_windows(corpus.train, cfg.batch_size, T, data_gen)
        loss = -char_logprobs(lm, x, autocast_dtype).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), cfg.grad_clip)
        optimizer.step()
        tokens_seen += x.numel()
        elapsed = time.perf_counter() - t_start
        train_bpc = float(loss.detach()) / math.log(2)
        bar.set_postfix(bpc=f"{train_bpc:.3f}", refresh=False)
        out_of_time = cfg.max_minutes is not None and elapsed > 60 * cfg.max_minutes
        if (it + 1) % cfg.eval_every == 0 or it + 1 == cfg.max_iters or out_of_time:
            val_bpc = float(bits_per_char(lm, val_windows, autocast_dtype).mean())
            history.append({"iter": it + 1, "val_bits_per_char": val_bpc,
                            "train_bits_per_char": train_bpc, "wall_time_s": elapsed})
            log(f"iter {it + 1}: held-out {val_bpc:.4f} bits/char, {elapsed:.0f} s, "
                f"{tokens_seen / elapsed:.0f} tokens/s")
            save(it + 1, val_bpc)
        if out_of_time:
            log(f"stopping: max_minutes={cfg.max_minutes} reached at iter {it + 1}")
            break
    bar.close()
    return state
