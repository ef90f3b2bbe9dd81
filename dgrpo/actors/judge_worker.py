"""JudgeWorker: scores rollout batches with the learned judge, an ensemble of judges, or a programmatic reward.

A reward named by import path (reward.kind python) is built here, once per judge actor, with the actor's
resources (its device is the actor's GPU when it has one). With judge refresh the driver sends new judge
weights (`set_judge`); every scored batch records the judge version that scored it (0: reward.judge_checkpoint
as loaded).
"""

from __future__ import annotations

import time

import torch

from ..config import RewardConfig
from ..corpus import CharTokenizer
from ..models.rewards import JudgeReward, RewardError, build_reward, compute_member_rewards
from ..precision import describe_precision, pick_device, resolve_precision
from ..protocols import RolloutBatch, ScoredBatch, WeightSnapshot
from .references import LOST, Receipt, fetch
from .telemetry import ActorTelemetry, placement


def prompt_tokens(batch: RolloutBatch, mask_id: int) -> torch.Tensor:
    """(B, T) the prompts the batch was sampled from: its tokens where reveal_step is -1, [MASK] elsewhere."""
    return batch.tokens.masked_fill(batch.reveal_step >= 0, mask_id)


class JudgeWorker:
    def __init__(self, judge_id: int, reward_cfg: RewardConfig, vocab: dict, torch_threads: int = 1,
                 metrics: bool = False, precision: str = "fp32"):
        torch.set_num_threads(torch_threads)
        self.judge_id = judge_id
        self.device = pick_device()
        self.tokenizer = CharTokenizer.from_dict(vocab)
        self.reward_error = None
        try:
            self.reward_fn = build_reward(reward_cfg, self.tokenizer, device=self.device,
                                          autocast_dtype=resolve_precision(precision, self.device))
        except RewardError as e:  # told with the first score call: one line, where an actor's start-up error is not
            self.reward_fn, self.reward_error = None, e
        self.precision = describe_precision(precision, self.device)
        if reward_cfg.kind == "judge":
            print(f"precision: judge {judge_id}: {self.precision}", flush=True)
        self.telemetry = ActorTelemetry("judge", str(judge_id), enabled=metrics)
        self.judge_version = 0

    def set_judge(self, snapshot: WeightSnapshot) -> dict:
        """Load a judge version published by the judge trainer (the same object for every judge actor)."""
        if not isinstance(self.reward_fn, JudgeReward):
            raise ValueError(f"set_judge needs the learned judge reward, this actor scores with "
                             f"{getattr(self.reward_fn, 'name', None)!r}")
        t0 = time.perf_counter()
        snapshot.load_into(self.reward_fn.judge)
        self.judge_version = snapshot.version
        return {"judge_id": self.judge_id, "version": self.judge_version, "load_s": time.perf_counter() - t0}

    def score_by_ref(self, refs: list) -> tuple:
        """score the batches of `refs`, for the driver's calls with num_returns=len(refs)+1: the scored batches
        stay in the object store, and the answer is their receipts, in order. A batch lost with its node
        scores as None with the receipt LOST."""
        batches, lost = fetch(refs)
        batches = iter(batches)
        scored = [None if i in lost else self.score(next(batches)) for i in range(len(refs))]
        return (*scored, [LOST if s is None else Receipt.of(s) for s in scored])

    def score(self, batch: RolloutBatch) -> ScoredBatch:
        if self.reward_error is not None:
            raise self.reward_error
        t0 = time.perf_counter()
        prompts = prompt_tokens(batch, self.tokenizer.mask_id) if getattr(self.reward_fn, "wants_prompts", False) \
            else None
        rewards, members = compute_member_rewards(self.reward_fn, batch.tokens.to(self.device), prompts)
        score_s = time.perf_counter() - t0
        self.telemetry.observe_judge(samples=batch.num_samples, seconds=score_s)
        return ScoredBatch(rollout=batch, rewards=rewards.float(), judge_id=self.judge_id,
                           timings={"score_s": score_s}, judge_version=self.judge_version, member_rewards=members)

    def info(self) -> dict:
        return {"judge_id": self.judge_id, **placement(), "device": str(self.device), "precision": self.precision,
                "reward": getattr(self.reward_fn, "name", None), "judge_version": self.judge_version}
