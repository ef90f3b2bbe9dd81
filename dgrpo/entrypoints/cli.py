"""`dgrpo` command line: a thin layer over the Python API (api.py), one grammar for every command.

    -c/--config FILE, --set KEY=VALUE   every command with a config (pretrain, judge train, lm train, train,
                                        tune, pipeline, config; sample: the sampler's keys)
    --out PATH                          every command that writes; a non-empty one is refused without
    --overwrite                         (and a directory that is not dgrpo's is never written into)
    --resume                            continue the checkpoint or run in --out; an error when there is none
    --quiet/-q                          no progress bars, per-step lines or config echo; the result still prints
    --json                              the result as one line of JSON, the last line of stdout
    --precision auto|fp32|bf16          of every model the command runs (auto: bf16 only where native)
    --threads N                         torch threads of each process that computes (this one, or each Ray actor)

Errors a user can fix (bad config or flag values, missing files, wrong vocabulary, an unwritable
output, ...) are printed as one clear `error: ...` message with exit code 2, never a traceback;
a run stopped because training went wrong (TrainingHalted) exits with 3.

Longer than most files because every command states its options with their help here; what they do is
api.py's.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import sys
import typing
from pathlib import Path

import click

from ..config import Precision, Preset, SamplerConfig, to_dict, to_yaml
from ..errors import ConfigError, RunError, TrainingHalted
from ..precision import forced_precision, precision_report
from . import api

USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, RunError)
# file system errors a user fixes (a path, its permissions, a full or read-only disk), not bugs
USER_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOSPC,
               errno.EROFS, errno.EDQUOT, errno.ENAMETOOLONG}
POSITIVE, NON_NEGATIVE = click.IntRange(min=1), click.IntRange(min=0)
PRESETS = click.Choice(typing.get_args(Preset))
PRECISIONS = click.Choice(typing.get_args(Precision))
SAMPLER_DEFAULTS = SamplerConfig()
REVEAL_ORDERS = list(typing.get_args(SamplerConfig.model_fields["order"].annotation))
check_writable = api.check_writable  # for callers of the CLI module


def user_errors() -> tuple[type[BaseException], ...]:
    from ..corpus import CorpusError, VocabularyError
    from ..evaluation import EvaluationError
    from ..models.checkpoint import CheckpointError
    from ..models.rewards import RewardError
    from ..protocols import CodecError
    from ..training.pretrain import CompileError
    return USER_ERRORS + (CorpusError, VocabularyError, CheckpointError, CodecError, FileNotFoundError, CompileError,
                          EvaluationError, RewardError)


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


# -- the shared options -----------------------------------------------------------------------------------------

def options(*decorators):
    def apply(fn):
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn
    return apply


def config_options(fn=None, *, example: str = "grpo.kl_coef=0.02", what: str = "YAML/JSON config file"):
    decorate = options(
        click.option("--config", "-c", "config_file", type=click.Path(), default=None, help=what),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help=f"override a config key, e.g. --set {example} (repeatable; applied after -c)"),
    )
    return decorate(fn) if fn is not None else decorate


def out_option(what: str, required: bool = False, default=None):
    return click.option("--out", type=click.Path(), required=required, default=default,
                        show_default=default is not None,
                        help=f"{what}; a non-empty one is refused without --overwrite")


OVERWRITE = click.option("--overwrite", is_flag=True,
                         help="replace what --out already holds (never a directory that is not dgrpo's)")
RESUME = click.option("--resume", is_flag=True,
                      help="continue from the checkpoint in --out (an error when there is none)")
QUIET = click.option("--quiet", "-q", is_flag=True,
                     help="no progress bars, per-step lines or config echo; the result is still printed")
JSON = click.option("--json", "as_json", is_flag=True,
                    help="print the result as one line of JSON (the last line of stdout) instead of text")


def precision_option(default_help: str = "the config's (auto)"):
    return click.option("--precision", type=PRECISIONS, default=None,
                        help=f"of every model this command runs: auto (bf16 only where the hardware multiplies it "
                             f"natively), fp32 or bf16; default: {default_help}")


def threads_option(default_help: str = "all cores"):
    return click.option("--threads", type=POSITIVE, default=None,
                        help=f"torch threads of each process that computes (this one, or each Ray actor); "
                             f"default: {default_help}")


def emit(result, as_json: bool, text: str | None = None) -> None:
    """The result of a command: text (if any), or with --json one line of JSON."""
    if as_json:
        click.echo(json.dumps(result, default=str))
    elif text is not None:
        click.echo(text)


def flag_overrides(**flags) -> list[tuple[str, str]]:
    """Config overrides from flags, each with the flag that gave it (--max-iters for max_iters, --corpus for
    corpus.path), so a bad value is reported as the flag's."""
    return [(f"{k}={json.dumps(v)}", f"--{k.split('.')[0].replace('_', '-')} {v}")
            for k, v in flags.items() if v is not None]


def echo_config(cfg, roles: dict[str, str], quiet: bool) -> None:
    if not quiet:
        click.echo(to_yaml(cfg))
        click.echo(precision_report(roles))


@click.group(cls=Commands)
@click.version_option(package_name="diffusion-grpo")
def main():
    """diffusion-grpo: GRPO fine-tuning of masked-diffusion language models on Ray."""
    try:
        forced_precision()
    except ValueError as e:
        raise click.UsageError(str(e)) from None


# -- single-process trainers --------------------------------------------------------------------------------------

def trainer_options(fn):
    """The flags of the single-process trainers (pretrain, judge train, lm train)."""
    return options(
        config_options,
        click.option("--preset", type=PRESETS, default=None, help="model size (sets `preset`)"),
        click.option("--corpus", "corpus_path", type=click.Path(), default=None,
                     help="local UTF-8 text file (default: download tiny Shakespeare)"),
        click.option("--max-iters", type=int, default=None, help="stop after this many iterations (sets max_iters)"),
        click.option("--max-minutes", type=float, default=None,
                     help="stop (and checkpoint) after this wall time (sets max_minutes)"),
        out_option("the checkpoint directory"), RESUME, OVERWRITE, QUIET, JSON, precision_option(),
        threads_option(),
    )(fn)


def trainer_config(kind: str, config_file, overrides, corpus_path, precision, **flags):
    return api.make_config(kind, config_file, flag_overrides(**flags, precision=precision,
                                                             **{"corpus.path": corpus_path}) + list(overrides))


@main.command()
@trainer_options
@friendly
def pretrain(config_file, overrides, preset, corpus_path, max_iters, max_minutes, out, resume, overwrite, quiet,
             as_json, precision, threads):
    """Supervised masked-diffusion pretraining of the generator."""
    cfg = trainer_config("pretrain", config_file, overrides, corpus_path, precision, preset=preset,
                         max_iters=max_iters, max_minutes=max_minutes, out=out)
    api.prepare_checkpoint_dir(cfg.out, resume, overwrite)
    echo_config(cfg, {"pretraining": cfg.precision}, quiet)
    state = api.pretrain(cfg, resume=resume, overwrite=overwrite, quiet=quiet, threads=threads)
    emit({**state, "out": cfg.out}, as_json,
         f"done: iter {state.get('iter')}, val masked-token CE {state.get('val_loss'):.4f} nats, "
         f"{state.get('wall_time_s', 0):.0f} s, checkpoint {cfg.out}")


@main.group()
def judge():
    """Train and evaluate the learned judge."""


@judge.command("train")
@trainer_options
@click.option("--generator", type=click.Path(), default=None, help="generator checkpoint the judge learns to detect")
@friendly
def judge_train(config_file, overrides, preset, corpus_path, max_iters, max_minutes, out, resume, overwrite, quiet,
                as_json, precision, threads, generator):
    """Train the judge on real windows partly re-filled by the generator."""
    cfg = trainer_config("judge", config_file, overrides, corpus_path, precision, generator=generator, preset=preset,
                         max_iters=max_iters, max_minutes=max_minutes, out=out)
    api.prepare_checkpoint_dir(cfg.out, resume, overwrite)
    echo_config(cfg, {"judge training": cfg.precision}, quiet)
    state = api.train_judge(cfg, resume=resume, overwrite=overwrite, quiet=quiet, threads=threads)
    figures = ", ".join(f"{k} {state[k]:.3f}" for k in ("auc", "spearman") if isinstance(state.get(k), float))
    emit({**state, "out": cfg.out}, as_json,
         f"done: iter {state.get('iter')}, held-out {figures or 'figures: none'}, checkpoint {cfg.out}")


@judge.command("eval")
@click.option("--judge", "judge_ckpt", required=True, type=click.Path(), help="judge checkpoint")
@click.option("--generator", type=click.Path(), default=None, help="default: the judge's own generator")
@click.option("--corpus", "corpus_path", type=click.Path(), default=None, help="default: the judge's corpus")
@click.option("--windows", type=POSITIVE, default=256, show_default=True,
              help="held-out windows per kind (real, generated, re-filled)")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the windows and refills")
@out_option("also write the figures to this JSON file")
@options(OVERWRITE, JSON, precision_option("the judge's training precision"), threads_option())
@friendly
def judge_eval(judge_ckpt, generator, corpus_path, windows, seed, out, overwrite, as_json, precision, threads):
    """AUC, Spearman and mean scores on held-out windows (printed; with --out also written as JSON)."""
    figures = api.evaluate_judge(judge_ckpt, generator=generator, corpus=corpus_path, windows=windows, seed=seed,
                                 out=out, overwrite=overwrite, precision=precision, threads=threads)
    emit(figures, as_json, json.dumps(figures, indent=2))


@main.group()
def lm():
    """The autoregressive character language model of the gold evaluation."""


@lm.command("train")
@trainer_options
@friendly
def lm_train(config_file, overrides, preset, corpus_path, max_iters, max_minutes, out, resume, overwrite, quiet,
             as_json, precision, threads):
    """Train a causal character LM by maximum likelihood on the train split; reports held-out bits per character."""
    cfg = trainer_config("lm", config_file, overrides, corpus_path, precision, preset=preset, max_iters=max_iters,
                         max_minutes=max_minutes, out=out)
    api.prepare_checkpoint_dir(cfg.out, resume, overwrite)
    echo_config(cfg, {"LM training": cfg.precision}, quiet)
    state = api.train_lm(cfg, resume=resume, overwrite=overwrite, quiet=quiet, threads=threads)
    emit({**state, "out": cfg.out}, as_json,
         f"done: iter {state.get('iter')}, held-out {state.get('val_bits_per_char'):.4f} bits/char, "
         f"{state.get('wall_time_s', 0):.0f} s, checkpoint {cfg.out}")


# -- sampling and evaluation --------------------------------------------------------------------------------------

def sampler_default(key: str) -> str:
    return f"training's, {getattr(SAMPLER_DEFAULTS, key)!r} (SamplerConfig)"


@main.command()
@click.option("--checkpoint", "-k", required=True, type=click.Path(),
              help="generator or GRPO checkpoint, or a run directory (its best checkpoint)")
@click.option("--num", "-n", type=POSITIVE, default=3, show_default=True, help="samples to print")
@click.option("--length", type=POSITIVE, default=None, help="characters per unconditional sample (default: the block)")
@click.option("--prompt", default=None, help="text with mask characters to infill")
@click.option("--mask-char", default="_", show_default=True, help="the character of --prompt that marks a mask")
@config_options(example="random_reveal=0", what="YAML of sampler keys, or a train config (its sampler: section)")
@click.option("--steps", type=POSITIVE, default=None, help=f"denoising steps; default: {sampler_default('steps')}")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=None,
              help=f"default: {sampler_default('temperature')}")
@click.option("--top-k", type=NON_NEGATIVE, default=None, help=f"0 = off; default: {sampler_default('top_k')}")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=None,
              help=f"default: {sampler_default('top_p')}")
@click.option("--order", type=click.Choice(REVEAL_ORDERS), default=None,
              help=f"which drawn tokens a step reveals; default: {sampler_default('order')}")
@click.option("--seed", type=int, default=0, show_default=True, help="sampling seed")
@click.option("--judge", "judge_ckpt", type=click.Path(), default=None, help="judge checkpoint for best-of-N")
@click.option("--best-of", type=POSITIVE, default=1, show_default=True,
              help="samples per output; the judge keeps the best")
@out_option("also write the samples to this file as JSON lines: text, reward (with --judge), settings")
@options(OVERWRITE, QUIET, JSON, precision_option("auto"), threads_option())
@friendly
def sample(checkpoint, num, length, prompt, mask_char, config_file, overrides, steps, temperature, top_k, top_p,
           order, seed, judge_ckpt, best_of, out, overwrite, quiet, as_json, precision, threads):
    """Print samples from a checkpoint (infill with --prompt; best-of-N with --judge).

    The sampler is the one training uses (SamplerConfig); -c takes a YAML of sampler keys or a train config
    (its `sampler:` section), --set any sampler key (e.g. --set random_reveal=0)."""
    flags = [f"{k}={json.dumps(v)}" for k, v in (("steps", steps), ("temperature", temperature), ("top_k", top_k),
                                                  ("top_p", top_p), ("order", order)) if v is not None]
    sampler = api.sampler_config(config_file, flags + list(overrides))
    if not quiet:
        click.echo(precision_report({"sampling": precision or "auto"}), err=True)
    samples = api.sample(checkpoint, num, prompt=prompt, length=length, mask_char=mask_char, seed=seed,
                         judge=judge_ckpt, best_of=best_of, precision=precision or "auto", sampler=sampler, out=out,
                         overwrite=overwrite, threads=threads)
    text = "\n".join(f"--- reward {s.reward:.4f}\n{s.text}" if s.reward is not None else f"---\n{s.text}"
                     for s in samples)
    if out:
        text += f"\nwrote {len(samples)} samples to {out}"
    emit([s._asdict() for s in samples], as_json, text)


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
@click.option("--prompt-kind", type=click.Choice(["unconditional", "infill"]), default=None,
              help="default: the run's prompts.kind")
@click.option("--mask-fraction", type=click.FloatRange(min=0, max=1, min_open=True), default=None,
              help="infill: share of masked positions (default: the run's)")
@click.option("--length", type=POSITIVE, default=None, help="characters per sample (default: the run's)")
@click.option("--steps", type=POSITIVE, default=None, help="sampler steps (default: the run's)")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=None,
              help="default: the run's")
@click.option("--top-k", type=NON_NEGATIVE, default=None, help="default: the run's")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=None, help="default: the run's")
@click.option("--order", type=click.Choice(REVEAL_ORDERS), default=None, help="default: the run's")
@click.option("--chunk", type=POSITIVE, default=256, show_default=True, help="rows per sampler / judge / LM call")
@out_option("also write the report to this JSON file")
@options(OVERWRITE, QUIET, JSON,
         precision_option("auto; sampler and replay share it, so the measured KL is exact in either"),
         threads_option())
@friendly
def evaluate_cmd(policies, runs, best_only, generator, best_of, pool, judge_ckpts, ensemble, ensemble_std_coef, gold,
                 lm_ckpt, prompts, samples_per_prompt, seed, corpus_path, prompt_kind, mask_fraction, length, steps,
                 temperature, top_k, top_p, order, chunk, out, overwrite, quiet, as_json, precision, threads):
    """Gold evaluation: proxy and gold reward, LM bits/char, diversity and KL per sequence, with s.e."""
    from ..evaluation import format_report
    precision = precision or "auto"
    if not quiet:
        click.echo(precision_report({"evaluation": precision}))
    report = api.evaluate(
        policies, runs, best=best_only, out=out, overwrite=overwrite, threads=threads,
        log=(lambda *a, **k: None) if quiet else click.echo,
        generator=generator, best_of=_int_list(best_of, "--best-of"), pool=pool, judges=list(judge_ckpts),
        ensemble=ensemble, ensemble_std_coef=ensemble_std_coef, gold=gold, lm=lm_ckpt, prompts=prompts,
        samples_per_prompt=samples_per_prompt, seed=seed, corpus=corpus_path, prompt_kind=prompt_kind,
        mask_fraction=mask_fraction, length=length, precision=precision, chunk=chunk,
        sampler={"steps": steps, "temperature": temperature, "top_k": top_k, "top_p": top_p, "order": order})
    wrote = f"; wrote {out}" if out else ""
    emit(report, as_json, f"{format_report(report)}\n{report['timings']['total_s']:.1f} s{wrote}")


# -- GRPO on Ray ------------------------------------------------------------------------------------------------

def train_overrides(out, precision, threads) -> list[tuple[str, str]]:
    pairs = []
    if out is not None:
        pairs.append((f"run.out_dir={json.dumps(out)}", f"--out {out}"))
    if precision is not None:
        pairs += [(f"resources.{role}.precision={precision}", f"--precision {precision}")
                  for role in ("rollout", "judge", "learner", "judge_trainer")]
    if threads is not None:
        pairs.append((f"resources.torch_threads={threads}", f"--threads {threads}"))
    return pairs


@main.command()
@config_options
@out_option("the run directory (sets run.out_dir)")
@click.option("--resume", is_flag=True, help="continue the run in --out / run.out_dir from its last checkpoint "
                                             "(the config may change only in when and how long it runs, what it "
                                             "logs and where its actors go); an error when there is none")
@click.option("--overwrite", is_flag=True, help="start afresh in --out / run.out_dir, deleting the run already there")
@options(QUIET, JSON, precision_option("the config's resources.*.precision (auto)"),
         threads_option("resources.torch_threads (1 per actor)"))
@friendly
def train(config_file, overrides, out, resume, overwrite, quiet, as_json, precision, threads):
    """GRPO fine-tuning on Ray (embedded local cluster unless RAY_ADDRESS / run.ray_address is set)."""
    if resume and overwrite:
        raise click.UsageError("--resume continues the run in run.out_dir, --overwrite deletes it: pass one")
    cfg = api.make_config("train", config_file, train_overrides(out, precision, threads) + list(overrides))
    echo_config(cfg, cfg.role_precisions(), quiet)
    summary = api.train(cfg, resume=resume, overwrite=overwrite, quiet=quiet)
    emit(summary, as_json, json.dumps(summary, indent=2))


@main.command()
@click.argument("run_dir", type=click.Path())
@click.option("--rollout-workers", type=POSITIVE, default=None, help="new rollout worker target")
@click.option("--judge-workers", type=POSITIVE, default=None, help="new judge worker target")
@JSON
@friendly
def scale(run_dir, rollout_workers, judge_workers, as_json):
    """The worker targets of a live run (its run.out_dir), within its min/max_workers; alone, its state.

    The run applies a new target within run.membership_check_s: new workers load the current weights before
    their first request, surplus ones finish theirs and leave (docs/OPERATIONS.md, "Elastic workers")."""
    from ..orchestration.scale import format_state, read_state, write_targets
    targets = {role: n for role, n in (("rollout", rollout_workers), ("judge", judge_workers)) if n is not None}
    if not targets:
        state = read_state(run_dir)
        emit(state, as_json, format_state(state))
        return
    bounds = write_targets(run_dir, targets)
    lines = [f"{role} workers: target {n} (the run allows {bounds[role][0]}..{bounds[role][1]}); written to "
             f"{Path(run_dir) / 'scale.json'}" for role, n in targets.items()]
    emit({"targets": targets, "bounds": bounds}, as_json, "\n".join(lines))


@main.command()
@out_option("the directory of every stage (an earlier demo there is reused)", default="runs/demo")
@click.option("--corpus", "corpus_path", type=click.Path(), default=None,
              help="local copy of tiny Shakespeare (default: download it)")
@click.option("--minutes", type=click.FloatRange(min=0, min_open=True), default=11.0, show_default=True,
              help="wall-time budget of the training stages")
@click.option("--threads", type=POSITIVE, default=1, show_default=True,
              help="torch threads of each Ray actor (the single-process stages use 2)")
@click.option("--seed", type=int, default=0, show_default=True,
              help="seed of every stage (the gold judge's stays apart from the proxy's)")
@click.option("--overwrite", is_flag=True, help="run every stage afresh instead of reusing an earlier demo in --out")
@JSON
@friendly
def demo(out, corpus_path, minutes, threads, seed, overwrite, as_json):
    """Pretrain -> proxy and gold judges -> LM -> GRPO on an embedded Ray cluster -> the verdict about the text.

    The verdict shows the proxy and gold judges, the LM's bits per character and the diversity measures before and
    after GRPO, and warns when the judges' gains are not gains of the text. An earlier demo in --out is reused stage
    by stage (finished stages kept, unfinished ones resumed)."""
    from .demo import run_demo
    result = run_demo(out, corpus_path, minutes=minutes, threads=threads, echo=click.echo, overwrite=overwrite,
                      seed=seed)
    emit(result, as_json)


@main.command()
@config_options
@out_option("the directory of every stage (sets `out`; finished stages there are reused)")
@click.option("--threads", type=POSITIVE, default=None,
              help="torch threads of each process that computes: the single-process stages (`threads`) and each "
                   "Ray actor of the GRPO stage (grpo.resources.torch_threads)")
@options(QUIET, JSON)
@click.option("--overwrite", is_flag=True, help="run every stage afresh instead of reusing what is under --out")
@friendly
def pipeline(config_file, overrides, out, threads, quiet, as_json, overwrite):
    """Generator -> proxy judge(s) -> gold judge -> evaluation LM -> GRPO -> gold evaluation, one command.

    Finished stages under --out are reused, unfinished ones resumed (configs/headline.yaml is the
    project's headline experiment)."""
    from .pipeline import run_pipeline, stage_configs
    flags = flag_overrides(out=out)
    if threads is not None:
        flags += [(f"threads={threads}", f"--threads {threads}"),
                  (f"grpo.resources.torch_threads={threads}", f"--threads {threads}")]
    cfg = api.make_config("pipeline", config_file, flags + list(overrides))
    stage_configs(cfg)  # every stage's config is valid before anything runs
    if not quiet:
        click.echo(to_yaml(cfg))
    result = run_pipeline(cfg, echo=click.echo, quiet=quiet, overwrite=overwrite)
    emit(result, as_json)


TUNE_ENTRIES = {"trials", "tune_results.json", "tune_results.csv", "best.json", "best_config.yaml"}


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
@out_option("the directory of the trials and results (sets run.out_dir)")
@click.option("--overwrite", is_flag=True, help="replace the results of an earlier search in --out")
@options(QUIET, JSON, precision_option("the config's resources.*.precision (auto)"),
         threads_option("resources.torch_threads (1 per actor)"))
@friendly
def tune_cmd(config_file, overrides, search_file, num_samples, scheduler, metric, mode, max_concurrent, out,
             overwrite, quiet, as_json, precision, threads):
    """Ray Tune over GRPO runs: one placement group per trial, ASHA early stopping, best config to run.out_dir."""
    from .tune import load_search, run_tune, settings_from_flags
    cfg = api.make_config("train", config_file, train_overrides(out, precision, threads) + list(overrides))
    search = load_search(search_file, settings_from_flags(
        num_samples=num_samples, scheduler=scheduler, metric=metric, mode=mode,
        max_concurrent_trials=max_concurrent), base=cfg)
    out_dir = Path(cfg.run.out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()):
        entries = {p.name for p in out_dir.iterdir()}
        if not entries <= TUNE_ENTRIES | {search.settings.name}:
            raise ConfigError(f"run.out_dir {out_dir} is not empty and holds no dgrpo tune results "
                              f"({', '.join(sorted(entries)[:5])}); choose a new or empty directory")
        if not overwrite:
            raise RunError(f"run.out_dir {out_dir} holds an earlier search; replace it with --overwrite or choose "
                           f"another --out")
        import shutil
        for name in entries:
            target = out_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    result = run_tune(cfg, search, quiet=quiet)
    best, settings = result["best"], search.settings
    text = (f"{result['table']}\n\nbest ({settings.metric}, {settings.mode}, scope {settings.best_scope}): "
            f"{json.dumps(best['best_params'])} -> {best['best_value']}\nbest config: {result['best_config_path']}"
            f"\n\n{result['best_config_yaml']}")
    emit({k: v for k, v in result.items() if k != "table"}, as_json, text)


# -- configs, reports, logs ---------------------------------------------------------------------------------------

@main.command()
@click.argument("kind", type=click.Choice(list(api.CONFIG_KINDS)), default="train")
@config_options
@out_option("also write the YAML to this file")
@options(OVERWRITE, JSON)
@friendly
def config(kind, config_file, overrides, out, overwrite, as_json):
    """Print the config tree of a command as YAML: its defaults, or -c FILE with --set applied, validated
    (a Python reward is imported and its signature checked, nothing is built or run)."""
    if out is not None:
        api.prepare_output_file(out, overwrite)
    if kind == "judge" and config_file is None and not any(o.startswith("generator=") for o in overrides):
        overrides = ("generator=GENERATOR_CHECKPOINT", *overrides)
    cfg = api.make_config(kind, config_file, list(overrides))
    if out is not None:
        Path(out).write_text(to_yaml(cfg))
    emit(to_dict(cfg), as_json, f"wrote {out}" if out is not None else to_yaml(cfg))


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--overoptimization", is_flag=True,
              help="PATHS are `dgrpo evaluate` JSONs: plot proxy and gold reward vs sqrt(KL) with Gao fits")
@click.option("--out", type=click.Path(), default=None,
              help="the report directory (default RUN/report); with --overoptimization the PNG (default "
                   "overoptimization.png; the curves and fits go to the same name .json); a non-empty one is "
                   "refused without --overwrite")
@options(OVERWRITE, JSON)
@friendly
def report(paths, overoptimization, out, overwrite, as_json):
    """PNG plots (reward, KL, loss, clip fraction, throughput, phase times) and report.md for a run directory;
    with --overoptimization, the over-optimisation plot of evaluate JSONs."""
    if overoptimization:
        from ..evaluation.overoptimization import format_fit
        from ..evaluation.plot import plot_overoptimization
        out = out or "overoptimization.png"
        api.prepare_output_file(out, overwrite)
        api.prepare_output_file(Path(out).with_suffix(".json"), overwrite)
        summary = plot_overoptimization(paths, out)
        lines = [f"{curve['label']}, {reward}: {format_fit(curve['fits'][reward])}"
                 for curve in summary["curves"] for reward in ("proxy", "gold")]
        lines.append(f"wrote {summary['plot']} and {Path(summary['plot']).with_suffix('.json')}")
        emit(summary, as_json, "\n".join(lines))
        return
    if len(paths) != 1:
        raise RunError("dgrpo report takes one run directory (or --overoptimization and evaluate JSONs)")
    from .report import make_report
    out = out or str(Path(paths[0]) / "report")
    api.prepare_output_dir(out, overwrite)
    summary = make_report(paths[0], out)
    emit(summary, as_json, json.dumps(summary, indent=2))


@main.group()
def rollouts():
    """Rollout log files."""


@rollouts.command("inspect")
@click.argument("path", type=click.Path())
@JSON
@friendly
def rollouts_inspect(path, as_json):
    """Summarise a rollout log written with run.log_rollouts."""
    from ..protocols.rollout_log import format_summary, summarize_rollout_log
    if not Path(path).is_file():
        raise FileNotFoundError(f"rollout log {path} does not exist")
    summary = summarize_rollout_log(path)
    emit(summary, as_json, format_summary(summary))


if __name__ == "__main__":
    main()
