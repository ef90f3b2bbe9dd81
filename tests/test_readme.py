"""The documentation runs as written: every command block of README.md and docs/OPERATIONS.md is executed here,
in order, at a tiny size, so an example that fails is a failing test.

What "a tiny size" changes is all in SHRINK and TINY below (fewer iterations and steps, the tiny preset, small
batches); the commands are otherwise the documents' own, parsed as bash parses them. The blocks that are not
run are in NOT_RUN, each with the reason (the network, a cluster, a GPU, a Prometheus or Grafana server, or a
`make` target that is the suite itself); an entry that no longer matches a block fails the test.

The commands run in one process (tests/readme_runner) that starts one Ray cluster in the documents' working
directory (a temporary copy of what they need: examples/, deploy/, and a made-up tinyshakespeare.txt), as an
embedded cluster would: relative paths and `examples.rewards` resolve in the actors as on a user's machine.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import _make_corpus_text

REPO = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "docs/OPERATIONS.md")

# (document, start of the block's first command) -> why the block is not run here
NOT_RUN = {
    ("README.md", "make test"): "the suite itself, and `make demo` (12 minutes): both timed in docs/RESULTS.md",
    ("README.md", "curl -fsSL -o tinyshakespeare.txt"): "needs the network; the test writes its own "
                                                        "tinyshakespeare.txt",
    ("docs/OPERATIONS.md", "RAY_AUTH_MODE=token ray start --head --node-ip-address 127.0.0.1 --port 6379"):
        "a cluster (tests/test_job_submit.py starts a private head like it)",
    ("docs/OPERATIONS.md", "RAY_AUTH_MODE=token ray job submit"): "a cluster (tests/test_job_submit.py submits "
                                                                  "this command line)",
    ("docs/OPERATIONS.md", "RAY_ADDRESS=http://127.0.0.1:8265 deploy/submit.sh deploy/configs/tiny.yaml"):
        "a cluster (tests/test_job_submit.py runs deploy/submit.sh)",
    ("docs/OPERATIONS.md", "RAY_ADDRESS=http://127.0.0.1:8265 RAY_AUTH_MODE=token ray job submit --working-dir ."):
        "a GPU cluster with /mnt/shared",
    ("docs/OPERATIONS.md", "ray up deploy/cluster/ray_cluster.yaml"): "a cloud account (tests/test_deploy.py "
                                                                      "validates the file)",
    ("docs/OPERATIONS.md", "kubectl create secret"): "a Kubernetes cluster (tests/test_deploy.py validates "
                                                     "the RayJob)",
    ("docs/OPERATIONS.md", "dgrpo train --config deploy/configs/cluster.yaml"): "a GPU cluster",
    ("docs/OPERATIONS.md", "dgrpo scale RUN_DIR"): "a live elastic run (README.md's block runs the same command; "
                                                   "tests/test_elastic.py on live runs)",
    ("docs/OPERATIONS.md", "export RAY_PROMETHEUS_HOST"): "a `ray start` head and a Prometheus server "
                                                          "(tests/test_prometheus.py)",
    ("docs/OPERATIONS.md", "cp deploy/grafana/dgrpo_dashboard.json"): "a Ray head and a Grafana server",
}

# the tiny size: substitutions in the command text, then arguments appended to each dgrpo command
SHRINK = [
    (r"--max-iters \d+", "--max-iters 20"),
    (r"run\.steps=\d+", "run.steps=3"),
    (r"--best-of 1,2,4,8\b", "--best-of 1,2"),
]
GRPO_TINY = ["--set", "run.eval_every=2", "--set", "run.eval_prompts=4",
             "--set", "run.checkpoint_every=2", "--set", "run.metrics_export=false", "--set", "sampler.steps=4",
             "--set", "grpo.group_size=4", "--set", "grpo.prompts_per_step=2", "--set", "grpo.minibatch_size=8",
             "--set", "judge_refresh.batch_size=4", "--set", "judge_refresh.eval_windows=4"]
TINY = {
    "pretrain": ["--preset", "tiny", "--threads", "1", "--set", "batch_size=8", "--set", "eval_windows=16",
                 "--set", "compile=false"],
    "judge train": ["--preset", "tiny", "--threads", "1", "--set", "batch_size=4", "--set", "refill_pool=8",
                    "--set", "eval_windows=8", "--set", "sampler.steps=2"],
    "lm train": ["--preset", "tiny", "--threads", "1", "--set", "batch_size=8", "--set", "eval_windows=8"],
    "judge eval": ["--windows", "8", "--threads", "1"],
    "sample": ["--threads", "1"],
    "evaluate": ["--prompts", "4", "--samples-per-prompt", "2", "--threads", "1"],
    "config train": GRPO_TINY,
    "train": GRPO_TINY,  # a train command without -c; one with -c FILE takes them from its file
}


def fenced_blocks(text: str, language: str) -> list[str]:
    """The bodies of the ```language blocks of a Markdown text (indented fences too), dedented."""
    blocks = []
    for m in re.finditer(rf"^( *)```{language}\n(.*?)^\1```", text, re.S | re.M):
        indent = len(m.group(1))
        blocks.append("\n".join(line[indent:] for line in m.group(2).splitlines()))
    return blocks


def commands(block: str) -> list[str]:
    """A block's commands: continuation lines joined, comment and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def argv(command: str, cwd: Path) -> list[str]:
    """A command as bash splits it: $'...' strings (\\n is a newline), $PWD, quotes, a trailing comment."""
    command = re.sub(r"\$'((?:[^'\\]|\\.)*)'",
                     lambda m: shlex.quote(codecs.decode(m.group(1), "unicode_escape")), command)
    command = command.replace("$PWD", str(cwd))
    return shlex.split(command, comments=True)


def subcommand(args: list[str]) -> str:
    return " ".join(args[1:3]) if args[1] in ("judge", "lm", "config", "rollouts") else args[1]


def tiny(args: list[str]) -> list[str]:
    text = shlex.join(args)
    for pattern, replacement in SHRINK:
        text = re.sub(pattern, replacement, text)
    args = shlex.split(text)
    name = subcommand(args)
    if name == "train" and ("-c" in args or "--config" in args):
        return args
    steps = ["--set", "run.steps=2"] if name in ("train", "config train") and not any(
        a.startswith("run.steps=") for a in args) else []
    return args + TINY.get(name, []) + steps


def doc_blocks() -> list[tuple[str, str, str | None]]:
    """(document, block, why it is not run or None) for every ```bash block of DOCS."""
    found = []
    for doc in DOCS:
        for block in fenced_blocks((REPO / doc).read_text(), "bash"):
            first = commands(block)[0]
            reasons = [why for (d, start), why in NOT_RUN.items() if d == doc and first.startswith(start)]
            found.append((doc, block, reasons[0] if reasons else None))
    return found


def test_every_block_is_run_or_listed_with_its_reason():
    blocks = doc_blocks()
    for doc, start in NOT_RUN:
        assert any(d == doc and commands(b)[0].startswith(start) for d, b, _ in blocks), \
            f"NOT_RUN names a block that {doc} no longer has: {start!r}"
    for doc, block, why in blocks:
        if why is None:
            for command in commands(block):
                assert command.startswith("dgrpo "), f"{doc}: a block to run has a command this test cannot " \
                                                     f"run; run it or list it in NOT_RUN: {command!r}"


RUNNER = r"""
import json, sys
import ray
from click.testing import CliRunner
from dgrpo.entrypoints.cli import main

commands = json.loads(open(sys.argv[1]).read())  # document -> its commands, in order
# OMP_NUM_THREADS=1 comes with the environment (a runtime_env would start every worker through Ray's shim process)
ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
results = {}
for doc, runs in commands.items():
    results[doc] = []
    for args in runs:  # a document's commands stop at its first failure
        result = CliRunner().invoke(main, args[1:], prog_name="dgrpo")
        error = result.exception if not isinstance(result.exception, SystemExit) else None
        results[doc].append({"args": args, "exit_code": result.exit_code, "output": result.output,
                             "exception": repr(error) if error else None})
        if result.exit_code != 0:
            break
open(sys.argv[2], "w").write(json.dumps(results))
ray.shutdown()
"""


@pytest.fixture(scope="module")
def documented_runs(tmp_path_factory) -> tuple[Path, dict[str, list[dict]]]:
    """Every runnable block of DOCS, in order, at the tiny size: (working directory, results per document)."""
    cwd = tmp_path_factory.mktemp("docs")
    (cwd / "tinyshakespeare.txt").write_text(_make_corpus_text())
    for folder in ("examples", "deploy"):
        shutil.copytree(REPO / folder, cwd / folder)
    runs = {doc: [tiny(argv(c, cwd)) for d, block, why in doc_blocks() if d == doc and why is None
                  for c in commands(block)] for doc in DOCS}
    (cwd / "commands.json").write_text(json.dumps(runs))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", RUNNER, "commands.json", "results.json"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((cwd / "results.json").read_text())
    for doc in DOCS:
        assert len(results[doc]) == len(runs[doc]), results[doc][-1]
    return cwd, results


@pytest.mark.parametrize("doc", DOCS)
def test_every_documented_command_runs(documented_runs, doc):
    _, results = documented_runs
    failed = [r for r in results[doc] if r["exit_code"] != 0]
    assert not failed, f"{shlex.join(failed[0]['args'])}\n{failed[0]['output'][-3000:]}\n{failed[0]['exception']}"


def output_of(results: list[dict], *prefix: str) -> str:
    return next(r["output"] for r in results if r["args"][:len(prefix)] == list(prefix))


def test_the_readme_commands_do_what_it_says(documented_runs):
    cwd, results = documented_runs
    readme = results["README.md"]
    infill = [r for r in readme if "--prompt" in r["args"]][0]
    assert "ROMEO:\n" in infill["output"]  # $'...': a newline, in the corpus's vocabulary
    assert len((cwd / "samples.jsonl").read_text().splitlines()) == 16
    assert json.loads((cwd / "judge_eval.json").read_text())["n_windows"] == 8
    assert (cwd / "runs/grpo/config.yaml").is_file() and (cwd / "runs/grpo/report/report.md").is_file()
    summary = json.loads((cwd / "runs/grpo/summary.json").read_text())
    assert summary["steps"] == 2 and summary["status"] == "finished"  # --overwrite started it afresh
    state = output_of(readme, "dgrpo", "scale", "runs/grpo-elastic")
    assert "rollout workers:" in state and "allowed 1..3" in state
    assert re.search(r"batches +[1-9]", output_of(readme, "dgrpo", "rollouts", "inspect"))
    assert json.loads((cwd / "runs/quick/grpo/summary.json").read_text())["steps"] == 3
    assert json.loads((cwd / "runs/words/summary.json").read_text())["steps"] == 3
    assert (cwd / "evaluation.json").is_file() and (cwd / "overoptimization.png").is_file()
    assert (cwd / "runs/grpo-refresh/summary.json").is_file()
