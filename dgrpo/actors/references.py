"""Batches passed on by reference: what an actor hands back to the driver instead of a batch, and how an
actor takes batches it was given by reference.

    driver  --RolloutRequest-->  RolloutWorker.generate_by_ref  -> (RolloutBatch, Receipt)   num_returns=2
    driver  --[ObjectRef...]-->  JudgeWorker.score_by_ref       -> (ScoredBatch..., [Receipt...])  num_returns=k+1
    driver  --[ObjectRef...]-->  LearnerActor.train_by_ref      -> metrics, or the inputs that were lost

The driver reads only the receipts; the batches stay in the object store of the node that made them and
go from there to the actor that needs them. References are passed inside a list, so that Ray does not
resolve them before the call: the actor fetches them itself (`fetch`) and tells a batch lost with its
node (Ray's ObjectLostError) from its own failure. The driver then issues the lost batch's request again.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray

from ..protocols import RolloutBatch, ScoredBatch


@dataclass(frozen=True)
class Receipt:
    """What the driver schedules and logs a batch by: ids, versions, sizes and timings (no tensors)."""
    request_id: int
    policy_version: int  # of the policy that generated the batch
    num_groups: int
    num_samples: int
    generate_s: float
    score_s: float = 0.0
    judge_version: int = -1  # of the judge that scored it; -1: not scored
    lost: bool = False  # the call's input batch was lost with its node: nothing was made
    load_s: float = 0.0  # the weight load the request carried (ActorGroup.publish with a version), if any

    @classmethod
    def of(cls, batch: RolloutBatch | ScoredBatch) -> "Receipt":
        if isinstance(batch, ScoredBatch):
            r = batch.rollout
            return cls(r.request_id, r.policy_version, r.num_groups, r.num_samples, r.timings["generate_s"],
                       batch.timings["score_s"], batch.judge_version)
        return cls(batch.request_id, batch.policy_version, batch.num_groups, batch.num_samples,
                   batch.timings["generate_s"])


LOST = Receipt(-1, -1, 0, 0, 0.0, lost=True)


def fetch(refs: list) -> tuple[list, list[int]]:
    """(the objects of `refs`, the indices of those lost with their node). One get for all, unless one is lost."""
    try:
        return list(ray.get(list(refs))), []
    except ray.exceptions.ObjectLostError:
        pass
    values, lost = [], []
    for i, ref in enumerate(refs):
        try:
            values.append(ray.get(ref))
        except ray.exceptions.ObjectLostError:
            lost.append(i)
    return values, lost
