"""Masked-diffusion language model (MDLM / LLaDA style) over characters.

Input vocabulary = the corpus characters plus one [MASK] id (the last id).
The head predicts only characters: a [MASK] is never an output.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..corpus import CharTokenizer
from ..precision import fp32_region
from .checkpoint import CheckpointError, load_checkpoint
from .transformer import ModelConfig, Trunk


class DiffusionLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.trunk = Trunk(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, self.n_chars, bias=False)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.02)

    @property
    def n_chars(self) -> int:
        return self.cfg.vocab_size - 1

    @property
    def mask_id(self) -> int:
        return self.cfg.vocab_size - 1

    def forward(self, idx: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) with [MASK] at unknown positions -> logits (B, T, n_chars); with rows (flat
        indices of positions, see Trunk) only those positions' logits, (N, n_chars).

        The head runs in fp32 even under bf16 autocast: rounding logits to bf16 would move
        every log-probability the sampler records and the learner replays."""
        h = self.trunk(idx, rows)
        with fp32_region(h.device):
            return F.linear(h.float(), self.lm_head.weight)


def load_generator(path, device: torch.device | str = "cpu"):
    """(frozen DiffusionLM in eval mode, its tokenizer, checkpoint) from a generator checkpoint."""
    ckpt = load_checkpoint(path, expect_kind="generator")
    tokenizer = CharTokenizer.from_dict(ckpt.vocab)
    if ckpt.model_config.vocab_size != tokenizer.vocab_size:
        raise CheckpointError(f"generator checkpoint {path}: model vocab_size {ckpt.model_config.vocab_size} "
                              f"does not match its {tokenizer.n_chars} characters + [MASK]; it is corrupt")
    model = DiffusionLM(ckpt.model_config)
    ckpt.load_weights_into(model)
    model.to(device).eval().requires_grad_(False)
    return model, tokenizer, ckpt


def mask_tokens(x: torch.Tensor, mask_id: int, generator: torch.Generator | None = None,
                t_min: float = 1e-3, stratified: bool = False,
                complementary: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward process: t ~ U(t_min, 1) per sequence, each token masked with prob t.

    stratified: one uniform offset shifted by i/B for sequence i (each t is still
    U(t_min, 1), but the batch covers the interval evenly: a lower-variance loss).
    complementary: rows i and B/2 + i hold the same window (B even); the second gets the
    complement of the first's mask, so its t is 1 - t, still uniform.
    Returns (noisy input, boolean mask of masked positions, t of shape (B,)).
    """
    if complementary:
        _, masked, t = mask_tokens(x[:x.shape[0] // 2], mask_id, generator, t_min, stratified)
        masked = torch.cat([masked, ~masked])
        return torch.where(masked, torch.full_like(x, mask_id), x), masked, torch.cat([t, 1 - t])
    B, T = x.shape
    if stratified:
        offsets = torch.arange(B, device=x.device) / B
        u = (torch.rand(1, generator=generator, device=x.device) + offsets) % 1.0
    else:
        u = torch.rand(B, generator=generator, device=x.device)
    t = t_min + (1 - t_min) * u
    masked = torch.rand(B, T, generator=generator, device=x.device) < t[:, None]
    return torch.where(masked, torch.full_like(x, mask_id), x), masked, t


def masked_token_ce(model: DiffusionLM, noisy: torch.Tensor, x: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each masked position, (N,) in the order of x[masked]; the model computes
    the logits of those positions alone (see Trunk's rows)."""
    rows = masked.flatten().nonzero().squeeze(1)
    return F.cross_entropy(model(noisy, rows).float(), x.flatten()[rows], reduction="none")


def diffusion_loss(model: DiffusionLM, x: torch.Tensor, generator: torch.Generator | None = None,
                   elbo_weight: bool = False, stratified_t: bool = False,
                   complementary: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked-diffusion loss on clean windows x (B, T).

    Returns (loss to optimise, masked-token cross-entropy in nats). With
    elbo_weight the loss is the MDLM bound: sum over masked tokens of CE / t,
    divided by the number of tokens; otherwise the mean CE over masked tokens.
    """
    noisy, masked, t = mask_tokens(x, model.mask_id, generator, stratified=stratified_t,
                                   complementary=complementary)
    ce = masked_token_ce(model, noisy, x, masked)
    token_ce = ce.sum() / max(ce.numel(), 1)
    if elbo_weight:
        loss = (ce / t[:, None].expand_as(x)[masked]).sum() / x.numel()
    else:
        loss = token_ce
    return loss, token_ce.detach()
