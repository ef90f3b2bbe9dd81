"""`dgrpo` command line. Each command: config file + `--set a.b=v` overrides + a few flags.

Errors a user can fix (bad config or flag values, missing files, wrong vocabulary, an unwritable
output, ...) are printed as one clear `error: ...` message with exit code 2, never a traceback;
a run stopped because training went wrong (TrainingHalted) exits with 3.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import sys
from pathlib import Path

import click

from ..config import (JudgeTrainConfig, LMTrainConfig, PipelineConfig, PretrainConfig, TrainConfig, load_config,
                      to_dict, to_yaml)
from ..errors import ConfigError, RunError, TrainingHalted
from ..precision import forced_precision, precision_report

USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, RunError)
# file system errors a user fixes (a path, its permissions, a full or read-only disk), not bugs
USER_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOSPC,
               errno.EROFS, errno.EDQUOT, errno.ENAMETOOLONG}
POSITIVE, NON_NEGATIVE = click.IntRange(min=1), click.IntRange(min=0)


def user_errors() -> tuple[type[BaseException], ...]:
    from ..corpus import CorpusError, VocabularyError
    from ..evaluation import EvaluationError
    from ..models.checkpoint import CheckpointError
    from ..protocols import CodecError
    from ..training.pretrain import CompileError
    return USER_ERRORS + (CorpusError, VocabularyError, CheckpointError, CodecError, FileNotFoundError, CompileError,
                          EvaluationError)


def corpus_flag() -> str:
    """How the running command sets the corpus path (not every command has --corpus)."""
    params = {p.name for p in click.get_current_context().command.params}
    return "--corpus PATH" if "corpus_path" in params else "--set corpus.path=PATH"


def friendly(fn):
    """Turn the errors a user can fix into `error: ...` and exit code 2 (3: a run stopped by TrainingHalted)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from ..corpus import CorpusError
        try:
            return fn(*args, **kwargs)
        except TrainingHalted as e:
            click.echo(f"error: the run stopped: {e}", err=True)
            sys.exit(3)
        except user_errors() as e:
            hint = f" (the corpus path: {corpus_flag()})" if isinstance(e, CorpusError) else ""
            click.echo(f"error: {e}{hint}", err=True)
            sys.exit(2)
        except OSError as e:
            if e.errno not in USER_ERRNOS:
                raise
            click.echo(f"error: {e.strerror}: {e.filename}", err=True)
            sys.exit(2)
    return wrapper


def check_writable(path: str | os.PathLike, flag: str, kind: str = "directory") -> None:
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


@contextlib.contextmanager
def one_line_usage_errors():
    try:
        yield
    except click.UsageError as e:
        command = e.ctx.command_path if e.ctx else "dgrpo"
        click.echo(f"error: {e.format_message()} (see `{command} --help`)", err=True)
        sys.exit(e.exit_code)


class Commands(click.Group):
    """The dgrpo group: a usage error (unknown flag, bad value) is one `error: ...` line, exit code 2."""

    def make_context(self, *args, **kwargs):
        with one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with one_line_usage_errors():
            return super().invoke(ctx)


def config_options(fn):
    fn = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                      help="override a config key, e.g. --set grpo.kl_coef=0.02 (repeatable)")(fn)
    fn = click.option("--config", "-c", "config_file", type=click.Path(), default=None,
                      help="YAML/JSON config file")(fn)
    return fn


def flag_overrides(**flags) -> list[tuple[str, str]]:
    """Config overrides from flags, each with the flag that gave it (--max-iters for max_iters, --corpus for
    corpus.path), so a bad value is reported as the flag's."""
    return [(f"{k}={json.dumps(v)}", f"--{k.split('.')[0].replace('_', '-')} {v}")
            for k, v in flags.items() if v is not None]


def set_threads(n: int | None = None) -> None:
    import torch
    if n:
        torch.set_num_threads(n)


@click.group(cls=Commands)
@click.version_option(package_name="diffusion-grpo")
def main():
    """diffusion-grpo: GRPO fine-tuning of masked-diffusion language models on Ray."""
    try:
        forced_precision()
    except ValueError as e:
        raise click.UsageError(str(e)) from None


def trainer_options(fn):
    """The flags of the single-process trainers (pretrain, lm train)."""
    options = [
        click.option("--preset", type=click.Choice(["tiny", "small", "base"]), default=None),
        click.option("--corpus", "corpus_path", type=click.Path(), default=None,
                     help="local UTF-8 text file (default: download tiny Shakespeare)"),
        click.option("--max-iters", type=int, default=None),
        click.option("--max-minutes", type=float, default=None),
        click.option("--out", type=click.Path(), default=None, help="checkpoint directory"),
        click.option("--resume", is_flag=True, help="continue from the checkpoint in --out"),
        click.option("--threads", type=POSITIVE, default=None, help="torch threads (default: all cores)"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def role_precisions(cfg: TrainConfig) -> dict[str, str]:
    res = cfg.resources
    roles = {"rollout": res.rollout.precision, "judge": res.judge.precision, "learner": res.learner.precision}
    if cfg.judge_refresh.enabled:
        roles["judge trainer"] = res.judge_trainer.precision
    return roles


def trainer_setup(cls, role, config_file, overrides, corpus_path, threads, **flags):
    """(validated config, its corpus) of a single-process trainer; prints the config and its precision."""
    from ..corpus import load_corpus
    cfg = load_config(cls, config_file, flag_overrides(**flags, **{"corpus.path": corpus_path}) + list(overrides))
    check_writable(cfg.out, "--out")
    set_threads(threads)
    click.echo(to_yaml(cfg))
    click.echo(precision_report({role: cfg.precision}))
    return cfg, load_corpus(cfg.corpus.path, cfg.corpus.cache_dir, cfg.corpus.val_fraction)


@main.command()
@config_options
@trainer_options
@friendly
def pretrain(config_file, overrides, preset, corpus_path, max_iters, max_minutes, out, resume, threads):
    """Supervised masked-diffusion pretraining of the generator."""
    from ..training.pretrain import pretrain as run_pretrain
    cfg, corpus = trainer_setup(PretrainConfig, "pretraining", config_file, overrides, corpus_path, threads,
                                preset=preset, max_iters=max_iters, max_minutes=max_minutes, out=out)
    state = run_pretrain(cfg, corpus, to_dict(cfg), resume=resume)
    click.echo(f"done: iter {state.get('iter')}, val masked-token CE {state.get('val_loss'):.4f} nats, "
               f"{state.get('wall_time_s', 0):.0f} s, checkpoint {cfg.out}")


@main.command()
@click.option("--checkpoint", "-k", required=True, type=click.Path(), help="generator checkpoint")
@click.option("--num", "-n", type=POSITIVE, default=3, show_default=True)
@click.option("--length", type=POSITIVE, default=None, help="characters per unconditional sample")
@click.option("--prompt", default=None, help="text with mask characters to infill")
@click.option("--mask-char", default="_", show_default=True)
@click.option("--steps", type=POSITIVE, default=64, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True)
@click.option("--top-k", type=NON_NEGATIVE, default=0, show_default=True, help="0 = off")
@click.option("--order", type=click.Choice(["random", "confidence"]), default="confidence", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--judge", "judge_ckpt", type=click.Path(), default=None, help="judge checkpoint for best-of-N")
@click.option("--best-of", type=POSITIVE, default=1, show_default=True,
              help="samples per output; the judge keeps the best")
@click.option("--out", "out_file", type=click.Path(dir_okay=False), default=None,
              help="also write the samples as JSON lines: text, reward (with --judge) and the settings")
@friendly
def sample(checkpoint, num, length, prompt, mask_char, steps, temperature, top_k, order, seed, judge_ckpt, best_of,
           out_file):
    """Print samples from a generator checkpoint (infill with --prompt; best-of-N with --judge)."""
    from ..models.generation import generate_texts
    click.echo(precision_report({"sampling": "auto"}), err=True)
    if out_file:
        check_writable(out_file, "--out", kind="file")
    settings = {"checkpoint": checkpoint, "prompt": prompt, "mask_char": mask_char, "length": length, "steps": steps,
                "temperature": temperature, "top_k": top_k, "order": order, "seed": seed, "judge": judge_ckpt,
                "best_of": best_of}
    samples = generate_texts(checkpoint, num=num, length=length, prompt=prompt, mask_char=mask_char, steps=steps,
                             temperature=temperature, top_k=top_k, order=order, seed=seed,
                             judge_checkpoint=judge_ckpt, best_of=best_of)
    for text, reward in samples:
        head = f"--- reward {reward:.4f}" if reward is not None else "---"
        click.echo(f"{head}\n{text}")
    if out_file:
        with open(out_file, "w") as fh:
            for i, (text, reward) in enumerate(samples):
                row = {"index": i, "text": text, **({"reward": reward} if reward is not None else {}),
                       "settings": settings}
                fh.write(json.dumps(row) + "\n")
        click.echo(f"wrote {len(samples)} samples to {out_file}")


@main.group()
def judge():
    """Train and evaluate the learned judge."""


@judge.command("train")
@config_options
@click.option("--generator", type=click.Path(), default=None, help="generator checkpoint")
@click.option("--corpus", "corpus_path", type=click.Path(), default=None)
@click.option("--preset", type=click.Choice(["tiny", "small", "base"]), default=None)
@click.option("--max-iters", type=int, default=None)
@click.option("--max-minutes", type=float, default=None)
@click.option("--out", type=click.Path(), default=None)
@click.option("--resume", is_flag=True)
@click.option("--threads", type=POSITIVE, default=None)
@friendly
def judge_train(config_file, overrides, generator, corpus_path, preset, max_iters, max_minutes, out, resume, threads):
    """Train the judge on real windows partly re-filled by the generator."""
    from ..training.judge import train_judge
    cfg = load_config(JudgeTrainConfig, config_file, flag_overrides(
        generator=generator, preset=preset, max_iters=max_iters, max_minutes=max_minutes, out=out,
        **{"corpus.path": corpus_path}) + list(overrides))
    check_writable(cfg.out, "--out")
    set_threads(threads)
    click.echo(to_yaml(cfg))
    click.echo(precision_report({"judge training": cfg.precision}))
    train_judge(cfg, to_dict(cfg), resume=resume)


@judge.command("eval")
@click.option("--judge", "judge_ckpt", required=True, type=click.Path())
@click.option("--generator", type=click.Path(), default=None, help="default: the judge's own generator")
@click.option("--corpus", "corpus_path", type=click.Path(), default=None)
@click.option("--windows", type=POSITIVE, default=256, show_default=True)
@click.option("--seed", default=0, show_default=True)
@friendly
def judge_eval(judge_ckpt, generator, corpus_path, windows, seed):
    """AUC, Spearman and mean scores on held-out windows; writes eval.json beside the judge."""
    from ..training.judge import evaluate_judge_cli
    figures = evaluate_judge_cli(judge_ckpt, generator, corpus_path, windows, seed)
    click.echo(json.dumps(figures, indent=2))


@main.group()
def lm():
    """The autoregressive character language model of the gold evaluation."""


@lm.command("train")
@config_options
@trainer_options
@friendly
def lm_train(config_file, overrides, preset, corpus_path, max_iters, max_minutes, out, resume, threads):
    """Train a causal character LM by maximum likelihood on the train split; reports held-out bits per character."""
    from ..training.lm import train_char_lm
    cfg, corpus = trainer_setup(LMTrainConfig, "LM training", config_file, overrides, corpus_path, threads, preset=preset,
                                max_iters=max_iters, max_minutes=max_minutes, out=out)
    state = train_char_lm(cfg, corpus, to_dict(cfg), resume=resume)
    click.echo(f"done: iter {state.get('iter')}, held-out {state.get('val_bits_per_char'):.4f} bits/char, "
               f"{state.get('wall_time_s', 0):.0f} s, checkpoint {cfg.out}")


def _int_list(text: str | None, flag: str) -> list[int]:
    try:
        return [int(v) for v in (text or "").split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes a comma-separated list of integers, got {text!r}") from None


@main.command("evaluate")
@click.option("--policy", "policies", multiple=True, type=click.Path(),
              help="GRPO checkpoint (weights + its stored reference); repeatable")
@click.option("--run", "runs", multiple=True, type=click.Path(),
              help="a GRPO run directory: every checkpoint under RUN/checkpoints; repeatable")
@click.option("--best", "best_only", is_flag=True,
              help="with --run: only each run's best checkpoint on its held-out selection measure "
                   "(checkpoints/best.json)")
@click.option("--generator", type=click.Path(), default=None,
              help="base generator (default: the first policy's stored reference)")
@click.option("--best-of", default=None, help="best-of-N from the base generator, e.g. 1,2,4,8,16,32,64")
@click.option("--pool", type=POSITIVE, default=None, help="best-of-N pool per prompt (default: the largest N)")
@click.option("--judge", "judge_ckpts", multiple=True, type=click.Path(),
              help="proxy judge; repeat it for an ensemble (default: the run's reward judge or judges)")
@click.option("--ensemble", type=click.Choice(["mean", "mean_minus_std", "min"]), default=None,
              help="how an ensemble of --judge combines (default: the run's reward.ensemble, else mean)")
@click.option("--ensemble-std-coef", type=float, default=None,
              help="lambda of mean_minus_std (default: the run's, else 1)")
@click.option("--gold", type=click.Path(), default=None, help="gold judge, trained independently of the proxy")
@click.option("--lm", "lm_ckpt", type=click.Path(), default=None, help="`dgrpo lm train` checkpoint")
@click.option("--prompts", type=POSITIVE, default=64, show_default=True, help="held-out prompts (validation windows)")
@click.option("--samples-per-prompt", type=POSITIVE, default=4, show_default=True,
              help="samples of the base and of each policy")
@click.option("--seed", type=int, default=None, help="prompt seed (default: the run's run.eval_seed)")
@click.option("--corpus", "corpus_path", type=click.Path(), default=None, help="default: the run's corpus.path")
@click.option("--prompt-kind", type=click.Choice(["unconditional", "infill"]), default=None)
@click.option("--mask-fraction", type=click.FloatRange(min=0, max=1, min_open=True), default=None)
@click.option("--length", type=POSITIVE, default=None, help="characters per sample (default: the run's)")
@click.option("--steps", type=POSITIVE, default=None, help="sampler steps (default: the run's)")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=None)
@click.option("--top-k", type=NON_NEGATIVE, default=None)
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=None)
@click.option("--order", type=click.Choice(["random", "confidence"]), default=None)
@click.option("--precision", type=click.Choice(["fp32", "bf16", "auto"]), default="fp32", show_default=True,
              help="fp32 keeps the measured KL exact (sampler and replay in one precision)")
@click.option("--chunk", type=POSITIVE, default=256, show_default=True, help="rows per sampler / judge / LM call")
@click.option("--threads", type=POSITIVE, default=None)
@click.option("--out", required=True, type=click.Path(), help="JSON file")
@friendly
def evaluate_cmd(policies, runs, best_only, generator, best_of, pool, judge_ckpts, ensemble, ensemble_std_coef, gold,
                 lm_ckpt, prompts, samples_per_prompt, seed, corpus_path, prompt_kind, mask_fraction, length, steps,
                 temperature, top_k, top_p, order, precision, chunk, threads, out):
    """Gold evaluation: proxy and gold reward, LM bits/char, diversity and KL per sequence, with s.e."""
    from ..evaluation import EvaluateOptions, evaluate, format_report
    from .rundir import find_checkpoints, read_best
    if best_only and not runs:
        raise ConfigError("--best picks the best checkpoint of each --run directory; pass --run DIR")
    check_writable(out, "--out", kind="file")
    policies = list(policies)
    for run in runs:
        found = find_checkpoints(Path(run))
        if not found:
            raise RunError(f"--run {run}: no checkpoints under {Path(run) / 'checkpoints'}")
        if best_only:
            best = read_best(Path(run))
            if best is None:
                raise RunError(f"--best: {run} names no best checkpoint (checkpoints/best.json); it ran with "
                               f"run.selection=none or before best checkpoints existed: evaluate --run without --best")
            found = [Path(run) / "checkpoints" / best["checkpoint"]]
        policies += [str(p) for p in found]
    set_threads(threads)
    opts = EvaluateOptions(
        policies=policies, generator=generator, best_of=_int_list(best_of, "--best-of"), pool=pool,
        judges=list(judge_ckpts), ensemble=ensemble, ensemble_std_coef=ensemble_std_coef,
        gold=gold, lm=lm_ckpt, prompts=prompts, samples_per_prompt=samples_per_prompt, seed=seed, corpus=corpus_path,
        prompt_kind=prompt_kind, mask_fraction=mask_fraction, length=length, precision=precision, chunk=chunk,
        sampler={"steps": steps, "temperature": temperature, "top_k": top_k, "top_p": top_p, "order": order})
    click.echo(precision_report({"evaluation": precision}))
    report = evaluate(opts, log=click.echo)
    click.echo(format_report(report))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2))
    click.echo(f"{report['timings']['total_s']:.1f} s; wrote {out}")


@main.command()
@config_options
@click.option("--resume", is_flag=True, help="continue the run in run.out_dir from its last checkpoint "
                                             "(the config may change only in when and how long it runs, what it "
                                             "logs and where its actors go)")
@click.option("--overwrite", is_flag=True, help="start afresh in run.out_dir, deleting the run already there")
@click.option("--quiet", "-q", is_flag=True, help="no progress line per step (the summary is still printed)")
@friendly
def train(config_file, overrides, resume, overwrite, quiet):
    """GRPO fine-tuning on Ray (embedded local cluster unless RAY_ADDRESS / run.ray_address is set)."""
    from .driver import run_training
    if resume and overwrite:
        raise click.UsageError("--resume continues the run in run.out_dir, --overwrite deletes it: pass one")
    cfg = load_config(TrainConfig, config_file, list(overrides))
    click.echo(to_yaml(cfg))
    click.echo(precision_report(role_precisions(cfg)))
    summary = run_training(cfg, resume=resume, overwrite=overwrite, quiet=quiet)
    click.echo(json.dumps(summary, indent=2))


@main.command()
@click.argument("run_dir", type=click.Path())
@click.option("--rollout-workers", type=click.IntRange(min=1), default=None, help="new rollout worker target")
@click.option("--judge-workers", type=click.IntRange(min=1), default=None, help="new judge worker target")
@friendly
def scale(run_dir, rollout_workers, judge_workers):
    """Tell a live run (its run.out_dir) how many rollout workers / judges to keep, within its min/max_workers.

    The run applies it within run.membership_check_s: new workers load the current weights before their
    first request, surplus ones finish theirs and leave (docs/OPERATIONS.md, "Elastic workers")."""
    from .scale import write_targets
    targets = {role: n for role, n in (("rollout", rollout_workers), ("judge", judge_workers)) if n is not None}
    if not targets:
        raise ConfigError("dgrpo scale needs --rollout-workers N and/or --judge-workers N")
    bounds = write_targets(run_dir, targets)
    for role, n in targets.items():
        lo, hi = bounds[role]
        click.echo(f"{role} workers: target {n} (the run allows {lo}..{hi}); written to {Path(run_dir) / 'scale.json'}")


@main.command()
@click.option("--out", default="runs/demo", show_default=True, type=click.Path())
@click.option("--corpus", "corpus_path", type=click.Path(), default=None,
              help="local copy of tiny Shakespeare (default: download it)")
@click.option("--minutes", type=click.FloatRange(min=0, min_open=True), default=12.0, show_default=True,
              help="wall-time budget of the training stages")
@click.option("--threads", type=POSITIVE, default=1, show_default=True, help="torch threads per Ray actor")
@click.option("--overwrite", is_flag=True, help="run every stage afresh instead of reusing an earlier demo in --out")
@friendly
def demo(out, corpus_path, minutes, threads, overwrite):
    """Pretrain -> proxy and gold judges -> GRPO on an embedded Ray cluster -> proxy and gold before/after."""
    from .demo import run_demo
    run_demo(out, corpus_path, minutes=minutes, threads=threads, echo=click.echo, overwrite=overwrite)


@main.command()
@config_options
@click.option("--quiet", "-q", is_flag=True, help="no progress bars or per-step lines")
@click.option("--overwrite", is_flag=True, help="run every stage afresh instead of reusing what is under `out`")
@friendly
def pipeline(config_file, overrides, quiet, overwrite):
    """Generator -> proxy judge(s) -> gold judge -> evaluation LM -> GRPO -> gold evaluation, one command.

    Finished stages under `out` are reused, unfinished ones resumed (configs/headline.yaml is the
    project's headline experiment)."""
    from .pipeline import run_pipeline, stage_configs
    cfg = load_config(PipelineConfig, config_file, list(overrides))
    stage_configs(cfg)  # every stage's config is valid before anything runs
    click.echo(to_yaml(cfg))
    run_pipeline(cfg, echo=click.echo, quiet=quiet, overwrite=overwrite)


@main.command("tune")
@config_options
@click.option("--search", "search_file", required=True, type=click.Path(),
              help="YAML search space: dotted config keys -> {grid|choice|uniform|loguniform|randint: [...]}, "
                   "optional `tune:` settings")
@click.option("--num-samples", type=POSITIVE, default=None, help="overrides tune.num_samples")
@click.option("--scheduler", type=click.Choice(["asha", "fifo"]), default=None, help="overrides tune.scheduler")
@click.option("--metric", default=None, help="overrides tune.metric (e.g. reward_mean, eval_reward_mean)")
@click.option("--mode", type=click.Choice(["max", "min"]), default=None, help="overrides tune.mode")
@click.option("--max-concurrent", type=POSITIVE, default=None, help="overrides tune.max_concurrent_trials")
@click.option("--quiet", "-q", is_flag=True, help="no line per trial result, no Tune status table")
@friendly
def tune_cmd(config_file, overrides, search_file, num_samples, scheduler, metric, mode, max_concurrent, quiet):
    """Ray Tune over GRPO runs: one placement group per trial, ASHA early stopping, best config to run.out_dir."""
    from .tune import load_search, run_tune, settings_from_flags
    cfg = load_config(TrainConfig, config_file, list(overrides))
    search = load_search(search_file, settings_from_flags(
        num_samples=num_samples, scheduler=scheduler, metric=metric, mode=mode,
        max_concurrent_trials=max_concurrent), base=cfg)
    result = run_tune(cfg, search, quiet=quiet)
    click.echo(result["table"])
    click.echo(f"\nbest ({search.settings.metric}, {search.settings.mode}, scope {search.settings.best_scope}): "
               f"{json.dumps(result['best']['best_params'])} -> {result['best']['best_value']}")
    click.echo(f"best config: {result['best_config_path']}\n")
    click.echo(result["best_config_yaml"])


@main.command()
@click.argument("kind", type=click.Choice(["pretrain", "judge", "train", "lm", "pipeline"]), default="train")
def config(kind):
    """Print the default config tree of a command as YAML."""
    cls = {"pretrain": PretrainConfig, "judge": JudgeTrainConfig, "train": TrainConfig, "lm": LMTrainConfig,
           "pipeline": PipelineConfig}[kind]
    if cls is JudgeTrainConfig:
        click.echo(to_yaml(cls(generator="GENERATOR_CHECKPOINT")))
    else:
        click.echo(to_yaml(cls()))


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--overoptimization", is_flag=True,
              help="PATHS are `dgrpo evaluate` JSONs: plot proxy and gold reward vs sqrt(KL) with Gao fits")
@click.option("--out", type=click.Path(), default="overoptimization.png", show_default=True,
              help="with --overoptimization: the PNG (the curves and fits go to the same name .json)")
@friendly
def report(paths, overoptimization, out):
    """PNG plots (reward, KL, loss, clip fraction, throughput, phase times) and report.md for a run directory;
    with --overoptimization, the over-optimisation plot of evaluate JSONs."""
    if overoptimization:
        from ..evaluation.overoptimization import format_fit
        from ..evaluation.plot import plot_overoptimization
        summary = plot_overoptimization(paths, out)
        for curve in summary["curves"]:
            for reward in ("proxy", "gold"):
                click.echo(f"{curve['label']}, {reward}: {format_fit(curve['fits'][reward])}")
        click.echo(f"wrote {summary['plot']} and {Path(summary['plot']).with_suffix('.json')}")
        return
    if len(paths) != 1:
        raise RunError("dgrpo report takes one run directory (or --overoptimization and evaluate JSONs)")
    from .report import make_report
    summary = make_report(paths[0])
    click.echo(json.dumps(summary, indent=2))


@main.group()
def rollouts():
    """Rollout log files."""


@rollouts.command("inspect")
@click.argument("path", type=click.Path())
@friendly
def rollouts_inspect(path):
    """Summarise a rollout log written with run.log_rollouts."""
    from ..protocols.rollout_log import format_summary, summarize_rollout_log
    if not Path(path).is_file():
        raise FileNotFoundError(f"rollout log {path} does not exist")
    click.echo(format_summary(summarize_rollout_log(path)))


if __name__ == "__main__":
    main()
