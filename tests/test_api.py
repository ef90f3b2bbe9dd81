"""The Python API: `import dgrpo` is light, make_config builds and validates from a file, a dict or keywords,
the functions refuse what the commands refuse, and the README's Python example runs exactly as written."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import dgrpo
from conftest import _make_corpus_text
from dgrpo.config import TrainConfig
from dgrpo.errors import ConfigError, RunError
from dgrpo.models.rewards import RewardError

REPO = Path(__file__).resolve().parent.parent


def test_import_dgrpo_imports_neither_ray_nor_torch():
    code = ("import sys, dgrpo; cfg = dgrpo.make_config('train', run={'steps': 3}); "
            "print(cfg.run.steps, 'ray' in sys.modules, 'torch' in sys.modules, sorted(dgrpo.__all__) == "
            "sorted(n for n in dir(dgrpo) if n in dgrpo.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.split() == ["3", "False", "False", "True"], out.stderr


def test_make_config_from_a_file_a_dict_and_keywords(tmp_path):
    path = tmp_path / "grpo.yaml"
    path.write_text("run: {steps: 7, eval_every: 3}\ngrpo: {lr: 0.001}\n")
    cfg = dgrpo.make_config("train", path)
    assert isinstance(cfg, TrainConfig) and (cfg.run.steps, cfg.run.eval_every, cfg.grpo.lr) == (7, 3, 1e-3)
    cfg = dgrpo.make_config("train", path, ["grpo.lr=0.01"], run={"steps": 9})  # file < keywords < overrides
    assert (cfg.run.steps, cfg.run.eval_every, cfg.grpo.lr) == (9, 3, 0.01)
    cfg = dgrpo.make_config("train", {"run": {"steps": 4}}, "run.eval_every=2")
    assert (cfg.run.steps, cfg.run.eval_every) == (4, 2)
    assert dgrpo.make_config("train", cfg, run={"steps": 5}).run.eval_every == 2  # from a config object
    assert dgrpo.make_config("pretrain", preset="tiny", max_iters=3).max_iters == 3
    with pytest.raises(ConfigError, match=r"grpo\.lr: Input should be greater than 0"):
        dgrpo.make_config("train", grpo={"lr": -1})
    with pytest.raises(ConfigError, match="unknown config kind 'trian'"):
        dgrpo.make_config("trian")
    with pytest.raises(RewardError, match="no module named 'nowhere'"):
        dgrpo.make_config("train", reward={"kind": "python", "function": "nowhere:fn"})


def test_the_functions_refuse_what_the_commands_refuse(tmp_path, tiny_generator, tiny_corpus_file):
    with pytest.raises(RunError, match=r"--out .* already holds a generator checkpoint"):
        dgrpo.pretrain(preset="tiny", max_iters=2, out=tiny_generator, corpus={"path": tiny_corpus_file})
    with pytest.raises(RunError, match="--resume: no checkpoint in"):
        dgrpo.train_lm(preset="tiny", out=str(tmp_path / "lm"), resume=True, corpus={"path": tiny_corpus_file})
    with pytest.raises(ConfigError, match="pass one"):
        dgrpo.train(run={"out_dir": str(tmp_path / "run")}, resume=True, overwrite=True)
    (tmp_path / "s.jsonl").write_text("x\n")
    with pytest.raises(RunError, match="already exists"):
        dgrpo.sample(tiny_generator, out=str(tmp_path / "s.jsonl"))


def test_sample_load_policy_and_metrics_of_a_run_directory(tmp_path, tiny_generator):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for step in (2, 4):
        shutil.copytree(tiny_generator, run / "checkpoints" / f"step_{step:06d}")
    assert dgrpo.resolve_checkpoint(run).name == "step_000004"  # the newest without best.json
    (run / "checkpoints" / "best.json").write_text(json.dumps({"step": 2, "checkpoint": "step_000002"}))
    policy = dgrpo.load_policy(run)
    assert policy.checkpoint.name == "step_000002" and not policy.model.training
    samples = dgrpo.sample(run, num=2, steps=3, seed=1, order="random")
    assert len(samples) == 2 and all(len(s.text) == policy.model.cfg.block_size and s.reward is None for s in samples)
    assert samples == dgrpo.sample(tiny_generator, num=2, steps=3, seed=1, order="random")  # the same weights
    (run / "metrics.jsonl").write_text('{"step": 0, "eval_reward_mean": 0.1}\n{"step": 1, "reward_mean": 0.2}\n')
    assert [r["step"] for r in dgrpo.read_metrics(run)] == [0, 1]
    with pytest.raises(RunError, match="has not finished"):
        dgrpo.read_summary(run)


def readme_python_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_python_example_runs_as_written(tmp_path):
    """The README's block, byte for byte, run as a script from a directory laid out like the repository root
    (examples/ and a tinyshakespeare.txt, here a small made-up one): a run on an embedded Ray cluster."""
    code = readme_python_example()
    assert len(code.strip().splitlines()) < 15
    (tmp_path / "quickstart.py").write_text(code)
    (tmp_path / "tinyshakespeare.txt").write_text(_make_corpus_text())
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "quickstart.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split(":")[0] for line in steps] == [f"step {i}" for i in range(1, 11)]
    assert any(re.fullmatch(r"held-out reward \d\.\d{3} -> \d\.\d{3}", line) for line in lines)
    assert len([line for line in lines if line.startswith("'")]) == 2
    summary = json.loads((tmp_path / "runs/api/grpo/summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 10
    recorded = json.loads((tmp_path / "runs/api/grpo/run.json").read_text())["config"]["reward"]
    assert recorded["kind"] == "python" and recorded["function"] == "examples.rewards:vowel_share"
