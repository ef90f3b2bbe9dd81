"""JudgeWorker: scores rollout batches with the learned judge, an ensemble of judges, or a programmatic reward."""

from __future__ import annotations

import os
import time

import torch

from ..config import RewardConfig
from ..corpus import CharTokenizer
from ..models.rewards import build_reward, compute_member_rewards
from ..precision import pick_device
from ..protocols import RolloutBatch, ScoredBatch
from .telemetry import ActorTelemetry


class JudgeWorker:
    def __init__(self, judge_id: int, reward_cfg: RewardConfig, vocab: dict, torch_threads: int = 1, metrics: bool = False):
        torch.set_num_threads(torch_threads)
        self.judge_id = judge_id
        self.device = pick_device()
        self.tokenizer = CharTokenizer.from_dict(vocab)
        self.reward_fn = build_reward(reward_cfg, self.tokenizer, device=self.device)
        self.telemetry = ActorTelemetry("judge", str(judge_id), enabled=metrics)

    def score(self, batch: RolloutBatch) -> ScoredBatch:
        t0 = time.perf_counter()
        rewards, members = compute_member_rewards(self.reward_fn, batch.tokens.to(self.device))
        score_s = time.perf_counter() - t0
        self.telemetry.observe_judge(samples=batch.num_samples, seconds=score_s)
        return ScoredBatch(rollout=batch, rewards=rewards.float(), judge_id=self.judge_id,
                           timings={"score_s": score_s}, member_rewards=members)

    def info(self) -> dict:
        return {"judge_id": self.judge_id, "pid": os.getpid(), "device": str(self.device),
                "reward": self.reward_fn.name}
