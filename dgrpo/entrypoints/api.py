"""The Python API: what the `dgrpo` commands do, as functions a script or a notebook calls.

    import dgrpo
    cfg = dgrpo.make_config("train", "grpo.yaml", ["run.steps=20"], reward={"kind": "python",
                            "function": "examples.rewards:vowel_share"})
    summary = dgrpo.train(cfg)                      # a GRPO run on Ray, as `dgrpo train`
    rows = dgrpo.read_metrics(summary["out_dir"])   # one dict per line of metrics.jsonl
    for s in dgrpo.sample(summary["out_dir"], num=2):
        print(s.text)

`import dgrpo` imports none of this until an attribute is used (dgrpo/__init__.py), and nothing here imports
Ray or torch before a function needs them. The CLI (cli.py) is a thin layer over these functions; their
keyword arguments are its flags (`resume`, `overwrite`, `quiet`, `precision`, ...), and they refuse what it
refuses: an output that would replace earlier results without `overwrite`, `resume` without a checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

from ..config import (JudgeTrainConfig, LMTrainConfig, PipelineConfig, PretrainConfig, Section, TrainConfig,
                      deep_merge, load_config, to_dict)
from ..errors import ConfigError, RunError

CONFIG_KINDS: dict[str, type[Section]] = {"train": TrainConfig, "pretrain": PretrainConfig, "judge": JudgeTrainConfig,
                                          "lm": LMTrainConfig, "pipeline": PipelineConfig}


# -- configs ------------------------------------------------------------------------------------------------------

def make_config(kind: str = "train", source=None, overrides=(), **sections) -> Section:
    """A validated config of `kind` (train, pretrain, judge, lm, pipeline).

    source: a YAML/JSON file, a dict, or a config object; `sections` (top-level keys, e.g. run={"steps": 20})
    are merged into it; `overrides` are `a.b=value` strings as `--set` takes them, applied last. A train
    config's Python reward is imported and its signature checked (check_config). ConfigError says what is wrong.
    """
    if kind not in CONFIG_KINDS:
        raise ConfigError(f"unknown config kind {kind!r}; choose one of {', '.join(CONFIG_KINDS)}")
    cls = CONFIG_KINDS[kind]
    if isinstance(overrides, str):
        overrides = [overrides]
    path, base = None, {}
    if isinstance(source, Section):
        base = to_dict(source)
    elif isinstance(source, dict):
        base = source
    elif source is not None:
        path = source
    if sections:  # they win over the file
        if path is not None:
            from ..config import read_yaml_mapping
            base, path = read_yaml_mapping(path, "config file"), None
        base = deep_merge(base, sections)
    cfg = load_config(cls, path, list(overrides), base=base)
    check_config(cfg)
    return cfg


def _as_config(kind: str, cfg, keys: dict) -> Section:
    cls = CONFIG_KINDS[kind]
    if isinstance(cfg, cls) and not keys:
        check_config(cfg)
        return cfg
    return make_config(kind, cfg, **keys)


def check_config(cfg: Section) -> None:
    """What a config names beyond its own fields: a train config's Python reward (reward.kind python) must be
    importable, callable, and take (texts, prompts) (a class: its constructor takes reward.kwargs). Nothing is
    built or run; a RewardError names the function."""
    reward = getattr(cfg, "reward", None)
    if isinstance(cfg, TrainConfig) and reward.kind == "python":
        from ..models.rewards import check_python_reward
        check_python_reward(reward.function, reward.kwargs, reward.python_path)


def resolved_train_config(cfg: TrainConfig) -> TrainConfig:
    """cfg with reward.python_path made absolute (the judge actors do not share the driver's working directory)."""
    if not cfg.reward.python_path:
        return cfg
    cfg = cfg.model_copy(deep=True)
    cfg.reward.python_path = [str(Path(p).expanduser().absolute()) for p in cfg.reward.python_path]
    return cfg


# -- outputs: never replace earlier results unasked ----------------------------------------------------------------

def check_writable(path, flag: str = "--out", kind: str = "directory") -> None:
    """Before any work: `path` can become (or is) the output `kind` (directory or file) that `flag` names."""
    target = Path(path).expanduser().absolute()
    if target.exists():
        if target.is_dir() != (kind == "directory"):
            raise ConfigError(f"{flag} {path} is a {'directory' if target.is_dir() else 'file'}, not a {kind}; "
                              f"choose another {flag}")
        if not os.access(target, os.W_OK):
            raise ConfigError(f"{flag} {path} is not writable; choose another {flag}")
        return
    parent = next(p for p in target.parents if p.exists())
    if not parent.is_dir():
        raise ConfigError(f"{flag} {path}: {parent} is a file, not a directory; choose another {flag}")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"{flag} {path} cannot be created: {parent} is not writable; choose another {flag}")


def describe_checkpoint(path: Path) -> str:
    try:
        manifest = json.loads((Path(path) / "config.json").read_text())
        state = manifest.get("state") or {}
        return f"a {manifest.get('kind')} checkpoint at iter {state.get('iter', '?')}"
    except (OSError, ValueError, AttributeError):
        return "an unreadable checkpoint"


def prepare_checkpoint_dir(out, resume: bool = False, overwrite: bool = False, flag: str = "--out") -> None:
    """The output directory of a single-process trainer (pretrain, judge train, lm train), checked before any work.

    resume: it must hold a checkpoint. Otherwise it must be new or empty, or hold a dgrpo checkpoint and
    `overwrite` (the new run's first checkpoint replaces it, atomically). A directory holding anything else is
    never written into."""
    if resume and overwrite:
        raise ConfigError("--resume continues the checkpoint in --out, --overwrite replaces it: pass one")
    path = Path(out)
    check_writable(path, flag)
    has_checkpoint = (path / "config.json").is_file()
    if resume:
        if not has_checkpoint:
            raise RunError(f"--resume: no checkpoint in {out}; start without --resume")
        return
    if not path.is_dir() or not any(path.iterdir()):
        return
    if not has_checkpoint:
        shown = ", ".join(sorted(p.name for p in path.iterdir())[:5])
        raise ConfigError(f"{flag} {out} is not empty and holds no dgrpo checkpoint ({shown}); choose a new or "
                          f"empty directory")
    if not overwrite:
        raise RunError(f"{flag} {out} already holds {describe_checkpoint(path)}; continue it with --resume, replace "
                       f"it with --overwrite, or choose another {flag}")


def prepare_output_file(path, overwrite: bool = False, flag: str = "--out") -> None:
    """An output file: a new path, or an existing one only with `overwrite`."""
    check_writable(path, flag, kind="file")
    p = Path(path)
    if p.is_file() and p.stat().st_size > 0 and not overwrite:
        raise RunError(f"{flag} {path} already exists; replace it with --overwrite or choose another {flag}")


def prepare_output_dir(path, overwrite: bool = False, flag: str = "--out") -> None:
    """An output directory of files that are made again (reports): new or empty, or replaced with `overwrite`."""
    check_writable(path, flag)
    p = Path(path)
    if p.is_dir() and any(p.iterdir()) and not overwrite:
        raise RunError(f"{flag} {path} is not empty; replace what is in it with --overwrite or choose another {flag}")


# -- the single-process trainers -----------------------------------------------------------------------------------

def _log(quiet: bool):
    return (lambda *a, **k: None) if quiet else print


def _threads(threads: int | None) -> None:
    if threads:
        import torch
        torch.set_num_threads(threads)


def _load_corpus(cfg):
    from ..corpus import load_corpus
    return load_corpus(cfg.corpus.path, cfg.corpus.cache_dir, cfg.corpus.val_fraction)


def pretrain(cfg=None, *, resume: bool = False, overwrite: bool = False, quiet: bool = False,
             threads: int | None = None, **keys) -> dict:
    """Masked-diffusion pretraining of a generator (`dgrpo pretrain`). cfg: a PretrainConfig, or what make_config
    takes, with `keys` as its sections (preset="tiny", max_iters=500, out="runs/gen", corpus={"path": ...}).
    Returns the last checkpoint's state (iter, val_loss, wall_time_s, history, ...)."""
    from ..training.pretrain import pretrain as run_pretrain
    cfg = _as_config("pretrain", cfg, keys)
    prepare_checkpoint_dir(cfg.out, resume, overwrite)
    _threads(threads)
    return run_pretrain(cfg, _load_corpus(cfg), to_dict(cfg), resume=resume, progress=not quiet, log=_log(quiet))


def train_judge(cfg=None, *, resume: bool = False, overwrite: bool = False, quiet: bool = False,
                threads: int | None = None, **keys) -> dict:
    """Train a judge against a generator (`dgrpo judge train`); returns its final state and held-out figures."""
    from ..training.train_judge import train_judge as run_train_judge
    cfg = _as_config("judge", cfg, keys)
    prepare_checkpoint_dir(cfg.out, resume, overwrite)
    _threads(threads)
    return run_train_judge(cfg, to_dict(cfg), resume=resume, progress=not quiet, log=_log(quiet))


def train_lm(cfg=None, *, resume: bool = False, overwrite: bool = False, quiet: bool = False,
             threads: int | None = None, **keys) -> dict:
    """Train the character language model of the gold evaluation (`dgrpo lm train`); returns its final state."""
    from ..training.lm import train_char_lm
    cfg = _as_config("lm", cfg, keys)
    prepare_checkpoint_dir(cfg.out, resume, overwrite)
    _threads(threads)
    return train_char_lm(cfg, _load_corpus(cfg), to_dict(cfg), resume=resume, progress=not quiet, log=_log(quiet))


def evaluate_judge(judge: str, *, generator: str | None = None, corpus: str | None = None, windows: int = 256,
                   seed: int = 0, out: str | None = None, overwrite: bool = False, precision: str | None = None,
                   threads: int | None = None) -> dict:
    """A judge's held-out AUC, Spearman and mean scores (`dgrpo judge eval`); written as JSON to `out` if given.
    The generator, corpus and precision default to the judge's training config."""
    from ..training.train_judge import evaluate_judge_cli
    if out is not None:
        prepare_output_file(out, overwrite)
    _threads(threads)
    return evaluate_judge_cli(judge, generator, corpus, windows, seed, out=out, precision=precision)


# -- GRPO ------------------------------------------------------------------------------------------------------

def train(cfg=None, *, resume: bool = False, overwrite: bool = False, quiet: bool = False, **keys) -> dict:
    """A GRPO run (`dgrpo train`): on the cluster at run.ray_address / $RAY_ADDRESS, else an embedded local one
    (or the Ray this process already joined). cfg: a TrainConfig, or what make_config takes, with `keys` as its
    sections. Returns the run's summary (also RUN/summary.json); the run directory is summary["out_dir"]."""
    if resume and overwrite:
        raise ConfigError("--resume continues the run in run.out_dir, --overwrite deletes it: pass one")
    cfg = resolved_train_config(_as_config("train", cfg, keys))
    from ..orchestration.driver import run_training
    return run_training(cfg, resume=resume, overwrite=overwrite, quiet=quiet)


# -- runs, checkpoints and policies --------------------------------------------------------------------------------

def read_metrics(run_dir) -> list[dict]:
    """The rows of RUN/metrics.jsonl: one per GRPO step (reward_mean, kl, loss, ...; eval_* when it evaluated),
    and the held-out evaluation before the first step (step 0)."""
    from ..orchestration.metrics import read_jsonl
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise RunError(f"{path} does not exist; give a `dgrpo train` run directory (its run.out_dir)")
    return read_jsonl(path)


def read_summary(run_dir) -> dict:
    """RUN/summary.json: steps, held-out reward before and after, the best checkpoint, status (and why it stopped)."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise RunError(f"{path} does not exist; the run has not finished (see its metrics.jsonl)")
    return json.loads(path.read_text())


def resolve_checkpoint(path) -> Path:
    """A checkpoint directory: `path` itself, or for a `dgrpo train` run directory its best checkpoint
    (checkpoints/best.json), else its newest."""
    from ..orchestration.rundir import find_checkpoints, read_best
    p = Path(path)
    if (p / "config.json").is_file() or not (p / "checkpoints").is_dir():
        return p
    best = read_best(p)
    if best is not None and (p / "checkpoints" / best["checkpoint"]).is_dir():
        return p / "checkpoints" / best["checkpoint"]
    found = find_checkpoints(p)
    if not found:
        raise RunError(f"{p} holds no checkpoint under {p / 'checkpoints'}")
    return found[-1]


class Policy(NamedTuple):
    model: object  # DiffusionLM in eval mode
    tokenizer: object  # CharTokenizer
    checkpoint: Path


def load_policy(path, device: str = "cpu") -> Policy:
    """The generator or GRPO policy at `path` (a checkpoint, or a run directory: its best checkpoint)."""
    from ..models.diffusion import load_generator
    checkpoint = resolve_checkpoint(path)
    model, tokenizer, _ = load_generator(checkpoint)
    return Policy(model.to(device).eval(), tokenizer, checkpoint)


class Sample(NamedTuple):
    text: str
    reward: float | None  # the judge's reward, with a judge


def sampler_config(source=None, overrides=()):
    """A SamplerConfig: the defaults every command shares (those of training), then `source` (a YAML file or
    dict of sampler keys, or a train config's `sampler:` section), then `key=value` overrides."""
    from ..config import SamplerConfig, read_yaml_mapping
    base = {}
    if isinstance(source, (str, os.PathLike)):
        base = read_yaml_mapping(source, "config file")
    elif isinstance(source, dict):
        base = source
    if isinstance(base.get("sampler"), dict):
        base = base["sampler"]
    return load_config(SamplerConfig, None, list(overrides), base=base)


def sample(checkpoint, num: int = 3, *, prompt: str | None = None, length: int | None = None, mask_char: str = "_",
           seed: int = 0, judge: str | None = None, best_of: int = 1, precision: str = "auto",
           sampler=None, out: str | None = None, overwrite: bool = False, threads: int | None = None,
           **sampler_keys) -> list[Sample]:
    """`num` texts from a generator, a GRPO checkpoint or a run directory (its best checkpoint) (`dgrpo sample`).

    The sampler is training's (SamplerConfig's defaults), then `sampler` (a SamplerConfig, a dict or a YAML
    file), then `sampler_keys` (steps=8, order="random", ...). prompt: text with `mask_char` at the positions to
    fill. judge and best_of: keep the judge's best of best_of samples. out: also as JSON lines."""
    from ..models.generation import generate_texts
    if out is not None:
        prepare_output_file(out, overwrite)
    if hasattr(sampler, "model_dump"):
        sampler = sampler.model_dump()
    cfg = sampler_config(sampler, [f"{k}={json.dumps(v)}" for k, v in sampler_keys.items()])
    _threads(threads)
    path = resolve_checkpoint(checkpoint)
    samples = [Sample(text, reward) for text, reward in generate_texts(
        path, num=num, length=length, prompt=prompt, mask_char=mask_char, seed=seed, judge_checkpoint=judge,
        best_of=best_of, precision=precision, sampler=cfg)]
    if out is not None:
        settings = {"checkpoint": str(path), "prompt": prompt, "mask_char": mask_char, "length": length, "seed": seed,
                    "judge": judge, "best_of": best_of, "precision": precision, **cfg.model_dump()}
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w") as fh:
            for i, s in enumerate(samples):
                row = {"index": i, "text": s.text, **({"reward": s.reward} if s.reward is not None else {}),
                       "settings": settings}
                fh.write(json.dumps(row) + "\n")
    return samples


def evaluate(policies=(), runs=(), *, best: bool = False, out: str | None = None, overwrite: bool = False,
             threads: int | None = None, log=print, **options) -> dict:
    """The gold evaluation (`dgrpo evaluate`): proxy and gold reward, LM bits/char, diversity and KL per
    sequence with standard errors, for the base generator, best-of-N and each policy.

    policies: checkpoints; runs: run directories (every checkpoint, or with best=True each run's best);
    options: the fields of dgrpo.evaluation.EvaluateOptions (generator, best_of=[1, 2, 4], gold, lm, prompts,
    samples_per_prompt, precision, sampler={...}, ...). Written as JSON to `out` if given."""
    from ..evaluation import EvaluateOptions
    from ..evaluation import evaluate as run_evaluate
    from ..orchestration.rundir import find_checkpoints, read_best
    if best and not runs:
        raise ConfigError("--best picks the best checkpoint of each --run directory; pass --run DIR")
    if out is not None:
        prepare_output_file(out, overwrite)
    found = [str(p) for p in policies]
    for run in runs:
        checkpoints = find_checkpoints(Path(run))
        if not checkpoints:
            raise RunError(f"--run {run}: no checkpoints under {Path(run) / 'checkpoints'}")
        if best:
            pointer = read_best(Path(run))
            if pointer is None:
                raise RunError(f"--best: {run} names no best checkpoint (checkpoints/best.json); it ran with "
                               f"run.selection=none or before best checkpoints existed: evaluate --run without --best")
            checkpoints = [Path(run) / "checkpoints" / pointer["checkpoint"]]
        found += [str(p) for p in checkpoints]
    _threads(threads)
    report = run_evaluate(EvaluateOptions(policies=found, **options), log=log)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2))
    return report
