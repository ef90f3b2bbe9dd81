"""The requests the driver issues and the batches they become, up to the step that trains them.

    issue(version, training)   every idle rollout worker that holds weights gets a request (lost ones first)
    to_judge(calls)            rollout batches in together, by reference, to the judges (one call per judge)
    collect(call, receipts)    scored batches wait for their step; one whose input was lost is made again
    take_step(version)         the next step's batches, stale ones dropped; None while too few are ready
    give_back(batches, lost)   a step that lost inputs trained nothing: the lost are made again, the rest wait first

A request is issued once and trained once: a lost one is issued again with its id and seed (a worker's
death: the rollout group's requeue; a batch lost with its node: regenerate), and a second scored batch of
one request is counted and dropped. Synchronous mode issues one step's prompts at the current version and
waits for its update; asynchronous mode keeps up to run.max_staleness steps of groups in flight.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import ray

from ..actors.references import Receipt
from ..config import TrainConfig
from ..protocols import RolloutRequest
from .groups import ActorGroup, Call


@dataclass
class Scored:
    """A scored batch waiting for its step: its reference, its receipt and the request that made it."""
    ref: object
    receipt: Receipt
    request: RolloutRequest

    @property
    def request_id(self) -> int:
        return self.receipt.request_id


class BatchFlow:
    def __init__(self, cfg: TrainConfig, prompts, workers: ActorGroup, judges: ActorGroup, counters: dict,
                 rollout_log=None, request_counter: int = 0):
        self.cfg, self.prompts, self.workers, self.judges = cfg, prompts, workers, judges
        self.counters, self.rollout_log = counters, rollout_log
        self.request_counter = request_counter  # requests issued so far: the next request's id
        self.ready: deque[Scored] = deque()  # scored batches waiting for a step
        self.consumed: set[int] = set()  # request ids whose scored batch arrived (a second one is a duplicate)

    def groups_in_flight(self) -> int:
        actors = self.workers.manager
        return sum(c.size for c in actors.calls("generate_by_ref", "score_by_ref")) + \
            sum(b.receipt.num_groups for b in self.ready)

    def requests_in_flight(self) -> set[int]:
        """Ids of the issued requests not yet scored: generating, scoring, or lost and waiting to be issued again."""
        manager = self.workers.manager
        return {c.payload.request_id for c in manager.calls("generate_by_ref")} | \
            {r.request_id for c in manager.calls("score_by_ref") for r in c.payload} | \
            {r.request_id for r in self.workers.requeued}

    def issue(self, version: int, training: bool) -> None:
        cfg = self.cfg
        per_step = cfg.grpo.prompts_per_step
        per_request = -(-per_step // self.workers.target)  # the target, not the live count: same requests as ever
        sync = cfg.run.mode == "sync"
        # async: generate the next step's groups while the learner trains on this step's;
        # more look-ahead than max_staleness steps would only produce batches to drop
        limit = per_step if sync else per_step * max(1, cfg.run.max_staleness)
        idle = self.workers.idle_slots()
        in_flight = self.groups_in_flight() if idle else 0
        for slot in idle:
            if sync and (training or self.workers.holds(slot) != version):
                continue
            request = self.workers.pop_requeued()
            if request is None:
                room = limit - in_flight
                if room <= 0:
                    return
                n = min(per_request, room)
                request = RolloutRequest(request_id=self.request_counter, prompts=self.prompts.next(n),
                                         group_size=cfg.grpo.group_size,
                                         seed=cfg.run.seed * 1_000_003 + self.request_counter,
                                         reference_terms=cfg.grpo.reference_on_rollout,
                                         replay_steps=cfg.grpo.replay_steps or 0)
                self.request_counter += 1
            request.min_version = version if sync else max(0, version - cfg.run.max_staleness)
            self.workers.submit(slot, "generate_by_ref", request, size=request.prompts.shape[0], stored=1)
            in_flight += request.prompts.shape[0]

    def to_judge(self, calls: list[Call]) -> None:
        """The rollout batches of `calls` (answered together), by reference, spread over the placed judges: one
        scoring call per judge, the least busy first."""
        parts = max(1, min(len(calls), self.judges.placed()))
        for part in (calls[i::parts] for i in range(parts)):
            self.judges.submit_least_loaded("score_by_ref", [c.values[0] for c in part], size=sum(c.size for c in part),
                                            work=[c.payload for c in part], stored=len(part))

    def collect(self, call: Call, receipts: list[Receipt]) -> None:
        for request, ref, receipt in zip(call.payload, call.values, receipts):
            if receipt.lost:
                self.regenerate([request], f"the judge's input (rollout batch of request {request.request_id})")
            elif receipt.request_id in self.consumed:
                self.counters["duplicate_batches"] += 1
            else:
                self.consumed.add(receipt.request_id)
                if self.rollout_log is not None:  # the only place the driver fetches a batch's bytes
                    self.rollout_log.write(ray.get(ref))
                self.ready.append(Scored(ref, receipt, request))

    def regenerate(self, requests: list[RolloutRequest], what: str) -> None:
        print(f"{what} was lost with its node; request(s) {[r.request_id for r in requests]} are issued again",
              flush=True)
        self.counters["regenerated_batches"] += len(requests)
        self.workers.requeued.extend(requests)

    def take_step(self, version: int) -> list[Scored] | None:
        max_staleness = self.cfg.run.max_staleness
        fresh = deque()
        for b in self.ready:
            if version - b.receipt.policy_version > max_staleness:
                self.counters["dropped_stale_batches"] += 1
            else:
                fresh.append(b)
        self.ready = fresh
        per_step = self.cfg.grpo.prompts_per_step
        if sum(b.receipt.num_groups for b in self.ready) < per_step:
            return None
        take, groups = [], 0
        while groups < per_step:
            b = self.ready.popleft()
            take.append(b)
            groups += b.receipt.num_groups
        return sorted(take, key=lambda b: b.receipt.request_id)

    def give_back(self, batches: list[Scored], lost: set[int]) -> None:
        for i in lost:
            self.consumed.discard(batches[i].receipt.request_id)
        self.ready.extendleft(reversed([b for i, b in enumerate(batches) if i not in lost]))
        self.regenerate([batches[i].request for i in sorted(lost)], "a scored batch of the step")
