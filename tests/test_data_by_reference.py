"""Batches travel by reference (issue 26): a batch lost with its node is made again, and every request is
trained exactly once.

The driver hands rollout batches to the judges and scored batches to the learner as object references
(actors/references.py); a batch lives in the object store of the node that made it. Here the cluster
(tests/raynodes.py) keeps every task result over 1 KB in a node's object store
(max_direct_call_object_size), as a real model's batches would be, and has two judge nodes and two rollout
nodes. The driver, a process joined to the cluster, kills a node holding a batch at two moments:

    step 2: a judge node, once a batch it scored is in and before the step trains it (the learner finds
            its input lost; the judge is lost with its node);
    step 4: a rollout node, once a batch it generated is in and before a judge scores it (the judge finds
            its input lost; the rollout worker is lost with its node).

Neither actor that was given the lost batch has died: it answers that its input is lost, and the driver
issues the batch's request again (same id and seed). The run goes on to its last step; every step trains
a full step of fresh samples, and each request is trained exactly once. (The run keeps no rollout log:
the driver would fetch every batch to write it, and its copy would survive the node.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from dgrpo.actors.references import Receipt, fetch
from dgrpo.orchestration.metrics import read_jsonl
from raynodes import REPO, LocalCluster
from test_multinode import HEALTH_CHECKS, run_config

ray.cloudpickle.register_pickle_by_value(__import__(__name__))  # the actor classes below, for the workers

DRIVER = r'''
import json, sys
import ray
from dgrpo.config import TrainConfig
from dgrpo.orchestration.cluster import connect
from dgrpo.orchestration.driver import Driver
from raynodes import stop_session

config, sessions, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
killed = []


def kill_node(node_id, why):
    port = next(n["NodeManagerPort"] for n in ray.nodes() if n["NodeID"] == node_id)
    stop_session(sessions[str(port)], signals=(9,))
    killed.append({"node": node_id, "why": why})
    print(f"killed node {node_id[:8]}: {why}", flush=True)


class KillsNodes(Driver):
    def collect(self, call, receipts):
        super().collect(call, receipts)
        if self.step == 1 and not killed and not any(r.lost for r in receipts):
            kill_node(call.slot.node_id, "a judge node holding a scored batch of step 2")

    def score(self, call, receipt):
        if self.step == 3 and len(killed) == 1:
            kill_node(call.slot.node_id, "a rollout node holding a batch of step 4")
        return super().score(call, receipt)


cfg = TrainConfig.model_validate(config)
connect(cfg)
driver = KillsNodes(cfg, quiet=True)
try:
    summary = driver.run()
    state = {"requests": driver.request_counter, "in_flight": sorted(driver.requests_in_flight()),
             "ready": sorted(b.request_id for b in driver.ready)}
finally:
    driver.close()
json.dump({"summary": summary, "state": state, "killed": killed}, open(out, "w"))
'''


def test_fetch_tells_lost_objects(ray_cluster):
    """fetch -> (the objects that are there, the indices of those lost); one lost object fails none of the others."""
    refs = [ray.put(i) for i in range(3)]
    assert fetch(refs) == ([0, 1, 2], [])

    @ray.remote
    def lost():
        raise ray.exceptions.ObjectLostError("00" * 28, None, "")  # what ray.get raises for a lost object

    # a task that raises ObjectLostError stands for a lost object: ray.get of its result raises it
    values, missing = fetch([refs[0], lost.remote(), refs[2]])
    assert values == [0, 2] and missing == [1]


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster(system_config={**HEALTH_CHECKS, "max_direct_call_object_size": 1024})
    try:
        c.add_nodes({"learner-1": {"dgrpo_learner": 1}, "judge-1": {"dgrpo_judge": 1}, "judge-2": {"dgrpo_judge": 1},
                     "rollout-1": {"dgrpo_rollout": 1}, "rollout-2": {"dgrpo_rollout": 1}})
        yield c
    finally:
        c.stop()


@pytest.mark.slow
@pytest.mark.cluster
def test_a_batch_lost_with_its_node_is_regenerated(cluster, tiny_corpus_file, tmp_path):
    config = run_config(tmp_path / "run", tiny_corpus_file, rollout=(1, 2), judge=(1, 2), steps=6,
                        checkpoint_every=100, max_worker_failures=0, log_rollouts=False)  # logging would copy them
    sessions = {str(n.node_manager_port): n.sid for n in cluster.nodes.values()}
    out = tmp_path / "result.json"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(config), json.dumps(sessions), str(out)],
                          env=dict(cluster.env, RAY_ADDRESS=cluster.address, PYTHONPATH=f"{REPO}:{REPO / 'tests'}"),
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    print(f"\nrun with two nodes lost took {time.perf_counter() - t0:.0f} s")
    print("\n".join(line for line in output.splitlines() if line.startswith(("killed", "rollout actor", "judge actor"))
                    or "issued again" in line))
    result = json.loads(out.read_text())
    summary, state = result["summary"], result["state"]
    assert [k["why"].split()[1] for k in result["killed"]] == ["judge", "rollout"]
    assert summary["nodes_lost"] == 2 and summary["actors_lost_with_node"] == 2
    assert summary["regenerated_batches"] >= 2  # at least the batch each kill took
    # every step trained a full step of fresh samples; each issued request was trained once, none is left
    rows = [r for r in read_jsonl(Path(config["run"]["out_dir"]) / "metrics.jsonl") if "num_samples" in r]
    assert [r["step"] for r in rows] == list(range(1, 7))
    per_step = config["grpo"]["prompts_per_step"] * config["grpo"]["group_size"]
    assert [r["num_samples"] for r in rows] == [per_step] * 6
    assert all(r["batch_versions"] == [r["step"] - 1] for r in rows)
    assert summary["batches_trained"] == summary["requests_issued"] == state["requests"]
    assert summary["duplicate_batches"] == 0 and summary["dropped_stale_batches"] == 0
    assert state["in_flight"] == [] and state["ready"] == []


class Owner:
    """Stands for the learner: puts an object in the store (owning it) and hands back its reference."""

    def info(self):
        return {"node_id": ray.get_runtime_context().get_node_id()}

    def put(self):
        return [ray.put(b"w" * 200_000)]


class Loader:
    """Stands for a rollout worker: loads whatever object it is sent."""

    def info(self):
        return {"node_id": ray.get_runtime_context().get_node_id()}

    def set_weights(self, weights):
        return {"version": 1, "load_s": 0.0}

    def work_by_ref(self, request_id, weights=None):
        """A request that takes the weights along (ActorGroup.carry_method): loads them first."""
        if weights is not None:
            ray.get(weights[0])
        return b"batch", Receipt(request_id, 1, 1, 1, 0.0)


@pytest.mark.parametrize("carried", [False, True], ids=["own_load", "with_a_request"])
def test_weights_lost_with_their_owner_stop_the_run_as_the_owners_loss(ray_cluster, carried):
    """Weights die with the learner that put them (their owner): a worker's load then fails, and the run stops
    with the learner's loss (resume), not with a worker's bad call (a race seen when a learner node is lost
    between the learner's publish and the workers' loads); so does a request that takes them along."""
    from dgrpo.errors import RunError
    from dgrpo.orchestration.groups import ActorManager

    manager = ActorManager(timeout_s=60, max_failures=0, counters={})
    try:
        owner = manager.group("learner", 1, lambda _: ray.remote(Owner).options(num_cpus=0).remote(),
                              restartable=False)
        loaders = manager.group("rollout", 1, lambda _: ray.remote(Loader).options(num_cpus=0).remote(),
                                carry_method="work_by_ref")
        manager.wait_placed()
        [weights] = owner.call("put")
        ray.kill(owner.slots[0].handle, no_restart=True)
        deadline = time.monotonic() + 30  # dead (ray.kill returns before it is, and a call may still be answered)
        while True:
            try:
                ray.get(owner.slots[0].handle.info.remote(), timeout=5)
            except ray.exceptions.RayActorError:
                break
            assert time.monotonic() < deadline, "the killed owner still answers after 30 s"
            time.sleep(0.2)
        deadline = time.monotonic() + 60  # and its death known where objects are fetched (a copy is served till then)
        while time.monotonic() < deadline:
            try:
                ray.get(weights, timeout=5)
            except ray.exceptions.ObjectLostError:
                break
            time.sleep(0.5)
        if not carried:
            loaders.publish(weights, source=(owner, owner.slots[0]))
        else:
            loaders.slots[0].version = 0  # it holds an earlier version: the next request takes the new one along
            loaders.publish(weights, source=(owner, owner.slots[0]), version=1)
            loaders.submit(loaders.slots[0], "work_by_ref", 7, stored=1)
        method = "work_by_ref" if carried else "set_weights"
        with pytest.raises(RunError, match=rf"the learner actor died during rollout.{method} .*--resume"):
            while manager.busy():
                manager.results(timeout=0.5)
    finally:
        manager.close()
