"""One CLI grammar (issue 27): --out/--overwrite/--resume per command, -c/--set, --quiet, --json, --precision,
--threads mean the same everywhere; `sample` defaults to the training sampler; `scale RUN` alone prints the state;
every option has help; and the README's table of commands against the shared options is the CLI's."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from dgrpo.config import SamplerConfig, TrainConfig, to_yaml
from dgrpo.entrypoints import api
from dgrpo.entrypoints.cli import main, train_overrides

REPO = Path(__file__).resolve().parent.parent
SHARED = ("-c/--set", "--out", "--overwrite", "--resume", "--quiet", "--json", "--precision", "--threads")


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def refused(result, *needles) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output[-3000:], result.exception)
    assert "Traceback" not in result.output
    message = result.output[result.output.index("error: "):]
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def last_json(result):
    assert result.exit_code == 0, (result.output[-3000:], result.exception)
    return json.loads(result.output.strip().splitlines()[-1])


def commands(group: click.Group = main, prefix: str = ""):
    """(name, command) of every leaf command, e.g. ("judge train", ...)."""
    for name, command in sorted(group.commands.items()):
        full = f"{prefix}{name}"
        if isinstance(command, click.Group):
            yield from commands(command, full + " ")
        else:
            yield full, command


def shared_options(command: click.Command) -> set[str]:
    flags = {opt for p in command.params for opt in p.opts}
    found = {o for o in SHARED if o in flags}
    if {"-c", "--set"} <= flags:
        found.add("-c/--set")
    return found


# -- the grammar as a whole -----------------------------------------------------------------------------------------

def test_every_option_has_help_text():
    missing = [f"{name} {p.opts[0]}" for name, command in commands() for p in command.params
               if isinstance(p, click.Option) and not (p.help or "").strip()]
    assert not missing, missing


def readme_grammar_table() -> dict[str, set[str]]:
    """README's "One grammar for every command" table: command -> the shared options it marks."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## One grammar for every command"):]
    lines = [line for line in section.splitlines() if line.startswith("| `dgrpo ")]
    header = next(line for line in section.splitlines() if line.startswith("| command |"))
    columns = [c.strip().strip("`") for c in header.strip("|").split("|")][1:]
    table = {}
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        table[cells[0].strip("`").removeprefix("dgrpo ")] = {col for col, cell in zip(columns, cells[1:])
                                                               if cell.startswith("✓")}
    return table


def test_the_readme_table_of_shared_options_is_the_cli():
    table = readme_grammar_table()
    actual = {name: shared_options(command) for name, command in commands()}
    assert set(table) == set(actual), (set(table) ^ set(actual))
    for name in actual:
        assert table[name] == actual[name], (name, table[name], actual[name])


def test_commands_with_a_config_take_c_and_set():
    for name in ("pretrain", "judge train", "lm train", "train", "tune", "pipeline", "config", "sample"):
        assert "-c/--set" in shared_options(dict(commands())[name]), name


def test_commands_that_write_take_out():
    for name, command in commands():
        if name not in ("scale", "rollouts inspect"):  # scale writes its run's scale.json; inspect only reads
            assert "--out" in shared_options(command), name
            assert "--overwrite" in shared_options(command), name


# -- the single-process trainers: --out, --overwrite, --resume --------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tiny_corpus_file):
    return tiny_corpus_file


def trainer_args(command: str, out: Path, corpus: str, generator: str | None = None) -> list[str]:
    args = command.split() + ["--preset", "tiny", "--corpus", corpus, "--max-iters", "2", "--out", out,
                              "--threads", "1", "--quiet", "--json", "--set", "eval_every=2", "--set", "eval_windows=8",
                              "--precision", "fp32"]
    if command == "pretrain":
        args += ["--set", "batch_size=4", "--set", "compile=false"]
    if command == "judge train":
        args += ["--generator", generator, "--set", "batch_size=4", "--set", "refill_pool=8",
                 "--set", "sampler.steps=2"]
    if command == "lm train":
        args += ["--set", "batch_size=4", "--set", "eval_windows=4"]
    return args


@pytest.mark.parametrize("command", ["pretrain", "judge train", "lm train"])
def test_trainers_refuse_to_clobber_and_resume_only_a_checkpoint(command, tmp_path, corpus, tiny_generator):
    out = tmp_path / "out"
    args = trainer_args(command, out, corpus, tiny_generator)
    result = last_json(cli(*args))
    assert result["iter"] == 2 and result["out"] == str(out)
    assert json.loads((out / "config.json").read_text())["config"]["precision"] == "fp32"  # --precision
    before = snapshot(out)
    refused(cli(*args), f"--out {out} already holds a", "checkpoint at iter 2", "--resume", "--overwrite")
    assert snapshot(out) == before  # refused before anything was written
    again = last_json(cli(*args, "--overwrite", "--max-iters", "3"))  # replaced (iteration counts from 0)
    assert again["iter"] == 3 and again["history"][0]["iter"] == 2
    resumed = last_json(cli(*args, "--resume", "--max-iters", "4"))  # continues from iteration 3
    assert resumed["iter"] == 4 and [h["iter"] for h in resumed["history"]] == [2, 3, 4]
    refused(cli(*args, "--resume", "--overwrite"), "pass one")
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(cli(*trainer_args(command, empty, corpus, tiny_generator), "--resume"), "--resume: no checkpoint in")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    refused(cli(*trainer_args(command, other, corpus, tiny_generator), "--overwrite"),
            "is not empty and holds no dgrpo checkpoint (notes.txt)")
    assert (other / "notes.txt").read_text() == "mine"


def test_quiet_leaves_only_the_result(tmp_path, corpus):
    args = trainer_args("pretrain", tmp_path / "o", corpus)
    args.remove("--json")
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines() == [line for line in result.output.strip().splitlines()
                                                  if line.startswith("done: iter 2")]


# -- file outputs ---------------------------------------------------------------------------------------------------

def test_sample_defaults_are_the_training_samplers_and_its_out_is_guarded(tmp_path, tiny_generator):
    out = tmp_path / "s.jsonl"
    rows = last_json(cli("sample", "-k", tiny_generator, "-n", "2", "--out", out, "--json", "--quiet"))
    assert len(rows) == 2 and all(set(r) == {"text", "reward"} for r in rows)
    settings = json.loads(out.read_text().splitlines()[0])["settings"]
    assert {k: settings[k] for k in SamplerConfig.model_fields} == SamplerConfig().model_dump()
    refused(cli("sample", "-k", tiny_generator, "--out", out), f"--out {out} already exists", "--overwrite")
    assert len(out.read_text().splitlines()) == 2
    cli("sample", "-k", tiny_generator, "-n", "3", "--out", out, "--overwrite", "--set", "steps=3",
        "--order", "random")
    settings = json.loads(out.read_text().splitlines()[0])["settings"]
    assert len(out.read_text().splitlines()) == 3 and settings["steps"] == 3 and settings["order"] == "random"
    config = tmp_path / "train.yaml"  # -c takes a train config's sampler section
    config.write_text(to_yaml(TrainConfig.model_validate({"sampler": {"steps": 5, "temperature": 0.5}})))
    cli("sample", "-k", tiny_generator, "-n", "1", "-c", config, "--out", out, "--overwrite")
    settings = json.loads(out.read_text().splitlines()[0])["settings"]
    assert settings["steps"] == 5 and settings["temperature"] == 0.5
    refused(cli("sample", "-k", tiny_generator, "--set", "stepz=3"), "stepz: unknown key")


def test_judge_eval_and_evaluate_and_config_guard_their_out(tmp_path, tiny_generator, tiny_judge):
    out = tmp_path / "eval.json"
    figures = last_json(cli("judge", "eval", "--judge", tiny_judge, "--windows", "4", "--out", out, "--json",
                            "--threads", "1"))
    assert json.loads(out.read_text()) == figures
    refused(cli("judge", "eval", "--judge", tiny_judge, "--windows", "4", "--out", out), "already exists")
    assert not list(Path(tiny_judge).glob("eval.json.tmp"))
    report = tmp_path / "report.json"
    args = ["evaluate", "--generator", tiny_generator, "--judge", tiny_judge, "--best-of", "1,2", "--prompts", "2",
            "--samples-per-prompt", "1", "--threads", "1", "--out", report, "--quiet", "--json"]
    result = last_json(cli(*args))
    assert json.loads(report.read_text())["rows"][0]["name"] == result["rows"][0]["name"] == "generator"
    refused(cli(*args), f"--out {report} already exists")
    assert last_json(cli(*args, "--overwrite"))["precision"] == "auto"  # as everywhere: auto unless told
    yaml_out = tmp_path / "grpo.yaml"
    assert cli("config", "train", "--set", "run.steps=7", "--out", yaml_out).exit_code == 0
    assert TrainConfig.model_validate(__import__("yaml").safe_load(yaml_out.read_text())).run.steps == 7
    refused(cli("config", "train", "--out", yaml_out), "already exists")


def test_report_writes_where_out_says_and_refuses_to_clobber(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "reward_mean": 0.1 * s, "reward_std": 0.01, "kl": 0.0, "loss": 0.0, "clip_frac": 0.0,
             "entropy": 1.0, "wall_time": float(s), "steps_per_min": 1.0, "time/step_s": 1.0} for s in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "plots"
    summary = last_json(cli("report", run, "--out", out, "--json"))
    assert summary["steps"] == 2 and (out / "report.md").is_file() and not (run / "report").exists()
    refused(cli("report", run, "--out", out), f"--out {out} is not empty")
    assert cli("report", run, "--out", out, "--overwrite").exit_code == 0
    png = tmp_path / "o.png"
    png.write_bytes(b"x")
    refused(cli("report", "--overoptimization", tmp_path / "e.json", "--out", png), "already exists")


# -- Ray commands: refused before Ray starts ----------------------------------------------------------------------

def test_train_and_tune_refuse_before_anything_runs(tmp_path, tiny_corpus_file):
    empty = tmp_path / "empty"
    refused(cli("train", "--out", empty, "--resume", "--set", f"corpus.path={tiny_corpus_file}"),
            "--resume: no checkpoint under")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    refused(cli("train", "--out", other, "--overwrite", "--set", f"corpus.path={tiny_corpus_file}"),
            "is not empty and is not a dgrpo run directory")
    search = REPO / "deploy" / "tune" / "search_tiny.yaml"
    refused(cli("tune", "-c", REPO / "deploy/configs/tiny.yaml", "--search", search, "--out", other),
            "holds no dgrpo tune results")
    earlier = tmp_path / "tuned"
    earlier.mkdir()
    (earlier / "best.json").write_text("{}")
    refused(cli("tune", "-c", REPO / "deploy/configs/tiny.yaml", "--search", search, "--out", earlier),
            "holds an earlier search", "--overwrite")
    assert (other / "notes.txt").read_text() == "mine" and (earlier / "best.json").read_text() == "{}"


def test_precision_and_threads_of_train_set_every_role():
    cfg = api.make_config("train", None, train_overrides("runs/x", "fp32", 3))
    res = cfg.resources
    assert {res.rollout.precision, res.judge.precision, res.learner.precision, res.judge_trainer.precision} == {"fp32"}
    assert res.torch_threads == 3 and cfg.run.out_dir == "runs/x"


# -- scale ----------------------------------------------------------------------------------------------------------

def test_scale_alone_prints_the_live_state(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    cfg = TrainConfig.model_validate({"run": {"out_dir": str(run), "steps": 9}, "resources": {
        "rollout": {"min_workers": 1, "max_workers": 4, "num_workers": 2}}})
    (run / "config.yaml").write_text(to_yaml(cfg))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 5, "rollout_workers": 2, "judge_workers": 1}) + "\n")
    state = last_json(cli("scale", run, "--json"))
    assert state["live"] is False and state["step"] == 5 and state["roles"]["rollout"] == {
        "placed": 2, "target": 2, "min": 1, "max": 4}
    fd = os.open(run / "run.lock", os.O_RDWR | os.O_CREAT)  # a live run holds its lock
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, json.dumps({"pid": 4242, "host": "node-a", "run_id": "r1", "since": "now"}).encode())
        assert cli("scale", run, "--rollout-workers", "3").exit_code == 0
        text = cli("scale", run).output
    finally:
        os.close(fd)
    assert re.search(r"run .*: live \(PID 4242 on host node-a \(run r1, since now\)\), step 5 of 9", text), text
    assert "rollout workers: 2 placed (as last logged), target 3, allowed 1..4" in text
    assert "judge workers: 1 placed (as last logged), target 1, a fixed 1" in text
