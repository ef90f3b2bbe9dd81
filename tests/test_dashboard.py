"""run.dashboard (issue 17): a local run starts the embedded cluster's dashboard on 127.0.0.1 and says where.

`dgrpo train --set run.dashboard=true` in a subprocess (the embedded cluster is its own): the URL it
prints answers while the run lasts, with Ray's token (401 without it), lists the run's actors, and the
metrics endpoint it prints serves the run's gauges. That every socket of the cluster binds a loopback
address with the dashboard on is tests/test_bad_input.py's test_embedded_cluster_listens_on_loopback_only.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from raynodes import REPO, free_ports

# the second tier (`make test-cluster`): clusters of their own, run one at a time
pytestmark = pytest.mark.cluster


def get(url: str, token: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=20) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""
    except urllib.error.URLError:  # nothing listens (yet, or any more)
        return 0, ""


def test_dashboard_answers_on_loopback_during_a_tiny_run(tiny_corpus_file, tmp_path):
    port = free_ports(1)[0]
    sets = {"run.dashboard": "true", "run.dashboard_port": port, "run.out_dir": tmp_path / "run", "run.steps": 100_000,
            "run.max_minutes": 0.75,
            "run.eval_every": 100, "run.eval_prompts": 4, "corpus.path": tiny_corpus_file, "generator.preset": "tiny",
            "prompts.length": 16, "sampler.steps": 4, "grpo.group_size": 4, "grpo.prompts_per_step": 2,
            "grpo.minibatch_size": 8, "resources.rollout.num_workers": 1}
    cmd = [sys.executable, "-m", "dgrpo.entrypoints.cli", "train"]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while not any(line.startswith("Ray dashboard: ") for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.2)
        printed = next(line for line in lines if line.startswith("Ray dashboard: "))
        print(f"\n{printed.strip()}")
        dashboard, metrics = re.findall(r"http://127\.0\.0\.1:\d+\S*", printed)
        assert dashboard == f"http://127.0.0.1:{port}"
        token = Path(os.path.expanduser("~/.ray/auth_token")).read_text().strip()
        assert get(f"{dashboard}/api/version")[0] == 401  # token auth guards the dashboard
        status, body = get(f"{dashboard}/api/version", token)
        assert status == 200 and json.loads(body)["ray_version"]
        classes: set[str] = set()
        while not {"LearnerActor", "RolloutWorker", "JudgeWorker"} <= classes:
            assert proc.poll() is None, "the run ended before the dashboard listed its actors:\n" + "".join(lines)
            status, body = get(f"{dashboard}/api/v0/actors?limit=100", token)
            if status == 200:
                classes = {a["class_name"] for a in json.loads(body)["data"]["result"]["result"]}
            time.sleep(0.5)
        print(f"actors listed by the dashboard: {sorted(classes)}")
        exported = ""
        while "ray_dgrpo_policy_version" not in exported and proc.poll() is None:
            exported = get(metrics)[1]
            time.sleep(0.5)
        assert "ray_dgrpo_policy_version" in exported, exported[-2000:]  # the run's gauges, while it runs
        assert proc.wait(timeout=300) == 0, "".join(lines)[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=10)


def test_the_demo_watches_its_grpo_stage_in_the_dashboard(tmp_path):
    from dgrpo.entrypoints.demo import demo_config
    from dgrpo.entrypoints.pipeline import stage_configs
    run = stage_configs(demo_config(str(tmp_path / "demo"), None, minutes=12, threads=1)).grpo.run
    assert run.dashboard and run.metrics_export  # `make demo` prints the URL (demo.run_demo, cluster.connect)
