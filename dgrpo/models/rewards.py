"""Reward functions behind one interface: tokens (B, T) long -> rewards (B,) float32, higher is better.

- JudgeReward: 1 - judge.score(tokens), the learned judge (higher = more real).
- EnsembleJudgeReward: several judges (different seeds) combined by their mean, mean - lambda * std
  or minimum (combine_member_rewards).
- CharFrequencyReward: fraction of positions holding any of the given characters.
- SubstringFrequencyReward: occurrences of a substring (overlapping) per possible start.
- RegexReward: number of regular-expression matches, per character (normalize) or raw.

Select one by name with build_reward(cfg) (cfg.kind: judge | char_frequency | regex).
Call them through compute_rewards(fn, tokens), which rejects NaN, infinities and
wrong shapes with a clear ValueError instead of letting them become silent zeros;
compute_member_rewards(fn, tokens) also returns each member's rewards (one row for a
reward that is not an ensemble).
Pure torch: no Ray here.
"""

from __future__ import annotations

import math
import re

import torch

from ..config import RewardConfig
from ..corpus import CharTokenizer, VocabularyError

_DECODE_MASK = "\x00"  # a [MASK] left in a sequence decodes to NUL, never to a corpus character


def _check_tokens(tokens, what: str) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor):
        tokens = torch.as_tensor(tokens)
    if tokens.dim() != 2:
        raise ValueError(f"{what} takes token ids of shape (batch, length), got shape {tuple(tokens.shape)}")
    if tokens.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError(f"{what} takes integer token ids, got dtype {tokens.dtype}")
    return tokens.long()


class RewardFunction:
    """Base class: `fn(tokens (B, T) long) -> (B,) float32`, higher is better."""

    name: str = "reward"

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class JudgeReward(RewardFunction):
    """reward = 1 - judge.score(tokens): higher means the judge finds the text more real.

    The judge was trained on windows of exactly its block size, so other lengths are an error.
    """

    name = "judge"

    def __init__(self, judge, tokenizer: CharTokenizer | None = None, device: torch.device | str = "cpu",
                 autocast_dtype: torch.dtype | None = None):
        self.judge = judge.to(device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype

    @classmethod
    def from_checkpoint(cls, path, tokenizer: CharTokenizer | None = None, device: torch.device | str = "cpu",
                        autocast_dtype: torch.dtype | None = None) -> "JudgeReward":
        from .judge import load_judge
        judge, judge_tok, _ = load_judge(path, tokenizer=tokenizer, device=device)
        return cls(judge, judge_tok, device, autocast_dtype)

    @property
    def block_size(self) -> int:
        return self.judge.cfg.block_size

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = _check_tokens(tokens, "the judge reward")
        T = tokens.shape[1]
        if T != self.block_size:
            raise ValueError(f"the judge scores windows of exactly {self.block_size} characters (its training "
                             f"block), got {T}; generate/prompt windows of length {self.block_size} or train a "
                             f"judge for that length")
        return (1.0 - self.judge.score(tokens.to(self.device), self.autocast_dtype)).float().cpu()


ENSEMBLE_MODES = ("mean", "mean_minus_std", "min")


def member_std(members: torch.Tensor) -> torch.Tensor:
    """(M, B) -> (B,) sample standard deviation over the M members (divisor M - 1).

    The members are a sample from the judges one could have trained (one per seed); their spread
    estimates that distribution's, which is the judge's uncertainty about a text. The sample std
    estimates it without the population std's shrinkage by sqrt((M - 1) / M), which is large for the
    few members an ensemble has (0.71 at M = 2), so lambda means the same for any M.
    """
    if members.dim() != 2 or members.shape[0] < 2:
        raise ValueError(f"the spread of an ensemble needs (M >= 2, B) member rewards, got shape "
                         f"{tuple(members.shape)}")
    return members.std(dim=0, unbiased=True)


def combine_member_rewards(members: torch.Tensor, mode: str = "mean", std_coef: float = 1.0) -> torch.Tensor:
    """(M, B) rewards of M judges -> (B,): their mean, mean - std_coef * sample std (uncertainty-weighted),
    or their minimum (worst case)."""
    if mode not in ENSEMBLE_MODES:
        raise ValueError(f"unknown ensemble mode {mode!r}; choose one of {', '.join(ENSEMBLE_MODES)}")
    if members.dim() != 2 or members.shape[0] < 1:
        raise ValueError(f"member rewards must have shape (M, B) with M >= 1, got {tuple(members.shape)}")
    if mode == "min":
        return members.min(dim=0).values
    mean = members.mean(dim=0)
    if mode == "mean_minus_std":
        return mean - std_coef * member_std(members)
    return mean


class EnsembleJudgeReward(RewardFunction):
    """Several judges of one vocabulary and window length; each scores the whole batch (one batched
    call per member), and their rewards combine by combine_member_rewards."""

    name = "judge_ensemble"

    def __init__(self, members: list[JudgeReward], mode: str = "mean", std_coef: float = 1.0):
        if len(members) < 2:
            raise ValueError(f"a judge ensemble needs at least two judges, got {len(members)}")
        if mode not in ENSEMBLE_MODES:
            raise ValueError(f"unknown ensemble mode {mode!r}; choose one of {', '.join(ENSEMBLE_MODES)}")
        first = members[0]
        for i, m in enumerate(members[1:], start=1):
            if m.block_size != first.block_size:
                raise ValueError(f"ensemble member {i} scores windows of {m.block_size} characters, member 0 of "
                                 f"{first.block_size}; train every member for the same window length")
            if m.judge.cfg.vocab_size != first.judge.cfg.vocab_size:
                raise VocabularyError(f"ensemble member {i} has {m.judge.n_chars} characters, member 0 has "
                                      f"{first.judge.n_chars}; train every member on the same corpus")
            if m.tokenizer is not None and first.tokenizer is not None:
                m.tokenizer.check_same(first.tokenizer, f"ensemble member {i} vs member 0")
        self.members, self.mode, self.std_coef = list(members), mode, float(std_coef)

    @classmethod
    def from_checkpoints(cls, paths: list[str], mode: str = "mean", std_coef: float = 1.0,
                         tokenizer: CharTokenizer | None = None, device: torch.device | str = "cpu",
                         autocast_dtype: torch.dtype | None = None) -> "EnsembleJudgeReward":
        return cls([JudgeReward.from_checkpoint(p, tokenizer, device, autocast_dtype) for p in paths], mode, std_coef)

    @property
    def block_size(self) -> int:
        return self.members[0].block_size

    def member_rewards(self, tokens: torch.Tensor) -> torch.Tensor:
        """(M, B): each member's rewards of the batch."""
        return torch.stack([m(tokens) for m in self.members])

    def combine(self, members: torch.Tensor) -> torch.Tensor:
        """(M, B) member rewards -> (B,) the ensemble's reward."""
        return combine_member_rewards(members, self.mode, self.std_coef)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.combine(self.member_rewards(tokens))


class CharFrequencyReward(RewardFunction):
    """Fraction of positions (of T) whose character is any of `chars`. [MASK] never counts."""

    name = "char_frequency"

    def __init__(self, tokenizer: CharTokenizer, chars: str):
        if not chars:
            raise ValueError("char_frequency reward needs at least one character (reward.chars)")
        missing = sorted(set(chars) - set(tokenizer.chars))
        if missing:
            raise VocabularyError(f"reward.chars {chars!r}: character(s) {missing} are not in the corpus "
                                  f"vocabulary of {tokenizer.n_chars} characters, so the reward could never "
                                  f"be earned; choose characters that occur in the corpus")
        self.chars = chars
        self.ids = torch.tensor(sorted({tokenizer.stoi[c] for c in chars}), dtype=torch.long)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = _check_tokens(tokens, "the char_frequency reward")
        if tokens.shape[1] == 0:
            raise ValueError("the char_frequency reward needs sequences of length >= 1")
        hit = torch.isin(tokens, self.ids.to(tokens.device))
        return hit.float().mean(dim=1).cpu()


class SubstringFrequencyReward(RewardFunction):
    """Occurrences of `substring` (overlapping) divided by the number of possible starts T - len + 1."""

    name = "substring_frequency"

    def __init__(self, tokenizer: CharTokenizer, substring: str):
        if not substring:
            raise ValueError("substring_frequency reward needs a non-empty substring")
        try:
            self.ids = tokenizer.encode(substring)
        except VocabularyError as e:
            raise VocabularyError(f"substring {substring!r}: {e}") from None
        self.substring = substring

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = _check_tokens(tokens, "the substring_frequency reward")
        L = len(self.ids)
        if tokens.shape[1] < L:
            raise ValueError(f"sequences of length {tokens.shape[1]} are shorter than the substring "
                             f"{self.substring!r}")
        windows = tokens.unfold(1, L, 1)  # (B, T - L + 1, L)
        hits = (windows == self.ids.to(tokens.device)).all(dim=-1)
        return hits.float().mean(dim=1).cpu()


class RegexReward(RewardFunction):
    """Number of non-overlapping matches of `pattern` (re.finditer), divided by the text length if normalize."""

    name = "regex"

    def __init__(self, tokenizer: CharTokenizer, pattern: str, normalize: bool = True):
        try:
            self.regex = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"reward pattern {pattern!r} is not a valid regular expression: {e}") from None
        self.tokenizer = tokenizer
        self.pattern = pattern
        self.normalize = normalize

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = _check_tokens(tokens, "the regex reward")
        texts = self.tokenizer.decode_batch(tokens.cpu(), mask_char=_DECODE_MASK)
        counts = torch.tensor([sum(1 for _ in self.regex.finditer(t)) for t in texts], dtype=torch.float32)
        if self.normalize:
            counts = counts / max(tokens.shape[1], 1)
        return counts


REWARD_KINDS = ("judge", "char_frequency", "regex")


def build_reward(cfg: RewardConfig, tokenizer: CharTokenizer, device: torch.device | str = "cpu",
                 autocast_dtype: torch.dtype | None = None) -> RewardFunction:
    """The reward `cfg.kind` names, built from the fields of that kind."""
    if cfg.kind == "judge":
        members = getattr(cfg, "judge_checkpoints", None)
        if members:
            return EnsembleJudgeReward.from_checkpoints(members, cfg.ensemble, cfg.ensemble_std_coef,
                                                        tokenizer=tokenizer, device=device,
                                                        autocast_dtype=autocast_dtype)
        if not cfg.judge_checkpoint:
            raise ValueError("reward.kind 'judge' needs reward.judge_checkpoint (a `dgrpo judge train --out` "
                             "directory)")
        return JudgeReward.from_checkpoint(cfg.judge_checkpoint, tokenizer=tokenizer, device=device,
                                           autocast_dtype=autocast_dtype)
    if cfg.kind == "char_frequency":
        return CharFrequencyReward(tokenizer, cfg.chars)
    if cfg.kind == "regex":
        return RegexReward(tokenizer, cfg.pattern, cfg.normalize)
    raise ValueError(f"unknown reward kind {cfg.kind!r}; choose one of {', '.join(REWARD_KINDS)}")


def validate_rewards(rewards: torch.Tensor, n: int) -> None:
    """Raise ValueError unless ``rewards`` has shape (n,) and every entry is finite.

    The message names the offending rows (the first 20) and says the reward
    function must return n finite floats.
    """
    need = f"the reward function must return {n} finite floats (shape ({n},))"
    if not isinstance(rewards, torch.Tensor):
        try:
            rewards = torch.as_tensor(rewards)
        except Exception as exc:  # noqa: BLE001 - re-raised as ValueError with context
            raise ValueError(f"{need}; got an object of type {type(rewards).__name__}") from exc
    if tuple(rewards.shape) != (n,):
        raise ValueError(f"{need}; got shape {tuple(rewards.shape)}")
    if rewards.dtype.is_complex:
        raise ValueError(f"{need}; got complex dtype {rewards.dtype}")
    if rewards.is_floating_point():
        bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
        if bad:
            shown = bad[:20]
            more = f" and {len(bad) - 20} more" if len(bad) > 20 else ""
            values = ", ".join(_fmt(float(rewards[i])) for i in shown)
            raise ValueError(f"{need}; non-finite rewards at rows {shown}{more} "
                             f"(values: {values})")


def _fmt(v: float) -> str:
    if math.isnan(v):
        return "nan"
    return "inf" if v > 0 else "-inf"


def compute_rewards(fn: RewardFunction, tokens: torch.Tensor) -> torch.Tensor:
    """fn(tokens), checked: shape (B,) and every value finite, else ValueError naming the reward. float32."""
    B = int(tokens.shape[0])
    rewards = fn(tokens)
    try:
        validate_rewards(rewards, B)
    except ValueError as e:
        raise ValueError(f"reward {getattr(fn, 'name', type(fn).__name__)!r}: {e}") from None
    return torch.as_tensor(rewards).detach().to(dtype=torch.float32, device="cpu")


def compute_member_rewards(fn: RewardFunction, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards (B,), member rewards (M, B)), float32 on the CPU, each member checked as compute_rewards checks.
    A reward that is not an ensemble is its own single member."""
    if not isinstance(fn, EnsembleJudgeReward):
        rewards = compute_rewards(fn, tokens)
        return rewards, rewards[None].clone()
    B = int(tokens.shape[0])
    members = fn.member_rewards(tokens)
    for i, row in enumerate(members):
        try:
            validate_rewards(row, B)
        except ValueError as e:
            raise ValueError(f"reward {fn.name!r}, member {i}: {e}") from None
    members = members.detach().to(dtype=torch.float32, device="cpu")
    return fn.combine(members), members
