"""Fault tolerance in one place: actor slots of a role, their recovery and replacement.

A slot is one position of a role (rollout worker i, judge j). When a call on
it fails, the driver re-queues the lost work and calls `recover`: Ray restarts
the actor (`max_restarts`); if it cannot be reached any more (restarts used up
or hung), the slot gets a brand-new actor. Either way the slot holds no
weights (version -1) until it has loaded the current snapshot again, so it
receives no rollout request in between.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable

import ray


@dataclass(eq=False)
class Slot:
    role: str
    index: int
    handle: object
    version: int = -1
    busy: bool = False
    syncing: bool = False
    killed: bool = False
    failures: int = 0
    replacements: int = 0
    epoch: int = 0  # incarnation, bumped by recover: a failed call of an older one needs no new recovery


class ActorGroup:
    def __init__(self, role: str, n: int, timeout_s: float, factory: Callable[[int], object]):
        self.role = role
        self.timeout_s = timeout_s
        self.factory = factory
        self.slots = [Slot(role, i, factory(i)) for i in range(n)]

    def handles(self) -> list:
        return [s.handle for s in self.slots]

    def least_loaded(self, pending: Iterable) -> Slot:
        load = {id(s): 0 for s in self.slots}
        for p in pending:
            if p.slot is not None and id(p.slot) in load:
                load[id(p.slot)] += 1
        return min(self.slots, key=lambda s: load[id(s)])

    def recover(self, slot: Slot) -> None:
        slot.failures += 1
        slot.epoch += 1
        slot.version = -1
        slot.busy = slot.syncing = slot.killed = False
        if self._wait_restarted(slot.handle):
            return
        ray.kill(slot.handle, no_restart=True)
        slot.handle = self.factory(slot.index)
        slot.replacements += 1

    def _wait_restarted(self, handle) -> bool:
        """True once the actor answers again (Ray restarted it) within timeout_s; False if it is gone.

        A call on an actor that Ray is still restarting fails at once with
        ActorUnavailableError; that means "ask again", not "replace it"."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                ray.get(handle.info.remote(), timeout=left)
                return True
            except ray.exceptions.ActorUnavailableError:  # restarting (a RayActorError subclass: test it first)
                time.sleep(min(0.2, max(left, 0.0)))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                return False
