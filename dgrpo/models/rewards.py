"""Rewards behind one interface: a batch of samples -> one float each, higher is better.

Every reward is a RewardFunction. The judge actors call it on token ids, `fn(tokens (B, T), prompts (B, T))
-> (B,) float32`; `fn.score(texts, prompts)` is the same reward on decoded text, the interface a user's
reward implements (reward.kind python, PythonReward): a function `fn(texts, prompts) -> one float per text`,
or a class whose instances are such functions, named by import path `package.module:name`. A prompt is the
text the sampler started from, MASK_CHAR at the positions it filled in.

- JudgeReward: 1 - judge.score(tokens), the learned judge (higher = more real).
- EnsembleJudgeReward: several judges (different seeds) combined by their mean, mean - lambda * std
  or minimum (combine_member_rewards).
- CharFrequencyReward: fraction of positions holding any of the given characters.
- SubstringFrequencyReward: occurrences of a substring (overlapping) per possible start.
- RegexReward: number of regular-expression matches, per character (normalize) or raw.
- PythonReward: a user's function or class by import path (validated on load and on every call).

Select one by name with build_reward(cfg) (cfg.kind: judge | char_frequency | regex | python).
Call them through compute_rewards(fn, tokens), which rejects NaN, infinities and
wrong shapes with a clear ValueError instead of letting them become silent zeros;
compute_member_rewards(fn, tokens) also returns each member's rewards (one row for a
reward that is not an ensemble).
Pure torch: no Ray here.
One file, longer than most: every reward, its checks and its loading from an import path in the one place a
user reads to write their own.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from ..config import RewardConfig
from ..corpus import CharTokenizer, VocabularyError

MASK_CHAR = "\x00"  # a [MASK] decodes to NUL, never a corpus character: the positions a prompt leaves to the sampler
_DECODE_MASK = MASK_CHAR


class RewardError(ValueError):
    """A reward could not be loaded, or a call returned something other than one finite float per text."""


def _check_tokens(tokens, what: str) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor):
        tokens = torch.as_tensor(tokens)
    if tokens.dim() != 2:
        raise ValueError(f"{what} takes token ids of shape (batch, length), got shape {tuple(tokens.shape)}")
    if tokens.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError(f"{what} takes integer token ids, got dtype {tokens.dtype}")
    return tokens.long()


class RewardFunction:
    """Base class of every reward. `score(texts, prompts)` rates decoded texts; `fn(tokens, prompts)` rates
    token ids (B, T) (the prompts' ids: [MASK] where the sampler filled in) -> (B,) float32, by default by
    decoding them with `self.tokenizer` and calling score. Higher is better."""

    name: str = "reward"
    tokenizer: CharTokenizer | None = None
    wants_prompts: bool = False  # whether the judge actor should pass the prompts' ids

    def score(self, texts: list[str], prompts: list[str]) -> Sequence[float]:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, tokens: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        if self.tokenizer is None:
            raise ValueError(f"reward {self.name!r} scores text and needs a tokenizer to decode token ids")
        tokens = _check_tokens(tokens, f"reward {self.name!r}")
        texts = self.tokenizer.decode_batch(tokens.cpu(), mask_char=MASK_CHAR)
        if prompts is None:
            prompt_texts = [MASK_CHAR * tokens.shape[1]] * tokens.shape[0]
        else:
            prompt_texts = self.tokenizer.decode_batch(_check_tokens(prompts, "prompts").cpu(), mask_char=MASK_CHAR)
        return as_rewards(self.score(texts, prompt_texts), len(texts), self.name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def as_rewards(values, n: int, name: str) -> torch.Tensor:
    """`values` as a (n,) float32 tensor of finite numbers, else a one-line RewardError naming the reward."""
    where = f"reward {name}"
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu")
    elif not hasattr(values, "__len__") or isinstance(values, (str, bytes, dict)):
        raise RewardError(f"{where} returned {type(values).__name__}, not a sequence of {n} floats (one per text)")
    try:
        rewards = torch.as_tensor(values, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise RewardError(f"{where} returned values that are not numbers ({_one_line(e)}); return {n} floats, "
                          f"one per text") from None
    if rewards.dim() != 1 or rewards.shape[0] != n:
        got = f"{rewards.shape[0]} values" if rewards.dim() == 1 else f"shape {tuple(rewards.shape)}"
        raise RewardError(f"{where} returned {got} for {n} texts; return one float per text")
    bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
    if bad:
        shown = ", ".join(f"{i}: {float(rewards[i])}" for i in bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise RewardError(f"{where} returned {len(bad)} non-finite value(s) for {n} texts (row: value {shown}); "
                          f"return finite floats")
    return rewards.float()


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(e).__name__}: {text}" + (" ..." if len(lines) > 1 else "") if text else type(e).__name__


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

    def score(self, texts: list[str], prompts: list[str]) -> torch.Tensor:
        return self(_encode_texts(self.tokenizer, texts, self.name))

    def __call__(self, tokens: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        tokens = _check_tokens(tokens, "the judge reward")
        T = tokens.shape[1]
        if T != self.block_size:
            raise ValueError(f"the judge scores windows of exactly {self.block_size} characters (its training "
                             f"block), got {T}; generate/prompt windows of length {self.block_size} or train a "
                             f"judge for that length")
        return (1.0 - self.judge.score(tokens.to(self.device), self.autocast_dtype)).float().cpu()


ENSEMBLE_MODES = ("mean", "mean_minus_std", "min")


def judge_disagreement(batches) -> dict:
    """{"judge_disagreement": mean over samples of the sample std of the ensemble members' rewards} of scored
    batches, or {} when the reward is not an ensemble."""
    members = [b.member_rewards for b in batches if b.member_rewards.shape[0] >= 2]
    return {"judge_disagreement": float(torch.cat([member_std(m) for m in members]).mean())} if members else {}


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

    @property
    def tokenizer(self) -> CharTokenizer | None:
        return self.members[0].tokenizer

    def score(self, texts: list[str], prompts: list[str]) -> torch.Tensor:
        return self(_encode_texts(self.tokenizer, texts, self.name))

    def __call__(self, tokens: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
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
        self.chars, self.tokenizer = chars, tokenizer
        self.ids = torch.tensor(sorted({tokenizer.stoi[c] for c in chars}), dtype=torch.long)

    def score(self, texts: list[str], prompts: list[str]) -> list[float]:
        wanted = set(self.chars)
        return [sum(c in wanted for c in t) / len(t) if t else 0.0 for t in texts]

    def __call__(self, tokens: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
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
        self.substring, self.tokenizer = substring, tokenizer

    def score(self, texts: list[str], prompts: list[str]) -> list[float]:
        L = len(self.substring)
        return [sum(t.startswith(self.substring, i) for i in range(len(t) - L + 1)) / max(len(t) - L + 1, 1)
                for t in texts]

    def __call__(self, tokens: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
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

    def score(self, texts: list[str], prompts: list[str]) -> list[float]:
        counts = [float(sum(1 for _ in self.regex.finditer(t))) for t in texts]
        return [c / max(len(t), 1) for c, t in zip(counts, texts)] if self.normalize else counts


def _encode_texts(tokenizer: CharTokenizer | None, texts: list[str], name: str) -> torch.Tensor:
    if tokenizer is None:
        raise ValueError(f"reward {name!r} scores token ids; give it the judge's tokenizer to score texts")
    if len({len(t) for t in texts}) > 1:
        raise ValueError(f"reward {name!r} scores texts of one length, got lengths {sorted({len(t) for t in texts})}")
    return torch.stack([tokenizer.encode(t) for t in texts]) if texts else torch.zeros(0, 0, dtype=torch.long)


# -- rewards by import path (reward.kind python) ----------------------------------------------------------------

CALL_ARGS = (["text"], ["prompt"])  # what a reward is called with when its signature is checked


def add_python_path(paths) -> None:
    """Put `paths` (directories) first on sys.path, each once."""
    for entry in reversed([str(Path(p).expanduser().absolute()) for p in paths or ()]):
        if entry in sys.path:
            sys.path.remove(entry)
        sys.path.insert(0, entry)


def import_reward(spec: str, python_path=()):
    """The object `package.module:name` names, or a one-line RewardError saying why not. Searched: reward.python_path
    (first), the usual sys.path, then the working directory."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise RewardError(f"reward.function {spec!r} must look like package.module:name")
    add_python_path(python_path)
    if os.getcwd() not in sys.path:  # as Ray puts the driver's working directory on its workers' path
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        parts = module_name.split(".")
        if e.name in {".".join(parts[:i]) for i in range(1, len(parts) + 1)}:  # the module itself, not an import in it
            raise RewardError(f"reward.function {spec}: no module named {e.name!r} on the Python path; the module "
                              f"must be importable in the driver and in every judge actor: run from the directory "
                              f"that holds it, or add that directory to $PYTHONPATH or reward.python_path") from None
        raise RewardError(f"reward.function {spec}: importing {module_name} failed: {_one_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - the user's module raised while being imported
        raise RewardError(f"reward.function {spec}: importing {module_name} failed: {_one_line(e)}") from None
    target = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise RewardError(f"reward.function {spec}: {module_name} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise RewardError(f"reward.function {spec} is a {type(target).__name__}, not a function or class")
    return target


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _check_signature(fn, spec: str, what: str, *args, **kwargs) -> None:
    """fn can be called with `args` (the texts and the prompts, after self for a method) and `kwargs`."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin without a signature: the first call will tell
    try:
        signature.bind(*args, **kwargs)
    except TypeError as e:
        extra = "".join(f", {k}=..." for k in kwargs)
        raise RewardError(f"reward.function {spec}: {what}{signature} cannot be called as (texts, prompts{extra}) "
                          f"({e}); a reward takes the batch's texts and prompts and returns one float per text"
                          ) from None


def check_python_reward(spec: str, kwargs: dict | None = None, python_path=()) -> str:
    """Validate a Python reward without building it: importable, callable, and its signature takes
    (texts, prompts) (a class: its constructor takes reward.kwargs, its instances (texts, prompts)).
    Returns "function" or "class"; a RewardError names what is wrong."""
    kwargs = dict(kwargs or {})
    target = import_reward(spec, python_path)
    if inspect.isclass(target):
        extras = {k: None for k in ("tokenizer", "device") if k not in kwargs and _accepts(target, k)}
        init_kwargs = {**kwargs, **extras}
        try:
            inspect.signature(target).bind(**init_kwargs)
        except TypeError as e:
            raise RewardError(f"reward.function {spec}: {target.__name__}{inspect.signature(target)} cannot be built "
                              f"with reward.kwargs {sorted(kwargs)}: {e}") from None
        except ValueError:
            pass
        method = target.score if issubclass(target, RewardFunction) else getattr(target, "__call__", None)
        if method is None or method is object.__call__:
            raise RewardError(f"reward.function {spec}: instances of {target.__name__} are not callable; give the "
                              f"class a __call__(self, texts, prompts) returning one float per text")
        _check_signature(method, spec, f"{target.__name__}.{method.__name__}", None, *CALL_ARGS)
        return "class"
    _check_signature(target, spec, getattr(target, "__name__", "the function"), *CALL_ARGS, **kwargs)
    return "function"


class PythonReward(RewardFunction):
    """A user's reward named by import path (reward.kind python): a function called as fn(texts, prompts,
    **kwargs), or a class built once (here: once per judge actor) as cls(**kwargs), plus `tokenizer` and
    `device` when its constructor takes them, whose instances are called as obj(texts, prompts). Every call is
    checked: one finite float per text, else a one-line RewardError naming the function."""

    wants_prompts = True

    def __init__(self, spec: str, kwargs: dict | None = None, tokenizer: CharTokenizer | None = None,
                 device: torch.device | str = "cpu", python_path=()):
        self.name, self.tokenizer = spec, tokenizer
        kind = check_python_reward(spec, kwargs, python_path)
        target = import_reward(spec, python_path)
        kwargs = dict(kwargs or {})
        if kind == "class":
            extras = {k: v for k, v in (("tokenizer", tokenizer), ("device", device))
                      if k not in kwargs and _accepts(target, k)}
            try:
                instance = target(**kwargs, **extras)
            except Exception as e:  # noqa: BLE001 - the user's constructor
                raise RewardError(f"reward {spec}: building {target.__name__}(**reward.kwargs) raised "
                                  f"{_one_line(e)}") from None
            self.fn, self.call_kwargs = (instance.score if isinstance(instance, RewardFunction) else instance), {}
        else:
            self.fn, self.call_kwargs = target, kwargs

    def score(self, texts: list[str], prompts: list[str]) -> torch.Tensor:
        try:
            values = self.fn(list(texts), list(prompts), **self.call_kwargs)
        except Exception as e:  # noqa: BLE001 - the user's reward
            raise RewardError(f"reward {self.name} raised {_one_line(e)} on a batch of {len(texts)} texts") from None
        return as_rewards(values, len(texts), self.name)


REWARD_KINDS = ("judge", "char_frequency", "regex", "python")


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
    if cfg.kind == "python":
        return PythonReward(cfg.function, cfg.kwargs, tokenizer=tokenizer, device=device,
                            python_path=getattr(cfg, "python_path", ()))
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


def compute_rewards(fn: RewardFunction, tokens: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
    """fn(tokens) (fn(tokens, prompts) with prompts), checked: shape (B,) and every value finite, else ValueError
    naming the reward. float32."""
    B = int(tokens.shape[0])
    rewards = fn(tokens) if prompts is None else fn(tokens, prompts)
    try:
        validate_rewards(rewards, B)
    except ValueError as e:
        raise ValueError(f"reward {getattr(fn, 'name', type(fn).__name__)!r}: {e}") from None
    return torch.as_tensor(rewards).detach().to(dtype=torch.float32, device="cpu")


def compute_member_rewards(fn: RewardFunction, tokens: torch.Tensor,
                           prompts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards (B,), member rewards (M, B)), float32 on the CPU, each member checked as compute_rewards checks.
    A reward that is not an ensemble is its own single member."""
    if not isinstance(fn, EnsembleJudgeReward):
        rewards = compute_rewards(fn, tokens, prompts)
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
