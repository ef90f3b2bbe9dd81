"""Messages exchanged between the learner, rollout workers and judges.

Plain dataclasses: tensors are torch tensors in memory and travel as
dtype + shape + raw bytes (see codec.py). Weight snapshots hold numpy arrays
so Ray's object store can share them between processes without a copy.

Nothing here imports Ray; these classes are the contract between the actors,
and `validate()` is what a receiver calls before trusting a batch.
"""

from __future__ import annotations

import typing
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import RevealOrder

REVEAL_ORDERS = typing.get_args(RevealOrder)

SCHEMA_VERSION = 6
"""The wire version this build writes. It reads every version from 1 up: a field added by a later
version carries `metadata={"since": version}` and takes its default in messages of older versions.

    2: ScoredBatch.member_rewards (the rewards of each judge of an ensemble) and
       ScoredBatch.judge_version (the judge weights that scored it: 0 = the judge checkpoint, n = n-th refresh)
    3: RolloutRequest.measure_kl and RolloutBatch.kl_to_reference (the KL of each sample's sampling process to
       the run's starting generator, measured by the sampler for held-out evaluations)
    4: RolloutBatch.order, .random_reveal, .reveal_temperature, .selection and .reveal_rank (the reveal rule, each
       step's log-probability of its choice of positions and the order of its reveals, which the learner's replay
       needs to be exact under the confidence rules)
    5: RolloutRequest.reference_terms and .replay_steps, RolloutBatch.replay_mask, .reference_logprobs and
       .reference_selection (grpo.reference_on=rollout: the worker replays the reference on the rows it chose)
    6: RolloutBatch.reveal_threshold (confidence order's threshold, 0 = off)
"""


def _fmt_rows(rows: torch.Tensor, limit: int = 8) -> str:
    rows = rows.flatten().tolist()
    shown = ", ".join(str(r) for r in rows[:limit])
    return f"[{shown}{', ...' if len(rows) > limit else ''}]"


def _check_tensor(name: str, t: object, dtype: torch.dtype, shape: tuple[int, ...] | None = None,
                  ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype}, got {t.dtype}; convert it with .to({dtype})")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


@dataclass(eq=False)
class RolloutRequest:
    """Learner -> worker: fill the [MASK] positions of each prompt `group_size` times."""

    SCHEMA = "rollout_request"

    request_id: int  # unique per run, used to deduplicate
    prompts: torch.Tensor  # (G, T) long, [MASK] at positions to fill; one row per group
    group_size: int  # k samples per prompt
    seed: int  # sampler seed for this request
    min_version: int = 0  # worker must hold at least this policy version
    # also measure each sample's KL to the run's starting generator (held-out evaluations)
    measure_kl: bool = field(default=False, metadata={"since": 3})
    # also replay the reference on `replay_steps` steps per sample (0: every step), rows drawn from `seed`
    # (grpo.reference_on=rollout): the learner then replays only the policy
    reference_terms: bool = field(default=False, metadata={"since": 5})
    replay_steps: int = field(default=0, metadata={"since": 5})


@dataclass(eq=False)
class RolloutBatch:
    """Worker -> judge/learner: G*k sampled completions plus their trajectories."""

    SCHEMA = "rollout_batch"

    request_id: int
    tokens: torch.Tensor  # (G*k, T) long
    reveal_step: torch.Tensor  # (G*k, T) long, -1 at prompt positions
    logprobs: torch.Tensor  # (G*k, T) float32 behaviour log-probs, 0 at prompt positions
    group_index: torch.Tensor  # (G*k,) long, group of each row (0..G-1 within this batch)
    policy_version: int
    worker_id: int
    steps: int  # sampler steps S
    temperature: float
    top_k: int
    top_p: float
    timings: dict[str, float] = field(default_factory=dict)  # e.g. {"generate_s": ...}
    # (G*k,) float64 KL(policy || starting generator) of each sample's sampling process (sampler.py), when the
    # request asked for it; empty otherwise
    kl_to_reference: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64),
                                          metadata={"since": 3})
    # the reveal rule (sampler.py); older messages were replayed without selection terms, as random order is
    order: str = field(default="random", metadata={"since": 4})
    random_reveal: float = field(default=0.0, metadata={"since": 4})
    reveal_temperature: float = field(default=1.0, metadata={"since": 4})
    reveal_threshold: float = field(default=0.0, metadata={"since": 6})  # 0: off
    # (G*k, steps) float32 log-probability of each step's choice of positions given its tokens; empty in older
    # messages (then 0: exact under random order, where it does not depend on the model)
    selection: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.float32),
                                    metadata={"since": 4})
    # (G*k, T) long order of each position among its step's reveals (0 first), -1 at prompt positions; the
    # gumbel_confidence rule's replay needs it, other rules may leave it empty
    reveal_rank: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.long),
                                      metadata={"since": 4})
    # when the request asked for reference terms: (G*k, steps) bool the (sample, step) rows the learner must
    # replay, and the reference's (G*k, T) float32 log-probs of the tokens of those rows (0 elsewhere) and
    # (G*k, steps) float32 selection terms (0 off the rows); empty otherwise
    replay_mask: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.bool),
                                      metadata={"since": 5})
    reference_logprobs: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.float32),
                                             metadata={"since": 5})
    reference_selection: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.float32),
                                              metadata={"since": 5})

    @property
    def num_samples(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_groups(self) -> int:
        return int(self.group_index.max()) + 1 if self.group_index.numel() else 0

    @property
    def has_reference_terms(self) -> bool:
        return bool(self.replay_mask.numel() or self.reference_logprobs.numel() or self.reference_selection.numel())

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        _check_tensor("RolloutBatch.tokens", self.tokens, torch.long, ndim=2)
        shape = tuple(self.tokens.shape)
        _check_tensor("RolloutBatch.reveal_step", self.reveal_step, torch.long, shape)
        _check_tensor("RolloutBatch.logprobs", self.logprobs, torch.float32, shape)
        _check_tensor("RolloutBatch.group_index", self.group_index, torch.long, (shape[0],))
        if self.steps < 1:
            raise ValueError(f"RolloutBatch.steps must be >= 1, got {self.steps}")
        bad = ((self.reveal_step < -1) | (self.reveal_step >= self.steps)).any(dim=1)
        if bool(bad.any()):
            raise ValueError(f"RolloutBatch.reveal_step must lie in [-1, steps={self.steps}); "
                             f"out of range at rows {_fmt_rows(bad.nonzero())}")
        bad = ~torch.isfinite(self.logprobs).all(dim=1)
        if bool(bad.any()):
            raise ValueError(f"RolloutBatch.logprobs has NaN/inf at rows {_fmt_rows(bad.nonzero())}")
        if self.kl_to_reference.numel():
            _check_tensor("RolloutBatch.kl_to_reference", self.kl_to_reference, torch.float64, (shape[0],))
        if self.order not in REVEAL_ORDERS:
            raise ValueError(f"RolloutBatch.order must be one of {REVEAL_ORDERS}, got {self.order!r}")
        if not 0 <= self.random_reveal < 1:
            raise ValueError(f"RolloutBatch.random_reveal must be in [0, 1), got {self.random_reveal}")
        if not self.reveal_temperature > 0:
            raise ValueError(f"RolloutBatch.reveal_temperature must be > 0, got {self.reveal_temperature}")
        if not 0 <= self.reveal_threshold <= 1 or (self.reveal_threshold and self.order != "confidence"):
            raise ValueError(f"RolloutBatch.reveal_threshold must be 0 (off) or in (0, 1] under confidence order, got "
                             f"{self.reveal_threshold} with order {self.order!r}")
        if self.selection.numel() or self.order != "random":
            _check_tensor("RolloutBatch.selection", self.selection, torch.float32, (shape[0], self.steps))
            bad = ~torch.isfinite(self.selection).all(dim=1)
            if bool(bad.any()):
                raise ValueError(f"RolloutBatch.selection has NaN/inf at rows {_fmt_rows(bad.nonzero())}")
        if self.reveal_rank.numel() or self.order == "gumbel_confidence":
            _check_tensor("RolloutBatch.reveal_rank", self.reveal_rank, torch.long, shape)
            bad = ((self.reveal_rank < 0) != (self.reveal_step < 0)).any(dim=1) | (self.reveal_rank >= shape[1]).any(1)
            if bool(bad.any()):
                raise ValueError(f"RolloutBatch.reveal_rank must be -1 exactly at prompt positions and below the "
                                 f"length elsewhere; not so at rows {_fmt_rows(bad.nonzero())}")
        if self.has_reference_terms:
            _check_tensor("RolloutBatch.replay_mask", self.replay_mask, torch.bool, (shape[0], self.steps))
            _check_tensor("RolloutBatch.reference_logprobs", self.reference_logprobs, torch.float32, shape)
            _check_tensor("RolloutBatch.reference_selection", self.reference_selection, torch.float32,
                          (shape[0], self.steps))
            revealed = (self.reveal_step[:, None, :] == torch.arange(self.steps)[None, :, None]).any(-1)
            bad = (self.replay_mask & ~revealed).any(1)
            if bool(bad.any()):
                raise ValueError(f"RolloutBatch.replay_mask marks steps that revealed nothing at rows "
                                 f"{_fmt_rows(bad.nonzero())}")
            bad = ~(torch.isfinite(self.reference_logprobs).all(1) & torch.isfinite(self.reference_selection).all(1))
            if bool(bad.any()):
                raise ValueError(f"RolloutBatch.reference_logprobs/selection have NaN/inf at rows "
                                 f"{_fmt_rows(bad.nonzero())}")
        if self.num_samples == 0:
            return
        g = self.group_index
        if int(g.min()) < 0:
            raise ValueError(f"RolloutBatch.group_index must be >= 0, got min {int(g.min())}")
        counts = torch.bincount(g)
        if bool((counts == 0).any()):
            missing = (counts == 0).nonzero().flatten()
            raise ValueError(f"RolloutBatch.group_index must use every group 0..{len(counts) - 1}; "
                             f"groups {_fmt_rows(missing)} have no rows")
        if bool((counts != counts[0]).any()):
            raise ValueError(f"RolloutBatch.group_index must give every group the same number of rows "
                             f"(G*k layout), got counts {counts.tolist()}")


@dataclass(eq=False)
class ScoredBatch:
    """Judge -> learner: a rollout batch with one scalar reward per sample."""

    SCHEMA = "scored_batch"

    rollout: RolloutBatch
    rewards: torch.Tensor  # (G*k,) float32
    judge_id: int
    timings: dict[str, float] = field(default_factory=dict)
    # the judge weights that scored it: 0 = reward.judge_checkpoint, n = n-th refresh
    judge_version: int = field(default=0, metadata={"since": 2})
    # (M, G*k) float32: the reward of each of the M members the reward combines (one row unless an
    # ensemble); empty in batches of schema version 1, which did not record it
    member_rewards: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0), metadata={"since": 2})

    @property
    def num_samples(self) -> int:
        return self.rollout.num_samples

    def validate(self) -> None:
        self.rollout.validate()
        _check_tensor("ScoredBatch.rewards", self.rewards, torch.float32, (self.num_samples,))
        if self.member_rewards.numel():
            _check_tensor("ScoredBatch.member_rewards", self.member_rewards, torch.float32,
                          (self.member_rewards.shape[0], self.num_samples))
            if not bool(torch.isfinite(self.member_rewards).all()):
                raise ValueError(f"ScoredBatch.member_rewards has NaN/inf (judge {self.judge_id}, request "
                                 f"{self.rollout.request_id})")
        bad = ~torch.isfinite(self.rewards)
        if bool(bad.any()):
            raise ValueError(f"reward returned NaN/inf at rows {_fmt_rows(bad.nonzero())} "
                             f"(judge {self.judge_id}, request {self.rollout.request_id}); "
                             "fix the reward function or clamp its output")


def _wire_dtype(t: torch.Tensor) -> torch.dtype:
    if t.is_floating_point():
        return torch.float32
    if t.dtype == torch.bool:
        return torch.bool
    if t.is_complex():
        raise ValueError(f"cannot snapshot complex tensor of dtype {t.dtype}")
    return torch.long


@dataclass(eq=False)
class WeightSnapshot:
    """Learner -> workers: the policy's state_dict as CPU numpy arrays.

    Floating tensors are stored as float32 (numpy has no bfloat16), integer
    tensors as int64 and bool tensors as bool.
    """

    SCHEMA = "weight_snapshot"

    version: int
    tensors: dict[str, np.ndarray]

    @classmethod
    def from_module(cls, module: torch.nn.Module, version: int) -> "WeightSnapshot":
        tensors = {}
        for name, t in module.state_dict().items():
            copy = t.detach().to("cpu", dtype=_wire_dtype(t), copy=True).contiguous()
            tensors[name] = copy.numpy()
        return cls(version=version, tensors=tensors)

    def load_into(self, module: torch.nn.Module) -> None:
        """Strictly load into `module`, casting to each parameter's dtype and device."""
        own = module.state_dict()
        missing = sorted(set(own) - set(self.tensors))
        unexpected = sorted(set(self.tensors) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"weight snapshot v{self.version} does not match the model: missing keys {missing}, "
                f"unexpected keys {unexpected}; build the worker's model from the same config as the learner's")
        mismatched = [f"{k}: snapshot {tuple(self.tensors[k].shape)} vs model {tuple(own[k].shape)}"
                      for k in own if tuple(self.tensors[k].shape) != tuple(own[k].shape)]
        if mismatched:
            raise ValueError(f"weight snapshot v{self.version} has shape mismatches ({'; '.join(mismatched)}); "
                             "build the worker's model from the same config as the learner's")
        state = {}
        with warnings.catch_warnings():
            # Arrays coming out of Ray's object store are read-only; we only read them.
            warnings.simplefilter("ignore", UserWarning)
            for k, target in own.items():
                state[k] = torch.from_numpy(self.tensors[k]).to(device=target.device, dtype=target.dtype)
        module.load_state_dict(state, strict=True)

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.tensors.values()))


@dataclass
class MetricsRecord:
    """Learner -> metrics sinks: one training step's scalars."""

    SCHEMA = "metrics_record"

    step: int
    policy_version: int
    wall_time: float
    metrics: dict[str, float] = field(default_factory=dict)


MESSAGE_TYPES: tuple[type, ...] = (RolloutRequest, RolloutBatch, ScoredBatch, WeightSnapshot, MetricsRecord)
