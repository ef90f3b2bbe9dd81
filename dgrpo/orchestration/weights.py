"""How each policy version reaches the rollout workers (run.weight_sync; docs/WEIGHT_SYNC.md).

object_store  the learner puts its weights in the object store once (`publish`); every worker loads that
              one object (ActorGroup.publish), and so does a worker placed or recovered later.
collective    the learner broadcasts them to the placed workers as rank 0 of a torch.distributed group
              (gloo on CPU, NCCL on CUDA: actors/collective.py). The group is rebuilt, as a new epoch,
              when its members change (a worker placed, recovered or retired) or a broadcast failed (a
              member lost mid-broadcast, or one that did not answer within the group's timeout). A worker
              outside the broadcast (placed or recovered later, or whose broadcast failed) loads the version
              from the object store, where the learner puts it only when such a worker needs it.
"""

from __future__ import annotations

import time

from .groups import ActorGroup

RENDEZVOUS_TIMEOUT_S = 60.0  # the rendezvous store's own timeout; each epoch's joins carry the group's
GROUP_TIMEOUT_SHARE = 0.8  # of run.actor_timeout_s: a broken group fails before the learner's call is overdue


def weight_sync(run_cfg, learner: ActorGroup, workers: ActorGroup, counters: dict) -> "WeightSync":
    if run_cfg.weight_sync == "collective":
        return CollectiveSync(learner, workers, counters, GROUP_TIMEOUT_SHARE * run_cfg.actor_timeout_s)
    return ObjectStoreSync(learner, workers)


class WeightSync:
    learner: ActorGroup
    workers: ActorGroup
    info: dict

    def broadcast(self, version: int, wait: bool) -> dict:
        """Sends `version` (the learner's current weights) to every worker; with `wait`, until every worker has
        loaded it -> the step record's figures (without waiting, the load times are the previous broadcast's,
        whose acks came in meanwhile)."""
        t0 = time.perf_counter()
        previous_loads = self.workers.take_load_seconds()
        self.publish(version)
        while wait and (self.workers.loading() or self.sending()):
            for _call, answer in self.learner.manager.results(methods=("broadcast_weights",)):
                self.answered(answer)
        loads = previous_loads + self.workers.take_load_seconds() if wait else previous_loads
        return {"time/sync_s": time.perf_counter() - t0, "sync_load_s_mean": sum(loads) / max(len(loads), 1),
                "weights_mb": self.info["nbytes"] / 2**20, "time/publish_s": self.info["publish_s"]}

    def publish(self, version: int) -> None:
        raise NotImplementedError

    def answered(self, result: dict) -> None:
        """The learner's side of a collective broadcast is done."""

    def sending(self) -> bool:
        return False


class ObjectStoreSync(WeightSync):
    def __init__(self, learner: ActorGroup, workers: ActorGroup):
        self.learner, self.workers = learner, workers
        self.info = {"nbytes": 0, "publish_s": 0.0}

    def publish(self, version: int) -> None:
        ref, self.info = self.learner.call("publish")
        self.workers.publish(ref, source=(self.learner, self.learner.slots[0]), version=version)


class CollectiveSync(WeightSync):
    def __init__(self, learner: ActorGroup, workers: ActorGroup, counters: dict, timeout_s: float):
        self.learner, self.workers, self.counters, self.timeout_s = learner, workers, counters, timeout_s
        counters.setdefault("broadcast_groups", 0)
        counters.setdefault("broadcasts_failed", 0)
        self.rendezvous: dict | None = None  # started by the learner at the first broadcast
        self.epoch = 0
        self.members: list | None = None  # (slot, incarnation) of the current epoch's workers, by rank
        self.broken = False  # the last broadcast failed: the next one opens a new epoch
        self.info = {"nbytes": 0, "publish_s": 0.0}

    def publish(self, version: int) -> None:
        """Rank 0 sends `version`; every placed worker receives it (the group rebuilt first if need be)."""
        learner_slot = self.learner.slots[0]
        fallback = lambda: learner_slot.handle.snapshot.remote()  # noqa: E731 (made only when a worker needs it)
        slots = self.workers.placed_slots()
        if not slots:  # nobody to send to: later workers load the object
            self.workers.load_via("receive_weights", {}, fallback)
            return
        if self.rendezvous is None:
            self.rendezvous = self.learner.call("collective_host", RENDEZVOUS_TIMEOUT_S)
        members = [(s, s.epoch) for s in slots]
        if members != self.members or self.broken:
            self.epoch += 1
            self.members, self.broken = members, False
            self.counters["broadcast_groups"] += 1
        spec = {**self.rendezvous, "epoch": self.epoch, "world_size": len(slots) + 1, "version": version,
                "timeout_s": self.timeout_s}
        self.learner.submit(learner_slot, "broadcast_weights", {**spec, "rank": 0})
        self.workers.load_via("receive_weights", {s: ({**spec, "rank": rank},) for rank, s in enumerate(slots, 1)},
                              fallback)

    def answered(self, result: dict) -> None:
        """The learner's side of a broadcast is done; if it failed, the next one rebuilds the group."""
        if not result["ok"]:
            self.broken = True
            self.counters["broadcasts_failed"] += 1
            print(f"the weight broadcast of epoch {self.epoch} failed ({result['error']}); workers that missed it "
                  f"load the weights from the object store, and the next broadcast rebuilds the group", flush=True)
        self.info = result

    def sending(self) -> bool:
        return bool(self.learner.manager.calls("broadcast_weights"))
