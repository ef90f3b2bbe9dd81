"""Bad input gets a clear error and exit code, never a traceback from deep inside (issue 6).

CLI-level inputs go through `dgrpo` (click's CliRunner): a user error prints
`error: ...` and exits with code 2. Reward values are checked where they are
produced (the judge actor); the driver turns the actor's error into a RunError.
Weights load only from safetensors and JSON: no pickle, and nothing listens
beyond the loopback interface.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import msgpack
import pytest
import ray
import torch
from click.testing import CliRunner

from dgrpo.actors.judge_worker import JudgeWorker
from dgrpo.config import RewardConfig, TrainConfig
from dgrpo.corpus import CharTokenizer, load_corpus
from dgrpo.errors import RunError
from dgrpo.models.checkpoint import save_checkpoint
from dgrpo.models.diffusion import DiffusionLM
from dgrpo.models.judge import Judge, judge_config
from dgrpo.models.transformer import preset_config
from dgrpo.entrypoints.cli import main
from dgrpo.orchestration.driver import Driver
from dgrpo.protocols import RolloutBatch, ScoredBatch, encode
from dgrpo.protocols.rollout_log import RolloutLogWriter
from raynodes import free_ports

ray.cloudpickle.register_pickle_by_value(__import__(__name__))  # Ray workers cannot import this module


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def assert_user_error(result, *patterns: str) -> str:
    """Exit code 2 and one `error: ...` message, no traceback; returns the message."""
    out = result.output
    assert result.exit_code == 2, (result.exit_code, out, result.exception)
    assert "Traceback" not in out
    assert isinstance(result.exception, SystemExit)
    message = out[out.index("error: "):]
    for pattern in patterns:
        assert re.search(pattern, message, re.S), (pattern, message)
    return message


def train_args(tmp_path: Path, corpus: str, *sets: str) -> list[str]:
    base = {"run.out_dir": str(tmp_path / "run"), "run.steps": 2, "run.metrics_export": False,
            "corpus.path": corpus, "generator.preset": "tiny", "prompts.length": 16, "sampler.steps": 4}
    args = ["train"]
    for key, value in base.items():
        args += ["--set", f"{key}={value}"]
    for s in sets:
        args += ["--set", s]
    return args


# -- config ----------------------------------------------------------------------


@pytest.mark.parametrize("setting, pattern", [
    ("grpo.group_size=-4", r"grpo\.group_size: Input should be greater than or equal to 2 \(got -4\)"),
    ("grpo.clip_eps=0", r"grpo\.clip_eps: Input should be greater than 0 \(got 0\)"),
    ("grpo.clip_eps=-0.2", r"grpo\.clip_eps: Input should be greater than 0"),
    ("grpo.adv_eps=0", r"grpo\.adv_eps: Input should be greater than 0"),
    ("run.max_staleness=-1", r"run\.max_staleness: Input should be greater than or equal to 0 \(got -1\)"),
    ("sampler.temperature=0", r"sampler\.temperature: Input should be greater than 0 \(got 0\)"),
    ("sampler.temperature=-1.5", r"sampler\.temperature: Input should be greater than 0"),
    ("grpo.group_size=eight", r"grpo\.group_size: Input should be a valid integer"),
    ("run.bogus=1", r"run\.bogus: unknown key"),
    ("grpo.kl_cof=0.1", r"grpo\.kl_cof: unknown key"),
    ("nonsense.key=1", r"nonsense: unknown key"),
])
def test_train_rejects_bad_config_values(tmp_path, tiny_corpus_file, setting, pattern):
    assert_user_error(cli(*train_args(tmp_path, tiny_corpus_file, setting)), r"invalid configuration", pattern)
    assert not (tmp_path / "run").exists()  # rejected before anything ran


def test_train_rejects_a_config_file_with_unknown_keys(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("run:\n  steps: 3\n  stepz: 4\ngrpo:\n  group_size: 0\n")
    message = assert_user_error(cli("train", "--config", str(path)), rf"invalid configuration in {re.escape(str(path))}")
    assert "run.stepz: unknown key" in message and "grpo.group_size" in message
    path.write_text("- a list\n- not a mapping\n")
    assert_user_error(cli("train", "--config", str(path)), r"must hold a mapping at top level")
    path.write_text("run: {steps: [unclosed\n")
    assert_user_error(cli("train", "--config", str(path)), r"is not valid YAML/JSON")
    assert_user_error(cli("train", "--config", str(tmp_path / "missing.yaml")), r"does not exist")


# -- checkpoints -------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_corpus_file):
    """A tiny generator checkpoint of the corpus, a judge of the same vocabulary and one of another."""
    root = tmp_path_factory.mktemp("ckpts")
    tok = load_corpus(tiny_corpus_file).tokenizer
    torch.manual_seed(0)
    gen = DiffusionLM(preset_config("tiny", tok.vocab_size))
    save_checkpoint(root / "gen", kind="generator", model_config=gen.cfg, vocab=tok.to_dict(), weights=gen)
    for name, judge_tok in (("judge", tok), ("other_judge", CharTokenizer.from_text("abcdefghij XYZ\n"))):
        judge = Judge(judge_config("tiny", judge_tok.n_chars, 32))
        save_checkpoint(root / name, kind="judge", model_config=judge.cfg, vocab=judge_tok.to_dict(), weights=judge)
    return root


def copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_train_with_a_missing_generator_checkpoint(ray_cluster, tmp_path, tiny_corpus_file):
    result = cli(*train_args(tmp_path, tiny_corpus_file, f"generator.checkpoint={tmp_path / 'nope'}"))
    assert_user_error(result, r"checkpoint .*nope does not exist")


def test_train_with_a_corrupt_or_truncated_generator_checkpoint(ray_cluster, tmp_path, tiny_corpus_file, checkpoints):
    truncated = copy_checkpoint(checkpoints / "gen", tmp_path / "truncated")
    model = truncated / "model.safetensors"
    model.write_bytes(model.read_bytes()[:200])
    result = cli(*train_args(tmp_path, tiny_corpus_file, f"generator.checkpoint={truncated}"))
    assert_user_error(result, r"model\.safetensors is corrupt or truncated")

    corrupt = copy_checkpoint(checkpoints / "gen", tmp_path / "corrupt")
    (corrupt / "config.json").write_text('{"format": "dgrpo-checkpoint", "format_')
    result = cli(*train_args(tmp_path, tiny_corpus_file, f"generator.checkpoint={corrupt}"))
    assert_user_error(result, r"config\.json is not valid JSON")

    judge_as_generator = cli(*train_args(tmp_path, tiny_corpus_file, f"generator.checkpoint={checkpoints / 'judge'}"))
    assert_user_error(judge_as_generator, r"holds a judge checkpoint, expected a generator checkpoint")


def test_train_with_a_judge_of_another_vocabulary(ray_cluster, tmp_path, tiny_corpus_file, checkpoints):
    result = cli(*train_args(tmp_path, tiny_corpus_file, f"generator.checkpoint={checkpoints / 'gen'}",
                             "reward.kind=judge", f"reward.judge_checkpoint={checkpoints / 'other_judge'}"))
    assert_user_error(result, r"vocabularies differ \(judge vs generator\)", r"must come from the same corpus")


def test_sample_rejects_prompt_characters_outside_the_vocabulary(checkpoints):
    result = cli("sample", "--checkpoint", str(checkpoints / "gen"), "--prompt", "The king ☃ é __________",
                 "--steps", "2", "--num", "1")
    assert_user_error(result, r"'é'", r"'☃'")
    ok = cli("sample", "--checkpoint", str(checkpoints / "gen"), "--prompt", "the king ______", "--steps", "2",
             "--num", "1")
    assert ok.exit_code == 0, ok.output


def test_weights_are_never_unpickled(tmp_path, checkpoints):
    """A pickle planted as model.safetensors / config.json is rejected without being executed."""
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    payload = pickle.dumps(Exploit())
    planted = copy_checkpoint(checkpoints / "gen", tmp_path / "planted")
    (planted / "model.safetensors").write_bytes(payload)
    result = cli("sample", "--checkpoint", str(planted), "--steps", "2", "--num", "1")
    assert_user_error(result, r"model\.safetensors is corrupt or truncated")
    (planted / "config.json").write_bytes(payload)
    assert_user_error(cli("sample", "--checkpoint", str(planted), "--num", "1"), r"config\.json is not valid JSON")
    assert not marker.exists()


def test_no_pickle_loading_in_the_package():
    """Static guard: the package has no code path that unpickles files (Ray's own transport aside)."""
    root = Path(__file__).resolve().parents[1] / "dgrpo"
    banned = re.compile(r"torch\.load\(|pickle\.loads?\(|cloudpickle\.loads?\(|allow_pickle\s*=\s*True|"
                        r"weights_only\s*=\s*False|import dill|import joblib")
    hits = [f"{p.relative_to(root)}:{i + 1}: {line.strip()}"
            for p in root.rglob("*.py") for i, line in enumerate(p.read_text().splitlines()) if banned.search(line)]
    assert hits == []


# -- rollout logs -----------------------------------------------------------------------


def scored_batch(request_id: int = 0, n: int = 4, length: int = 8) -> ScoredBatch:
    g = torch.Generator().manual_seed(request_id)
    rollout = RolloutBatch(
        request_id=request_id, tokens=torch.randint(0, 20, (n, length), generator=g),
        reveal_step=torch.randint(0, 4, (n, length), generator=g), logprobs=-torch.rand(n, length, generator=g),
        group_index=torch.arange(n // 2).repeat_interleave(2), policy_version=0, worker_id=0, steps=4,
        temperature=1.0, top_k=0, top_p=1.0, timings={"generate_s": 0.1})
    return ScoredBatch(rollout=rollout, rewards=torch.rand(n, generator=g), judge_id=0, timings={"score_s": 0.1})


def frame(payload: bytes) -> bytes:
    return struct.pack("<I", len(payload)) + payload


def test_rollouts_inspect_on_a_good_log(tmp_path):
    path = tmp_path / "rollouts.msgpack"
    with RolloutLogWriter(path) as w:
        for i in range(3):
            w.write(scored_batch(i))
    result = cli("rollouts", "inspect", str(path))
    assert result.exit_code == 0, result.output


def hostile_wire() -> dict:
    return msgpack.unpackb(encode(scored_batch()), raw=False)


def _nested(depth: int) -> bytes:
    return b"\x91" * depth + b"\xc0"  # [[[...[nil]...]]]


def _with(mutate) -> bytes:
    wire = hostile_wire()
    mutate(wire)
    return frame(msgpack.packb(wire, use_bin_type=True))


HOSTILE = {
    "truncated payload": lambda good: good[:-7],
    "truncated header": lambda good: b"\x05\x00",
    "random bytes": lambda good: random.Random(0).randbytes(3000),
    "length claims 4 GiB": lambda good: b"\xff\xff\xff\xff" + good,
    "deep nesting": lambda good: frame(_nested(100_000)),
    "array32 header claiming 4G items": lambda good: frame(b"\xdd\xff\xff\xff\xff"),
    "msgpack ext type": lambda good: frame(msgpack.packb(msgpack.ExtType(42, b"x" * 16))),
    "pickled object dtype": lambda good: _with(lambda w: w["data"]["rewards"].update(dtype="|O")),
    "array shape bigger than its data": lambda good: _with(
        lambda w: w["data"]["rewards"].update(shape=[2 ** 31, 2 ** 31])),
    "negative shape": lambda good: _with(lambda w: w["data"]["rewards"].update(shape=[-4])),
    "unknown schema": lambda good: _with(lambda w: w.update(schema="os.system")),
    "field of the wrong type": lambda good: _with(lambda w: w["data"].update(judge_id="0; rm -rf /")),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_rollouts_inspect_rejects_truncated_and_hostile_files(tmp_path, name):
    good = frame(encode(scored_batch()))
    path = tmp_path / "bad.msgpack"
    path.write_bytes(good + HOSTILE[name](good))
    assert_user_error(cli("rollouts", "inspect", str(path)), r"frame 1 at byte offset")


def test_rollouts_inspect_rejects_a_frame_with_inconsistent_shapes(tmp_path):
    def mutate(wire):  # same byte count, shape (2, 16) instead of (4, 8): a mask that does not fit
        wire["data"]["rollout"]["reveal_step"]["shape"] = [2, 16]
    path = tmp_path / "bad.msgpack"
    path.write_bytes(_with(mutate))
    assert_user_error(cli("rollouts", "inspect", str(path)), r"reveal_step")


def test_rollouts_inspect_on_a_missing_file(tmp_path):
    assert_user_error(cli("rollouts", "inspect", str(tmp_path / "none.msgpack")), r"does not exist")


# -- rewards ------------------------------------------------------------------------------


def bad_reward_judge(kind: str, skip_eval: bool = False):
    """A judge whose reward function returns NaN, inf or a wrong shape (on training batches only if skip_eval)."""
    class BadRewardJudge(JudgeWorker):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            good, self.bad = self.reward_fn, True

            def reward(tokens):
                r = good(tokens)
                if not self.bad:
                    return r
                if kind == "nan":
                    r[1] = float("nan")
                elif kind == "inf":
                    r[0] = float("inf")
                elif kind == "shape":
                    r = r[:, None].repeat(1, 2)
                elif kind == "short":
                    r = r[:-1]
                return r
            reward.name = f"{kind}_reward"
            self.reward_fn = reward

        def score(self, batch):
            self.bad = not (skip_eval and batch.request_id < 0)
            return super().score(batch)
    return BadRewardJudge


@pytest.mark.parametrize("kind, pattern", [
    ("inf", r"non-finite rewards at rows \[0\]"),
    ("shape", r"must return 8 finite floats \(shape \(8,\)\); got shape \(8, 2\)"),
    ("short", r"got shape \(7,\)"),
])
def test_judge_rejects_non_finite_or_misshapen_rewards(tiny_corpus_file, kind, pattern):
    tok = load_corpus(tiny_corpus_file).tokenizer
    judge = bad_reward_judge(kind)(0, RewardConfig(kind="char_frequency", chars="e"), tok.to_dict())
    batch = scored_batch(n=8).rollout
    batch.tokens = torch.randint(0, tok.n_chars, batch.tokens.shape)
    with pytest.raises(ValueError, match=rf"reward '{kind}_reward': .*{pattern}"):
        judge.score(batch)


def test_nan_reward_stops_the_run_with_a_clear_error(ray_cluster, tiny_corpus_file, tmp_path):
    cfg = TrainConfig.model_validate({
        "run": {"out_dir": str(tmp_path / "run"), "steps": 2, "eval_prompts": 4, "metrics_export": False,
                "actor_timeout_s": 120},
        "corpus": {"path": tiny_corpus_file}, "generator": {"preset": "tiny"},
        "reward": {"kind": "char_frequency", "chars": "e"}, "prompts": {"length": 16}, "sampler": {"steps": 4},
        "grpo": {"group_size": 4, "prompts_per_step": 2}, "resources": {"rollout": {"num_workers": 1}},
    })
    cls = type("NaNDriver", (Driver,), {"judge_cls": bad_reward_judge("nan", skip_eval=True)})
    driver = cls(cfg)
    try:
        with pytest.raises(RunError, match=r"score on judge actor 0 failed: ValueError: reward 'nan_reward': "
                                           r"the reward function must return 8 finite floats .*"
                                           r"non-finite rewards at rows \[1\]") as err:
            driver.run()
    finally:
        driver.close()
    assert "nan" in str(err.value).lower() and driver.step == 0


# -- network ----------------------------------------------------------------------------------

LISTEN_PROBE = textwrap.dedent("""
    import json, os, sys, time
    import ray
    from dgrpo.config import TrainConfig
    from dgrpo.orchestration.cluster import connect
    sys.path[:0] = sys.argv[2:4]  # the repository (bench.common) and tests/
    from bench.common import process_tree
    from raynodes import listening_sockets

    assert connect(TrainConfig.model_validate(json.loads(sys.argv[1]))), "expected an embedded cluster"
    ray.get(ray.put(1), timeout=60)
    time.sleep(1.0)  # the agents start with the node; give them a moment to bind
    print("LISTEN " + json.dumps(listening_sockets(process_tree(os.getpid()))))
    ray.shutdown()
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("dashboard", [False, True], ids=["default", "dashboard"])
def test_embedded_cluster_listens_on_loopback_only(tmp_path, dashboard):
    """Start the embedded cluster the way `dgrpo train` does (cluster.connect; default config, and with
    run.dashboard) in a subprocess; every listening TCP socket of its process tree is bound to a
    loopback address, the dashboard's too."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["OMP_NUM_THREADS"] = "1"
    port = free_ports(1)[0]
    config = {"run": {"dashboard": True, "dashboard_port": port}} if dashboard else {}
    proc = subprocess.run([sys.executable, "-c", LISTEN_PROBE, json.dumps(config),
                           str(Path(__file__).parents[1]), str(Path(__file__).parent)], capture_output=True, text=True,
                          timeout=240, env=env, cwd=tmp_path)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("LISTEN ")), None)
    assert proc.returncode == 0 and line, proc.stdout[-2000:] + proc.stderr[-4000:]
    sockets = json.loads(line[len("LISTEN "):])
    assert len(sockets) >= 3, sockets  # GCS, raylet, workers at least
    assert (port in {s[1] for s in sockets}) == dashboard, sockets

    def loopback(addr: str) -> bool:
        import ipaddress
        ip = ipaddress.ip_address(addr)
        mapped = getattr(ip, "ipv4_mapped", None)
        return ip.is_loopback or (mapped is not None and mapped.is_loopback)

    exposed = [s for s in sockets if not loopback(s[0])]
    assert exposed == [], exposed
