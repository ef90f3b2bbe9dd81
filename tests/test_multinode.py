"""A multi-node Ray cluster on this machine (issue 17): roles on their nodes, a run submitted with
`ray job submit`, and runs that lose rollout, judge and learner nodes or gain rollout nodes.

The cluster (tests/raynodes.py) is a head (dashboard and job server on 127.0.0.1, no role marker)
and worker nodes, each its own `ray start` with one CPU and one role marker (dgrpo_learner,
dgrpo_judge, dgrpo_rollout). Every actor of a role asks for a whole marker
(custom_resources {marker: 1}), so a node holds one actor of its role and a role's actors can run
nowhere else. Drivers are `dgrpo train` processes that join the cluster (RAY_ADDRESS), as a job's
driver does. A node is lost by SIGKILL to every process of its `ray start` session: raylet,
agents and the actors on it. Ray's health checks run every second here (5 misses mark a node
dead, against 3 s x 5 by default) so that a lost node is declared dead within seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dgrpo.config import TrainConfig, to_dict
from dgrpo.orchestration.metrics import read_jsonl
from raynodes import REPO, LocalCluster
from test_faults import check_every_batch_trained_once, fault_config

# the second tier (`make test-cluster`): clusters of their own, run one at a time
pytestmark = pytest.mark.cluster

ROLE_MARKERS = {"learner": "dgrpo_learner", "judge": "dgrpo_judge", "rollout": "dgrpo_rollout"}
HEALTH_CHECKS = {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}


@pytest.fixture(scope="module")
def cluster():
    t0 = time.perf_counter()
    c = LocalCluster(system_config=HEALTH_CHECKS)
    try:
        c.add_nodes({"learner-1": {"dgrpo_learner": 1}, "judge-1": {"dgrpo_judge": 1},
                     "rollout-1": {"dgrpo_rollout": 1}, "rollout-2": {"dgrpo_rollout": 1}})
        print(f"\ncluster of {len(c.nodes)} nodes up in {time.perf_counter() - t0:.0f} s "
              f"({', '.join(f'{n.name} {n.started_s:.0f} s' for n in c.nodes.values())})")
        yield c
    finally:
        c.stop()


def keep_nodes(cluster: LocalCluster, marker: str, names: list[str]) -> None:
    """Exactly the nodes `names` of `marker` are live: others are stopped, missing ones started."""
    for name in cluster.live(marker):
        if name not in names:
            cluster.kill_node(name)
    missing = {n: {marker: 1} for n in names if n not in cluster.live(marker)}
    if missing:
        cluster.add_nodes(missing)


def run_config(out_dir: Path, corpus: str, rollout: tuple[int, int], judge: tuple[int, int], **run) -> dict:
    """test_faults' tiny run, its roles pinned to their markers, one actor per node."""
    def role(marker: str, bounds: tuple[int, int] | None = None) -> dict:
        size = {"min_workers": bounds[0], "max_workers": bounds[1], "max_restarts": 1} if bounds else {}
        return {**size, "num_cpus": 0.5, "custom_resources": {marker: 1}}
    cfg = fault_config(out_dir.parent, corpus, out_dir.name,
                       run={"steps": 8, "eval_every": 1000, "checkpoint_every": 2, "keep_checkpoints": 2,
                            "actor_timeout_s": 120, "placement_timeout_s": 180, "membership_check_s": 1, **run},
                       resources={"torch_threads": 1, "learner": role("dgrpo_learner"),
                                  "rollout": role("dgrpo_rollout", rollout), "judge": role("dgrpo_judge", judge)})
    return to_dict(cfg)


class Train:
    """`dgrpo train` as a driver process joined to the cluster; its output goes to RUN.log."""

    def __init__(self, cluster: LocalCluster, config: dict, resume: bool = False):
        self.out = Path(config["run"]["out_dir"])
        self.out.mkdir(parents=True, exist_ok=True)
        self.config_file = self.out.parent / f"{self.out.name}.yaml"
        self.config_file.write_text(yaml.safe_dump(config))
        self.log_path = self.out.parent / f"{self.out.name}{'.resume' if resume else ''}.log"
        cmd = [sys.executable, "-m", "dgrpo.entrypoints.cli", "train", "-c", str(self.config_file)]
        cmd += ["--resume"] if resume else []
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, env=dict(cluster.env, RAY_ADDRESS=cluster.address), cwd=REPO,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def steps(self) -> list[dict]:
        return [r for r in read_jsonl(self.out / "metrics.jsonl") if "num_samples" in r]

    def wait_for(self, what: str, predicate, timeout_s: float = 300) -> dict:
        """Waits until predicate(last step record) holds; -> that record."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            rows = self.steps()
            if rows and predicate(rows[-1]):
                return rows[-1]
            if self.proc.poll() is not None:
                pytest.fail(f"the run ended (rc {self.proc.returncode}) before {what}:\n{self.output()[-4000:]}")
            time.sleep(0.5)
        pytest.fail(f"no {what} within {timeout_s} s:\n{self.output()[-4000:]}")

    def finish(self, timeout_s: float = 400) -> int:
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"the run did not end within {timeout_s} s:\n{self.output()[-4000:]}")
        finally:
            self.log.close()
        return self.proc.returncode

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text()

    def summary(self) -> dict:
        return json.loads((self.out / "summary.json").read_text())


def node_roles(cluster: LocalCluster, summary: dict) -> dict[str, list[str]]:
    """node name -> the roles whose actors ran on it (from the run's summary)."""
    by_id = {node_id: name for name, node_id in cluster.node_ids().items()}
    roles: dict[str, list[str]] = {}
    for role, ids in summary["nodes"].items():
        for node_id in ids:
            roles.setdefault(by_id.get(node_id, node_id[:8]), []).append(role)
    return roles


def test_each_role_runs_on_its_nodes_in_a_submitted_job(cluster, tiny_corpus_file, tmp_path):
    """`ray job submit` of a tiny run whose roles ask for their markers: the job succeeds, and every
    actor ran on a node of its role (by node id): the learner on learner-1, the judge on judge-1,
    the two rollout workers one on each rollout node."""
    keep_nodes(cluster, "dgrpo_rollout", ["rollout-1", "rollout-2"])
    keep_nodes(cluster, "dgrpo_judge", ["judge-1"])
    keep_nodes(cluster, "dgrpo_learner", ["learner-1"])
    markers = [f"resources.{role}.custom_resources={{{marker}: 1}}" for role, marker in ROLE_MARKERS.items()]
    env = dict(cluster.env, RAY_ADDRESS=cluster.dashboard)
    t0 = time.perf_counter()
    out_dir = tmp_path / "job_run"
    sets = [f"corpus.path={tiny_corpus_file}", f"run.out_dir={out_dir}", "resources.rollout.num_workers=2", *markers]
    args = [a for s in sets for a in ("--set", s)]
    submit = subprocess.run([str(REPO / "deploy" / "submit.sh"), "deploy/configs/tiny.yaml", *args], env=env,
                            cwd=REPO, capture_output=True, text=True, timeout=400)
    assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-2000:]
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["steps"] == 2
    roles = node_roles(cluster, summary)
    print(f"\njob finished in {time.perf_counter() - t0:.0f} s; where each role ran:")
    ids = cluster.node_ids()
    for name, node in cluster.nodes.items():
        print(f"  {name:10s} {ids.get(name, '?')[:8]}  {json.dumps(node.resources):22s} {roles.get(name, [])}")
    assert roles == {"learner-1": ["learner"], "judge-1": ["judge"], "rollout-1": ["rollout"],
                     "rollout-2": ["rollout"]}


def test_what_the_cluster_listens_on(cluster):
    """Records every listening TCP socket of every node (docs/OPERATIONS.md quotes the table): the
    dashboard is on 127.0.0.1 only; the rest is on loopback, all interfaces or the host's address."""
    ids = cluster.node_ids()
    host = {cluster.addresses[n.node_manager_port] for n in cluster.nodes.values()}
    rows = cluster.listening()
    print()
    for name, sockets in rows.items():
        print(f"{name} ({ids[name][:8]}):")
        for addr, port, proc, what in sockets:
            print(f"  {addr:>15s}:{port:<6d} {proc:16s} {what}")
    head = rows["head"]
    assert [a for a, p, _, _ in head if p == cluster.dashboard_port] == ["127.0.0.1"]
    allowed = {"127.0.0.1", "::1", "0.0.0.0", "::", *host}
    assert all(addr in allowed for sockets in rows.values() for addr, _, _, _ in sockets), rows
    assert all(sockets for sockets in rows.values())  # every live node's processes listen somewhere


@pytest.mark.slow
def test_rollout_nodes_join_and_leave_and_a_judge_node_is_lost(cluster, tiny_corpus_file, tmp_path):
    """Sync mode, rollout workers elastic 1..3, judges 1..2, one actor per node. The run starts on one
    rollout node; two more join (workers 1 -> 3, each loading the current weights first); one of them
    is lost mid-run (3 -> 2, its request re-issued), then a judge node (2 -> 1). The run goes on to
    its last step and trains every issued request exactly once, each from the policy before it."""
    keep_nodes(cluster, "dgrpo_rollout", ["rollout-1"])
    keep_nodes(cluster, "dgrpo_judge", ["judge-1", "judge-2"])
    keep_nodes(cluster, "dgrpo_learner", ["learner-1"])
    # hundreds of steps in two minutes saturate the tiny reward; the run is about membership, so it does not stop
    # on zero signal
    config = run_config(tmp_path / "elastic", tiny_corpus_file, rollout=(1, 3), judge=(1, 2), steps=100_000,
                        max_minutes=2, checkpoint_every=100_000, max_zero_signal_steps=0)
    train = Train(cluster, config)
    try:
        train.wait_for("step 2 with both judges", lambda r: r["step"] >= 2 and r["judge_workers"] == 2)
        t0 = time.perf_counter()
        cluster.add_nodes({"rollout-3": {"dgrpo_rollout": 1}, "rollout-4": {"dgrpo_rollout": 1}})
        grown = train.wait_for("3 rollout workers", lambda r: r["rollout_workers"] == 3)
        print(f"\nstep {grown['step']}: 3 rollout workers, {time.perf_counter() - t0:.0f} s after two nodes "
              f"were started")
        killed = cluster.kill_node("rollout-4")
        shrunk = train.wait_for("2 rollout workers", lambda r: r["rollout_workers"] == 2 and r["nodes_lost"] == 1)
        print(f"step {shrunk['step']}: rollout-4 lost ({len(killed)} processes killed), 2 rollout workers")
        cluster.kill_node("judge-2")
        last = train.wait_for("1 judge", lambda r: r["judge_workers"] == 1 and r["nodes_lost"] == 2)
        print(f"step {last['step']}: judge-2 lost, 1 judge")
        assert train.finish() == 0, train.output()[-4000:]
    finally:
        if train.proc.poll() is None:
            train.proc.kill()
    output = train.output()
    print("\n".join(line for line in output.splitlines()
                    if line.startswith(("rollout actor", "judge actor", "scale:"))))
    summary = train.summary()
    rows = train.steps()
    counts = [(r["step"], r["rollout_workers"], r["judge_workers"]) for r in rows]
    changes = [c for i, c in enumerate(counts) if i == 0 or c[1:] != counts[i - 1][1:]]
    print(f"(step, rollout workers, judge workers) where the counts changed: {changes}")
    rollouts = [c[1] for i, c in enumerate(changes) if i == 0 or c[1] != changes[i - 1][1]]
    print({k: summary[k] for k in ("steps", "requests_issued", "batches_trained", "reissued_requests",
                                   "worker_restarts", "judge_restarts", "actors_lost_with_node", "nodes_lost",
                                   "duplicate_batches", "dropped_stale_batches")})
    assert rollouts[0] == 1 and rollouts[-1] == 2 and 3 in rollouts[:-1], rollouts  # 1 -> (2 ->) 3 -> 2
    assert counts[-1][1:] == (2, 1)
    assert summary["nodes_lost"] == 2 and summary["actors_lost_with_node"] == 2
    cfg = TrainConfig.model_validate({**config, "run": {**config["run"], "steps": summary["steps"]}})
    check_every_batch_trained_once(cfg, summary, {"requests": summary["requests_issued"], "in_flight": [],
                                                  "ready": []})
    roles = node_roles(cluster, summary)
    assert sorted(n for n, r in roles.items() if "rollout" in r) == ["rollout-1", "rollout-3", "rollout-4"]


@pytest.mark.slow
def test_losing_the_learner_node_stops_the_run_and_resume_finishes_it(cluster, tiny_corpus_file, tmp_path):
    keep_nodes(cluster, "dgrpo_rollout", ["rollout-1"])
    keep_nodes(cluster, "dgrpo_judge", ["judge-1"])
    keep_nodes(cluster, "dgrpo_learner", ["learner-1"])
    config = run_config(tmp_path / "learner_loss", tiny_corpus_file, rollout=(1, 1), judge=(1, 1), steps=30)
    train = Train(cluster, config)
    train.wait_for("step 3 (a checkpoint at step 2)", lambda r: r["step"] >= 3)
    cluster.kill_node("learner-1")
    rc = train.finish()
    output = train.output()
    error = next((line for line in output.splitlines() if line.startswith("error: ")), "")
    print(f"\nafter losing learner-1: exit {rc}\n{error}")
    assert rc == 2 and "the learner actor was lost with its node" in error and "--resume" in error
    stopped_at = train.steps()[-1]["step"]
    assert stopped_at < 30

    cluster.add_nodes({"learner-2": {"dgrpo_learner": 1}})
    resumed = Train(cluster, config, resume=True)
    assert resumed.finish() == 0, resumed.output()[-4000:]
    line = next(ln for ln in resumed.output().splitlines() if ln.startswith("resumed from"))
    print(line)
    steps = [r["step"] for r in resumed.steps()]
    assert steps == list(range(1, 31))  # each step logged once: those after the checkpoint again, once
    summary = resumed.summary()
    assert summary["steps"] == 30 and summary["batches_trained"] == summary["requests_issued"]
    assert node_roles(cluster, summary).get("learner-2") == ["learner"]
