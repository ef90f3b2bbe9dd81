"""`dgrpo evaluate`: the gold evaluation the reward never sees (pure torch, no Ray).

Rows, all on the same held-out prompts (validation windows made into prompts exactly as
the driver's evaluation makes them: fixed_windows + make_prompts, the run's prompt kind):

- base: the starting generator (`--generator`, else the reference stored in the first
  policy checkpoint), `samples_per_prompt` samples per prompt: the "before" row, KL 0.
- best_of_n: one pool of M = max(N) samples per prompt from the base generator; the row
  of each N is the unbiased expectation of each measure at the proxy-argmax of N samples
  drawn from the pool (best_of_n.py). KL: the analytic bound log N - (N-1)/N ("bon_bound").
- policy: each GRPO checkpoint, `samples_per_prompt` per prompt. KL(policy || reference)
  per sequence measured on its samples: the sampler runs the stored reference beside the
  policy and sums the exact KL of every draw the trajectory depends on (sampler.py) ("measured").

Measures per row, each {mean, stderr} over prompts (samples of a prompt averaged first):
proxy_reward (1 - score of the judge GRPO optimised, or its ensemble's combined reward, with
the members' spread as proxy_disagreement), gold_reward (1 - score of a judge
trained independently), lm_bits_per_char (a causal character LM, char_lm.py), distinct-n
and repeated n-grams (text_stats.py), kl_per_sequence; and their paired differences to the
base row, prompt by prompt. The base and the policies are sampled from the same seed (common
random numbers), the best-of-N pool from another.

One file, longer than most: every row is sampled, scored and paired on the same prompts and seeds, and
that contract is easier to check in one place than across modules.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import SamplerConfig
from ..corpus import CharTokenizer, check_length, fixed_windows, load_corpus, make_prompts
from ..models.char_lm import bits_per_char, load_char_lm
from ..models.diffusion import DiffusionLM
from ..models.judge import load_judge
from ..models.diffusion import load_generator
from ..models.rewards import ENSEMBLE_MODES, combine_member_rewards, member_std
from ..training.train_judge import judge_scores
from ..models.sampler import sample, validate_sampling
from ..precision import machine_summary, resolve_precision
from .best_of_n import best_of_n_expectation, bon_kl_bound
from .overoptimization import report_series
from .statistics import mean_stderr, paired_difference, per_prompt_means
from .text_stats import DISTINCT_ORDERS, REPEATED, TextStats, char_2gram_divergence, distinct_over_sets

SAMPLER_DEFAULTS = SamplerConfig().model_dump()
PER_SAMPLE = (("proxy_reward", "proxy_disagreement", "gold_reward", "lm_bits_per_char")
              + tuple(f"distinct_{n}_per_sample" for n in DISTINCT_ORDERS) + tuple(REPEATED))
DEFAULT_EVAL_SEED = 1234
KL_DEFINITION = {
    "random": "policy rows: the trajectory KL to the reference, measured along the policy's samples (the revealed "
              "positions do not depend on the model: the exact KL of the two models' token distributions there, "
              "summed over steps); an upper bound of the text KL. best-of-N rows: the bound log N - (N-1)/N",
    "confidence": "policy rows: the trajectory KL to the reference, measured along the policy's samples (log "
                  "policy(trajectory) - log reference(trajectory), the choice of positions by confidence included: "
                  "the KL the learner's kl_seq and its budget hold); an upper bound of the text KL, a loose one: "
                  "the choice of positions turns on small differences between the models. best-of-N rows: the "
                  "bound log N - (N-1)/N",
    "gumbel_confidence": "policy rows: the trajectory KL to the reference, measured along the policy's samples (log "
                         "policy(trajectory) - log reference(trajectory), the order of each step's reveals included: "
                         "the KL the learner's kl_seq and its budget hold); an upper bound of the text KL. best-of-N "
                         "rows: the bound log N - (N-1)/N",
}
N_EXAMPLES = 2


class EvaluationError(ValueError):
    """A bad input to `dgrpo evaluate` that the user can fix."""


@dataclass
class EvaluateOptions:
    policies: list[str] = field(default_factory=list)
    generator: str | None = None
    best_of: list[int] = field(default_factory=list)
    pool: int | None = None  # best-of-N pool per prompt; default max(best_of)
    judges: list[str] = field(default_factory=list)  # proxy (two or more: an ensemble); default the run's reward
    ensemble: str | None = None  # how an ensemble combines; default the run's reward.ensemble, else "mean"
    ensemble_std_coef: float | None = None  # lambda of mean_minus_std; default the run's, else 1.0
    gold: str | None = None
    lm: str | None = None
    prompts: int = 64
    samples_per_prompt: int = 4
    seed: int | None = None  # prompts; default the run's run.eval_seed
    corpus: str | None = None
    prompt_kind: str | None = None
    mask_fraction: float | None = None
    length: int | None = None
    sampler: dict = field(default_factory=dict)  # overrides of the run's sampler settings
    precision: str = "fp32"
    chunk: int = 256  # rows per sampler / judge / LM call
    examples: int = N_EXAMPLES  # texts kept per row


@dataclass
class Policy:
    path: str
    model: DiffusionLM
    reference: DiffusionLM | None
    tokenizer: CharTokenizer
    config: dict
    state: dict

    @property
    def reference_resets(self) -> int:
        """How often the run replaced its reference by the policy (grpo.reference_reset_every) before this
        checkpoint; then the stored reference is no longer the starting generator."""
        return int((self.state.get("learner") or {}).get("reference_resets", 0))


def _load_policy(path: str) -> Policy:
    model, tokenizer, ckpt = load_generator(path)
    reference = None
    if ckpt.has("reference"):
        reference = ckpt.load_weights_into(DiffusionLM(ckpt.model_config), "reference.safetensors")
        reference.eval().requires_grad_(False)
    return Policy(str(path), model, reference, tokenizer, ckpt.config or {}, ckpt.state or {})


def run_levers(config: dict) -> list[str]:
    """The levers against reward exploitation a run's config turned on, each as a short label."""
    reward, grpo, refresh = (config.get(k) or {} for k in ("reward", "grpo", "judge_refresh"))
    levers = []
    members = reward.get("judge_checkpoints") or []
    if len(members) > 1:
        combine = reward.get("ensemble", "mean")
        lam = f", lambda={reward.get('ensemble_std_coef', 1.0):g}" if combine == "mean_minus_std" else ""
        levers.append(f"ensemble of {len(members)} ({combine}{lam})")
    if refresh.get("enabled"):
        levers.append(f"judge refresh every {refresh.get('publish_every')} steps")
    if grpo.get("reference_reset_every"):
        levers.append(f"reference reset every {grpo['reference_reset_every']} steps")
    return levers


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise EvaluationError(message)


def _validate(opts: EvaluateOptions) -> None:
    _check(bool(opts.policies or opts.generator), "nothing to evaluate: pass --policy CKPT and/or --generator CKPT")
    _check(opts.prompts >= 2, f"--prompts must be >= 2 (standard errors are over prompts), got {opts.prompts}")
    _check(opts.samples_per_prompt >= 1, f"--samples-per-prompt must be >= 1, got {opts.samples_per_prompt}")
    _check(opts.chunk >= 1, f"--chunk must be >= 1, got {opts.chunk}")
    _check(opts.length is None or opts.length >= 2, f"--length must be >= 2, got {opts.length}")
    bad = [n for n in opts.best_of if n < 1]
    _check(not bad, f"--best-of needs N >= 1, got {bad}")
    if opts.best_of:
        pool = opts.pool or max(opts.best_of)
        _check(pool >= max(opts.best_of), f"--pool {pool} is smaller than the largest N {max(opts.best_of)}")
    _check(opts.pool is None or opts.pool >= 1, f"--pool must be >= 1, got {opts.pool}")


def _sampler_settings(opts: EvaluateOptions, run_cfg: dict) -> dict:
    run_sampler = run_cfg.get("sampler") or {}
    sampler = {k: run_sampler.get(k, v) for k, v in SAMPLER_DEFAULTS.items()}
    unknown = sorted(set(opts.sampler) - set(SAMPLER_DEFAULTS))
    _check(not unknown, f"unknown sampler settings {unknown}; known: {sorted(SAMPLER_DEFAULTS)}")
    sampler.update({k: v for k, v in opts.sampler.items() if v is not None})
    try:
        validate_sampling(**sampler)
    except ValueError as e:
        raise EvaluationError(str(e)) from None
    return sampler


def _judge(path: str, what: str, tokenizer: CharTokenizer, length: int):
    judge, _, ckpt = load_judge(path, tokenizer=tokenizer)
    _check(judge.block_size == length, f"the {what} judge {path} scores windows of {judge.block_size} characters, "
                                       f"the evaluated samples have {length}")
    return judge, ckpt


def sample_per_prompt(model: DiffusionLM, prompts: torch.Tensor, repeats: int, sampler: dict, seed: int,
                      chunk: int = 256, autocast_dtype: torch.dtype | None = None,
                      reference: DiffusionLM | None = None, forwards: bool = False):
    """(tokens, kl_to_reference) of `repeats` samples per prompt (rows i*repeats ... of prompt i), sampled in
    chunks of `chunk` rows from one generator seeded with `seed`; each sample's trajectory KL term to
    `reference` (sampler.py), None without a reference. With `forwards=True` also (B,) the model forwards each
    sample took (its steps that revealed tokens: fewer than `steps` under a reveal threshold)."""
    x = prompts.repeat_interleave(repeats, dim=0)
    g = torch.Generator().manual_seed(seed)
    outs = [sample(model, x[i:i + chunk], generator=g, autocast_dtype=autocast_dtype, reference=reference,
                   **sampler) for i in range(0, len(x), chunk)]
    kl = None if reference is None else torch.cat([o.kl_to_reference for o in outs])
    tokens = torch.cat([o.tokens for o in outs])
    if not forwards:
        return tokens, kl
    reveal_step = torch.cat([o.reveal_step for o in outs])
    steps = torch.arange(sampler["steps"])
    taken = (reveal_step[:, None, :] == steps[None, :, None]).any(-1).sum(1)
    return tokens, kl, taken.double()


class Evaluator:
    """Loads everything once, then samples and measures row by row."""

    def __init__(self, opts: EvaluateOptions, log=print):
        self.t_start = time.perf_counter()
        _validate(opts)
        self.opts, self.log = opts, log
        self.timings: dict[str, float] = {"sample_s": 0.0, "proxy_s": 0.0, "gold_s": 0.0,
                                          "lm_s": 0.0, "text_s": 0.0}
        self.policies = [_load_policy(p) for p in opts.policies]
        if opts.generator:
            self.base, self.tokenizer, gen_ckpt = load_generator(opts.generator)
            self.base_source = str(opts.generator)
            base_cfg = gen_ckpt.config or {}
        else:
            first = self.policies[0]
            _check(first.reference is not None, f"{first.path} stores no reference weights (it is not a GRPO "
                                                f"checkpoint); pass the base generator with --generator")
            _check(first.reference_resets == 0, f"{first.path} stores a reference its run reset "
                                                f"{first.reference_resets} times (grpo.reference_reset_every), not the "
                                                f"starting generator; pass that with --generator")
            self.base, self.tokenizer = first.reference, first.tokenizer
            self.base_source = f"{first.path} (its stored reference)"
            base_cfg = first.config
        for p in self.policies:
            p.tokenizer.check_same(self.tokenizer, f"{p.path} vs the base generator")
        self.run_cfg = self.policies[0].config if self.policies else base_cfg
        self.sampler = _sampler_settings(opts, self.run_cfg)
        prompts_cfg = self.run_cfg.get("prompts") or {}
        self.prompt_kind = opts.prompt_kind or prompts_cfg.get("kind", "unconditional")
        self.mask_fraction = float(opts.mask_fraction or prompts_cfg.get("mask_fraction", 0.5))
        self.length = int(opts.length or prompts_cfg.get("length") or self.base.cfg.block_size)
        for model, name in [(self.base, self.base_source)] + [(p.model, p.path) for p in self.policies]:
            _check(self.length <= model.cfg.block_size, f"samples of {self.length} characters do not fit "
                                                        f"{name}'s block of {model.cfg.block_size}")
        self.seed = int(opts.seed if opts.seed is not None
                        else (self.run_cfg.get("run") or {}).get("eval_seed", DEFAULT_EVAL_SEED))
        self.autocast_dtype = resolve_precision(opts.precision)
        self._load_scorers()
        corpus_cfg = self.run_cfg.get("corpus") or {}
        self.corpus_path = opts.corpus or corpus_cfg.get("path")
        corpus = load_corpus(self.corpus_path, corpus_cfg.get("cache_dir"), float(corpus_cfg.get("val_fraction", 0.1)),
                             tokenizer=self.tokenizer)
        check_length(corpus.val, self.length, "validation")
        windows = fixed_windows(corpus.val, opts.prompts, self.length, seed=self.seed)
        self.windows = windows  # the held-out text the prompts come from: the real-text reference
        self.real_texts = self.tokenizer.decode_batch(windows)
        try:
            self.prompts = make_prompts(windows, self.tokenizer.mask_id, self.prompt_kind, self.mask_fraction,
                                        generator=torch.Generator().manual_seed(self.seed))
        except ValueError as e:
            raise EvaluationError(str(e)) from None
        self.timings["load_s"] = time.perf_counter() - self.t_start

    def _proxy_settings(self) -> tuple[list[str], str, float]:
        """(proxy judge paths, ensemble mode, lambda): --judge, else the run's reward."""
        opts = self.opts
        reward_cfg = self.run_cfg.get("reward") or {}
        run_judge = reward_cfg.get("kind") == "judge"
        paths = list(opts.judges) or (list(reward_cfg.get("judge_checkpoints") or [reward_cfg.get("judge_checkpoint")])
                                      if run_judge else [])
        if not paths or not paths[0]:
            why = "--best-of needs it to pick the best sample; " if opts.best_of else ""
            raise EvaluationError(f"no proxy judge: {why}pass --judge CKPT (the judge GRPO optimised against; "
                                  f"repeat it for an ensemble)")
        _check(len(set(paths)) == len(paths), f"--judge names a judge twice: {paths}")
        own = run_judge and not opts.judges  # the run's ensemble settings go with the run's judges
        mode = opts.ensemble or (reward_cfg.get("ensemble") if own else None) or "mean"
        coef = opts.ensemble_std_coef if opts.ensemble_std_coef is not None else \
            (reward_cfg.get("ensemble_std_coef") if own else None)
        _check(mode in ENSEMBLE_MODES, f"--ensemble must be one of {', '.join(ENSEMBLE_MODES)}, got {mode!r}")
        _check(len(paths) > 1 or (opts.ensemble is None and opts.ensemble_std_coef is None),
               "--ensemble and --ensemble-std-coef combine two or more judges: repeat --judge")
        return paths, mode, 1.0 if coef is None else float(coef)

    def _load_scorers(self) -> None:
        opts = self.opts
        self.judge_paths, self.ensemble_mode, self.ensemble_std_coef = self._proxy_settings()
        self.proxies = [_judge(p, "proxy", self.tokenizer, self.length) for p in self.judge_paths]
        self.gold = self.lm = None
        self.warnings: list[str] = []
        if opts.gold:
            gold = Path(opts.gold).resolve()
            rewards = set(self.judge_paths)
            for p in self.policies:
                reward_cfg = p.config.get("reward") or {}
                rewards |= set(reward_cfg.get("judge_checkpoints") or []) | {reward_cfg.get("judge_checkpoint")}
                selection = (p.config.get("run") or {}).get("selection_judge")
                _check(not selection or Path(selection).resolve() != gold,
                       f"the gold judge {opts.gold} is the selection judge of {p.path}'s run, so it chose which "
                       f"checkpoints were kept; use a judge that neither training nor selection saw")
            _check(gold not in {Path(r).resolve() for r in rewards if r},
                   f"the gold judge {opts.gold} is the proxy judge (or a member of the proxy ensemble, or a reward "
                   f"judge of an evaluated run); "
                   f"train one independently (dgrpo judge train --set seed=... --out ...)")
            self.gold, gold_ckpt = _judge(opts.gold, "gold", self.tokenizer, self.length)
            gold_seed = (gold_ckpt.config or {}).get("seed")
            for path, (_, proxy_ckpt) in zip(self.judge_paths, self.proxies):
                proxy_seed = (proxy_ckpt.config or {}).get("seed")
                _check(proxy_seed is None or proxy_seed != gold_seed,
                       f"the gold judge {opts.gold} was trained with the seed {proxy_seed} of the proxy judge {path}: "
                       f"same initial weights and the same refill samples, so it is not independent; train it with "
                       f"another seed")
        else:
            self.warnings.append("no --gold: gold_reward not measured")
        if opts.lm:
            self.lm, _, _ = load_char_lm(opts.lm, tokenizer=self.tokenizer)
            _check(self.length <= self.lm.cfg.block_size, f"the language model {opts.lm} reads at most "
                                                          f"{self.lm.cfg.block_size} characters, the samples have "
                                                          f"{self.length}")
        else:
            self.warnings.append("no --lm: lm_bits_per_char not measured")

    # -- sampling and measuring --------------------------------------------------------------------

    def _timed(self, key: str, fn):
        t0 = time.perf_counter()
        out = fn()
        self.timings[key] += time.perf_counter() - t0
        return out

    def draw(self, model: DiffusionLM, repeats: int, seed: int, reference: DiffusionLM | None = None):
        """(tokens, kl_to_reference, forwards per sample)."""
        return self._timed("sample_s", lambda: sample_per_prompt(
            model, self.prompts, repeats, self.sampler, seed, self.opts.chunk, self.autocast_dtype, reference,
            forwards=True))

    def measure(self, tokens: torch.Tensor) -> tuple[dict[str, torch.Tensor | None], TextStats, list[str]]:
        """Per-sample measures of (B, T) samples: PER_SAMPLE name -> (B,) float64 (None when not measured)."""
        chunk = self.opts.chunk
        values: dict[str, torch.Tensor | None] = {}
        members = self._timed("proxy_s", lambda: torch.stack([1.0 - judge_scores(
            judge, tokens, self.autocast_dtype, chunk).double() for judge, _ in self.proxies]))
        values["proxy_reward"] = combine_member_rewards(members, self.ensemble_mode, self.ensemble_std_coef)
        values["proxy_disagreement"] = member_std(members) if len(members) > 1 else None
        values["gold_reward"] = None if self.gold is None else self._timed("gold_s", lambda: 1.0 - judge_scores(
            self.gold, tokens, self.autocast_dtype, chunk).double())
        values["lm_bits_per_char"] = None if self.lm is None else self._timed("lm_s", lambda: bits_per_char(
            self.lm, tokens, self.autocast_dtype, chunk))
        texts = self.tokenizer.decode_batch(tokens)
        stats = self._timed("text_s", lambda: TextStats(texts))
        values.update(stats.values)
        return values, stats, texts

    # -- rows ----------------------------------------------------------------------------------------

    def row(self, name: str, kind: str, per_prompt: dict, stats: TextStats, sets: list[list[int]], kl: dict,
            kl_kind: str, examples: list[str], texts: list[str], **info) -> dict:
        """A row: per-prompt values summarised over prompts, distinct-n over `sets` (lists of sample indices,
        one sample per prompt), the character 2-gram divergence of each set to the held-out text (averaged over
        the sets, which are disjoint), and the KL."""
        distinct = {f"distinct_{n}": distinct_over_sets([[stats.word_ngrams[n][i] for i in s] for s in sets])
                    for n in DISTINCT_ORDERS}
        # per set of one sample per prompt, as many texts as the held-out reference: the divergence of a finite
        # sample falls with its size, so every row compares sets of the same size
        per_set = self._timed("text_s", lambda: [char_2gram_divergence([texts[i] for i in s], self.real_texts)
                                                 for s in sets])
        divergence = {"mean": sum(d["mean"] for d in per_set) / len(per_set),
                      "stderr": math.sqrt(sum(d["stderr"] ** 2 for d in per_set)) / len(per_set)}
        summaries = {k: None if v is None else mean_stderr(v) for k, v in per_prompt.items()}
        return {"name": name, "kind": kind, **info, **summaries, **distinct, "char_2gram_js": divergence,
                "kl_per_sequence": kl,
                "kl_kind": kl_kind, "sqrt_kl": math.sqrt(max(kl["mean"], 0.0)), "examples": examples[:self.opts.examples]}

    def sampled_row(self, name: str, kind: str, model: DiffusionLM, reference: DiffusionLM | None) -> tuple[dict, dict]:
        """(row, per-prompt values) of a model sampled `samples_per_prompt` times per prompt; with a reference,
        the KL to it is measured on those samples."""
        P, m = self.opts.prompts, self.opts.samples_per_prompt
        tokens, kl_samples, forwards = self.draw(model, m, self.seed + 1, reference)
        values, stats, texts = self.measure(tokens)
        per_prompt = {k: None if v is None else per_prompt_means(v.view(P, m)) for k, v in values.items()}
        if reference is None:
            kl, kl_kind = {"mean": 0.0, "stderr": 0.0}, "base"
        else:
            kl, kl_kind = mean_stderr(per_prompt_means(kl_samples.view(P, m))), "measured"
        sets = [[i * m + j for i in range(P)] for j in range(m)]  # sample j of every prompt
        row = self.row(name, kind, per_prompt, stats, sets, kl, kl_kind, texts, texts,
                       n=1 if kind == "base" else None, samples_per_prompt=m,
                       forwards_per_sample=mean_stderr(per_prompt_means(forwards.view(P, m))))
        return row, per_prompt

    def best_of_n_rows(self) -> list[tuple[dict, dict]]:
        """(row, per-prompt values) of best-of-N for every N, all from one pool per prompt."""
        P = self.opts.prompts
        pool = self.opts.pool or max(self.opts.best_of)
        tokens, _, _ = self.draw(self.base, pool, self.seed + 2)
        values, stats, texts = self.measure(tokens)
        proxy = values["proxy_reward"].view(P, pool)
        rows = []
        for n in sorted(set(self.opts.best_of) | {1}):
            per_prompt = {k: None if v is None else best_of_n_expectation(proxy, v.view(P, pool), n)
                          for k, v in values.items()}
            # sets for distinct-n: the proxy's pick in each of the pool // n disjoint groups of n
            groups = pool // n
            picks = proxy[:, :groups * n].reshape(P, groups, n).argmax(-1) + torch.arange(groups) * n
            sets = (picks + torch.arange(P)[:, None] * pool).T.tolist()
            kl = bon_kl_bound(n)
            row = self.row(f"best-of-{n}", "best_of_n", per_prompt, stats, sets, {"mean": kl, "stderr": 0.0},
                           "bon_bound", [texts[s[0]] for s in sets], texts, n=n,
                           samples_per_prompt=pool)
            rows.append((row, per_prompt))
        return rows

    def real_text(self) -> dict:
        """The measures of the held-out text the prompts come from: what a judge or the LM says of real text."""
        values, stats, _ = self.measure(self.windows)
        measured = {k: mean_stderr(v) for k, v in values.items() if v is not None}
        distinct = {f"distinct_{n}": distinct_over_sets([stats.word_ngrams[n]]) for n in DISTINCT_ORDERS}
        return {**measured, **distinct}

    def run(self) -> dict:
        opts = self.opts
        self.log(self.describe())
        base_row, base_pp = self.sampled_row("generator", "base", self.base, None)
        base_row["checkpoint"] = self.base_source
        rows = [(base_row, base_pp)]
        if opts.best_of:
            rows += self.best_of_n_rows()
            for row, _ in rows[1:]:
                row["checkpoint"] = self.base_source
        for p in self.policies:
            # KL to the starting generator: the stored reference, unless the run has reset it since
            own_reference = p.reference is not None and p.reference_resets == 0
            reference = p.reference if own_reference else self.base
            row, pp = self.sampled_row(f"policy {p.path}", "policy", p.model, reference)
            run_sampler = {k: (p.config.get("sampler") or {}).get(k) for k in SAMPLER_DEFAULTS}
            grpo_cfg = p.config.get("grpo") or {}
            row.update({"checkpoint": p.path, "step": p.state.get("step"),
                        "run": (p.config.get("run") or {}).get("out_dir") or str(Path(p.path).parent.parent),
                        "kl_coef": grpo_cfg.get("kl_coef"), "kl_target": grpo_cfg.get("kl_target"),
                        "reference_resets": p.reference_resets, "levers": run_levers(p.config),
                        "reference": "stored in the checkpoint" if own_reference else "the base generator",
                        "run_sampler": run_sampler})
            rows.append((row, pp))
        for row, pp in rows[1:]:
            row["paired_vs_base"] = {k: paired_difference(pp[k], base_pp[k]) for k in PER_SAMPLE
                                     if pp[k] is not None}
        report = {
            "kind": "dgrpo-evaluate", "version": 1, "n_prompts": opts.prompts,
            "samples_per_prompt": opts.samples_per_prompt,
            "best_of_n_pool": (opts.pool or max(opts.best_of)) if opts.best_of else None,
            "prompts": {"kind": self.prompt_kind, "mask_fraction": self.mask_fraction, "length": self.length,
                        "seed": self.seed, "split": "validation", "corpus": self.corpus_path},
            "sampler": self.sampler, "kl_definition": KL_DEFINITION[self.sampler["order"]],
            "sampling_seeds": {"base_and_policies": self.seed + 1, "best_of_n_pool": self.seed + 2},
            "checkpoints": {"generator": self.base_source, "proxy_judge": self.proxy_source, "gold_judge": opts.gold,
                            "lm": opts.lm, "policies": list(opts.policies)},
            "proxy_ensemble": ({"members": len(self.judge_paths), "mode": self.ensemble_mode,
                                "std_coef": self.ensemble_std_coef, "std": "sample (divisor M - 1)"}
                               if len(self.judge_paths) > 1 else None),
            "precision": opts.precision, "autocast": str(self.autocast_dtype) if self.autocast_dtype else "fp32",
            "machine": machine_summary(), "warnings": self.warnings,
            "rows": [row for row, _ in rows], "real_text": self.real_text(),
        }
        report["curves"] = report_series(report)
        report["timings"] = {**self.timings, "total_s": time.perf_counter() - self.t_start}
        return report

    @property
    def proxy_source(self) -> str | list[str]:
        """The proxy judge's path, or the ensemble's list of paths."""
        return self.judge_paths[0] if len(self.judge_paths) == 1 else list(self.judge_paths)

    def describe(self) -> str:
        s = self.sampler
        lines = [f"evaluating on {self.opts.prompts} held-out {self.prompt_kind} prompts of {self.length} characters "
                 f"(validation split, seed {self.seed}), {self.opts.samples_per_prompt} samples per prompt",
                 f"sampler: steps={s['steps']} temperature={s['temperature']} top_k={s['top_k']} top_p={s['top_p']} "
                 f"order={s['order']}; precision {self.opts.precision}",
                 f"base generator: {self.base_source}",
                 f"proxy judge: {self.proxy_source}" + (f" ({self.ensemble_mode}, lambda {self.ensemble_std_coef})"
                                                         if len(self.judge_paths) > 1 else "")
                 + f"; gold judge: {self.opts.gold}; language model: {self.opts.lm}"]
        if self.opts.best_of:
            lines.append(f"best-of-N: N = {sorted(set(self.opts.best_of) | {1})} from a pool of "
                         f"{self.opts.pool or max(self.opts.best_of)} per prompt")
        lines += [f"policy: {p.path} (step {p.state.get('step')})" for p in self.policies]
        return "\n".join(lines)


def evaluate(opts: EvaluateOptions, log=print) -> dict:
    return Evaluator(opts, log).run()


def _cell(metric: dict | None, fmt: str = ".4f") -> str:
    return "-" if metric is None else f"{metric['mean']:{fmt}} ± {metric['stderr']:{fmt}}"


def format_report(report: dict) -> str:
    """The rows as a table of mean ± s.e. over prompts, then paired differences to the base row."""
    columns = [("proxy_reward", "proxy"), ("gold_reward", "gold"), ("lm_bits_per_char", "LM bits/char"),
               ("distinct_2", "distinct-2"), ("repeated_char_4grams", "rep. char 4g"),
               ("repeated_word_2grams", "rep. word 2g"), ("char_2gram_js", "char 2g JS to real")]
    lines = [["row", "KL nats/seq", "d"] + [title for _, title in columns]]
    for r in report["rows"]:
        kl = r["kl_per_sequence"]
        kl_text = {"bon_bound": f"<= {kl['mean']:.3f} (bound)", "base": "0"}.get(r["kl_kind"], _cell(kl, ".3f"))
        lines.append([r["name"], kl_text, f"{r['sqrt_kl']:.3f}"] + [_cell(r.get(k)) for k, _ in columns])
    real = report.get("real_text")
    if real:
        lines.append(["held-out text (the prompts' source)", "-", "-"] + [_cell(real.get(k)) for k, _ in columns])
    text = _align(lines)
    paired_columns = [(k, title) for k, title in columns if k in PER_SAMPLE]
    paired = [["row"] + [f"Δ {title}" for _, title in paired_columns]]
    for r in report["rows"][1:]:
        paired.append([r["name"]] + [_cell(r["paired_vs_base"].get(k)) for k, _ in paired_columns])
    if len(paired) > 1:
        text += "\n\npaired by prompt, minus the base generator (mean ± s.e.):\n" + _align(paired)
    return text


def _align(cells: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
