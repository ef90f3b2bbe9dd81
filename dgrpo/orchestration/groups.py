"""Fault tolerance in one place: the actors of each role, the calls in flight on them, their recovery.

An ActorGroup holds the slots of one role (rollout worker i, judge j, the learner);
a slot is one position of the role and its current actor. The driver submits calls
on slots and asks the ActorManager, which watches the calls of every group, for the
results that came back. Everything else happens here:

* each call carries its slot's incarnation (`epoch`) and is due within
  run.actor_timeout_s; an overdue actor is killed so that Ray restarts it, and time
  spent waiting for a restart is not counted against other calls;
* when an actor dies, its slot is recovered once per incarnation (several calls fail
  with one death): one charge against the failure budget all groups share, then
  Ray's restart is awaited or, with the restarts used up or the actor hung, the slot
  gets a brand-new actor. The slot holds no weights (version -1) until it has loaded
  the group's published weights again, so it gets no work in between;
* the lost work is re-issued as its group says: sent again to the least-loaded slot
  (`resubmit`: a score), or handed back to the driver, which schedules it like new
  work (`requeue`: a rollout request must go to a worker holding the right weights);
* a call that raised (bad input, a bug) stops the run: it would fail again;
* a group that cannot restart (the learner: a restarted one would have lost its
  state) stops the run when its actor dies or hangs; `dgrpo train --resume` goes on.

Slots are added one by one (`_add_slot`), so a failed start leaves no actor unknown.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

import ray

from ..errors import RunError

RESTART_COUNTERS = {"rollout": "worker_restarts", "judge": "judge_restarts"}


def restart_counter(role: str) -> str:
    """The run's counter of `role`'s actor restarts (a metric and summary key)."""
    return RESTART_COUNTERS.get(role, f"{role}_restarts")


class ActorLost(RuntimeError):
    """A blocking call's actor died; its slot is recovered, the caller may try again."""


@dataclass(eq=False)
class Slot:
    role: str
    index: int
    handle: object
    version: int = -1  # weights held: -1 none yet
    in_flight: int = 0  # calls of this incarnation not yet answered
    killed: bool = False  # killed for restart after a deadline, not yet recovered
    failures: int = 0
    replacements: int = 0
    epoch: int = 0  # incarnation, bumped by recovery: a failed call of an older one needs no new recovery


@dataclass(eq=False)
class Call:
    group: "ActorGroup"
    slot: Slot
    method: str
    args: tuple
    size: int = 0  # work the call carries, in the driver's unit (prompt groups)
    epoch: int = 0
    submitted: float = field(default_factory=time.perf_counter)

    @property
    def payload(self):
        return self.args[0] if self.args else None


class ActorManager:
    """The groups of one run, every call in flight on them, and their shared failure budget."""

    def __init__(self, timeout_s: float, max_failures: int, counters: dict):
        self.timeout_s = timeout_s  # every call's deadline (run.actor_timeout_s)
        self.max_failures = max_failures
        self.counters = counters  # the run's counters: restarts and re-issued requests are counted here
        self.groups: list[ActorGroup] = []
        self.in_flight: dict[ray.ObjectRef, Call] = {}

    def group(self, role: str, slots: int, factory: Callable[[int], object], **policy) -> "ActorGroup":
        """A group of `slots` actors of `role`, each made by factory(slot index); policy: see ActorGroup."""
        group = ActorGroup(self, role, factory, **policy)
        self.groups.append(group)  # before its actors start: a failed start still stops the started ones
        for _ in range(slots):
            group._add_slot()
        return group

    def calls(self, *methods: str) -> list[Call]:
        return [c for c in self.in_flight.values() if not methods or c.method in methods]

    def busy(self) -> bool:
        return bool(self.in_flight)

    def results(self, methods: Iterable[str] = (), timeout: float = 1.0) -> list[tuple[Call, object]]:
        """Waits up to `timeout` for the next answer (of a call of `methods`, default any) and checks
        every deadline. Returns the (call, result) pairs for the driver; lost calls are recovered
        and re-issued, weight loads bookkept, on the way."""
        refs = [r for r, c in self.in_flight.items() if not methods or c.method in methods]
        done, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        self._check_deadlines()
        out = []
        for ref in done:
            call = self.in_flight.pop(ref)
            answered, result = call.group._collect(ref, call)
            if answered:
                out.append((call, result))
        return out

    def charge_failure(self, group: "ActorGroup", slot: Slot, error: BaseException) -> None:
        key = restart_counter(group.role)
        self.counters[key] = self.counters.get(key, 0) + 1
        total = sum(self.counters.get(restart_counter(role), 0) for role in {g.role for g in self.groups})
        print(f"{group.role} actor {slot.index} failed ({type(error).__name__}); restart {total} "
              f"of at most {self.max_failures}")
        if total > self.max_failures:
            raise RunError(f"{total} actor failures exceed run.max_worker_failures={self.max_failures}; "
                           f"last: {group.role} {slot.index}: {error}. Check the actor logs "
                           f"(Ray dashboard or /tmp/ray/session_latest/logs), then resume with --resume")

    def pause(self, seconds: float) -> None:
        """Calls that waited on a restart were not hung: move their deadlines by the wait."""
        for call in self.in_flight.values():
            call.submitted += seconds

    def _check_deadlines(self) -> None:
        now, limit = time.perf_counter(), self.timeout_s
        overdue = [r for r, c in self.in_flight.items() if now - c.submitted > limit]
        if not overdue:
            return
        answered, _ = ray.wait(overdue, num_returns=len(overdue), timeout=0)  # done, not yet collected
        for call in [self.in_flight[r] for r in set(overdue) - set(answered)]:
            group, slot = call.group, call.slot
            if not group.restartable:
                raise RunError(f"the {group.role} did not finish {group.describe(call.method)} within {limit:.0f} s "
                               f"(run.actor_timeout_s); raise the timeout for large batches, or resume with --resume")
            if not slot.killed:
                print(f"{call.method} on {group.role} actor {slot.index} exceeded {limit:.0f} s; killing it for restart")
                slot.killed = True
                ray.kill(slot.handle, no_restart=False)

    def close(self) -> None:
        """Cancels what is in flight and stops every actor started so far."""
        for ref, call in self.in_flight.items():
            if call.group.restartable:  # the learner's call goes with its actor below
                ray.cancel(ref, force=False)
        for group in self.groups:
            for handle in group.handles():
                ray.kill(handle, no_restart=True)


class ActorGroup:
    """The slots of one role. Policy:

    restartable    Ray may restart its actors and the group recovers them (else a fault stops the run)
    on_lost        method -> "resubmit" | "requeue": what becomes of a call lost with its actor
    restarted      errors a call raises when it reached a restarted incarnation (a death, not a bug)
    load_method    the actor method that loads published weights (it answers {"version", "load_s"})
    call_names     method -> what one call is called in messages ("a step")
    """

    def __init__(self, manager: ActorManager, role: str, factory: Callable[[int], object], restartable: bool = True,
                 on_lost: dict[str, str] | None = None, restarted: tuple[type[BaseException], ...] = (),
                 load_method: str = "set_weights", call_names: dict[str, str] | None = None):
        self.manager, self.role, self.factory = manager, role, factory
        self.restartable, self.on_lost, self.restarted = restartable, on_lost or {}, restarted
        self.load_method, self.call_names = load_method, call_names or {}
        self.restart_timeout_s = manager.timeout_s  # how long a restarting actor may take to answer again
        self.slots: list[Slot] = []
        self.weights = None  # the last published weights (an ObjectRef); every slot loads them before work
        self.requeued: deque = deque()  # lost work the driver issues again (same id, same seed)
        self.load_seconds: list[float] = []  # of the weight loads answered since the driver last took them

    def _add_slot(self) -> Slot:
        slot = Slot(self.role, len(self.slots), None)
        self.slots.append(slot)
        slot.handle = self.factory(slot.index)
        return slot

    def handles(self) -> list:
        return [s.handle for s in self.slots if s.handle is not None]

    def describe(self, method: str) -> str:
        return self.call_names.get(method, method)

    # -- calls -------------------------------------------------------------------
    def submit(self, slot: Slot, method: str, *args, size: int = 0) -> Call:
        call = Call(self, slot, method, args, size=size, epoch=slot.epoch)
        self.manager.in_flight[getattr(slot.handle, method).remote(*args)] = call
        slot.in_flight += 1
        return call

    def submit_least_loaded(self, method: str, *args, size: int = 0) -> Call:
        load = Counter(id(c.slot) for c in self.manager.in_flight.values())
        return self.submit(min(self.slots, key=lambda s: load[id(s)]), method, *args, size=size)

    def call(self, slot: Slot, method: str, *args, what: str | None = None,
             passthrough: tuple[type[BaseException], ...] = ()):
        """A blocking call, due within run.actor_timeout_s. A dead actor is recovered (ActorLost);
        errors of `passthrough` types are the caller's to handle; any other error stops the run."""
        what = what or f"{self.role}.{method}"
        timeout = self.manager.timeout_s
        try:
            return ray.get(getattr(slot.handle, method).remote(*args), timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise RunError(f"{what} did not answer within {timeout:.0f} s (run.actor_timeout_s); "
                           f"the actor is hung or the cluster is overloaded") from None
        except ray.exceptions.RayTaskError as e:
            if isinstance(e, passthrough):
                raise
            if not isinstance(e, self.restarted):
                raise RunError(f"{what} failed: {type(e.cause).__name__}: {e.cause}") from None
            error: BaseException = e
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            error = e
        if not self.restartable:
            raise self._died(what, error)
        self.recover(slot, error)
        raise ActorLost(f"{what}: {type(error).__name__}")

    def _collect(self, ref, call: Call) -> tuple[bool, object]:
        """The answer of a finished call: (True, result) for the driver, or (False, None) when the
        group dealt with it (a weight load, or a call lost with its actor and re-issued)."""
        slot = call.slot
        if call.epoch == slot.epoch:
            slot.in_flight -= 1
        try:
            result = ray.get(ref, timeout=0)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e, self.restarted):
                self._lost(call, e)  # the call reached a restarted incarnation that holds nothing yet
                return False, None
            # the actor is alive but the call raised: bad input or a bug, not a crash; do not retry
            raise RunError(f"{call.method} on {self.role} actor {slot.index} failed: "
                           f"{type(e.cause).__name__}: {e.cause}") from None
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            self._lost(call, e)
            return False, None
        if call.method == self.load_method:
            if call.epoch == slot.epoch:
                slot.version = result["version"]
            self.load_seconds.append(result["load_s"])
            return False, None
        return True, result

    # -- weights -----------------------------------------------------------------
    def publish(self, weights) -> None:
        """Every slot loads `weights` (one object in the object store); so does each recovered slot later."""
        self.weights = weights
        for slot in self.slots:
            self.submit(slot, self.load_method, weights)

    def keep_for_recovery(self, weights) -> None:
        """What a recovered slot loads before its next call, not sent to the live slots (a trainer's
        own state, which it holds already)."""
        self.weights = weights

    def loading(self) -> bool:
        return any(c.group is self and c.method == self.load_method for c in self.manager.in_flight.values())

    def idle_slots(self) -> list[Slot]:
        """Slots that hold published weights and have no call in flight."""
        return [s for s in self.slots if s.in_flight == 0 and s.version >= 0]

    def take_load_seconds(self) -> list[float]:
        taken, self.load_seconds = self.load_seconds, []
        return taken

    def pop_requeued(self):
        """The oldest lost request to issue again (counted as re-issued), or None."""
        if not self.requeued:
            return None
        self.manager.counters["reissued_requests"] += 1
        return self.requeued.popleft()

    # -- faults ------------------------------------------------------------------
    def _died(self, what: str, error: BaseException) -> RunError:
        return RunError(f"the {self.role} actor died during {what} ({type(error).__name__}); "
                        f"restart with `dgrpo train --resume` to continue from the last checkpoint")

    def _lost(self, call: Call, error: BaseException) -> None:
        """The actor of `call` died under it: recover its slot once per incarnation, then re-issue
        the lost work, which produced nothing."""
        if not self.restartable:
            raise self._died(f"{self.role}.{call.method}", error)
        if call.epoch == call.slot.epoch:
            self.recover(call.slot, error)
        policy = self.on_lost.get(call.method)
        if policy == "requeue":
            self.requeued.append(call.payload)
        elif policy == "resubmit":
            self.manager.counters["reissued_requests"] += 1
            self.submit_least_loaded(call.method, *call.args, size=call.size)

    def recover(self, slot: Slot, error: BaseException) -> None:
        """Charge the failure, then wait for Ray's restart of the slot's actor or give the slot a new
        one; it holds no weights until it has loaded the published ones (sent here)."""
        self.manager.charge_failure(self, slot, error)
        t0 = time.perf_counter()
        slot.failures += 1
        slot.epoch += 1
        slot.version = -1
        slot.in_flight = 0
        slot.killed = False
        if not self._wait_restarted(slot.handle):
            ray.kill(slot.handle, no_restart=True)
            slot.handle = self.factory(slot.index)
            slot.replacements += 1
        self.manager.pause(time.perf_counter() - t0)
        if self.weights is not None:
            self.submit(slot, self.load_method, self.weights)

    def _wait_restarted(self, handle) -> bool:
        """True once the actor answers again (Ray restarted it) within restart_timeout_s; False if it is gone.

        A call on an actor that Ray is still restarting fails at once with
        ActorUnavailableError; that means "ask again", not "replace it"."""
        deadline = time.monotonic() + self.restart_timeout_s
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
