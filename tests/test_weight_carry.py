"""Weights published with a version travel with the workers' next requests (ActorGroup.carry_method): one
call a request where a load and a request took two. A worker that holds no weights yet loads them on its own;
a blocking call on a worker behind the published version loads them first; the worker always runs a request
with the weights published when it was sent."""

from __future__ import annotations

import ray

from dgrpo.actors.references import Receipt
from dgrpo.orchestration.groups import ActorManager

ray.cloudpickle.register_pickle_by_value(__import__(__name__))  # the actor class below, for the workers


class Holder:
    """Stands for a rollout worker: holds a version, logs every load and every request in order."""

    def __init__(self):
        self.version, self.log = -1, []

    def info(self):
        return {"node_id": ray.get_runtime_context().get_node_id()}

    def set_weights(self, snapshot):
        self.version = snapshot["version"]
        self.log.append(("load", self.version))
        return {"version": self.version, "load_s": 0.001}

    def work_by_ref(self, request_id, weights=None):
        load_s = self.set_weights(ray.get(weights[0]))["load_s"] if weights is not None else 0.0
        self.log.append(("work", request_id, self.version))
        return {"made_with": self.version}, Receipt(request_id, self.version, 1, 1, 0.0, load_s=load_s)

    def held(self):
        return self.version

    def history(self):
        return self.log


def answers(manager, n):
    out = []
    while len(out) < n:
        out += [result for _call, result in manager.results(timeout=1.0)]
    return out


def test_published_weights_go_with_the_next_request_and_a_blocking_call_loads_them_first(ray_cluster):
    manager = ActorManager(timeout_s=60, max_failures=0, counters={})
    try:
        group = manager.group("rollout", 2, lambda _: ray.remote(Holder).options(num_cpus=0).remote(),
                              carry_method="work_by_ref")
        manager.wait_placed()
        # the first version: no slot holds weights yet, so each loads it on its own
        group.publish(ray.put({"version": 0}), version=0)
        assert group.loading()
        while group.loading():
            manager.results(methods=(), timeout=0.5)
        assert [s.version for s in group.slots] == [0, 0]
        assert len(group.take_load_seconds()) == 2

        group.publish(ray.put({"version": 1}), version=1)  # no load sent: the requests take it along
        assert not group.loading()
        assert [group.holds(s) for s in group.slots] == [1, 1]
        first, second = group.slots
        calls = [group.submit(first, "work_by_ref", 10, stored=1)]
        assert calls[0].carried == 1 and first.version == 1
        receipts = answers(manager, 1)
        assert receipts[0].policy_version == 1 and receipts[0].load_s == 0.001
        assert ray.get(calls[0].values[0]) == {"made_with": 1}
        assert group.take_load_seconds() == [0.001]
        again = group.submit(first, "work_by_ref", 11, stored=1)  # holds it now: nothing carried
        assert again.carried is None and answers(manager, 1)[0].policy_version == 1

        # a blocking call on a slot behind the published version loads it first (the second slot holds 0)
        group.publish(ray.put({"version": 2}), version=2)
        group.slots.remove(first)  # so that the call goes to the second slot
        try:
            assert group.call("held") == 2
        finally:
            group.slots.insert(0, first)
        assert ray.get(second.handle.history.remote()) == [("load", 0), ("load", 2)]
        assert ray.get(first.handle.history.remote()) == [("load", 0), ("load", 1), ("work", 10, 1), ("work", 11, 1)]
        while group.loading():  # the second slot's own load is answered: it holds version 2
            manager.results(methods=(), timeout=0.5)
        assert second.version == 2 and group.holds(first) == 2

        # published without a version (a group without carry_method, or the old path): every slot loads now
        group.publish(ray.put({"version": 3}))
        assert group.loading()
        while group.loading():
            manager.results(methods=(), timeout=0.5)
        assert [s.version for s in group.slots] == [3, 3]
    finally:
        manager.close()
