"""Training and evaluation of the judge (pure torch, no Ray).

Data, built on the fly from a given generator checkpoint:

* a real window of the corpus's train split (held-out windows: validation split only);
* a fraction x in [0, 1] of its positions, exactly round(x * T) of them chosen at
  random, is replaced by [MASK] and re-filled by the generator through the
  sampler (dgrpo.models.sampler.sample, the same code GRPO rollouts use), so the
  judge learns the generator's own mistakes, in context;
* target g(x) = x (judge_targets) under binary cross-entropy with logits on the
  window logit, plus (weight cfg.token_loss_weight if the config has it, else 1)
  a per-position BCE of the judge's token head against "this character differs
  from the real one" (ELECTRA's replaced-token detection): T labels per window
  instead of one.
* the judge's trunk starts as a copy of the generator's when the shapes match
  (same preset), the usual reward-model recipe; see copy_generator_trunk.

Measured against the small generator (CE 2.43 nats) on this 2-core machine: a
judge trained from scratch on the window label alone memorised its pool of
refills (train AUC up, held-out AUC down to ~0.5 after 1,200 iterations); the
generator's trunk + pooled per-position evidence + token labels reached held-out
AUC 0.89 in 150 iterations on the same data.

Why g(x) = x: with a soft BCE target the loss is minimised by sigmoid(logit) =
E[x | window], so the score is the judge's estimate of the share of the window
the generator wrote: monotone in x, 0 for real text, 1 for a fully generated
window, and reward = 1 - score is "how much of this looks real".

Mixture of x: p_real windows at x = 0, p_generated at x = 1, the rest x ~ U(0, 1).
Generation is the expensive part, so x > 0 windows come from a pool of
cfg.refill_pool refills of which a quarter (the oldest) is replaced every
cfg.refill_every iterations; x = 0 windows cost nothing and are drawn fresh from
the train split for every batch (round(p_real * batch_size) of each batch), which
keeps the mixture and gives the judge far more distinct real text than a pool would.
The share of wall time spent generating refills is measured and reported.

How fresh the pool is matters more than how long the judge trains. Real windows never
repeat; a refill that is seen many times can be memorised, which teaches the shortcut
"seen before = generated" and fails on held-out text. Against the 2.34-nat small
generator, with a pool of 256 refreshed 64 at a time every 50 iterations (each refill
used ~9 times) held-out AUC peaked at 0.86 (iteration 400) and then fell; every 16
iterations (~3 uses, refill generation 54% of the time instead of 32%) it rose steadily,
to AUC 0.98 / Spearman 0.80 at 15 minutes (the trainer's 128-window held-out set).

Figures on held-out validation windows (evaluate_judge): AUC of real (x = 0) vs
fully generated (x = 1) windows (Mann-Whitney, average ranks for ties), Spearman
rank correlation of the score with x over n real + n fully generated + n windows
with x ~ U(0, 1), and the mean scores of real and of generated windows. Computed
in torch (no sklearn / scipy at run time).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..corpus import CharTokenizer, check_length, fixed_windows, load_corpus, random_windows
from ..errors import ConfigError
from ..models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ..models.diffusion import DiffusionLM, load_generator
from ..models.judge import Judge, judge_config, load_judge
from ..models.optim import make_optimizer
from ..models.sampler import sample
from ..precision import autocast_context, resolve_precision
from .pretrain import scheduled_lr

EVAL_FILE = "eval.json"
FIGURE_KEYS = ("auc", "spearman", "score_real", "score_generated")
REFILL_CHUNK_ROWS = 128
SCORE_CHUNK_ROWS = 256


# --- targets and data -------------------------------------------------------------------------

def judge_targets(x: torch.Tensor) -> torch.Tensor:
    """g(x) = x: the training target of a window whose fraction x was re-filled (see module doc)."""
    return x.float()


def realised_fractions(fractions: torch.Tensor, T: int) -> torch.Tensor:
    """The fraction actually re-filled by build_refills: round(x * T) / T."""
    return _n_masked(fractions, T).float() / T


def _n_masked(fractions: torch.Tensor, T: int) -> torch.Tensor:
    if fractions.numel() and (float(fractions.min()) < 0 or float(fractions.max()) > 1):
        raise ValueError("refill fractions must lie in [0, 1]")
    return torch.round(fractions.double() * T).long().clamp_(0, T)


def sample_fractions(n: int, p_real: float, p_generated: float, generator: torch.Generator | None = None
                     ) -> torch.Tensor:
    """n draws of x from the mixture: 0 with prob p_real, 1 with prob p_generated, else U(0, 1)."""
    if p_real < 0 or p_generated < 0 or p_real + p_generated > 1 + 1e-9:
        raise ValueError(f"p_real={p_real} and p_generated={p_generated} must be >= 0 and sum to at most 1")
    u = torch.rand(n, generator=generator)
    x = torch.rand(n, generator=generator)
    return torch.where(u < p_real, torch.zeros_like(x), torch.where(u < p_real + p_generated, torch.ones_like(x), x))


def _sampler_kwargs(sampler_cfg) -> dict:
    get = (sampler_cfg.get if isinstance(sampler_cfg, dict) else lambda k, d: getattr(sampler_cfg, k, d))
    return dict(steps=int(get("steps", 16)), temperature=float(get("temperature", 1.0)),
                top_k=int(get("top_k", 0)), top_p=float(get("top_p", 1.0)), order=str(get("order", "random")))


def build_refills(generator: DiffusionLM, windows: torch.Tensor, fractions: torch.Tensor, sampler_cfg,
                  rng: torch.Generator | None = None, autocast_dtype: torch.dtype | None = None,
                  chunk_rows: int = REFILL_CHUNK_ROWS) -> torch.Tensor:
    """Mask exactly round(x_i * T) random positions of window i and let the generator re-fill them.

    windows (N, T) real ids, fractions (N,) in [0, 1] -> tokens (N, T). Rows with nothing
    masked are returned unchanged without running the generator; the others are sampled
    in batched chunks of `chunk_rows`.
    """
    if windows.dim() != 2 or fractions.shape != (windows.shape[0],):
        raise ValueError(f"windows must be (N, T) and fractions (N,), got {tuple(windows.shape)} and "
                         f"{tuple(fractions.shape)}")
    N, T = windows.shape
    k = _n_masked(fractions, T)
    rank = torch.rand(N, T, generator=rng).argsort(dim=1).argsort(dim=1)
    masked = rank < k[:, None]
    prompts = windows.masked_fill(masked, generator.mask_id)
    out = windows.clone()
    rows = (k > 0).nonzero().flatten()
    kwargs = _sampler_kwargs(sampler_cfg)
    was_training = generator.training
    generator.eval()
    try:
        for start in range(0, len(rows), chunk_rows):
            idx = rows[start:start + chunk_rows]
            out[idx] = sample(generator, prompts[idx], generator=rng, autocast_dtype=autocast_dtype, **kwargs).tokens
    finally:
        generator.train(was_training)
    return out


# --- figures ----------------------------------------------------------------------------------

def average_ranks(v: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, ties get the average of their ranks (float64)."""
    v = v.flatten()
    _, inverse, counts = torch.unique(v, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    return (ends - (counts.double() - 1) / 2)[inverse]


def auc(negatives: torch.Tensor, positives: torch.Tensor) -> float:
    """P(score of a positive > score of a negative) + 0.5 P(tie): Mann-Whitney U / (n_pos n_neg)."""
    n_neg, n_pos = negatives.numel(), positives.numel()
    if not n_neg or not n_pos:
        raise ValueError("AUC needs at least one negative and one positive")
    ranks = average_ranks(torch.cat([negatives.flatten(), positives.flatten()]).double())
    u = ranks[n_neg:].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    denom = (a.square().sum() * b.square().sum()).sqrt()
    return float((a * b).sum() / denom) if float(denom) > 0 else float("nan")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation: Pearson correlation of average (tie-aware) ranks; nan if one is constant."""
    if a.numel() != b.numel() or a.numel() < 2:
        raise ValueError("spearman needs two 1-D tensors of the same length >= 2")
    return pearson(average_ranks(a.double()), average_ranks(b.double()))


@torch.no_grad()
def judge_scores(judge: Judge, tokens: torch.Tensor, autocast_dtype: torch.dtype | None = None,
                 chunk_rows: int = SCORE_CHUNK_ROWS) -> torch.Tensor:
    return torch.cat([judge.score(tokens[i:i + chunk_rows], autocast_dtype)
                      for i in range(0, len(tokens), chunk_rows)])


def make_eval_set(generator: DiffusionLM, val_data: torch.Tensor, n_windows: int, sampler_cfg, seed: int = 0,
                  autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out (3n, T) tokens and (3n,) x: n real validation windows (x = 0), n fully generated
    (x = 1) and n validation windows re-filled at x ~ U(0, 1). Deterministic in seed."""
    T = generator.cfg.block_size
    check_length(val_data, T, "validation")
    windows = fixed_windows(val_data, 3 * n_windows, T, seed=seed)
    rng = torch.Generator().manual_seed(seed + 1)
    x = torch.cat([torch.zeros(n_windows), torch.ones(n_windows), torch.rand(n_windows, generator=rng)])
    tokens = build_refills(generator, windows, x, sampler_cfg, rng, autocast_dtype)
    return tokens, realised_fractions(x, T)


def judge_figures(judge: Judge, tokens: torch.Tensor, x: torch.Tensor, n_windows: int,
                  autocast_dtype: torch.dtype | None = None) -> dict:
    """Figures on an eval set laid out as make_eval_set's (real, generated, partial)."""
    s = judge_scores(judge, tokens, autocast_dtype)
    real, gen = s[:n_windows], s[n_windows:2 * n_windows]
    return {"auc": auc(real, gen), "spearman": spearman(s, x), "score_real": float(real.mean()),
            "score_generated": float(gen.mean()), "score_partial": float(s[2 * n_windows:].mean()),
            "n_windows": n_windows}


def evaluate_judge(judge: Judge, generator: DiffusionLM, val_data: torch.Tensor, n_windows: int, sampler_cfg,
                   seed: int = 0, autocast_dtype: torch.dtype | None = None) -> dict:
    """auc (real vs fully generated), spearman (score vs x), score_real, score_generated, n_windows
    on held-out windows of val_data (pass the validation split only)."""
    if judge.cfg.block_size != generator.cfg.block_size:
        raise ValueError(f"judge block {judge.cfg.block_size} differs from the generator's "
                         f"{generator.cfg.block_size}")
    tokens, x = make_eval_set(generator, val_data, n_windows, sampler_cfg, seed, autocast_dtype)
    return judge_figures(judge, tokens, x, n_windows, autocast_dtype)


def _json_safe(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def write_eval_json(directory, figures: dict) -> Path:
    path = Path(directory) / EVAL_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_json_safe(figures), indent=2))
    os.replace(tmp, path)
    return path


# --- loading ----------------------------------------------------------------------------------

def copy_generator_trunk(judge: Judge, generator: DiffusionLM) -> bool:
    """Copy the generator's trunk into the judge when the shapes allow (same width/depth/block).

    The usual reward-model recipe (initialise from the policy): the generator's trunk already
    knows the corpus's spelling and words, so the judge starts from useful features. The
    [CLS] embedding row, which the generator lacks, keeps its fresh initialisation.
    Returns False (and changes nothing) when the architectures differ.
    """
    src, dst = generator.trunk.state_dict(), judge.trunk.state_dict()
    if set(src) != set(dst):
        return False
    for k, v in src.items():
        if k == "wte.weight":
            if v.shape[1] != dst[k].shape[1] or v.shape[0] != dst[k].shape[0] - 1:
                return False
        elif v.shape != dst[k].shape:
            return False
    merged = dict(src)
    wte = dst["wte.weight"].clone()
    wte[:src["wte.weight"].shape[0]] = src["wte.weight"]
    merged["wte.weight"] = wte
    judge.trunk.load_state_dict(merged)
    return True


# --- training ---------------------------------------------------------------------------------

def train_judge(cfg, config_dict: dict, resume: bool = False, progress: bool = True, log=print,
                init_from_generator: bool | None = None) -> dict:
    """Train a judge per `cfg` (JudgeTrainConfig) against cfg.generator; checkpoint and eval.json in cfg.out.

    init_from_generator: copy the generator's trunk into the judge when the presets match
    (None: cfg.init_from_generator if the config has it, else True).
    """
    if cfg.p_real + cfg.p_generated > 1 + 1e-9:
        raise ConfigError(f"p_real ({cfg.p_real}) + p_generated ({cfg.p_generated}) must be at most 1")
    t_run = time.perf_counter()
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    generator, tokenizer, gen_ckpt = load_generator(cfg.generator)
    gen_path = str(Path(cfg.generator).resolve())
    corpus = load_corpus(cfg.corpus.path, cfg.corpus.cache_dir, cfg.corpus.val_fraction, tokenizer=tokenizer)
    T = generator.cfg.block_size
    check_length(corpus.train, T, "train")
    check_length(corpus.val, T, "validation")
    judge = Judge(judge_config(cfg.preset, tokenizer.n_chars, T))
    if init_from_generator is None:
        init_from_generator = bool(getattr(cfg, "init_from_generator", True))
    initialised = init_from_generator and copy_generator_trunk(judge, generator)
    optimizer = make_optimizer(judge, cfg.lr, cfg.weight_decay, (0.9, 0.99))
    autocast_dtype = resolve_precision(cfg.precision)
    data_gen = torch.Generator().manual_seed(cfg.seed)
    sample_gen = torch.Generator().manual_seed(cfg.seed + 1)
    B = cfg.batch_size
    n_real = min(B, round(B * cfg.p_real))
    n_pool_batch = B - n_real
    pool_size = cfg.refill_pool if n_pool_batch else 0
    refresh_n = max(1, pool_size // 4)
    p_gen_pool = min(1.0, cfg.p_generated / (1 - cfg.p_real)) if cfg.p_real < 1 else 0.0
    pool_tokens = torch.zeros(pool_size, T, dtype=torch.long)
    pool_x = torch.zeros(pool_size)
    pool_changed = torch.zeros(pool_size, T, dtype=torch.uint8)  # 1 where the refill differs from the real text
    token_weight = float(getattr(cfg, "token_loss_weight", 1.0))
    pool_ptr = 0
    start_iter, elapsed, refill_time, eval_time, history, figures = 0, 0.0, 0.0, 0.0, [], None
    windows_refilled = 0
    state: dict = {}

    resumed = resume and (out / "config.json").exists()
    if resumed:
        ckpt = load_checkpoint(out, expect_kind="judge")
        saved_gen = ckpt.state.get("generator")
        if saved_gen and saved_gen != gen_path:
            raise CheckpointError(f"{out} was trained against generator {saved_gen}, this run names {gen_path}; "
                                  f"resume with the same generator or use a new --out")
        CharTokenizer.from_dict(ckpt.vocab).check_same(tokenizer, "judge checkpoint vs generator")
        if ckpt.model_config != judge.cfg:
            raise CheckpointError(f"{out} holds a judge with model {ckpt.model_config.to_dict()}, this run builds "
                                  f"{judge.cfg.to_dict()}; resume with the same preset or use a new --out")
        ckpt.load_weights_into(judge)
        ckpt.load_optimizer_into(optimizer)
        rng = ckpt.load_tensors("rng")
        data_gen.set_state(rng["data"])
        sample_gen.set_state(rng["sample"])
        if pool_size:
            pool = ckpt.load_tensors("pool") if ckpt.has("pool") else {}
            if pool.get("tokens") is None or tuple(pool["tokens"].shape) != (pool_size, T) or "changed" not in pool:
                raise CheckpointError(f"{out} has no refill pool of {pool_size} windows of {T}; resume with the "
                                      f"same refill_pool / p_real or use a new --out")
            pool_tokens, pool_x, pool_ptr = pool["tokens"], pool["x"], int(pool["ptr"][0])
            pool_changed = pool["changed"]
        st = ckpt.state
        start_iter, elapsed = st["iter"], st["wall_time_s"]
        refill_time, eval_time = st.get("refill_time_s", 0.0), st.get("eval_time_s", 0.0)
        history, figures = st.get("history", []), st.get("figures")
        windows_refilled = st.get("windows_refilled", 0)
        initialised = st.get("init_from_generator", initialised)
        state = dict(st)
        log(f"resumed from {out} at iter {start_iter}")
    elif initialised:
        log(f"judge trunk initialised from the generator's ({cfg.preset} preset, same shapes)")
    t_start = time.perf_counter() - elapsed

    def refill(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        nonlocal refill_time, windows_refilled
        t0 = time.perf_counter()
        windows = random_windows(corpus.train, n, T, data_gen)
        x = sample_fractions(n, 0.0, p_gen_pool, data_gen)
        x = x.clamp_min(1.0 / T)  # pool windows hold generated text: at least one re-filled position
        tokens = build_refills(generator, windows, x, cfg.sampler, sample_gen, autocast_dtype)
        refill_time += time.perf_counter() - t0
        windows_refilled += n
        return tokens, realised_fractions(x, T), (tokens != windows).to(torch.uint8)

    if pool_size and not resumed:
        log(f"filling the refill pool: {pool_size} windows of {T} ({cfg.sampler.steps} sampler steps)")
        pool_tokens, pool_x, pool_changed = refill(pool_size)
        elapsed = time.perf_counter() - t_start

    t0 = time.perf_counter()
    eval_tokens, eval_x = make_eval_set(generator, corpus.val, cfg.eval_windows, cfg.sampler, cfg.seed,
                                        autocast_dtype)
    eval_set_time = time.perf_counter() - t0
    log(f"held-out eval set: {3 * cfg.eval_windows} validation windows ({eval_set_time:.1f} s to generate)")

    eval_time += eval_set_time

    def shares() -> dict:
        total = max(elapsed, 1e-9)
        return {"refill_time_s": refill_time, "refill_share": refill_time / total, "eval_time_s": eval_time,
                "eval_share": eval_time / total}

    def save(it: int) -> None:
        nonlocal state
        state = {"iter": it, "wall_time_s": elapsed, **shares(), "windows_refilled": windows_refilled,
                 "generator": gen_path, "generator_iter": gen_ckpt.state.get("iter"), "preset": cfg.preset,
                 "block_size": T, "init_from_generator": initialised, "figures": figures, "history": history,
                 "train_loss": train_loss}
        extra = {"rng": {"data": data_gen.get_state(), "sample": sample_gen.get_state()}}
        if pool_size:
            extra["pool"] = {"tokens": pool_tokens, "x": pool_x, "changed": pool_changed,
                             "ptr": torch.tensor([pool_ptr])}
        save_checkpoint(out, kind="judge", model_config=judge.cfg, vocab=tokenizer.to_dict(), weights=judge,
                        state=state, config=config_dict, optimizer=optimizer, extra_tensors=extra)
        write_eval_json(out, {**figures, "iter": it, "generator": gen_path, "seed": cfg.seed, **shares()})

    judge.train()
    bar = tqdm(range(start_iter, cfg.max_iters), initial=start_iter, total=cfg.max_iters,
               disable=not progress, desc="judge", dynamic_ncols=True, mininterval=5.0)
    train_loss = None
    for it in bar:
        if pool_size and it > 0 and it % cfg.refill_every == 0:
            idx = (pool_ptr + torch.arange(refresh_n)) % pool_size
            pool_tokens[idx], pool_x[idx], pool_changed[idx] = refill(refresh_n)
            pool_ptr = (pool_ptr + refresh_n) % pool_size
        time_fraction = elapsed / (60 * cfg.max_minutes) if cfg.max_minutes else 0.0
        lr = scheduled_lr(it, cfg.max_iters, cfg.lr, cfg.min_lr, cfg.warmup_iters, time_fraction)
        for group in optimizer.param_groups:
            group["lr"] = lr
        parts, targets, changed = [], [], []
        if n_real:
            parts.append(random_windows(corpus.train, n_real, T, data_gen))
            targets.append(torch.zeros(n_real))
            changed.append(torch.zeros(n_real, T))
        if n_pool_batch:
            pick = torch.randint(0, pool_size, (n_pool_batch,), generator=data_gen)
            parts.append(pool_tokens[pick])
            targets.append(pool_x[pick])
            changed.append(pool_changed[pick].float())
        x = torch.cat(parts)
        y = judge_targets(torch.cat(targets))
        with autocast_context("cpu", autocast_dtype):
            logits, tok_logits = judge(x, token_logits=True)
        seq_loss = F.binary_cross_entropy_with_logits(logits.float(), y)
        tok_loss = F.binary_cross_entropy_with_logits(tok_logits.float(), torch.cat(changed))
        loss = seq_loss + token_weight * tok_loss if token_weight else seq_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(judge.parameters(), cfg.grad_clip)
        optimizer.step()
        train_loss = float(seq_loss.detach())
        elapsed = time.perf_counter() - t_start
        bar.set_postfix(loss=f"{train_loss:.4f}", tok=f"{float(tok_loss.detach()):.4f}", refill=f"{refill_time / max(elapsed, 1e-9):.0%}")
        last = it + 1 == cfg.max_iters
        out_of_time = cfg.max_minutes is not None and elapsed > 60 * cfg.max_minutes
        if (it + 1) % cfg.eval_every == 0 or last or out_of_time:
            t0 = time.perf_counter()
            figures = judge_figures(judge, eval_tokens, eval_x, cfg.eval_windows, autocast_dtype)
            judge.train()
            eval_time += time.perf_counter() - t0
            elapsed = time.perf_counter() - t_start
            history.append({"iter": it + 1, **_json_safe(figures), "train_loss": train_loss, "wall_time_s": elapsed})
            log(f"iter {it + 1}: held-out AUC {figures['auc']:.4f}, Spearman {figures['spearman']:.4f}, "
                f"score real {figures['score_real']:.3f}, generated {figures['score_generated']:.3f}, "
                f"train BCE {train_loss:.4f}, {elapsed:.0f} s, refill generation "
                f"{refill_time / elapsed:.0%} of the time")
            save(it + 1)
        if out_of_time:
            log(f"stopping: max_minutes={cfg.max_minutes} reached at iter {it + 1}")
            break
    bar.close()
    total = time.perf_counter() - t_run
    if state:
        log(f"done: iter {state['iter']}, {state['wall_time_s']:.0f} s training wall time ({total:.0f} s in all), "
            f"refill generation {state['refill_share']:.0%} of it ({state['refill_time_s']:.0f} s, "
            f"{state['windows_refilled']} windows), held-out eval set {eval_set_time:.0f} s; checkpoint {out}, "
            f"figures {out / EVAL_FILE}")
    top = {k: state["figures"][k] for k in FIGURE_KEYS if state.get("figures")}  # also at top level
    return {**state, **top, "eval_set_time_s": eval_set_time, "total_time_s": total}


def evaluate_judge_cli(judge_ckpt, generator_ckpt=None, corpus_path=None, windows: int = 256, seed: int = 0) -> dict:
    """Held-out figures of a judge checkpoint; writes <judge_ckpt>/eval.json. The generator defaults
    to the one the judge was trained against, the corpus and sampler settings to its training config."""
    jckpt = load_checkpoint(judge_ckpt, expect_kind="judge")
    if generator_ckpt is None:
        generator_ckpt = jckpt.state.get("generator")
        if not generator_ckpt:
            raise CheckpointError(f"judge {judge_ckpt} does not record its generator; pass --generator")
        if not Path(generator_ckpt).exists() and jckpt.config.get("generator"):
            generator_ckpt = jckpt.config["generator"]
    generator, tokenizer, _ = load_generator(generator_ckpt)
    judge, _, _ = load_judge(judge_ckpt, tokenizer=tokenizer)
    if judge.cfg.block_size != generator.cfg.block_size:
        raise CheckpointError(f"judge {judge_ckpt} scores windows of {judge.cfg.block_size}, generator "
                              f"{generator_ckpt} writes {generator.cfg.block_size}")
    cfg = jckpt.config or {}
    corpus_cfg = cfg.get("corpus", {}) or {}
    corpus = load_corpus(corpus_path if corpus_path is not None else corpus_cfg.get("path"),
                         corpus_cfg.get("cache_dir"), corpus_cfg.get("val_fraction", 0.1), tokenizer=tokenizer)
    if windows < 2:
        raise ConfigError(f"--windows must be >= 2, got {windows}")
    autocast_dtype = resolve_precision(cfg.get("precision", "auto"))
    t0 = time.perf_counter()
    figures = evaluate_judge(judge, generator, corpus.val, windows, cfg.get("sampler", {}) or {}, seed,
                             autocast_dtype)
    figures = {**figures, "iter": jckpt.state.get("iter"), "generator": str(Path(generator_ckpt).resolve()),
               "seed": seed, "eval_time_s": time.perf_counter() - t0}
    write_eval_json(judge_ckpt, figures)
    return _json_safe(figures)
