"""The driver's side of judge refresh (docs/JUDGE_REFRESH.md): the judge trainer's group and what it is owed.

    driver  --[scored refs]--->  JudgeTrainerActor.add_batches   (each trained step's, fire-and-forget)
    driver  --every n steps--->  JudgeTrainerActor.refresh       (the next judge version and the trainer's state)
    driver  --ObjectRef------->  JudgeWorker.set_judge           (ray.put once; every judge loads it)

Sync mode waits for each version (and the judges' loads) before the next step's rollouts
are scored, so runs are reproducible; async mode never waits for the trainer. The driver
keeps the trainer's state at its newest version and the samples sent since: a restarted
trainer gets both back before its next call (ActorGroup.keep_for_recovery), so it redoes a
lost refresh on the same data, and a checkpoint holds both without waiting for the trainer. The samples
sent since are references to scored batches (the driver holds no batch bytes); a checkpoint fetches
them, and a batch lost with its node since is left out (judge_samples_dropped).
"""

from __future__ import annotations

import time
from typing import Callable

import ray
import torch

from ..actors.judge_refresh_trainer import TrainerRestartedError
from ..actors.references import fetch
from ..config import TrainConfig
from ..errors import RunError
from ..models.checkpoint import load_checkpoint
from ..protocols import WeightSnapshot
from ..training.judge_refresh import STATE_SETS, batch_split
from .groups import ActorGroup, ActorManager

COUNTERS = ("judge_trainer_restarts", "judge_samples_dropped", "judge_refreshes_skipped")


def check_judge_refresh(cfg: TrainConfig) -> None:
    """The judge trainer's batches take refills from the judge checkpoint's pool: it must have one."""
    refresh = cfg.judge_refresh
    n_refill = batch_split(refresh)[2]
    if refresh.enabled and n_refill and not load_checkpoint(cfg.reward.judge_checkpoint, expect_kind="judge").has("pool"):
        raise RunError(f"judge_refresh takes {n_refill} of every {refresh.batch_size} windows from the refill pool "
                       f"of {cfg.reward.judge_checkpoint}, which has none (trained with p_real=1?); set "
                       f"judge_refresh.p_real + judge_refresh.p_policy = 1")


class JudgeRefreshRole:
    """The judge trainer of one run; factory(slot) makes the actor. counters: the run's (restarts, drops)."""

    def __init__(self, cfg: TrainConfig, actors: ActorManager, judges: ActorGroup, factory: Callable[[int], object],
                 counters: dict):
        self.cfg, self.actors, self.judges, self.counters = cfg.judge_refresh, actors, judges, counters
        self.sync = cfg.run.mode == "sync"
        counters.update({key: 0 for key in COUNTERS})
        self.group = actors.group("judge_trainer", 1, factory, on_lost={"refresh": "resubmit"},
                                  restarted=(TrainerRestartedError,), load_method="load_state",
                                  call_names={"refresh": "a judge refresh"})
        self.version = 0  # the newest judge version sent to the judge actors
        self.published_step = 0
        self.samples_sent = 0  # policy samples sent to the trainer, in all
        # what was sent since self.state: (samples_sent after it, refs of scored batches, their sizes), or
        # (samples_sent after it, tokens, generated) restored from a checkpoint
        self.unversioned: list = []
        self.figures: dict = {}  # of the last version, for the next step's record
        self.state = self.ask("state")  # the trainer's (tensors, scalars) at its newest version: 0 for now
        self.remember()

    def ask(self, method: str, *args):
        """A blocking call on the trainer; a restarted one gets its state back first (groups.py)."""
        return self.group.call(method, *args, what=f"the judge trainer's {method}", attempts=3)

    def remember(self) -> None:
        """What a restarted trainer loads: its newest version's state, then the samples sent since."""
        self.group.keep_for_recovery((self.state, tuple((a, b) for _, a, b in self.unversioned)))

    # -- the run ---------------------------------------------------------------
    def forward(self, refs: list, receipts: list) -> None:
        """A trained step's scored batches (references) go to the trainer, unless max_pending_batches steps of
        them still wait there: then they are dropped (counted), so that a slow trainer never stalls GRPO."""
        sizes = [r.num_samples for r in receipts]
        if len(self.actors.calls("add_batches")) >= self.cfg.max_pending_batches:
            self.counters["judge_samples_dropped"] += sum(sizes)
            return
        self.group.submit(self.group.slots[0], "add_batches", list(refs), sizes)
        self.samples_sent += sum(sizes)
        self.unversioned.append((self.samples_sent, list(refs), sizes))
        self.remember()

    def after_step(self, step: int, batches: list) -> dict:
        """Every publish_every steps the trainer makes the next version from the samples sent so far (async:
        unless the last one is still training); sync mode waits until the judges hold it. -> the step's figures."""
        t0 = time.perf_counter()
        if step % self.cfg.publish_every == 0:
            if self.actors.calls("refresh"):
                self.counters["judge_refreshes_skipped"] += 1
            else:
                self.group.submit(self.group.slots[0], "refresh")
        if self.sync:
            while self.actors.calls("refresh"):
                for _call, result in self.actors.results(methods=("refresh",)):
                    self.apply(result, step)
            self.wait_for_judges()
        figures = {"judge_version": self.version, "judge_age_steps": step - self.published_step,
                   "batch_judge_versions": sorted({b.judge_version for b in batches}),
                   "time/judge_refresh_wait_s": time.perf_counter() - t0, **self.figures}
        self.figures = {}
        return figures

    def apply(self, result: dict, step: int) -> None:
        """A version came back: its state becomes the trainer's restart point, its judge goes to every judge."""
        self.state = result["state"]
        seen = self.state[1]["samples_seen"]
        self.unversioned = [s for s in self.unversioned if s[0] > seen]
        self.remember()
        self.figures = {f"judge_refresh/{k}": v for k, v in result["metrics"].items()}
        if result["version"] > self.version:
            self.publish(result["snapshot"], step)

    def publish(self, snapshot: WeightSnapshot, step: int) -> None:
        self.judges.publish(ray.put(snapshot))  # one object for every judge, and for restarted ones later
        self.version, self.published_step = snapshot.version, step

    def wait_for_judges(self) -> None:
        while self.judges.loading():
            self.actors.results(methods=())

    # -- checkpoints -------------------------------------------------------------
    def checkpoint(self) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
        """(scalars for the driver's state, tensor sets for the run checkpoint): the newest version's state
        and the samples sent since; nothing waits for the trainer."""
        tensors, meta = self.state
        T = tensors["buffer"]["tokens"].shape[1]
        samples = [s for s in (self.fetch(a, b) for _, a, b in self.unversioned) if s is not None]
        pending = {"tokens": torch.cat([t for t, _ in samples] + [torch.zeros(0, T, dtype=torch.long)]),
                   "generated": torch.cat([g for _, g in samples] + [torch.zeros(0, T, dtype=torch.bool)])}
        sets = {f"judge_refresh_{name}": tensors[name] for name in STATE_SETS}
        return {**meta, "published_step": self.published_step}, {**sets, "judge_refresh_pending": pending}

    @staticmethod
    def fetch(first, second) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(tokens, generated) of an entry of unversioned: its tensors, or its scored batches fetched (those
        lost with their node since are left out, as the trainer leaves them out); None if none is left."""
        if isinstance(first, torch.Tensor):
            return first, second
        batches, _lost = fetch(first)
        if not batches:
            return None
        return (torch.cat([b.rollout.tokens for b in batches]), torch.cat([b.rollout.reveal_step >= 0 for b in batches]))

    @staticmethod
    def saved(ckpt, driver_state: dict):
        """(state, pending samples) of a run checkpoint, or None if it holds none; CheckpointError if torn."""
        if "judge_refresh" not in driver_state:
            return None
        tensors = {name: ckpt.load_tensors(f"judge_refresh_{name}") for name in STATE_SETS}
        return (tensors, driver_state["judge_refresh"]), ckpt.load_tensors("judge_refresh_pending")

    def restore(self, saved, step: int) -> None:
        """On resume: the trainer goes on from the checkpoint; the judges get its judge before they score."""
        if saved is None:
            print("note: the checkpoint holds no judge refresh state; the judge trainer starts from "
                  "reward.judge_checkpoint")
            return
        self.state, pending = saved
        meta = self.state[1]
        self.samples_sent = meta["samples_seen"] + len(pending["tokens"])
        self.unversioned = [(self.samples_sent, pending["tokens"], pending["generated"])] if len(pending["tokens"]) \
            else []
        self.remember()
        self.ask("load_state", self.group.weights)
        if meta["version"] > 0:
            self.publish(self.ask("publish"), step)
            self.wait_for_judges()
        self.published_step = meta.get("published_step", step)
        print(f"judge refresh resumed at judge version {self.version}")
