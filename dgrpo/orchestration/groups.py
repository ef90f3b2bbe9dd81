"""Fault tolerance and membership in one place: the actors of each role, the calls in flight on them,
their recovery, and how many there are.
One file by design, longer than most: a fault handled in two places is handled twice or not at all.

An ActorGroup holds the slots of one role (rollout worker i, judge j, the learner); a slot is
one position of the role and its current actor. The driver submits calls on slots and asks the
ActorManager, which watches the calls of every group, for the results that came back.
Everything else happens here, and nothing here blocks the run on one actor:

* a slot's actor is *placed* once it has answered a probe (its `info` method). A new actor
  waits for resources (a node that advertises its role's marker) as long as it takes; while it
  waits it is the demand a cluster autoscaler acts on. A slot gets work only once placed and
  holding the group's published weights (a new worker loads them before its first request);
* each call carries its slot's incarnation (`epoch`) and is due within run.actor_timeout_s; an
  overdue actor is killed so that Ray restarts it;
* when an actor dies, its slot is recovered once per incarnation: its lost work is re-issued at
  once, then the slot is probed until Ray's restart answers; an actor that Ray will not restart
  (restarts used up, or not back within restart_timeout_s) gets a brand-new one. The death counts
  as a restart; once the slot's node is known (a crash on a live node is charged against the
  failure budget all groups share; a death whose node Ray has marked dead is a node loss, counted
  in actors_lost_with_node and not charged: the run goes on with the others);
* membership (per group, any role): a group keeps `target` actors, between min_size and
  max_size; resize() moves the target (the driver does on `dgrpo scale`); surplus slots retire
  once their calls are answered. A group with fewer than min_size placed actors for
  run.placement_timeout_s stops the run with what it lacks;
* lost work is re-issued as its group says: sent again to the least-loaded usable slot
  (`resubmit`: a score), or handed back to the driver, which schedules it like new work
  (`requeue`: a rollout request must go to a worker holding the right weights);
* a call that raised (bad input, a bug) stops the run: it would fail again;
* results passed on by reference: a call with `stored=k` leaves its first k results in the object
  store (`call.values`, which the driver hands to the next actor) and answers with the last one, a
  small receipt (actors/references.py); `work` names what a call is for (the driver's request);
* a group that cannot restart (the learner: a restarted one would have lost its state) stops
  the run when its actor dies, hangs or loses its node; `dgrpo train --resume` goes on.
"""

from __future__ import annotations

import socket
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

import ray

from ..errors import RunError

RESTART_COUNTERS = {"rollout": "worker_restarts", "judge": "judge_restarts"}
PROBE = "info"  # every actor class answers it; its answer names the node the actor runs on
STARTING, READY, RECOVERING = "starting", "ready", "recovering"
DEATHS = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.ObjectLostError)
REPROBE_S = 0.25  # between probes of an actor that Ray is restarting


def restart_counter(role: str) -> str:
    """The run's counter of `role`'s actor restarts (a metric and summary key)."""
    return RESTART_COUNTERS.get(role, f"{role}_restarts")


def node_gone(node_id: str | None) -> str | None:
    """Why the node is gone (Ray marked it dead, or its raylet refuses connections), or None if it is up.
    The raylet check answers at once, where Ray's health checks take seconds to mark a node dead."""
    if node_id is None:
        return None
    node = next((n for n in ray.nodes() if n["NodeID"] == node_id), None)
    if node is None or not node["Alive"]:
        return "Ray marked the node dead"
    try:
        socket.create_connection((node["NodeManagerAddress"], node["NodeManagerPort"]), timeout=2).close()
    except OSError as e:
        return f"its raylet at {node['NodeManagerAddress']}:{node['NodeManagerPort']} does not answer: " \
               f"{e.strerror or e}"
    return None


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
    state: str = STARTING
    since: float = field(default_factory=time.monotonic)  # when it entered its state
    node_id: str | None = None  # the node its actor answered from
    death: BaseException | None = None  # a death not yet charged or counted as a node loss
    dead_node: str | None = None  # the node it died on
    probing: bool = False  # a probe of this incarnation is in flight
    next_probe: float = 0.0
    retiring: bool = False  # no new work; removed once its calls are answered
    removed: bool = False


@dataclass(eq=False)
class Call:
    group: "ActorGroup"
    slot: Slot | None  # None: any usable slot (a call waiting in the backlog)
    method: str
    args: tuple
    size: int = 0  # work the call carries, in the driver's unit (prompt groups)
    work: object = None  # what the call is for (the driver's request), if not its first argument
    stored: int = 0  # results left in the object store (values); the answer is the last result
    values: tuple = ()  # their references, known from the moment the call is sent
    epoch: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    probe: bool = False  # a placement probe: no deadline
    carried: int | None = None  # the weights version the call took along (ActorGroup.carry_method)

    @property
    def payload(self):
        """What the call is for: its `work`, else its first argument."""
        if self.work is not None:
            return self.work
        return self.args[0] if self.args else None


class ActorManager:
    """The groups of one run, every call in flight on them, and their shared failure budget.

    timeout_s: every call's deadline (run.actor_timeout_s); placement_timeout_s: how long a group may
    stay below its min_size; check_s: seconds between membership checks (node deaths, surplus slots)."""

    def __init__(self, timeout_s: float, max_failures: int, counters: dict, placement_timeout_s: float = 120.0,
                 check_s: float = 2.0):
        self.timeout_s = timeout_s
        self.max_failures = max_failures
        self.placement_timeout_s = placement_timeout_s
        self.check_s = check_s
        self.counters = counters  # the run's counters: restarts, node losses, re-issued requests
        for key in ("reissued_requests", "actors_lost_with_node", "nodes_lost"):
            counters.setdefault(key, 0)
        self.groups: list[ActorGroup] = []
        self.in_flight: dict[ray.ObjectRef, Call] = {}
        self.crashes = 0  # deaths charged against max_failures
        self.lost_nodes: set[str] = set()
        self.announce = False  # print placements (after the start, when they are news)
        self.last_check = time.monotonic()

    def group(self, role: str, target: int, factory: Callable[[int], object], min_size: int | None = None,
              max_size: int | None = None, **policy) -> "ActorGroup":
        """A group of `role` that aims for `target` actors (a run's resources.<role>.num_workers), each made by
        factory(slot index); min_size..max_size bound the target (default: exactly `target`); policy: see
        ActorGroup."""
        group = ActorGroup(self, role, factory, min_size=target if min_size is None else min_size,
                           max_size=target if max_size is None else max_size, **policy)
        self.groups.append(group)  # before its actors start: a failed start still stops the started ones
        group.resize(target)
        return group

    def calls(self, *methods: str) -> list[Call]:
        """Calls of `methods` (default: all) in flight or waiting in a group's backlog for a slot."""
        waiting = [c for g in self.groups for c in g.backlog]
        return [c for c in [*self.in_flight.values(), *waiting] if not methods or c.method in methods]

    def busy(self) -> bool:
        """Something will still happen: a call in flight, a call waiting for a slot, a slot being recovered."""
        return bool(self.in_flight) or any(g.backlog or any(s.state == RECOVERING for s in g.slots)
                                           for g in self.groups)

    def results(self, methods: Iterable[str] | None = None, timeout: float = 1.0) -> list[tuple[Call, object]]:
        """Waits up to `timeout` for the next answer (of a call of `methods`, default any), checks every
        deadline and, every check_s, every group's membership. Returns the (call, result) pairs of every answer
        in by then, for the driver; probes, weight loads and lost calls are dealt with on the way (whatever
        `methods` says)."""
        self.tick()
        wanted = None if methods is None else set(methods)
        refs = [r for r, c in self.in_flight.items()
                if wanted is None or c.method in wanted or c.probe or c.method in c.group.load_methods]
        if any(s.state == RECOVERING for g in self.groups for s in g.slots):
            timeout = min(timeout, REPROBE_S)
        if refs:
            done, rest = ray.wait(refs, num_returns=1, timeout=timeout)
            if done and rest:  # every other answer already in: one pass of the driver's loop takes them all
                done += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        else:
            time.sleep(timeout)
            done = []
        self._check_deadlines()
        out = []
        for ref in done:
            call = self.in_flight.pop(ref)
            answered, result = call.group._collect(ref, call)
            if answered:
                out.append((call, result))
        return out

    def tick(self) -> None:
        """Re-probes restarting actors; every check_s, looks for dead nodes and checks each group's size."""
        for group in self.groups:
            group.reprobe()
        now = time.monotonic()
        if now - self.last_check < self.check_s:
            return
        self.last_check = now
        dead = self.dead_nodes()
        for group in self.groups:
            group.check(dead)

    def wait_placed(self) -> None:
        """Blocks until every group has min_size placed actors (or stops the run after placement_timeout_s)."""
        while any(g.placed() < g.min_size for g in self.groups):
            self.results(methods=(), timeout=0.5)
        self.announce = True

    @staticmethod
    def dead_nodes() -> set[str]:
        return {n["NodeID"] for n in ray.nodes() if not n["Alive"]}

    # -- deaths ------------------------------------------------------------------
    def death(self, group: "ActorGroup", slot: Slot, error: BaseException) -> None:
        """An actor died: counted as a restart now; charged or counted as a node loss once its node is known."""
        key = restart_counter(group.role)
        self.counters[key] = self.counters.get(key, 0) + 1
        print(f"{group.role} actor {slot.index} lost ({type(error).__name__}); its work is re-issued")

    def settle(self, group: "ActorGroup", slot: Slot, dead: set[str] | None = None) -> None:
        """Decides what the death of `slot` was: a node loss (its node is dead) or a crash (charged)."""
        error, slot.death = slot.death, None
        if error is None:
            return
        dead = self.dead_nodes() if dead is None else dead
        if slot.dead_node is not None and slot.dead_node in dead:
            key = restart_counter(group.role)
            self.counters[key] -= 1
            self.counters["actors_lost_with_node"] += 1
            if slot.dead_node not in self.lost_nodes:
                self.lost_nodes.add(slot.dead_node)
                self.counters["nodes_lost"] += 1
            print(f"{group.role} actor {slot.index} was lost with its node {slot.dead_node[:8]}, which Ray marked "
                  f"dead; the run goes on with {group.placed()} placed {group.role} actor(s) while a replacement "
                  f"waits for a node to run on")
            return
        self.charge_failure(group, slot, error)

    def charge_failure(self, group: "ActorGroup", slot: Slot, error: BaseException) -> None:
        self.crashes += 1
        slot.failures += 1
        print(f"{group.role} actor {slot.index} failed ({type(error).__name__}); restart {self.crashes} "
              f"of at most {self.max_failures}")
        if self.crashes > self.max_failures:
            raise RunError(f"{self.crashes} actor failures exceed run.max_worker_failures={self.max_failures}; "
                           f"last: {group.role} {slot.index}: {error}. Check the actor logs "
                           f"(Ray dashboard or /tmp/ray/session_latest/logs), then resume with --resume")

    def _check_deadlines(self) -> None:
        now, limit = time.perf_counter(), self.timeout_s
        overdue = [r for r, c in self.in_flight.items() if not c.probe and now - c.submitted > limit]
        if not overdue:
            return
        answered, _ = ray.wait(overdue, num_returns=len(overdue), timeout=0)  # done, not yet collected
        for call in [self.in_flight[r] for r in set(overdue) - set(answered)]:
            group, slot = call.group, call.slot
            if not group.restartable:
                raise RunError(f"the {group.role} did not finish {group.describe(call.method)} within {limit:.0f} s "
                               f"(run.actor_timeout_s); raise the timeout for large batches, or resume with --resume")
            if not slot.killed and call.epoch == slot.epoch:
                print(f"{call.method} on {group.role} actor {slot.index} exceeded {limit:.0f} s; killing it for restart")
                slot.killed = True
                ray.kill(slot.handle, no_restart=False)

    def close(self) -> None:
        """Cancels what is in flight and stops every actor started so far."""
        for ref, call in self.in_flight.items():
            if call.group.restartable and not call.probe:  # the learner's call goes with its actor below
                ray.cancel(ref, force=False)
        for group in self.groups:
            for handle in group.handles():
                ray.kill(handle, no_restart=True)


class ActorGroup:
    """The slots of one role. Policy:

    restartable    Ray may restart its actors and the group recovers them (else a fault stops the run)
    on_lost        method -> "resubmit" | "requeue": what becomes of a call lost with its actor
    restarted      errors a call raises when it reached a restarted incarnation (a death, not a bug)
    load_method    the actor method that loads published weights (it answers {"version", "load_s"}); methods
                   that load weights otherwise (a collective broadcast) join load_methods through load_via
    carry_method   a method that takes the published weights along (`weights=[ref]`, loaded before the call;
                   its answer has `load_s`): weights published with a version go to a live slot with its next
                   such call instead of a load of their own (publish)
    call_names     method -> what one call is called in messages ("a step")
    min_size       fewest placed actors the run goes on with (for longer than run.placement_timeout_s)
    max_size       most actors the target may ask for
    needs          what one actor asks of the cluster, for messages ("1 CPU, dgrpo_rollout: 1")
    """

    def __init__(self, manager: ActorManager, role: str, factory: Callable[[int], object], restartable: bool = True,
                 on_lost: dict[str, str] | None = None, restarted: tuple[type[BaseException], ...] = (),
                 load_method: str = "set_weights", carry_method: str | None = None,
                 call_names: dict[str, str] | None = None, min_size: int = 1, max_size: int = 1, needs: str = ""):
        self.manager, self.role, self.factory = manager, role, factory
        self.restartable, self.on_lost, self.restarted = restartable, on_lost or {}, restarted
        self.load_method, self.carry_method, self.call_names = load_method, carry_method, call_names or {}
        self.load_methods = {load_method}
        self.min_size, self.max_size, self.needs = min_size, max_size, needs
        self.target = 0
        self.restart_timeout_s = manager.timeout_s  # how long a restarting actor may take to answer again
        self.slots: list[Slot] = []
        self.next_index = 0
        self.weights = None  # the published weights (an ObjectRef, or a function making one when first needed)
        self.weights_version: int | None = None  # their version, when they travel with carry_method's calls
        self.recovery_only = False  # the weights are only for recovered slots (keep_for_recovery)
        self.weights_source = None  # (group, slot) whose actor owns the published object, if not the driver
        self.requeued: deque = deque()  # lost work the driver issues again (same id, same seed)
        self.backlog: deque[Call] = deque()  # calls waiting for their slot (or any slot) to be usable
        self.load_seconds: list[float] = []  # of the weight loads answered since the driver last took them
        self.nodes_used: set[str] = set()  # every node an actor of this group answered from
        self.below_min_since: float | None = None

    def handles(self) -> list:
        return [s.handle for s in self.slots if s.handle is not None]

    def describe(self, method: str) -> str:
        return self.call_names.get(method, method)

    def placed(self) -> int:
        return sum(s.state == READY and not s.retiring for s in self.slots)

    def placed_slots(self) -> list[Slot]:
        return [s for s in self.slots if s.state == READY and not s.retiring]

    def usable(self, slot: Slot) -> bool:
        """Placed, not retiring, and holding the published weights (if any were published). A placed slot's
        calls are sent after its weight load, and an actor answers its calls in order."""
        return slot.state == READY and not slot.retiring and (self.weights is None or self.recovery_only
                                                               or slot.version >= 0)

    # -- membership ------------------------------------------------------------------
    def resize(self, target: int) -> int:
        """Aims for `target` actors (clamped to min_size..max_size): new slots wait to be placed, surplus
        ones retire (unplaced first, then idle, then busy ones once answered). Returns the target."""
        self.target = max(self.min_size, min(self.max_size, target))
        active = [s for s in self.slots if not s.retiring]
        while len(active) < self.target:
            active.append(self._add_slot())
        surplus = len(active) - self.target
        if surplus > 0:
            order = sorted(active, key=lambda s: (s.state == READY, s.in_flight > 0, -s.index))
            for slot in order[:surplus]:
                slot.retiring = True
                if slot.state != READY or slot.in_flight == 0:
                    self._remove(slot)
        return self.target

    def _add_slot(self) -> Slot:
        slot = Slot(self.role, self.next_index, None)
        self.next_index += 1
        self.slots.append(slot)
        slot.handle = self.factory(slot.index)
        self._probe(slot)
        return slot

    def _remove(self, slot: Slot) -> None:
        if slot.death is not None:
            self.manager.settle(self, slot)
        slot.removed = True
        self.slots.remove(slot)
        ray.kill(slot.handle, no_restart=True)
        if self.manager.announce:
            print(f"{self.role} actor {slot.index} retired; {self.placed()} placed, target {self.target}")

    def _probe(self, slot: Slot) -> None:
        slot.probing = True
        self._send(slot, PROBE, (), probe=True)

    def reprobe(self) -> None:
        """Probes restarting actors again; replaces those that do not come back within restart_timeout_s."""
        now = time.monotonic()
        for slot in list(self.slots):
            if slot.state != RECOVERING:
                continue
            if now - slot.since > self.restart_timeout_s:
                self.manager.settle(self, slot)
                self._replace(slot)
            elif not slot.probing and now >= slot.next_probe:
                self._probe(slot)

    def check(self, dead_nodes: set[str]) -> None:
        """Membership: actors on dead nodes are lost, deaths on dead nodes settled as node losses, retired
        slots removed, and the run stopped if fewer than min_size are placed for too long."""
        for slot in list(self.slots):
            if slot.state == READY and slot.node_id in dead_nodes:
                self._mark_dead(slot, RuntimeError(f"node {slot.node_id[:8]} is dead"), what="the run")
            if slot.death is not None and slot.dead_node in dead_nodes:
                self.manager.settle(self, slot, dead_nodes)
            if slot.retiring and slot.in_flight == 0 and not slot.removed:
                self._remove(slot)
        self._flush_backlog()
        placed = self.placed()
        if placed >= self.min_size:
            self.below_min_since = None
            return
        now = time.monotonic()
        self.below_min_since = self.below_min_since or now
        waited = now - self.below_min_since
        if waited > self.manager.placement_timeout_s:
            lacking = f" ({self.needs} each)" if self.needs else ""
            raise RunError(f"only {placed} of at least {self.min_size} {self.role} actor(s) could be placed for "
                           f"{waited:.0f} s (run.placement_timeout_s): the cluster has no room for them{lacking}; "
                           f"add a node with those resources, lower the role's minimum (resources.{self.role}), or "
                           f"raise run.placement_timeout_s; then resume with --resume")

    # -- calls -------------------------------------------------------------------
    def _send(self, slot: Slot, method: str, args: tuple, size: int = 0, probe: bool = False, work=None,
              stored: int = 0) -> Call:
        call = Call(self, slot, method, args, size=size, work=work, stored=stored, epoch=slot.epoch, probe=probe)
        remote = getattr(slot.handle, method)
        kwargs = {}
        if method == self.carry_method and self.behind(slot):  # the call loads the published weights first
            kwargs["weights"] = [self.current_weights()]  # in a list: the actor gets it itself (ObjectLostError)
            call.carried = slot.version = self.weights_version  # the actor answers its calls in order
        if stored:
            *values, answer = remote.options(num_returns=stored + 1).remote(*args, **kwargs)
            call.values = tuple(values)
        else:
            answer = remote.remote(*args, **kwargs)
        self.manager.in_flight[answer] = call
        slot.in_flight += 1
        return call

    def submit(self, slot: Slot, method: str, *args, size: int = 0, work=None, stored: int = 0) -> Call:
        """Sends a call to `slot`; if the slot is not placed (starting or being recovered), the call waits
        in the backlog and goes to it once it is (its weights loaded first). work, stored: see Call."""
        if slot.state == READY and not slot.removed:
            return self._send(slot, method, args, size, work=work, stored=stored)
        call = Call(self, slot, method, args, size=size, work=work, stored=stored)
        self.backlog.append(call)
        return call

    def submit_least_loaded(self, method: str, *args, size: int = 0, work=None, stored: int = 0) -> Call:
        """To the usable slot with the fewest calls in flight; with none usable, to the backlog."""
        usable = [s for s in self.slots if self.usable(s)]
        if not usable:
            call = Call(self, None, method, args, size=size, work=work, stored=stored)
            self.backlog.append(call)
            return call
        return self._send(min(usable, key=lambda s: s.in_flight), method, args, size, work=work, stored=stored)

    def _flush_backlog(self) -> None:
        waiting, self.backlog = self.backlog, deque()
        for call in waiting:
            if call.slot is None or call.slot.removed:
                self.submit_least_loaded(call.method, *call.args, size=call.size, work=call.work, stored=call.stored)
            else:
                self.submit(call.slot, call.method, *call.args, size=call.size, work=call.work, stored=call.stored)

    def waiting_calls(self, *methods: str) -> list[Call]:
        return [c for c in self.backlog if not methods or c.method in methods]

    def call(self, method: str, *args, what: str | None = None, passthrough: tuple[type[BaseException], ...] = (),
             attempts: int | None = None):
        """A blocking call on a usable slot (waiting for one to be placed), due within run.actor_timeout_s.
        A dead actor is recovered by the group; the call then raises ActorLost, or with `attempts` is made again
        on a usable slot, the run stopping (RunError) when all of them were lost. Errors of `passthrough` types
        are the caller's to handle; any other error stops the run."""
        what = what or f"{self.role}.{method}"
        if attempts is None:
            return self._call_once(method, args, what, passthrough)
        for _attempt in range(attempts):
            try:
                return self._call_once(method, args, what, passthrough)
            except ActorLost as lost:
                last = lost
        raise RunError(f"{what} was lost with its actor {attempts} times (last: {last}); see the actor logs "
                       f"(Ray dashboard or /tmp/ray/session_latest/logs)")

    def _call_once(self, method: str, args: tuple, what: str, passthrough: tuple[type[BaseException], ...]):
        slot = self.wait_usable(what)
        if self.behind(slot):  # weights published to travel with requests: this call needs them too
            self._send(slot, self.load_method, (self.current_weights(),))
        epoch = slot.epoch
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
        except DEATHS as e:
            error = e
        if not self.restartable:
            raise self._died(what, error, slot)
        if slot.epoch == epoch:
            self._mark_dead(slot, error)
        raise ActorLost(f"{what}: {type(error).__name__}")

    def wait_usable(self, what: str) -> Slot:
        """The least-loaded usable slot, waiting (bounded) for one to be placed or recovered."""
        limit = self.restart_timeout_s + self.manager.placement_timeout_s
        deadline = time.monotonic() + limit
        while True:
            usable = [s for s in self.slots if self.usable(s)]
            if usable:
                load = Counter(id(c.slot) for c in self.manager.in_flight.values())
                return min(usable, key=lambda s: load[id(s)])
            if time.monotonic() > deadline:
                raise RunError(f"no {self.role} actor was ready for {what} within {limit:.0f} s "
                               f"(restart and placement timeouts)")
            self.manager.results(methods=(), timeout=0.25)

    def _collect(self, ref, call: Call) -> tuple[bool, object]:
        """The answer of a finished call: (True, result) for the driver, or (False, None) when the
        group dealt with it (a probe, a weight load, or a call lost with its actor and re-issued)."""
        slot = call.slot
        current = call.epoch == slot.epoch and not slot.removed
        if current:
            slot.in_flight -= 1
            if call.probe:
                slot.probing = False
        try:
            result = ray.get(ref, timeout=0)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e, self.restarted):
                self._lost(call, e)  # the call reached a restarted incarnation that holds nothing yet
                return False, None
            if (call.method in self.load_methods or call.carried is not None) and self.weights_source is not None \
                    and isinstance(getattr(e, "cause", None), ray.exceptions.ObjectLostError):
                # the weights died with their owner (the learner's ray.put): the publisher is lost, not this actor
                source, source_slot = self.weights_source
                raise source._died(f"{self.role}.{call.method}", e, source_slot)
            # the actor is alive but the call raised: bad input or a bug, not a crash; do not retry
            raise RunError(f"{call.method.removesuffix('_by_ref')} on {self.role} actor {slot.index} failed: "
                           f"{type(e.cause).__name__}: {e.cause}") from None
        except DEATHS as e:
            self._lost(call, e)
            return False, None
        if call.probe:
            if current:
                self._placed(slot, result)
            return False, None
        if call.method in self.load_methods:
            self._loaded(slot, current, result)
            return False, None
        if call.carried is not None:
            self.load_seconds.append(result.load_s)
        if slot.retiring and slot.in_flight == 0 and not slot.removed:
            self._remove(slot)
        return True, result

    # -- weights -----------------------------------------------------------------
    def _loaded(self, slot: Slot, current: bool, result: dict) -> None:
        """A weight load answered; one that failed ({"version": None}: a broken collective) loads the
        published object instead."""
        if result["version"] is None:
            if current and not slot.retiring and not slot.removed:
                self._send(slot, self.load_method, (self.current_weights(),))
            return
        if current:
            slot.version = result["version"]
        self.load_seconds.append(result["load_s"])
        if self.backlog:
            self._flush_backlog()  # calls that waited for a slot holding the weights

    def current_weights(self):
        """The published weights as an ObjectRef (made now if they were published as a function making one)."""
        if callable(self.weights):
            self.weights = self.weights()
        return self.weights

    def publish(self, weights, source: tuple | None = None, version: int | None = None) -> None:
        """Every placed slot loads `weights` (one object in the object store); so does each slot placed or
        recovered later, before its first call. With `version` and a carry_method, a slot that holds weights
        already takes them with its next carry_method call instead (one call a request, not two); a blocking
        call() loads them first. source: (group, slot) of the actor that put the object (its owner: a load
        failing because the object died with it stops the run as that actor's loss)."""
        self.weights, self.recovery_only, self.weights_source = weights, False, source
        self.weights_version = version if self.carry_method is not None else None
        for slot in self.placed_slots():
            if self.weights_version is None or slot.version < 0:
                self._send(slot, self.load_method, (weights,))

    def behind(self, slot: Slot) -> bool:
        """Whether weights published to travel with calls are newer than those the slot holds."""
        return self.weights_version is not None and not self.recovery_only and slot.version < self.weights_version

    def holds(self, slot: Slot) -> int:
        """The weights version the slot's next carry_method call runs with (-1: none)."""
        return self.weights_version if slot.version >= 0 and self.behind(slot) else slot.version

    def load_via(self, method: str, args: dict, weights) -> None:
        """Each slot of `args` (slot -> its call's arguments) loads new weights by its own `method` call (a
        collective broadcast it takes part in); every other slot, placed or recovered later, or whose call
        fails, loads `weights` (an ObjectRef, or a function making one when first needed)."""
        self.weights, self.recovery_only, self.weights_source, self.weights_version = weights, False, None, None
        self.load_methods.add(method)
        for slot, slot_args in args.items():
            self._send(slot, method, slot_args)

    def keep_for_recovery(self, weights) -> None:
        """What a recovered slot loads before its next call, not sent to the live slots (a trainer's
        own state, which it holds already)."""
        self.weights, self.recovery_only, self.weights_version = weights, True, None

    def loading(self) -> bool:
        return any(c.group is self and c.method in self.load_methods for c in self.manager.in_flight.values())

    def idle_slots(self) -> list[Slot]:
        """Slots that are placed, hold published weights and have no call in flight."""
        return [s for s in self.slots if s.state == READY and not s.retiring and s.in_flight == 0 and s.version >= 0]

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
    def _died(self, what: str, error: BaseException, slot: Slot) -> RunError:
        gone = node_gone(slot.node_id)
        if gone:
            return RunError(f"the {self.role} actor was lost with its node {slot.node_id[:8]} during {what} ({gone}); "
                            f"its state since the last checkpoint is gone: start a node with room for it "
                            f"(resources.{self.role}) and continue with `dgrpo train --resume`")
        return RunError(f"the {self.role} actor died during {what} ({type(error).__name__}); "
                        f"restart with `dgrpo train --resume` to continue from the last checkpoint")

    def _mark_dead(self, slot: Slot, error: BaseException, what: str = "a call") -> None:
        """The first sign of this incarnation's death: count it, and probe until Ray's restart answers."""
        if not self.restartable:
            raise self._died(what, error, slot)
        self.manager.death(self, slot, error)
        slot.epoch += 1
        slot.version = -1
        slot.in_flight = 0
        slot.killed = False
        slot.probing = False
        slot.state, slot.since, slot.next_probe = RECOVERING, time.monotonic(), 0.0
        slot.death, slot.dead_node = error, slot.node_id

    def _replace(self, slot: Slot) -> None:
        """A brand-new actor for the slot; it is placed when the cluster has room."""
        ray.kill(slot.handle, no_restart=True)
        slot.handle = self.factory(slot.index)
        slot.replacements += 1
        slot.epoch += 1
        slot.state, slot.since, slot.version, slot.in_flight = STARTING, time.monotonic(), -1, 0
        self._probe(slot)

    def _placed(self, slot: Slot, info: dict) -> None:
        """A probe answered: a new actor is placed, or a restarted one is back; it loads the weights first."""
        if slot.death is not None:
            self.manager.settle(self, slot)
        was = slot.state
        slot.state, slot.since = READY, time.monotonic()
        slot.node_id = info.get("node_id") if isinstance(info, dict) else None
        if slot.node_id:
            self.nodes_used.add(slot.node_id)
        if self.manager.announce and was == STARTING:
            node = f" on node {slot.node_id[:8]}" if slot.node_id else ""
            print(f"{self.role} actor {slot.index} placed{node}; {self.placed()} placed, target {self.target}")
        if slot.retiring:
            self._remove(slot)
            return
        if self.weights is not None:
            self._send(slot, self.load_method, (self.current_weights(),))
        self._flush_backlog()

    def _lost(self, call: Call, error: BaseException) -> None:
        """The actor of `call` died under it (or a probe got no answer): recover its slot once per
        incarnation, then re-issue the lost work, which produced nothing."""
        slot = call.slot
        current = call.epoch == slot.epoch and not slot.removed
        if call.probe and current and slot.state == STARTING and getattr(error, "actor_init_failed", False):
            raise RunError(f"{self.role} actor {slot.index} could not start: {error}") from None
        if not self.restartable:
            if call.probe and current and slot.state == STARTING and slot.replacements == 0:
                # it died before it was placed: no call has reached it, so a new one starts where it would have
                print(f"the {self.role} actor died before it was placed ({type(error).__name__}); it held nothing "
                      f"yet, so a new one is started (once)", flush=True)
                self._replace(slot)
                return
            raise self._died(f"{self.role}.{call.method}", error, slot)
        if call.probe:
            if not current:
                return
            if slot.state == RECOVERING and isinstance(error, ray.exceptions.ActorUnavailableError):
                slot.next_probe = time.monotonic() + REPROBE_S  # Ray is restarting it: ask again
                return
            if slot.state == STARTING:  # died before it was ever placed
                self.manager.death(self, slot, error)
                slot.death = error
            self.manager.settle(self, slot)  # dead for good (restarts used up): a new actor
            self._replace(slot)
            return
        if current:
            self._mark_dead(slot, error)
        policy = self.on_lost.get(call.method)
        if policy == "requeue":
            self.requeued.append(call.payload)
        elif policy == "resubmit":
            self.manager.counters["reissued_requests"] += 1
            self.submit_least_loaded(call.method, *call.args, size=call.size, work=call.work, stored=call.stored)
