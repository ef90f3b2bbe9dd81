"""Shared session fixtures: a small made-up corpus and a tiny generator pretrained on it (~1 s)."""

import os
import random
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    """With PYTHONDONTWRITEBYTECODE set (as on the machines this suite is timed on), no process writes the
    package's bytecode, so every process that imports it compiles it again: each Ray actor, `dgrpo` subprocess
    and test worker, some 300 of them in a run, ~0.4 s of CPU each. Compile it once, before the workers start,
    into its usual __pycache__ (git ignores it); where bytecode is written anyway, the first import does it."""
    if sys.flags.dont_write_bytecode and "PYTEST_XDIST_WORKER" not in os.environ:
        import compileall
        for package in ("dgrpo", "bench", "examples"):
            compileall.compile_dir(str(REPO / package), quiet=1)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Two torch threads on a 2-core machine shared with Ray actors oversubscribe: ~10x slower."""
    torch.set_num_threads(1)


def _make_corpus_text(n_chars: int = 24000, seed: int = 0) -> str:
    rng = random.Random(seed)
    speakers = ["KING", "QUEEN", "ROMEO", "NURSE"]
    words = ("the king and queen of rome shall speak to my lord good night sweet prince "
             "what is this that i see here now thou art a fool come away with me").split()
    parts = []
    size = 0
    while size < n_chars:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(4, 9)))
        block = f"{rng.choice(speakers)}:\n{line.capitalize()}.\n\n"
        parts.append(block)
        size += len(block)
    return "".join(parts)


@pytest.fixture(scope="session")
def tiny_corpus_file(tmp_path_factory):
    """Path (str) to a ~24k-character structured text file (speaker lines from a small word list)."""
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(_make_corpus_text())
    return str(path)


@pytest.fixture(scope="session")
def tiny_generator(tmp_path_factory, tiny_corpus_file):
    """Path (str) to a `tiny` generator checkpoint (block 32) pretrained 60 iterations on tiny_corpus_file."""
    import torch

    from dgrpo.config import PretrainConfig, to_dict
    from dgrpo.corpus import load_corpus
    from dgrpo.training.pretrain import pretrain

    out = tmp_path_factory.mktemp("gen") / "tiny_gen"
    cfg = PretrainConfig(preset="tiny", out=str(out), max_iters=60, batch_size=16, warmup_iters=5,
                         lr=3e-3, eval_every=30, eval_windows=16, precision="fp32", compile=False, ema_decay=0.0,
                         corpus={"path": tiny_corpus_file})
    corpus = load_corpus(cfg.corpus.path, val_fraction=cfg.corpus.val_fraction)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only adds contention on a shared 2-core box
    try:
        pretrain(cfg, corpus, to_dict(cfg), progress=False, log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    return str(out)


@pytest.fixture(scope="session")
def tiny_judge(tmp_path_factory, tiny_generator, tiny_corpus_file):
    """A tiny judge (block 32) trained 20 iterations against tiny_generator, with a refill pool of 16."""
    from dgrpo.config import JudgeTrainConfig, to_dict
    from dgrpo.training.train_judge import train_judge

    out = tmp_path_factory.mktemp("tiny_judge") / "judge"
    cfg = JudgeTrainConfig(generator=tiny_generator, preset="tiny", out=str(out), max_iters=20, batch_size=8,
                           warmup_iters=2, lr=1e-3, refill_pool=16, refill_every=5, eval_every=20, eval_windows=8,
                           precision="fp32", sampler={"steps": 4}, corpus={"path": tiny_corpus_file})
    train_judge(cfg, to_dict(cfg), progress=False, log=lambda *a: None)
    return str(out)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session (starting one takes ~5 s here).

    Its actors get OMP_NUM_THREADS=1 from the environment the cluster starts with, not from a runtime_env: with
    a runtime_env Ray starts every worker through a shim process (setup_worker.py, which imports Ray, then execs
    the worker), ~0.5 s of CPU more per actor, and the suite starts some 200 actors on this cluster."""
    import ray
    if not ray.is_initialized():
        before = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"  # the raylet, and so every worker it starts, inherits it
        try:
            ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
        finally:
            if before is None:
                del os.environ["OMP_NUM_THREADS"]
            else:
                os.environ["OMP_NUM_THREADS"] = before
    yield ray
    ray.shutdown()


def tiny_run_config(out_dir, corpus: str, **sections):
    """The tests' GRPO run: tiny preset, the made-up corpus, a character-frequency reward, 4 sampler steps,
    4 groups of 4 a step, 2 rollout workers, no metrics export. Each keyword names a section whose keys it
    sets (run={"steps": 6}); a value given for a nested section (resources={"rollout": {...}}) replaces it."""
    from dgrpo.config import TrainConfig

    base = {
        "run": {"out_dir": str(out_dir), "eval_prompts": 8, "checkpoint_every": 100, "metrics_export": False,
                "actor_timeout_s": 120},
        "corpus": {"path": corpus},
        "generator": {"preset": "tiny"},
        "reward": {"kind": "char_frequency", "chars": "e"},
        "sampler": {"steps": 4},
        "grpo": {"group_size": 4, "prompts_per_step": 4, "lr": 3e-3},
        "resources": {"rollout": {"num_workers": 2}},
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return TrainConfig.model_validate(base)


@pytest.fixture
def metrics_run_config(tmp_path, tiny_corpus_file):
    """A short tiny-preset GRPO run that exports metrics: steps -> its validated TrainConfig."""
    def make(steps: int):
        return tiny_run_config(
            tmp_path / "run", tiny_corpus_file, run={"steps": steps, "eval_every": steps, "metrics_export": True},
            grpo={"group_size": 4, "prompts_per_step": 2, "minibatch_size": 8},
            resources={"rollout": {"num_workers": 2, "num_cpus": 0.5}, "judge": {"num_cpus": 0.25},
                       "learner": {"num_cpus": 0.5}})
    return make
