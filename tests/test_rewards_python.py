"""Rewards by import path (reward.kind python): examples/rewards.py end to end, the built-in rewards through the
same interface, and a reward that raises, returns NaN, returns the wrong length or cannot be imported: each a
one-line error naming the function, with nothing already written lost."""

from __future__ import annotations

import hashlib
import json
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dgrpo.actors.judge_worker import JudgeWorker
from dgrpo.config import RewardConfig, TrainConfig
from dgrpo.corpus import CharTokenizer
from dgrpo.models.rewards import (MASK_CHAR, CharFrequencyReward, PythonReward, RegexReward, RewardError,
                                  build_reward, check_python_reward, compute_rewards)
from dgrpo.entrypoints.cli import main
from dgrpo.protocols import RolloutBatch

REPO = Path(__file__).resolve().parent.parent
TOK = CharTokenizer.from_text("abcde xyz\n")


def enc(*texts):
    return torch.stack([TOK.encode(t) for t in texts])


def write_module(tmp_path: Path, source: str) -> str:
    """A reward module under tmp_path (a fresh name: no module cache in this process) -> its name."""
    name = f"user_rewards_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    return name


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output[-3000:], result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    return errors[0]


def snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


# -- the example module and the interface ------------------------------------------------------------------------

def test_the_example_rewards_score_texts(tiny_corpus_file):
    cfg = RewardConfig(kind="python", function="examples.rewards:vowel_share", python_path=[str(REPO)])
    fn = build_reward(cfg, TOK)
    assert isinstance(fn, PythonReward) and fn.name == "examples.rewards:vowel_share"
    assert compute_rewards(fn, enc("abcde", "xyz z")).tolist() == pytest.approx([2 / 5, 0.0])
    words = PythonReward("examples.rewards:KnownWords", {"corpus": tiny_corpus_file, "min_count": 1},
                         python_path=[str(REPO)])
    assert words.score(["the king and the queen", "zzq xqv", "the qqq"], ["", "", ""]).tolist() == \
        pytest.approx([1.0, 0.0, 0.5])


def test_the_built_in_rewards_are_the_same_interface():
    """A built-in reward named by import path scores exactly as its `reward.kind` does: one interface."""
    tokens = enc("ab ab ab", "eeeeeeee", "abcdeabc")
    for kind, path, keys in [("regex", "RegexReward", {"pattern": "ab", "normalize": False}),
                             ("char_frequency", "CharFrequencyReward", {"chars": "e"})]:
        built_in = build_reward(RewardConfig(kind=kind, **keys), TOK)
        by_path = build_reward(RewardConfig(kind="python", function=f"dgrpo.models.rewards:{path}", kwargs=keys), TOK)
        assert compute_rewards(by_path, tokens).tolist() == compute_rewards(built_in, tokens).tolist()
        assert built_in.score(TOK.decode_batch(tokens), [""] * 3) == pytest.approx(
            compute_rewards(built_in, tokens).tolist())
    assert isinstance(build_reward(RewardConfig(kind="regex", pattern="e"), TOK), RegexReward)
    assert isinstance(build_reward(RewardConfig(kind="char_frequency"), TOK), CharFrequencyReward)


def test_a_judge_actor_passes_prompts_and_its_device(tmp_path):
    """The reward runs in the judge actor: a class gets the actor's device and tokenizer, every call the texts
    and the prompts they were sampled from (MASK_CHAR where the sampler filled in)."""
    name = write_module(tmp_path, f"""
        SEEN = {{}}

        class Masked:
            def __init__(self, scale, device, tokenizer):
                SEEN.update(device=str(device), chars=tokenizer.n_chars, scale=scale)
                self.scale = scale

            def __call__(self, texts, prompts):
                SEEN.update(texts=texts, prompts=prompts)
                return [self.scale * p.count({MASK_CHAR!r}) for p in prompts]
        """)
    cfg = RewardConfig(kind="python", function=f"{name}:Masked", kwargs={"scale": 0.5}, python_path=[str(tmp_path)])
    judge = JudgeWorker(0, cfg, TOK.to_dict())
    tokens = enc("abcde", "xyzab")
    reveal = torch.tensor([[-1, -1, 0, 1, 1], [-1, 0, 0, 0, 0]])
    batch = RolloutBatch(request_id=0, tokens=tokens, reveal_step=reveal, logprobs=torch.zeros(2, 5),
                         group_index=torch.tensor([0, 0]), policy_version=0, worker_id=0, steps=2, temperature=1.0,
                         top_k=0, top_p=1.0)
    scored = judge.score(batch)
    assert scored.rewards.tolist() == [1.5, 2.0]
    seen = __import__(name).SEEN
    assert seen["device"] == str(judge.device) and seen["chars"] == TOK.n_chars and seen["scale"] == 0.5
    assert seen["texts"] == ["abcde", "xyzab"] and seen["prompts"] == ["ab" + MASK_CHAR * 3, "x" + MASK_CHAR * 4]
    assert judge.info()["reward"] == f"{name}:Masked"


def test_a_gpu_judge_config_is_validated_without_a_gpu(monkeypatch):
    """examples/lm_reward_gpu.yaml puts the reward on judge actors with a GPU each; `dgrpo config train -c` checks
    the config and the reward (import, constructor, call signature) without building anything."""
    monkeypatch.chdir(REPO)
    result = cli("config", "train", "-c", "examples/lm_reward_gpu.yaml")
    assert result.exit_code == 0, result.output
    cfg = TrainConfig.model_validate(__import__("yaml").safe_load(result.output))
    assert cfg.resources.judge.num_gpus == 1 and cfg.reward.function == "examples.rewards:LanguageModelReward"
    message = one_line_error(cli("config", "train", "-c", "examples/lm_reward_gpu.yaml",
                                 "--set", "reward.kwargs.checkpnt=runs/lm"))
    assert "examples.rewards:LanguageModelReward" in message and "unexpected keyword argument 'checkpnt'" in message


# -- bad rewards: one line naming the function ------------------------------------------------------------------

BAD = """
    import math

    def raises(texts, prompts):
        return {}["no such key"]

    def nan(texts, prompts):
        return [0.5] * (len(texts) - 1) + [math.nan]

    def short(texts, prompts):
        return [0.5] * (len(texts) - 1)

    def one_argument(texts):
        return [0.0] * len(texts)
    """


@pytest.mark.parametrize("function, pattern", [
    ("raises", r"reward {m}:raises raised KeyError: 'no such key' on a batch of 3 texts"),
    ("nan", r"reward {m}:nan returned 1 non-finite value\(s\) for 3 texts \(row: value 2: nan\)"),
    ("short", r"reward {m}:short returned 2 values for 3 texts; return one float per text"),
])
def test_a_bad_reward_call_is_one_line_naming_the_function(tmp_path, function, pattern):
    import re
    name = write_module(tmp_path, BAD)
    judge = JudgeWorker(0, RewardConfig(kind="python", function=f"{name}:{function}", python_path=[str(tmp_path)]),
                        TOK.to_dict())
    batch = RolloutBatch(request_id=0, tokens=enc("abc", "cde", "xyz"), reveal_step=torch.zeros(3, 3, dtype=torch.long),
                         logprobs=torch.zeros(3, 3), group_index=torch.tensor([0, 0, 0]), policy_version=0,
                         worker_id=0, steps=1, temperature=1.0, top_k=0, top_p=1.0)
    with pytest.raises(RewardError) as err:
        judge.score(batch)
    assert "\n" not in str(err.value) and re.fullmatch(pattern.format(m=name) + ".*", str(err.value)), err.value


@pytest.mark.parametrize("function, pattern", [
    ("nowhere_at_all.rewards:fn", "no module named 'nowhere_at_all' on the Python path"),
    ("{m}:missing", "{m} has no attribute 'missing'"),
    ("{m}:one_argument", r"one_argument\(texts\) cannot be called as \(texts, prompts\)"),
])
def test_a_reward_that_cannot_be_loaded_is_refused_before_anything_runs(tmp_path, function, pattern):
    import re
    name = write_module(tmp_path, BAD)
    spec = function.format(m=name)
    message = one_line_error(cli("config", "train", "--set", "reward.kind=python", "--set", f"reward.function={spec}",
                                 "--set", f"reward.python_path=[{tmp_path}]"))
    assert re.search(pattern.format(m=name), message), message
    assert spec in message


def test_a_reward_path_must_name_a_module_and_a_function():
    result = cli("config", "train", "--set", "reward.kind=python", "--set", "reward.function=examples.rewards")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "reward.function as package.module:name" in result.output and "'examples.rewards'" in result.output
    result = cli("config", "train", "--set", "reward.kind=regex",
                 "--set", "reward.function=examples.rewards:vowel_share")
    assert result.exit_code == 2 and "set reward.kind=python (it is 'regex')" in result.output


def test_an_unimportable_reward_loses_nothing(tmp_path, tiny_corpus_file):
    """`dgrpo train --overwrite` would delete the run in run.out_dir; a reward that cannot be imported stops it
    first, and the run directory is left as it was."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000002").mkdir(parents=True)
    (run / "checkpoints" / "step_000002" / "config.json").write_text("{}")
    (run / "run.json").write_text(json.dumps({"run_id": "abc"}))
    (run / "metrics.jsonl").write_text('{"step": 1, "num_samples": 8}\n{"step": 2, "num_samples": 8}\n')
    before = snapshot(run)
    message = one_line_error(cli("train", "--overwrite", "--set", f"run.out_dir={run}", "--set",
                                 f"corpus.path={tiny_corpus_file}", "--set", "reward.kind=python",
                                 "--set", "reward.function=examples.rewardz:vowel_share"))
    assert "reward.function examples.rewardz:vowel_share: no module named 'examples.rewardz'" in message
    assert snapshot(run) == before


# -- end to end on Ray ------------------------------------------------------------------------------------------

TINY = {"run.steps": 3, "run.eval_every": 3, "run.eval_prompts": 4, "run.metrics_export": False,
        "run.checkpoint_every": 1, "run.actor_timeout_s": 120, "generator.preset": "tiny", "sampler.steps": 4,
        "grpo.group_size": 4, "grpo.prompts_per_step": 2, "grpo.minibatch_size": 8,
        "resources.rollout.num_workers": 1}


def train_args(out: Path, corpus: str, *extra: str, **over) -> list[str]:
    args = ["train", "--quiet", "--json"]
    for key, value in {**TINY, "run.out_dir": out, "corpus.path": corpus, **over}.items():
        args += ["--set", f"{key}={value}"]
    return args + list(extra)


def test_a_tiny_run_with_the_example_reward(ray_cluster, tmp_path, tiny_corpus_file):
    """GRPO against examples/rewards.py:KnownWords, built in the judge actor of the session's cluster."""
    out = tmp_path / "run"
    result = cli(*train_args(out, tiny_corpus_file, **{
        "reward.kind": "python", "reward.function": "examples.rewards:KnownWords",
        "reward.kwargs.corpus": tiny_corpus_file, "reward.python_path": f"[{REPO}]"}))
    assert result.exit_code == 0, (result.output[-3000:], result.exception)
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["steps"] == 3 and summary["status"] == "finished"
    rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "reward_mean" in r]
    assert len(rows) == 3 and all(0.0 <= r["reward_min"] <= r["reward_max"] <= 1.0 for r in rows)
    assert 0.0 <= summary["eval_reward_after"] <= 1.0


def test_a_reward_that_fails_mid_run_stops_it_in_one_line_and_loses_nothing(ray_cluster, tmp_path,
                                                                            tiny_corpus_file):
    """The reward raises on its fourth call (the evaluation before step 1, steps 1 and 2, then step 3): the run
    stops with one line naming it; steps 1-2 stay logged and checkpointed, and --resume (new judge actors, calls
    counted afresh: step 3, step 4, the final evaluation) finishes the run."""
    name = write_module(tmp_path, """
        class FailsOnce:
            def __init__(self, at_call):
                self.calls, self.at_call = 0, at_call

            def __call__(self, texts, prompts):
                self.calls += 1
                if self.calls == self.at_call:
                    raise RuntimeError(f"call {self.calls} failed")
                return [t.count("e") / len(t) for t in texts]
        """)
    out = tmp_path / "run"
    over = {"reward.kind": "python", "reward.function": f"{name}:FailsOnce", "reward.kwargs.at_call": 4,
            "reward.python_path": f"[{tmp_path}]", "run.steps": 4, "run.eval_every": 10}
    message = one_line_error(cli(*train_args(out, tiny_corpus_file, **over)))
    assert f"reward {name}:FailsOnce raised RuntimeError: call 4 failed on a batch of 8 texts" in message
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "num_samples" in r]
    assert steps == [1, 2] and sorted(p.name for p in (out / "checkpoints").glob("step_*")) == \
        ["step_000000", "step_000001", "step_000002"]
    result = cli(*train_args(out, tiny_corpus_file, "--resume", **over))  # a new actor: its calls counted afresh
    assert result.exit_code == 0, (result.output[-3000:], result.exception)
    assert json.loads(result.output.strip().splitlines()[-1])["steps"] == 4
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "num_samples" in r]
    assert steps == [1, 2, 3, 4]


def test_check_python_reward_builds_nothing(tmp_path):
    """Validation imports and inspects; the constructor (which may load a model) does not run."""
    name = write_module(tmp_path, """
        BUILT = []

        class Heavy:
            def __init__(self, checkpoint):
                BUILT.append(checkpoint)

            def __call__(self, texts, prompts):
                return [0.0] * len(texts)
        """)
    assert check_python_reward(f"{name}:Heavy", {"checkpoint": "x"}, [str(tmp_path)]) == "class"
    assert __import__(name).BUILT == []
