"""One experiment end to end: build what GRPO needs, run it, and judge it on measures it never saw.

    generator (pretraining) -> proxy judge(s) -> gold judge -> evaluation LM -> GRPO on Ray
        -> gold evaluation: the base generator, best-of-N from it, and the GRPO policy, on held-out prompts

Each stage writes below `out/` and, when it has finished, a `stage.json` naming the fingerprint of
its configuration. A stage whose directory holds a finished run of the same configuration is reused;
an unfinished one is resumed; a finished one of another configuration is an error (nothing is
overwritten). `dgrpo demo` and `dgrpo pipeline -c configs/headline.yaml` run this with different
budgets.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from pydantic import ValidationError

from ..config import (JudgeTrainConfig, LMTrainConfig, PipelineConfig, PretrainConfig, TrainConfig, deep_merge,
                      format_errors, to_dict)
from ..errors import ConfigError
from ..evaluation.verdict import MEASURES, format_measures, text_verdict
from ..precision import precision_report
from ..training.loop import UNBOUNDED_ITERS

STAGE_FILE = "stage.json"
GOLD_SEED = 1000  # the gold judge's default seed: far from the proxies' 0, 1, 2, ...


@dataclass
class Stages:
    generator: PretrainConfig
    proxy_judges: list[JudgeTrainConfig]
    gold_judge: JudgeTrainConfig | None
    lm: LMTrainConfig | None
    grpo: TrainConfig


def _build(cls, section: str, keys: dict, fixed: dict):
    try:
        return cls.model_validate(deep_merge(keys, fixed))
    except ValidationError as e:
        raise ConfigError(f"pipeline section `{section}`:\n{format_errors(e)}") from None


def stage_configs(p: PipelineConfig) -> Stages:
    """Every stage's validated config; the pipeline fixes output directories, corpus and generator."""
    out, corpus = Path(p.out), p.corpus.model_dump()
    unbounded = {"max_iters": UNBOUNDED_ITERS}  # unless a section sets max_iters, its time budget ends it
    generator = _build(PretrainConfig, "generator", {**unbounded, **p.generator},
                       {"out": str(out / "generator"), "corpus": corpus})
    single = len(p.proxy_judges) == 1
    proxies = [_build(JudgeTrainConfig, f"proxy_judges[{i}]", {**unbounded, "seed": i, **keys},
                      {"generator": generator.out, "corpus": corpus,
                       "out": str(out / ("proxy_judge" if single else f"proxy_judge_{i}"))})
               for i, keys in enumerate(p.proxy_judges)]
    gold = None
    if p.gold_judge is not None:
        gold = _build(JudgeTrainConfig, "gold_judge", {**unbounded, "seed": GOLD_SEED, **p.gold_judge},
                      {"generator": generator.out, "corpus": corpus, "out": str(out / "gold_judge")})
        clash = [j.out for j in proxies if j.seed == gold.seed]
        if clash:
            raise ConfigError(f"the gold judge's seed {gold.seed} is also the seed of proxy judge {clash[0]}: same "
                              f"initial weights and refills, not independent; give gold_judge another seed")
    lm = None if p.lm is None else _build(LMTrainConfig, "lm", {**unbounded, **p.lm},
                                          {"out": str(out / "lm"), "corpus": corpus})
    judges = [j.out for j in proxies]
    reward = {"kind": "judge", "judge_checkpoint": judges[0]} if single else {"kind": "judge",
                                                                                "judge_checkpoints": judges}
    grpo = _build(TrainConfig, "grpo", p.grpo, {"run": {"out_dir": str(out / "grpo")}, "corpus": corpus,
                                                 "generator": {"checkpoint": generator.out}, "reward": reward})
    return Stages(generator, proxies, gold, lm, grpo)


class Budget(NamedTuple):
    """A stage's length (`count` `unit`s, None when only its time limit ends it), the key of the figure that
    says how far it got, and its time limit in minutes (None: none)."""
    unit: str
    count: int | None
    figure: str
    minutes: float | None

    def describe(self) -> str:
        parts = ([f"{self.count} {self.unit}"] if self.count else []) + (
            [f"at most {self.minutes:.1f} min"] if self.minutes else [])
        return ", ".join(parts)

    def cut_short(self, figures: dict) -> bool:
        """Whether the time limit ended the stage before its length."""
        return bool(self.count and self.minutes) and figures.get(self.figure, self.count) < self.count


def budget(config) -> Budget:
    run = getattr(config, "run", None)
    if run is not None:  # GRPO; run.steps UNBOUNDED_ITERS: its time budget ends it
        return Budget("steps", run.steps if run.steps < UNBOUNDED_ITERS else None, "steps", run.max_minutes)
    iters = config.max_iters if config.max_iters < UNBOUNDED_ITERS else None
    return Budget("iterations", iters, "iter", config.max_minutes)


def fingerprint(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


class Pipeline:
    def __init__(self, cfg: PipelineConfig, echo=print, quiet: bool = False, overwrite: bool = False):
        self.cfg, self.echo, self.quiet, self.overwrite = cfg, echo, quiet, overwrite
        self.stages = stage_configs(cfg)
        self.out = Path(cfg.out)
        self.timings: dict[str, float] = {}
        self.reused: list[str] = []

    # -- stages -------------------------------------------------------------------------------------

    def stage(self, name: str, directory: str, config, train) -> dict:
        """Run `train(resume) -> figures` unless `directory` holds a finished run of `config`."""
        marker = Path(directory) / STAGE_FILE
        fp = fingerprint(to_dict(config))
        if self.overwrite and Path(directory).exists():
            self.echo(f"== {name}: --overwrite: removing {directory}")
            shutil.rmtree(directory)
        if marker.is_file():
            done = json.loads(marker.read_text())
            if done.get("fingerprint") == fp:
                self.echo(f"== {name}: reusing {directory} (finished, {done['wall_time_s'] / 60:.1f} min)")
                self.reused.append(name)
                self.timings[name] = 0.0
                return done
            raise ConfigError(f"{directory} holds a finished {name} of another configuration; run the pipeline with "
                              f"the configuration that made it, another `out`, or --overwrite to start afresh")
        resume = (Path(directory) / "config.json").is_file() or (Path(directory) / "checkpoints").is_dir()
        b = budget(config)
        self.echo(f"== {name}: {'resuming' if resume else 'training'} in {directory} ({b.describe()})")
        t0 = time.perf_counter()
        figures = train(resume)
        wall = time.perf_counter() - t0
        if b.cut_short(figures):
            self.echo(f"WARNING: {name} stopped at its time limit ({b.minutes:g} min) after {figures[b.figure]} of "
                      f"{b.count} {b.unit}: this machine ran it slower than the configuration expects (other "
                      f"jobs on its cores?), so its figures may be weaker than documented; to train it fully, raise "
                      f"its max_minutes and run again with --overwrite")
        self.timings[name] = wall
        done = {"stage": name, "fingerprint": fp, "wall_time_s": wall, "figures": figures}
        Path(directory).mkdir(parents=True, exist_ok=True)
        _write_json(marker, done)
        return done

    def build(self) -> None:
        import torch

        from ..corpus import load_corpus
        from ..training.train_judge import train_judge
        from ..training.lm import train_char_lm
        from ..training.pretrain import pretrain

        torch.set_num_threads(self.cfg.threads)
        s, progress = self.stages, not self.quiet
        corpus = load_corpus(self.cfg.corpus.path, self.cfg.corpus.cache_dir, self.cfg.corpus.val_fraction)
        roles = {"pretraining": s.generator.precision, "judge training": s.proxy_judges[0].precision}
        if s.lm is not None:
            roles["LM training"] = s.lm.precision
        self.echo(precision_report(roles))
        self.stage("generator", s.generator.out, s.generator, lambda resume: _figures(
            pretrain(s.generator, corpus, to_dict(s.generator), resume=resume, progress=progress, log=self.echo),
            "iter", "val_loss", "wall_time_s"))
        judges = [(f"proxy judge {i}" if len(s.proxy_judges) > 1 else "proxy judge", j)
                  for i, j in enumerate(s.proxy_judges)]
        if s.gold_judge is not None:
            judges.append(("gold judge", s.gold_judge))
        for name, j in judges:
            self.stage(name, j.out, j, lambda resume, j=j: _figures(
                train_judge(j, to_dict(j), resume=resume, progress=progress, log=self.echo),
                "iter", "auc", "spearman", "wall_time_s"))
        if s.lm is not None:
            self.stage("evaluation LM", s.lm.out, s.lm, lambda resume: _figures(
                train_char_lm(s.lm, corpus, to_dict(s.lm), resume=resume, progress=progress, log=self.echo),
                "iter", "val_bits_per_char", "wall_time_s"))

    def train(self) -> dict:
        from ..orchestration.driver import run_training
        g = self.stages.grpo
        self.echo(precision_report(g.role_precisions()))
        done = self.stage("GRPO", g.run.out_dir, g, lambda resume: run_training(g, resume=resume, quiet=self.quiet))
        return done["figures"]

    def policy_checkpoints(self) -> tuple[list[str], str]:
        """The checkpoints to evaluate (the run's last one, and before it the best one on its held-out
        selection measure when it kept one) and the one the verdict is about: the selected checkpoint, chosen
        without the gold judge, or the last one when the run selects none."""
        from ..orchestration.rundir import read_best
        run_dir = Path(self.stages.grpo.run.out_dir)
        last = sorted((run_dir / "checkpoints").glob("step_*"))
        if not last:
            raise ConfigError(f"the GRPO run left no checkpoint under {run_dir / 'checkpoints'}")
        best = read_best(run_dir)
        chosen = [str(last[-1])]
        if best is not None and best["checkpoint"] != last[-1].name:
            chosen.insert(0, str(run_dir / "checkpoints" / best["checkpoint"]))
        return chosen, chosen[0]

    def evaluate(self) -> dict:
        from ..evaluation import EvaluateOptions, evaluate, format_report
        s, e = self.stages, self.cfg.evaluate
        policies, self.verdict_checkpoint = self.policy_checkpoints()
        opts = EvaluateOptions(
            policies=policies, generator=s.generator.out, best_of=list(e.best_of),
            judges=[j.out for j in s.proxy_judges],
            gold=s.gold_judge.out if s.gold_judge is not None else None, lm=s.lm.out if s.lm is not None else None,
            prompts=e.prompts, samples_per_prompt=e.samples_per_prompt, precision=e.precision,
            corpus=self.cfg.corpus.path, examples=e.samples_shown)
        self.echo("== gold evaluation")
        t0 = time.perf_counter()
        report = evaluate(opts, log=self.echo)
        self.timings["evaluation"] = time.perf_counter() - t0
        _write_json(self.out / "evaluation.json", report)
        self.echo(format_report(report))
        return report

    def run(self) -> dict:
        t0 = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        self.build()
        build_s = time.perf_counter() - t0
        summary = self.train()
        report = self.evaluate()
        result = headline(report, summary, self.verdict_checkpoint)
        result["grpo"]["kl_target"] = self.stages.grpo.grpo.kl_target
        result.update({"build_minutes": build_s / 60, "stage_minutes": {k: v / 60 for k, v in self.timings.items()},
                       "reused_stages": self.reused, "total_minutes": (time.perf_counter() - t0) / 60,
                       "out": str(self.out)})
        _write_json(self.out / "result.json", result)
        for line in format_headline(result):
            self.echo(line)
        return result


def _figures(state: dict, *keys: str) -> dict:
    return {k: state.get(k) for k in keys}


# --- the verdict -------------------------------------------------------------------------------------

def _row(report: dict, kind: str, n: int | None = None) -> dict | None:
    for r in report["rows"]:
        if r["kind"] == kind and (n is None or r.get("n") == n):
            return r
    return None


def matched_best_of_n(report: dict, kl: float) -> dict | None:
    """The best-of-N row whose KL bound is nearest below the policy's KL, and the next one above (if measured):
    the policy is compared with best-of-N at the same KL, interpolated linearly in sqrt(KL)."""
    bon = sorted((r for r in report["rows"] if r["kind"] == "best_of_n"), key=lambda r: r["kl_per_sequence"]["mean"])
    if not bon:
        return None
    below = [r for r in bon if r["kl_per_sequence"]["mean"] <= kl]
    above = [r for r in bon if r["kl_per_sequence"]["mean"] > kl]
    if not above:  # the policy spent more KL than the largest N measured: compare with that N
        r = bon[-1]
        return {"n": r["n"], "kl": r["kl_per_sequence"]["mean"], "gold": _mean(r, "gold_reward"),
                "proxy": _mean(r, "proxy_reward"), "interpolated": False, "beyond_measured": True}
    lo, hi = (below[-1] if below else bon[0]), above[0]
    d_lo, d_hi, d = (math.sqrt(lo["kl_per_sequence"]["mean"]), math.sqrt(hi["kl_per_sequence"]["mean"]),
                     math.sqrt(max(kl, 0.0)))
    w = 0.0 if d_hi == d_lo else min(max((d - d_lo) / (d_hi - d_lo), 0.0), 1.0)
    mix = lambda key: None if _mean(lo, key) is None else (1 - w) * _mean(lo, key) + w * _mean(hi, key)  # noqa: E731
    return {"n": [lo["n"], hi["n"]], "kl": kl, "gold": mix("gold_reward"), "proxy": mix("proxy_reward"),
            "interpolated": True, "beyond_measured": False}


def _mean(row: dict, key: str) -> float | None:
    v = row.get(key)
    return None if v is None else v["mean"]


def headline(report: dict, grpo_summary: dict | None = None, checkpoint: str | None = None) -> dict:
    """Before (the base generator) and after (the policy row of `checkpoint`, by default the last policy row)
    on every measure (evaluation/verdict.py), the gold gain in standard errors, the warnings about the text, and
    best-of-N at the policy's KL."""
    base = _row(report, "base")
    policies = [r for r in report["rows"] if r["kind"] == "policy"]
    matching = [r for r in policies
                if checkpoint is not None and Path(r["checkpoint"]).resolve() == Path(checkpoint).resolve()]
    policy = matching[0] if matching else policies[-1]
    paired = policy.get("paired_vs_base", {})
    gold = paired.get("gold_reward")
    kl = policy["kl_per_sequence"]["mean"]
    keys = [key for key, _ in MEASURES]
    before, after = {k: base.get(k) for k in keys}, {k: policy.get(k) for k in keys}
    real = {k: v for k, v in (report.get("real_text") or {}).items() if k in keys} or None
    result = {
        "policy_checkpoint": policy["checkpoint"], "sampler": report["sampler"],
        "before": before, "after": after, "paired_gain": paired, "real_text": real,
        "kl_per_sequence": policy["kl_per_sequence"],
        "gold_gain_in_stderr": (gold["mean"] / gold["stderr"]) if gold and gold["stderr"] > 0 else None,
        **text_verdict(before, after, paired, real),
        "best_of_n_at_policy_kl": matched_best_of_n(report, kl),
        "examples_before": base.get("examples", []), "examples_after": policy.get("examples", []),
        "grpo": {k: (grpo_summary or {}).get(k) for k in ("steps", "wall_time_s", "eval_reward_before",
                                                          "eval_reward_after")},
    }
    return result


def format_headline(r: dict) -> list[str]:
    s = r["sampler"]
    lines = ["== result",
             f"policy: {r['policy_checkpoint']}",
             "sampled with: " + " ".join(f"{k}={v}" for k, v in s.items())]
    lines += format_measures(r["before"], r["after"], r["paired_gain"], r.get("real_text"))
    budget = (r.get("grpo") or {}).get("kl_target")
    kl = r["kl_per_sequence"]
    lines.append(f"KL(policy || reference): {kl['mean']:.4f} ± {kl['stderr']:.4f} nats per sequence"
                 + (f" (budget {budget:g})" if budget else ""))
    if r["gold_gain_in_stderr"] is not None:
        lines.append(f"gold gain: {r['gold_gain_in_stderr']:.1f} standard errors")
    if r.get("distinct_2_relative") is not None:
        lines.append(f"distinct-2: {100 * r['distinct_2_relative']:.1f}% of the base generator's")
    bon = r["best_of_n_at_policy_kl"]
    if bon and bon.get("gold") is not None:
        how = ("interpolated between N = {}".format(bon["n"]) if bon["interpolated"] else
               f"N = {bon['n']}, the largest measured (its KL bound {bon['kl']:.2f} is below the policy's)")
        lines.append(f"best-of-N at the policy's KL: gold {bon['gold']:.4f}, proxy {bon['proxy']:.4f} ({how})")
    for warning in r.get("warnings", []):
        lines.append(f"WARNING: {warning}")
    for note in r.get("notes", []):
        lines.append(f"note: {note}")
    if not r.get("warnings"):
        lines.append("no warnings: the measures no judge saw do not contradict the judges")
    for title, texts in [("before", r["examples_before"]), ("after", r["examples_after"])]:
        for i, text in enumerate(texts):
            lines.append(f"--- {title} {i + 1}:\n{text}")
    lines.append(f"build {r['build_minutes']:.1f} min (reused: {', '.join(r['reused_stages']) or 'none'}), "
                 f"total {r['total_minutes']:.1f} min; everything under {r['out']}")
    return lines


def run_pipeline(cfg: PipelineConfig, echo=print, quiet: bool = False, overwrite: bool = False) -> dict:
    return Pipeline(cfg, echo, quiet, overwrite).run()
