"""Held-out evaluation and checkpoint selection.

Each evaluation samples the run's fixed held-out prompts (one sample each, fixed seed) at the current
policy version, scores them with the reward (and run.selection_judge), and measures their KL to the
starting generator (sent with the request, kept by the worker). The best evaluation on run.selection
(within run.selection_kl_max) is the one checkpoints/best.json names. The samples' first texts go to
samples.jsonl. (The evaluation's batches come to the driver by value: it decodes and scores them here.)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import TrainConfig
from ..corpus import CharTokenizer
from ..models.rewards import JudgeReward, compute_rewards, judge_disagreement
from ..protocols import RolloutRequest
from .groups import ActorGroup
from .rundir import BEST_POINTER, checkpoint_path, write_best

# the held-out value each run.selection ranks evaluations by
SELECTION_KEYS = {"eval_reward": "eval_reward_mean", "selection_judge": "eval_selection_reward_mean"}


class HeldOut:
    """The run's held-out evaluations (`history`) and the best of them (`best`, or None)."""

    def __init__(self, cfg: TrainConfig, out: Path, tokenizer: CharTokenizer, eval_prompts: torch.Tensor,
                 selection_judge: JudgeReward | None):
        self.cfg, self.out, self.tokenizer = cfg, out, tokenizer
        self.eval_prompts, self.selection_judge = eval_prompts, selection_judge
        self.history: list[dict] = []
        self.best: dict | None = None  # the evaluation checkpoints/best.json names

    def evaluate(self, workers: ActorGroup, judges: ActorGroup, reference, step: int, version: int) -> dict:
        """Reward of held-out prompts, fixed seed, one sample each, at `version`; reference: the starting
        generator's weights (an ObjectRef), for the KL."""
        request = RolloutRequest(request_id=-1, prompts=self.eval_prompts, group_size=1,
                                 seed=self.cfg.run.eval_seed, min_version=version, measure_kl=True)
        # a dead worker or judge is recovered (and charged) by its group, and the call made again
        batch = workers.call("generate", request, reference, what="rollout.generate (eval)", attempts=3)
        scored = judges.call("score", batch, what="judge.score (eval)", attempts=3)
        r = scored.rewards
        result = {"step": step, "eval_reward_mean": float(r.mean()),
                  "eval_reward_stderr": float(r.std() / len(r) ** 0.5), "policy_version": version}
        kl = batch.kl_to_reference
        result.update(eval_kl_seq=float(kl.mean()), eval_kl_seq_stderr=float(kl.std() / len(kl) ** 0.5))
        result.update({f"eval_{k}": v for k, v in judge_disagreement([scored]).items()})
        if self.selection_judge is not None:
            s = compute_rewards(self.selection_judge, batch.tokens)
            result.update(eval_selection_reward_mean=float(s.mean()),
                          eval_selection_reward_stderr=float(s.std() / len(s) ** 0.5))
        self.history.append(result)
        texts = self.tokenizer.decode_batch(batch.tokens[:4])
        with open(self.out / "samples.jsonl", "a") as fh:
            fh.write(json.dumps({"step": step, "version": version, "texts": texts,
                                 "rewards": r[:4].tolist()}) + "\n")
        return result

    def select(self, result: dict) -> bool:
        """Whether this evaluation becomes the best: the highest run.selection value so far among the
        evaluations within run.selection_kl_max (ties keep the earlier one)."""
        run = self.cfg.run
        if run.selection == "none":
            return False
        if run.selection_kl_max is not None and result["eval_kl_seq"] > run.selection_kl_max:
            return False
        value = result[SELECTION_KEYS[run.selection]]
        if self.best is not None and value <= self.best["value"]:
            return False
        step = result["step"]
        self.best = {"step": step, "checkpoint": checkpoint_path(self.out, step).name,
                     "selection": run.selection, "value": value, "eval_kl_seq": result["eval_kl_seq"],
                     "eval_reward_mean": result["eval_reward_mean"]}
        return True

    def best_fields(self) -> dict:
        return {"best_step": self.best["step"], "best_value": self.best["value"]} if self.best else {}

    def restore(self, history: list[dict], best: dict | None) -> None:
        """On resume: the restored evaluations, and their best if its checkpoint is still there; the pointer
        follows it."""
        self.history = history
        pointer = self.out / "checkpoints" / BEST_POINTER
        if best is not None and not (self.out / "checkpoints" / best["checkpoint"]).is_dir():
            print(f"the best checkpoint {best['checkpoint']} of the restored state is gone; selecting anew")
            best = None
        self.best = best
        if best is None:
            pointer.unlink(missing_ok=True)
        else:
            write_best(self.out, best)
