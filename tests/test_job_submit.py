"""`ray job submit` of a tiny GRPO run to a `ray start --head` cluster (token auth, 127.0.0.1 only).

The head node runs in its own process session with its own ports and temp dir, so
it cannot collide with the session `ray_cluster` fixture or other Ray instances on
this machine (`ray.init()` elsewhere does not find it: its address file lives in
the private temp dir). Teardown stops exactly the processes of that session, by
id: `ray stop --force` would kill every Ray process on the machine.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from raynodes import BIN, REPO, alive, free_ports, ray_env, session_pids, stop_session

# the second tier (`make test-cluster`): clusters of their own, run one at a time
pytestmark = pytest.mark.cluster


@pytest.fixture
def head_node():
    """A `ray start --head` cluster on 127.0.0.1 with a dashboard (job server); stopped afterwards."""
    temp_dir = tempfile.mkdtemp(prefix="dgjs_", dir="/tmp")  # short: Ray's unix sockets live under it
    gcs, dash, agent_http, agent_grpc, rt_env, metrics, client, node_mgr, obj_mgr = free_ports(9)
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
           "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
           "--runtime-env-agent-port", str(rt_env), "--metrics-export-port", str(metrics),
           "--ray-client-server-port", str(client), "--node-manager-port", str(node_mgr),
           "--object-manager-port", str(obj_mgr), "--num-cpus", "2", "--temp-dir", temp_dir,
           "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, env=ray_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    sid = proc.pid  # the session id of everything `ray start` spawns
    try:
        out, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            pytest.fail(f"ray start --head failed ({proc.returncode}):\n{out[-3000:]}")
        yield {"address": f"http://127.0.0.1:{dash}", "gcs": f"127.0.0.1:{gcs}", "temp_dir": temp_dir,
               "start_output": out}
    finally:
        if proc.poll() is None:
            proc.kill()
        stop_session(sid)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not [p for p in session_pids(sid) if alive(p)], "ray processes left running"


def ray_cli(*args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=ray_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def job_status(address: str, job_id: str) -> str:
    code = ("import sys; from ray.job_submission import JobSubmissionClient; "
            "print(JobSubmissionClient(sys.argv[1]).get_job_status(sys.argv[2]).value)")
    res = subprocess.run([sys.executable, "-c", code, address, job_id], env=ray_env(), capture_output=True,
                         text=True, timeout=60)
    return res.stdout.strip() or res.stderr[-500:]


def test_ray_job_submit_runs_tiny_grpo(head_node, tiny_corpus_file, tmp_path):
    out_dir = tmp_path / "job_run"
    job_id = f"dgrpo-test-{os.getpid()}-{int(time.time())}"
    env = dict(ray_env(), RAY_ADDRESS=head_node["address"], SUBMISSION_ID=job_id)
    # issue 18: joining the cluster without its token fails at once, saying so
    tokenless = subprocess.run([str(BIN / "dgrpo"), "train", "--config", "deploy/configs/tiny.yaml",
                                "--set", f"corpus.path={tiny_corpus_file}", "--set", f"run.out_dir={tmp_path / 'x'}"],
                               env=dict(ray_env(), RAY_ADDRESS=head_node["gcs"], RAY_AUTH_MODE="disabled"), cwd=REPO,
                               capture_output=True, text=True, timeout=120)
    assert tokenless.returncode == 2 and f"error: cannot join the Ray cluster at {head_node['gcs']} ($RAY_ADDRESS" \
        in tokenless.stderr and "the cluster refused this client's token" in tokenless.stderr, tokenless.stderr[-2000:]
    # issue 18: a relative run.out_dir used to "succeed" inside Ray's temporary copy of the working directory
    relative = subprocess.run([str(REPO / "deploy" / "submit.sh"), "deploy/configs/tiny.yaml",
                               "--set", f"corpus.path={tiny_corpus_file}", "--set", "run.out_dir=runs/job_run"],
                              env=dict(env, SUBMISSION_ID=f"{job_id}-relative"), cwd=REPO, capture_output=True,
                              text=True, timeout=240)
    print(f"\n$ deploy/submit.sh deploy/configs/tiny.yaml --set corpus.path=... --set run.out_dir=runs/job_run\n"
          f"{relative.stdout[-1500:]}")
    assert relative.returncode != 0 and job_status(head_node["address"], f"{job_id}-relative") == "FAILED"
    assert "error: run.out_dir 'runs/job_run' is relative and this is a Ray job, whose working directory" in \
        relative.stdout, relative.stdout[-3000:]
    # the documented command: blocks, streams the job's output, exits 1 if the job fails; the relative
    # out_dir now resolved against run.storage_path; the reward by import path, from the uploaded working
    # directory (issue 27: importable by the job's driver and its judge actor)
    try:
        submit = subprocess.run([str(REPO / "deploy" / "submit.sh"), "deploy/configs/tiny.yaml",
                                 "--set", f"corpus.path={tiny_corpus_file}", "--set", "run.out_dir=job_run",
                                 "--set", f"run.storage_path={tmp_path}", "--set", "reward.kind=python",
                                 "--set", "reward.function=examples.rewards:vowel_share"],
                                env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as e:
        ray_cli("job", "stop", "--address", head_node["address"], job_id)
        pytest.fail(f"job did not finish in 240 s:\n{(e.stdout or '')[-3000:]}")
    logs = submit.stdout
    status = job_status(head_node["address"], job_id)
    print(f"\n$ deploy/submit.sh deploy/configs/tiny.yaml --set corpus.path=... --set run.out_dir=...\n"
          f"{logs[-3000:]}\n--- job {job_id}: {status}")
    assert submit.returncode == 0 and status == "SUCCEEDED", (status, logs[-3000:], submit.stderr[-3000:])

    summary = json.loads(logs[logs.rindex('{\n  "steps"'):logs.rindex("}") + 1])
    assert summary["steps"] == 2 and summary["out_dir"] == str(out_dir) and summary["status"] == "finished"
    assert f"run directory: {out_dir} (new run {summary['run_id']}, config " in logs
    ckpt = out_dir / "checkpoints" / "step_000002"
    assert ckpt.is_dir() and any(ckpt.iterdir())
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward_mean" in r] == [1, 2]
    assert all(0 <= r["reward_min"] <= r["reward_max"] <= 1 for r in rows if "reward_mean" in r)  # vowel shares
    assert [(r["num_groups"], r["num_samples"]) for r in rows if "num_samples" in r] == [(2, 8)] * 2
    assert json.loads((out_dir / "summary.json").read_text())["steps"] == 2
