"""Run directories and cluster connections a user can trust (issue 18).

Each numbered case of the issue, starting from its reproduction:

1. a Ray cluster recorded in Ray's temp dir (`ray_current_cluster`) does not capture an embedded run;
2. a fresh run into a finished run's directory is refused (nothing touched); --overwrite starts afresh;
3. a second run into a live run's directory is refused, naming the holder; a dead holder's lock is stale;
4. --resume refuses config changes outside RESUMABLE_KEYS (nothing written) and applies the others;
5. a non-empty directory that is not a run directory is never written into;
6. an unreachable run.ray_address fails in seconds, naming the address;
8. (tests/test_job_submit.py) a job with a relative run.out_dir is refused; here: how it is resolved;
9. flag values are checked by the CLI (one line, exit 2), output paths before any work, --set errors name
   --set, corpus errors name the command's own flag, checkpoints of NaN weights are refused, and a run
   that stops learning (collapse, non-finite loss) stops with exit 3 and a summary that says why.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import torch
from click.testing import CliRunner

from dgrpo.actors.learner import LearnerActor
from dgrpo.config import GRPOConfig, TrainConfig, to_dict
from dgrpo.errors import ConfigError, RunError, TrainingHalted
from dgrpo.learner.core import LearnerCore
from dgrpo.models.checkpoint import load_checkpoint, save_checkpoint
from dgrpo.models.diffusion import DiffusionLM
from dgrpo.models.transformer import preset_config
from dgrpo.entrypoints.cli import main
from dgrpo.orchestration.driver import Driver
from dgrpo.orchestration.metrics import read_jsonl
from dgrpo.orchestration.rundir import config_differences, fingerprint, open_run_dir, resolve_out_dir
from raynodes import BIN, alive, session_pids, stop_session

ray.cloudpickle.register_pickle_by_value(__import__(__name__))  # Ray workers cannot import this module

REPO = Path(__file__).resolve().parents[1]
TINY = {"run.steps": 4, "run.eval_every": 4, "run.eval_prompts": 4, "run.checkpoint_every": 2,
        "run.metrics_export": False, "run.actor_timeout_s": 120, "generator.preset": "tiny",
        "reward.kind": "char_frequency", "reward.chars": "e", "prompts.length": 16, "sampler.steps": 4,
        "grpo.group_size": 4, "grpo.prompts_per_step": 2, "grpo.minibatch_size": 8, "grpo.lr": 3e-3,
        "resources.rollout.num_workers": 1, "run.selection": "none"}


def train_args(out: Path, corpus: str, *sets: str, **over) -> list[str]:
    args = ["train"]
    for key, value in {**TINY, "run.out_dir": out, "corpus.path": corpus, **over}.items():
        args += ["--set", f"{key}={value}"]
    for s in sets:
        args += ["--set", s] if "=" in s else [s]
    return args


def cli(*args) -> "click.testing.Result":  # noqa: F821
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="dgrpo")


def one_line_error(result, code: int = 2) -> str:
    """The `error: ...` line of a refused command (exit `code`, no traceback)."""
    assert result.exit_code == code, (result.exit_code, result.output[-3000:], result.exception)
    assert "Traceback" not in result.output
    return result.stderr[result.stderr.index("error: "):].strip()


def snapshot(path: Path) -> dict:
    """Every file under `path` with the sha256 of its bytes: what a refused command must leave as it was."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def dgrpo(*args, env: dict | None = None, timeout: float = 240, cwd=None) -> subprocess.CompletedProcess:
    """`dgrpo ...` in a fresh process (no Ray of this test session), with this checkout first on the path."""
    full_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    full_env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0", **(env or {}))
    return subprocess.run([str(BIN / "dgrpo"), *map(str, args)], env=full_env, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or REPO)


def step_rows(out: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "num_samples" in r]


def checkpoint_names(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def finished_run(ray_cluster, tiny_corpus_file, tmp_path_factory) -> Path:
    """A finished 4-step run (checkpoints at steps 2 and 4), made with `dgrpo train`."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = cli(*train_args(out, tiny_corpus_file, "--quiet"))
    assert result.exit_code == 0, (result.output[-3000:], result.exception)
    assert step_rows(out) == [1, 2, 3, 4] and checkpoint_names(out) == ["step_000002", "step_000004"]
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# -- 1. a recorded Ray cluster ---------------------------------------------------------------------


def test_a_recorded_cluster_does_not_capture_an_embedded_run(tiny_corpus_file, tmp_path):
    """Repro: d=$(mktemp -d); mkdir -p $d/ray; echo 127.0.0.1:6399 > $d/ray/ray_current_cluster;
    RAY_TMPDIR=$d dgrpo train -c CONFIG  (was: ValueError: When connecting to an existing cluster, ...)."""
    ray_tmp = Path(f"/tmp/dgrt_{os.getpid()}")  # short: Ray's unix sockets live under it
    (ray_tmp / "ray").mkdir(parents=True, exist_ok=True)
    record = ray_tmp / "ray" / "ray_current_cluster"
    record.write_text("127.0.0.1:6399\n")  # a stale record: nothing listens there
    try:
        proc = dgrpo(*train_args(tmp_path / "run", tiny_corpus_file, "--quiet", **{"run.steps": 1}),
                     env={"RAY_TMPDIR": str(ray_tmp)})
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert "Started a local Ray instance" in proc.stderr and "existing cluster" not in proc.stderr
        assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 1
        assert record.read_text() == "127.0.0.1:6399\n"  # the record is not ours to change
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


# -- 2. a fresh run into a finished run's directory --------------------------------------------------


def test_a_fresh_run_into_a_finished_run_is_refused_then_overwrite_and_resume(finished_run, tiny_corpus_file,
                                                                              tmp_path):
    """Repro: a 12-step run into a 20-step run's directory kept the old step_15/step_20, and a later
    `--resume --set run.steps=24` continued from the old step 20 (here: 4 steps, then 3, then 5)."""
    out = copy_run(finished_run, tmp_path / "run")
    before = snapshot(out)
    old_id = json.loads((out / "run.json").read_text())["run_id"]
    message = one_line_error(cli(*train_args(out, tiny_corpus_file, **{"run.steps": 3})))
    assert re.search(rf"run.out_dir {re.escape(str(out))} already holds a run \(run {old_id}, steps logged up to 4, "
                     r"checkpoints step_000002, step_000004\); continue it with --resume, start it afresh with "
                     r"--overwrite", message), message
    assert snapshot(out) == before  # not a byte changed

    fresh = cli(*train_args(out, tiny_corpus_file, "--overwrite", "--quiet",
                            **{"run.steps": 3, "run.checkpoint_every": 1}))
    assert fresh.exit_code == 0, (fresh.output[-3000:], fresh.exception)
    assert f"--overwrite: deleting the previous run in {out} (run {old_id}, steps logged up to 4" in fresh.output
    assert step_rows(out) == [1, 2, 3] and checkpoint_names(out) == ["step_000001", "step_000002", "step_000003"]
    new_id = json.loads((out / "run.json").read_text())["run_id"]
    assert new_id != old_id

    resumed = cli(*train_args(out, tiny_corpus_file, "--resume", "--quiet",
                              **{"run.steps": 5, "run.checkpoint_every": 1, "resources.rollout.num_workers": 2}))
    assert resumed.exit_code == 0, (resumed.output[-3000:], resumed.exception)
    assert "--resume: run.steps 3 -> 5" in resumed.output
    assert "--resume: resources.rollout.num_workers 1 -> 2" in resumed.output
    assert f"resumed from {out / 'checkpoints' / 'step_000003'}: step 3" in resumed.output
    assert step_rows(out) == [1, 2, 3, 4, 5]  # every step once, all of this run
    record = json.loads((out / "run.json").read_text())
    assert record["run_id"] == new_id and [s["resume"] for s in record["starts"]] == [False, True]
    assert record["starts"][1]["changed"] == {"run.steps": [3, 5], "resources.rollout.num_workers": [1, 2]}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 5 and summary["run_id"] == new_id and summary["out_dir"] == str(out)


# -- 3. two runs into one directory ------------------------------------------------------------------


def test_a_second_run_into_a_live_run_is_refused_and_a_dead_ones_lock_is_stale(tiny_corpus_file, tmp_path):
    """Repro: two `dgrpo train` into one out_dir both exited 0, leaving a mixture."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")
    first = subprocess.Popen([str(BIN / "dgrpo"), *train_args(out, tiny_corpus_file, "--quiet",
                                                              **{"run.steps": 1000})],
                             env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and f'"pid": {first.pid}' not in _read(out / "run.lock"):
            assert first.poll() is None, "the first run ended early"
            time.sleep(0.5)
        assert f'"pid": {first.pid}' in _read(out / "run.lock")
        holder = rf"is in use by PID {first.pid} on host {re.escape(socket.gethostname())} \(run \w+, since "
        for flags in ([], ["--overwrite"], ["--resume"]):
            message = one_line_error(cli(*train_args(out, tiny_corpus_file, *flags)))
            assert re.search(holder, message) and "choose another run.out_dir" in message, message
    finally:
        os.kill(first.pid, signal.SIGKILL)  # no chance to release anything
        first.wait(timeout=30)
        stop_session(first.pid)  # its Ray processes
    assert not [p for p in session_pids(first.pid) if alive(p)]
    # the OS dropped the killed run's lock; its name in the file marks it stale
    messages: list[str] = []
    cfg = TrainConfig.model_validate({"run": {"out_dir": str(out)}})
    with open_run_dir(cfg, overwrite=True, log=messages.append) as run_dir:
        assert json.loads(_read(out / "run.lock"))["pid"] == os.getpid()
    assert any(f"the run of PID {first.pid} on host {socket.gethostname()}" in m and "taking it over" in m
               for m in messages), messages
    assert _read(out / "run.lock") == ""  # released
    assert json.loads((out / "run.json").read_text())["run_id"] == run_dir.run_id


def _read(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def test_the_lock_is_held_for_the_run_and_released_after(tmp_path):
    cfg = TrainConfig.model_validate({"run": {"out_dir": str(tmp_path / "run")}})
    with open_run_dir(cfg, log=lambda _: None):
        with pytest.raises(RunError, match=rf"is in use by PID {os.getpid()} on host "):
            with open_run_dir(cfg, overwrite=True, log=lambda _: None):
                pass
    with open_run_dir(cfg, log=lambda _: None):  # released: a new (still empty) run may start
        pass


# -- 4. --resume with a changed config ---------------------------------------------------------------


@pytest.mark.parametrize("change, listed", [
    ({"grpo.lr": 0.01}, r"grpo\.lr: 0\.003 -> 0\.01"),
    ({"grpo.group_size": 8}, r"grpo\.group_size: 4 -> 8"),
    ({"generator.preset": "small"}, r"generator\.preset: 'tiny' -> 'small'"),
    ({"grpo.lr": 0.01, "sampler.temperature": 0.7, "run.seed": 1},
     r"grpo\.lr: 0\.003 -> 0\.01\n  run\.seed: 0 -> 1\n  sampler\.temperature: 0\.5 -> 0\.7"),
])
def test_resume_refuses_a_changed_optimisation_or_model(finished_run, tiny_corpus_file, tmp_path, change, listed):
    """Repro: --resume with grpo.lr changed was accepted (the optimizer kept the old rate), group_size
    changed silently, a different model got 'no usable checkpoint' after config.yaml was overwritten."""
    out = copy_run(finished_run, tmp_path / "run")
    before = snapshot(out)
    result = cli(*train_args(out, tiny_corpus_file, "--resume", **{"run.steps": 6, **change}))
    message = one_line_error(result) + "\n"
    assert message.startswith(f"error: --resume: the config differs from the one the run in {out} was started "
                              f"with, in keys a resumed run cannot change:\n"), message
    assert re.search(listed, message), message
    assert "run.steps" not in message  # a resumable change is not a difference
    assert f"resume with the run's own config (-c {out / 'config.yaml'})" in message
    assert "no usable checkpoint" not in message
    assert snapshot(out) == before  # config.yaml, run.json, logs: nothing written


def test_config_differences_classify_keys():
    base = to_dict(TrainConfig())
    new = TrainConfig.model_validate({"run": {"steps": 99, "max_minutes": 5, "out_dir": "/elsewhere"},
                                      "resources": {"rollout": {"num_workers": 8, "custom_resources": {"x": 1}}},
                                      "grpo": {"lr": 1e-4, "betas": [0.9, 0.95]}, "prompts": {"kind": "infill"}})
    applied, refused = config_differences(base, to_dict(new))
    assert [k for k, *_ in applied] == ["resources.rollout.custom_resources", "resources.rollout.custom_resources.x",
                                        "resources.rollout.num_workers", "run.max_minutes", "run.out_dir", "run.steps"]
    assert [k for k, *_ in refused] == ["grpo.betas", "grpo.lr", "prompts.kind"]
    assert fingerprint(base) == fingerprint(to_dict(TrainConfig.model_validate({"run": {"steps": 99}})))
    assert fingerprint(base) != fingerprint(to_dict(new))
    stored = dict(base, run={k: v for k, v in base["run"].items() if k != "max_zero_signal_steps"})
    assert config_differences(stored, base) == ([], [])  # a key added since the run started takes its default


# -- 5. a directory that is not a run directory --------------------------------------------------------


def test_a_directory_that_is_not_a_run_directory_is_never_written(tiny_corpus_file, tmp_path):
    """Repro: an out_dir holding other files had its config.yaml, summary.json, samples.jsonl replaced."""
    out = tmp_path / "project"
    out.mkdir()
    for name in ("config.yaml", "summary.json", "samples.jsonl", "notes.txt"):
        (out / name).write_text(f"the user's own {name}\n")
    before = snapshot(out)
    for flags in ([], ["--overwrite"], ["--resume"]):
        message = one_line_error(cli(*train_args(out, tiny_corpus_file, *flags)))
        assert message == (f"error: run.out_dir {out} is not empty and is not a dgrpo run directory (it holds "
                           f"config.yaml, notes.txt, samples.jsonl, summary.json); choose a new or empty directory")
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == sorted(before)


# -- 6. an unreachable cluster ----------------------------------------------------------------------


def test_an_unreachable_cluster_fails_fast_naming_the_address(tiny_corpus_file, tmp_path):
    """Repro: run.ray_address=127.0.0.1:1 hung for more than 5 minutes."""
    t0 = time.monotonic()
    proc = dgrpo(*train_args(tmp_path / "run", tiny_corpus_file, **{"run.ray_address": "127.0.0.1:1"}), timeout=120)
    assert proc.returncode == 2 and time.monotonic() - t0 < 60, proc.stderr[-3000:]
    assert re.search(r"^error: cannot join the Ray cluster at 127\.0\.0\.1:1 \(run\.ray_address(, dialed as "
                     r"[\d.]+:1)?\): Connection refused; start it", proc.stderr, re.M), proc.stderr[-3000:]
    proc = dgrpo(*train_args(tmp_path / "run2", tiny_corpus_file), env={"RAY_ADDRESS": "127.0.0.1:1"}, timeout=120)
    assert proc.returncode == 2 and "cannot join the Ray cluster at 127.0.0.1:1 ($RAY_ADDRESS" in proc.stderr
    proc = dgrpo(*train_args(tmp_path / "run3", tiny_corpus_file, **{"run.ray_address": "http://127.0.0.1:8265"}))
    assert proc.returncode == 2 and "is a dashboard URL (for `ray job submit`)" in proc.stderr, proc.stderr[-2000:]


def test_an_open_port_without_a_cluster_fails_within_the_timeout(tiny_corpus_file, tmp_path):
    """A port that accepts connections but is no Ray GCS: ray.init alone retries for many minutes."""
    server = socket.socket()
    server.bind(("0.0.0.0", 0))  # Ray dials 127.0.0.1 as the host's own address
    server.listen(16)
    accepted = []
    threading.Thread(target=lambda: [accepted.append(server.accept()) for _ in range(64)], daemon=True).start()
    port = server.getsockname()[1]
    try:
        t0 = time.monotonic()
        proc = dgrpo(*train_args(tmp_path / "run", tiny_corpus_file, **{"run.ray_address": f"127.0.0.1:{port}",
                                                                         "run.connect_timeout_s": 2}), timeout=180)
        took = time.monotonic() - t0
    finally:
        server.close()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert re.search(rf"^error: cannot join the Ray cluster at 127\.0\.0\.1:{port} .*the port is open but no Ray "
                     r"GCS answers", proc.stderr, re.M), proc.stderr[-3000:]
    assert took < 90, took


# -- 8. a relative out_dir -----------------------------------------------------------------------------


def test_a_relative_out_dir_in_a_job_is_refused_or_resolved_against_the_storage_path(monkeypatch, tmp_path):
    cfg = TrainConfig.model_validate({"run": {"out_dir": "runs/x"}})
    monkeypatch.delenv("DGRPO_STORAGE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_out_dir(cfg.run) == tmp_path / "runs" / "x"
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what Ray sets for a job's entrypoint
    with pytest.raises(ConfigError, match=r"run.out_dir 'runs/x' is relative and this is a Ray job, whose working "
                                          r"directory .* is a temporary copy Ray deletes"):
        resolve_out_dir(cfg.run)
    monkeypatch.setenv("DGRPO_STORAGE", str(tmp_path / "shared"))
    assert resolve_out_dir(cfg.run) == tmp_path / "shared" / "runs" / "x"
    cfg.run.storage_path = "/data"
    assert resolve_out_dir(cfg.run) == Path("/data/runs/x")
    cfg.run.out_dir = "/abs/run"
    assert resolve_out_dir(cfg.run) == Path("/abs/run")


# -- 9. the smaller cases ---------------------------------------------------------------------------


@pytest.mark.parametrize("flag, value, pattern", [
    ("--steps", "0", r"Invalid value for '--steps': 0 is not in the range x>=1"),
    ("--top-k", "-5", r"Invalid value for '--top-k': -5 is not in the range x>=0"),
    ("--temperature", "0", r"Invalid value for '--temperature': 0\.0 is not in the range x>0"),
    ("--num", "0", r"Invalid value for '--num'"),
])
def test_sample_flag_values_are_one_line_errors(flag, value, pattern):
    """Repro: dgrpo sample --steps 0 / --top-k -5 / --temperature 0 ended in 36-line tracebacks."""
    result = cli("sample", "--checkpoint", "anything", flag, value)
    message = one_line_error(result)
    assert "\n" not in message and re.search(pattern, message) and "(see `dgrpo sample --help`)" in message


def test_an_out_dir_that_is_a_file_or_read_only_is_a_one_line_error(tiny_corpus_file, tmp_path):
    """Repro: a read-only or file-as-out_dir ended in an OSError traceback."""
    as_file = tmp_path / "a_file"
    as_file.write_text("mine\n")
    message = one_line_error(cli(*train_args(as_file, tiny_corpus_file)))
    assert message == f"error: run.out_dir {as_file} is a file, not a directory; choose another run.out_dir"
    message = one_line_error(cli("pretrain", "--corpus", tiny_corpus_file, "--out", as_file, "--preset", "tiny"))
    assert message == f"error: --out {as_file} is a file, not a directory; choose another --out"
    message = one_line_error(cli(*train_args(as_file / "sub", tiny_corpus_file)))
    assert message.startswith(f"error: cannot create run.out_dir {as_file / 'sub'}: Not a directory")
    assert as_file.read_text() == "mine\n"
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("a read-only file system needs `unshare -m` and root")
    read_only = tmp_path / "ro"
    read_only.mkdir()
    inner = " ".join(["mount -t tmpfs -o ro tmpfs", str(read_only), "&&", str(BIN / "dgrpo"),
                      *train_args(read_only, tiny_corpus_file)])
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(["unshare", "-m", "sh", "-c", inner], env=env, capture_output=True, text=True, timeout=120)
    if "mount:" in proc.stderr:
        pytest.skip(f"cannot mount here: {proc.stderr.strip()}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (f"error: run.out_dir {read_only} is not writable (Read-only file "
                                                    f"system); choose a writable location")


def test_set_errors_name_set_and_file_errors_name_the_file(tiny_corpus_file, tmp_path):
    """Repro: --set errors named the config file even when the bad value came from --set."""
    config = tmp_path / "cfg.yaml"
    config.write_text("grpo:\n  lr: 0.001\n")
    message = one_line_error(cli("train", "-c", config, "--set", "grpo.lr=-1"))
    assert message == ("error: invalid configuration:\n  grpo.lr: Input should be greater than 0 (got -1) "
                       "[from --set grpo.lr=-1]")
    config.write_text("grpo:\n  lr: -1\n")
    message = one_line_error(cli("train", "-c", config, "--set", "run.steps=3"))
    assert message == f"error: invalid configuration in {config}:\n  grpo.lr: Input should be greater than 0 (got -1)"
    message = one_line_error(cli("pretrain", "--max-iters", "0", "--out", tmp_path / "p"))
    assert message.endswith("max_iters: Input should be greater than or equal to 1 (got 0) [from --max-iters 0]")


def test_corpus_errors_name_the_commands_own_flag(ray_cluster, tmp_path):
    """Repro: corpus errors advised --corpus, which `train` lacks."""
    missing = tmp_path / "missing.txt"
    message = one_line_error(cli("train", "--set", f"corpus.path={missing}", "--set", f"run.out_dir={tmp_path / 'r'}"))
    assert message.endswith("(the corpus path: --set corpus.path=PATH)") and "--corpus" not in message, message
    message = one_line_error(cli("pretrain", "--corpus", missing, "--out", tmp_path / "p"))
    assert message.endswith("(the corpus path: --corpus PATH)"), message
    assert not (tmp_path / "p").exists()


@pytest.fixture
def nan_checkpoint(tiny_corpus_file, tmp_path) -> Path:
    from dgrpo.corpus import load_corpus
    tok = load_corpus(tiny_corpus_file).tokenizer
    model = DiffusionLM(preset_config("tiny", tok.vocab_size))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    return save_checkpoint(tmp_path / "nan_gen", kind="generator", model_config=model.cfg, vocab=tok.to_dict(),
                           weights=model)


def test_a_checkpoint_of_nan_weights_is_refused_naming_the_file(ray_cluster, nan_checkpoint, tiny_corpus_file,
                                                                tmp_path):
    """Repro: `dgrpo sample` of a NaN checkpoint printed blank lines and exited 0."""
    message = one_line_error(cli("sample", "--checkpoint", nan_checkpoint, "--steps", "2", "--num", "1"))
    assert re.fullmatch(rf"error: checkpoint file {re.escape(str(nan_checkpoint / 'model.safetensors'))} holds NaN "
                        r"or inf values in \d+ tensor\(s\) \(.*\): it was written by a diverged run; use an earlier "
                        r"checkpoint", message), message
    message = one_line_error(cli(*train_args(tmp_path / "run", tiny_corpus_file,
                                             **{"generator.checkpoint": nan_checkpoint})))
    assert "holds NaN or inf values" in message


def test_a_collapsed_policy_stops_the_run_with_a_summary_that_says_why(ray_cluster, tiny_corpus_file, tmp_path):
    """Repro: grpo.lr=1000 skipped 7 of 8 updates (every group's rewards equal) and the run exited 0."""
    out = tmp_path / "run"
    result = cli(*train_args(out, tiny_corpus_file, "--quiet",
                             **{"grpo.lr": 1000, "run.steps": 12, "run.checkpoint_every": 1,
                                "run.max_zero_signal_steps": 3}))
    message = one_line_error(result, code=3)
    match = re.fullmatch(r"error: the run stopped: steps (\d+)-(\d+): every group's rewards were equal \(mean reward "
                         r"\S+\) in 3 steps in a row \(run.max_zero_signal_steps\), so nothing is left to learn: the "
                         r"policy collapsed .* or the reward saturated", message)
    assert match, message
    stop = int(match.group(2))
    assert stop < 12 and int(match.group(1)) == stop - 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["stop_reason"] == message[len("error: the run stopped: "):]
    assert summary["steps"] == stop and summary["out_dir"] == str(out)
    rows = read_jsonl(out / "metrics.jsonl")
    assert step_rows(out) == list(range(1, stop + 1))  # everything logged is kept
    assert [r["zero_std_ratio"] for r in rows if "num_samples" in r][-3:] == [1.0] * 3
    assert f"step_{stop:06d}" not in checkpoint_names(out)  # no checkpoint of the collapsed step
    assert checkpoint_names(out)[-1] == f"step_{stop - 1:06d}"


class InfWeightLearner(LearnerActor):
    """A learner whose policy's weights turn inf before its second step (as after a diverged update)."""

    def train(self, *batches):
        if self.core.step == 1:
            with torch.no_grad():
                for p in self.core.policy.parameters():
                    p.view(-1)[0] = float("inf")
        return super().train(*batches)


def test_a_non_finite_loss_stops_the_run(ray_cluster, tiny_corpus_file, tmp_path):
    cfg = TrainConfig.model_validate({
        "run": {"out_dir": str(tmp_path / "run"), "steps": 4, "eval_every": 100, "eval_prompts": 4,
                "metrics_export": False, "actor_timeout_s": 120},
        "corpus": {"path": tiny_corpus_file}, "generator": {"preset": "tiny"},
        "reward": {"kind": "char_frequency", "chars": "e"}, "prompts": {"length": 16}, "sampler": {"steps": 4},
        "grpo": {"group_size": 8, "prompts_per_step": 2, "minibatch_size": 8},
        "resources": {"rollout": {"num_workers": 1}}})
    driver = type("InfDriver", (Driver,), {"learner_cls": InfWeightLearner})(cfg)
    try:
        with pytest.raises(TrainingHalted, match=r"^step 2: the loss or gradient was not finite in (\d) of \1 updates "
                                                 r"\(skipped, the weights are those before them\): the policy "
                                                 r"diverged; lower grpo\.lr"):
            driver.run()
    finally:
        driver.close()
    assert driver.step == 2 and driver.version == 1  # the skipped updates made no new version


def test_the_learner_skips_non_finite_updates():
    torch.manual_seed(0)
    policy = DiffusionLM(preset_config("tiny", 12))
    core = LearnerCore(policy, GRPOConfig(group_size=2, minibatch_size=2, lr=1e-2))
    from dgrpo.models.sampler import sample
    from dgrpo.protocols import RolloutBatch, ScoredBatch
    prompts = torch.full((4, 8), policy.mask_id)
    out = sample(policy, prompts, steps=4, generator=torch.Generator().manual_seed(0))
    batch = ScoredBatch(rollout=RolloutBatch(
        request_id=0, tokens=out.tokens, reveal_step=out.reveal_step, logprobs=out.logprobs,
        group_index=torch.tensor([0, 0, 1, 1]), policy_version=0, worker_id=0, steps=4, temperature=1.0, top_k=0,
        top_p=1.0, timings={"generate_s": 0.0}), rewards=torch.tensor([0.0, 1.0, 1.0, 0.0]), judge_id=0,
        timings={"score_s": 0.0})
    with torch.no_grad():
        for p in policy.parameters():
            p.view(-1)[0] = float("nan")
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    metrics = core.train([batch])
    assert metrics["nonfinite_updates"] == 2 and metrics["optimizer_steps"] == 0 and metrics["skipped_update"] == 1
    assert core.version == 0
    for k, v in policy.state_dict().items():
        assert torch.allclose(v, before[k], equal_nan=True), k  # untouched: no update of NaN was applied
