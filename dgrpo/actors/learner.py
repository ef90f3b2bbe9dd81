"""Learner actor: a thin Ray shell over LearnerCore (train, publish weights, checkpoint).

The driver hands it a step's scored batches by reference (references.py); it publishes each version as one
object (`publish`) or broadcasts it to the rollout workers as rank 0 of a collective (`broadcast_weights`,
collective.py), as run.weight_sync says.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..config import GRPOConfig
from ..learner.core import LearnerCore
from ..models.checkpoint import load_checkpoint, save_checkpoint
from ..models.diffusion import DiffusionLM
from ..models.rewards import judge_disagreement
from ..models.transformer import ModelConfig
from ..precision import describe_precision, pick_device, resolve_precision
from ..protocols import ScoredBatch, WeightSnapshot
from .collective import BroadcastMember
from .references import fetch
from .telemetry import placement


class LearnerActor:
    def __init__(self, grpo_cfg: GRPOConfig, model_config: ModelConfig, vocab: dict, init_weights: WeightSnapshot,
                 seed: int = 0, precision: str = "fp32", torch_threads: int = 1):
        torch.set_num_threads(torch_threads)
        torch.manual_seed(seed)
        self.model_config = model_config
        self.vocab = vocab
        device = pick_device()
        policy = DiffusionLM(self.model_config)
        init_weights.load_into(policy)
        self.core = LearnerCore(policy, grpo_cfg, seed=seed, device=str(device),
                                autocast_dtype=resolve_precision(precision, device))
        self.precision = describe_precision(precision, device)
        print(f"precision: learner: {self.precision}", flush=True)
        self.collective = BroadcastMember()

    def train(self, *batches: ScoredBatch) -> dict:
        return self.core.train(list(batches))

    def train_by_ref(self, refs: list) -> dict:
        """One step on the scored batches of `refs` (fetched from the judges' nodes) -> its metrics, with the
        judges' disagreement on them; or {"lost_inputs": [indices]} (nothing trained) when some were lost
        with their node."""
        batches, lost = fetch(refs)
        if lost:
            return {"lost_inputs": lost}
        return {**self.train(*batches), **judge_disagreement(batches), "policy_version": self.core.version}

    def snapshot(self) -> WeightSnapshot:
        """The current weights as one object (what a worker outside a collective broadcast loads)."""
        return self.core.snapshot()

    def collective_host(self, timeout_s: float) -> dict:
        """Starts the rendezvous of the weight broadcast (once) -> its address, backend and the model's layout."""
        return self.collective.host(self.core.policy, self.core.device, timeout_s)

    def broadcast_weights(self, spec: dict) -> dict:
        """Sends the current weights to the members of spec["epoch"] (collective.py) -> whether it worked, the
        version, its size and seconds."""
        result = self.collective.broadcast(self.core.policy, spec)
        nbytes = sum(t.numel() * t.element_size() for t in self.core.policy.state_dict().values())
        return {**result, "version": self.core.version, "nbytes": nbytes, "publish_s": result.get("seconds", 0.0)}

    def publish(self) -> list:
        """Put the current weights in the object store once; every worker loads the same object."""
        import ray
        t0 = time.perf_counter()
        snap = self.core.snapshot()
        ref = ray.put(snap)
        return [ref, {"version": snap.version, "nbytes": snap.nbytes, "publish_s": time.perf_counter() - t0}]

    def version(self) -> int:
        return self.core.version

    def save(self, path: str, driver_state: dict, config: dict, extra_tensors: dict | None = None) -> str:
        """extra_tensors: further tensor sets of the run saved in the same atomic checkpoint (judge refresh)."""
        core = self.core
        state = {"step": core.step, "version": core.version, "learner": core.state_scalars(), "driver": driver_state}
        save_checkpoint(path, kind="generator", model_config=self.model_config, vocab=self.vocab,
                        weights=core.policy, state=state, config=config, optimizer=core.optimizer,
                        extra_tensors={**core.state_tensors(), **(extra_tensors or {})})
        return path

    def load(self, path: str) -> dict:
        ckpt = load_checkpoint(path, expect_kind="generator")
        ckpt.load_weights_into(self.core.policy)
        ckpt.load_optimizer_into(self.core.optimizer)
        self.core.load_state(ckpt.load_tensors("reference"), ckpt.load_tensors("learner_rng"),
                             version=int(ckpt.state["version"]), step=int(ckpt.state["step"]),
                             scalars=ckpt.state.get("learner"))
        return ckpt.state["driver"]

    def info(self) -> dict:
        return {**placement(), "version": self.core.version, "step": self.core.step,
                "device": str(self.core.device), "precision": self.precision, "path": str(Path.cwd())}
