"""Bidirectional transformer trunk shared by the diffusion LM and the judge.

Pre-LayerNorm blocks, PyTorch scaled-dot-product attention without a causal
mask (`causal` turns one on for the autoregressive evaluation LM, char_lm.py), rotary
position embeddings. Rotary positions matter here: with learned absolute positions a
masked-diffusion model of this size stays on the unigram plateau far longer. Queries and
keys are RMS-normalised per head (QK-norm) in the presets: with pretraining's identity
start, short runs learn faster; long runs end the same (docs/RESULTS.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    vocab_size: int = 66  # input symbols: characters + [MASK] (+ [CLS] for the judge)
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    rope_base: float = 10000.0
    # exact GELU: much faster than the tanh approximation on CPU (docs/RESULTS.md);
    # checkpoints written before this field existed used "gelu_tanh"
    activation: str = "gelu_tanh"
    # RMS-normalised queries and keys, so attention logits are at most attn_scale x head size;
    # off for checkpoints written before this field existed
    qk_norm: bool = False
    attn_scale: Optional[float] = None  # None: 1/sqrt(head size)
    # each position attends only to itself and earlier ones (the autoregressive evaluation LM);
    # off for the diffusion generator and the judge
    causal: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**known)

    def validate(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError("head size must be even for rotary embeddings")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"model.activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.attn_scale is not None and not self.attn_scale > 0:
            raise ValueError(f"model.attn_scale must be positive (or null for 1/sqrt(head size)), got {self.attn_scale}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")


# Presets: tiny trains in seconds (tests), small is the CPU model, base the GPU one;
# QK-norm with attention logits capped at 12.8 (attn_scale x head size) in each.
PRESETS: dict[str, dict] = {
    "tiny": dict(block_size=32, n_layer=2, n_head=2, n_embd=32, activation="gelu", qk_norm=True, attn_scale=0.8),
    "small": dict(block_size=128, n_layer=4, n_head=4, n_embd=128, activation="gelu", qk_norm=True, attn_scale=0.4),
    "base": dict(block_size=256, n_layer=6, n_head=6, n_embd=384, activation="gelu", qk_norm=True, attn_scale=0.2),
}
ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def preset_config(name: str, vocab_size: int, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = ModelConfig(vocab_size=vocab_size, **{**PRESETS[name], **overrides})
    cfg.validate()
    return cfg


class Rotary(nn.Module):
    def __init__(self, head_dim: int, max_len: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, ..., D), positions on dim 1, contiguous in D (faster than the permuted
        # (B, H, T, D) view); rotates pairs (first half, second half)
        T = x.shape[1]
        shape = (T,) + (1,) * (x.dim() - 3) + (-1,)
        cos, sin = self.cos[:T].view(shape).to(x.dtype), self.sin[:T].view(shape).to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: Rotary):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.dropout = cfg.dropout
        self.rotary = rotary
        self.qk_norm = cfg.qk_norm
        self.scale = cfg.attn_scale
        self.causal = cfg.causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head)
        qk = qkv[:, :, :2]  # q and k in one pass
        if self.qk_norm:
            qk = F.rms_norm(qk, (qk.size(-1),))
        qk = self.rotary(qk)
        q, k, v = qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
        dropout = self.dropout if self.training else 0.0
        if torch.compiler.is_compiling() and x.device.type == "cpu" and dropout == 0.0:
            # inductor fuses the softmax of this explicit form into its own kernels; for short CPU
            # blocks that beats the flash kernel
            scale = self.scale if self.scale is not None else q.size(-1) ** -0.5
            att = (q @ k.transpose(-2, -1)) * scale
            if self.causal:
                future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
                att = att.masked_fill(future, float("-inf"))
            y = att.softmax(dim=-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=self.causal, scale=self.scale)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.act = ACTIVATIONS[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: Rotary):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = SelfAttention(cfg, rotary)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        if rows is not None:  # only these positions' outputs are wanted: (B, T, C) -> (N, C)
            x = x.flatten(0, 1)[rows]
        return x + self.mlp(self.ln_2(x))


class Trunk(nn.Module):
    """Token ids (B, T) -> hidden states (B, T, n_embd), every position sees every other."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        rotary = Rotary(cfg.n_embd // cfg.n_head, cfg.block_size + 1, cfg.rope_base)  # +1: judge's [CLS]
        self.blocks = nn.ModuleList(Block(cfg, rotary) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.apply(self._init_weights)
        for p in self.residual_projections():  # GPT-2 scaling
            nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def residual_projections(self) -> list[nn.Parameter]:
        """The attention and MLP output projections, which write into the residual stream."""
        return [p for name, p in self.named_parameters() if name.endswith("proj.weight")]

    @torch.no_grad()
    def zero_residual_projections(self) -> None:
        """Every block starts as the identity. Pretraining does this; a fresh model for
        tests keeps random projections, so that its output depends on context."""
        for p in self.residual_projections():
            p.zero_()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """rows: flat indices into the B*T positions whose states alone are returned, (N, n_embd);
        the last block's MLP then runs on those positions only (every position is still attended to)."""
        x = self.drop(self.wte(idx))
        for i, block in enumerate(self.blocks):
            x = block(x, rows if i == len(self.blocks) - 1 else None)
        return self.ln_f(x)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, out_dim: int, output_fraction: float = 1.0) -> float:
    """Matmul FLOPs of one forward pass per token (2 per multiply-add); output_fraction: the share
    of positions whose outputs are asked for (`rows`), which alone run the last MLP and the head."""
    C, L = cfg.n_embd, cfg.n_layer
    per_layer = 2 * (3 * C * C + C * C + 8 * C * C) + 2 * 2 * seq_len * C  # qkv, proj, mlp, attention
    return L * per_layer - (1 - output_fraction) * 2 * 8 * C * C + output_fraction * 2 * C * out_dim
