"""Training and evaluation of the judge (pure torch, no Ray).

Data, built on the fly from a given generator checkpoint:

* a real window of the corpus's train split (held-out windows: validation split only);
* a fraction x in [0, 1] of its positions, exactly round(x * T) of them chosen at
  random, is replaced by [MASK] and re-filled by the generator through the
  sampler (dgrpo.models.sampler.sample, the same code GRPO rollouts use), so the
  judge learns the generator's own mistakes, in context;
* target g(x) = x (judge_targets) under binary cross-entropy with logits on the
  window logit, plus (weight cfg.token_loss_weight) a per-position BCE of the judge's token head against "this character differs
  from the real one" (ELECTRA's replaced-token detection): T labels per window
  instead of one.
* the judge's trunk starts as a copy of the generator's when the shapes match
  (same preset), the usual reward-model recipe; see copy_generator_trunk.

A judge trained from scratch on the window label alone memorises its pool of
refills (train AUC up, held-out AUC falling towards chance); the generator's trunk,
pooled per-position evidence and the token labels together learn fast instead
(docs/RESULTS.md, the judge).

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
"seen before = generated" and fails on held-out text. So each refill should be used
only a few times (cfg.refill_every), at the price of more time spent generating.

Figures on held-out validation windows (evaluate_judge): AUC of real (x = 0) vs
fully generated (x = 1) windows (Mann-Whitney, average ranks for ties), Spearman
rank correlation of the score with x over n real + n fully generated + n windows
with x ~ U(0, 1), and the mean scores of real and of generated windows. Computed
in torch (no sklearn / scipy at run time).

One file, longer than most: the refill data, the loss and the held-out evaluation must make windows the
same way, and read best side by side.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import ValidationError

from ..config import JudgeTrainConfig, SamplerConfig, format_errors
from ..corpus import CharTokenizer, check_length, fixed_windows, load_corpus, random_windows
from ..errors import ConfigError
from ..models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ..models.diffusion import DiffusionLM, load_generator
from ..models.judge import Judge, judge_config, load_judge
from ..models.optim import make_optimizer
from ..models.sampler import sample
from ..precision import autocast_context, resolve_precision
from .loop import TrainingLoop

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


def build_refills(generator: DiffusionLM, windows: torch.Tensor, fractions: torch.Tensor, sampler: SamplerConfig,
                  rng: torch.Generator | None = None, autocast_dtype: torch.dtype | None = None,
                  chunk_rows: int = REFILL_CHUNK_ROWS, temperatures: list[float] | None = None) -> torch.Tensor:
    """Mask exactly round(x_i * T) random positions of window i and let the generator re-fill them.

    windows (N, T) real ids, fractions (N,) in [0, 1] -> tokens (N, T). Rows with nothing
    masked are returned unchanged without running the generator; the others are sampled
    in batched chunks of `chunk_rows`, each at the sampler's temperature or, with `temperatures`, at one of
    those drawn at random per row.
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
    temps = [sampler.temperature] if not temperatures else list(temperatures)
    row_temp = torch.randint(len(temps), (N,), generator=rng) if len(temps) > 1 else torch.zeros(N, dtype=torch.long)
    was_training = generator.training
    generator.eval()
    try:
        for t_index, temperature in enumerate(temps):
            rows = ((k > 0) & (row_temp == t_index)).nonzero().flatten()
            settings = {**sampler.model_dump(), "temperature": temperature}
            for start in range(0, len(rows), chunk_rows):
                idx = rows[start:start + chunk_rows]
                out[idx] = sample(generator, prompts[idx], generator=rng, autocast_dtype=autocast_dtype,
                                  **settings).tokens
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


def make_eval_set(generator: DiffusionLM, val_data: torch.Tensor, n_windows: int, sampler: SamplerConfig, seed: int = 0,
                  autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out (3n, T) tokens and (3n,) x: n real validation windows (x = 0), n fully generated
    (x = 1) and n validation windows re-filled at x ~ U(0, 1). Deterministic in seed."""
    T = generator.cfg.block_size
    check_length(val_data, T, "validation")
    windows = fixed_windows(val_data, 3 * n_windows, T, seed=seed)
    rng = torch.Generator().manual_seed(seed + 1)
    x = torch.cat([torch.zeros(n_windows), torch.ones(n_windows), torch.rand(n_windows, generator=rng)])
    tokens = build_refills(generator, windows, x, sampler, rng, autocast_dtype)
    return tokens, realised_fractions(x, T)


def judge_figures(judge: Judge, tokens: torch.Tensor, x: torch.Tensor, n_windows: int,
                  autocast_dtype: torch.dtype | None = None) -> dict:
    """Figures on an eval set laid out as make_eval_set's (real, generated, partial)."""
    s = judge_scores(judge, tokens, autocast_dtype)
    real, gen = s[:n_windows], s[n_windows:2 * n_windows]
    return {"auc": auc(real, gen), "spearman": spearman(s, x), "score_real": float(real.mean()),
            "score_generated": float(gen.mean()), "score_partial": float(s[2 * n_windows:].mean()),
            "n_windows": n_windows}


def evaluate_judge(judge: Judge, generator: DiffusionLM, val_data: torch.Tensor, n_windows: int, sampler: SamplerConfig,
                   seed: int = 0, autocast_dtype: torch.dtype | None = None) -> dict:
    """auc (real vs fully generated), spearman (score vs x), score_real, score_generated, n_windows
    on held-out windows of val_data (pass the validation split only)."""
    if judge.cfg.block_size != generator.cfg.block_size:
        raise ValueError(f"judge block {judge.cfg.block_size} differs from the generator's "
                         f"{generator.cfg.block_size}")
    tokens, x = make_eval_set(generator, val_data, n_windows, sampler, seed, autocast_dtype)
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

class RefillPool:
    """The x > 0 windows of judge training: generator refills of train windows, reused a few
    times each because generating them is the expensive part; refresh the oldest quarter at a time.
    A ring: draws come from the entries filled so far (judge refresh fills its buffer of policy
    samples gradually)."""

    def __init__(self, size: int, T: int):
        self.tokens = torch.zeros(size, T, dtype=torch.long)
        self.x = torch.zeros(size)
        self.changed = torch.zeros(size, T, dtype=torch.uint8)  # 1 where the refill differs from the real text
        self.ptr = 0
        self.filled = 0

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def replace_oldest(self, tokens: torch.Tensor, x: torch.Tensor, changed: torch.Tensor) -> None:
        """Entries go round the ring in order; adding a batch at once or in parts leaves the same pool."""
        n = len(x)
        keep = min(n, len(self))  # more than fit: only the newest stay, where they would have landed
        idx = (self.ptr + n - keep + torch.arange(keep)) % len(self)
        self.tokens[idx], self.x[idx], self.changed[idx] = tokens[n - keep:], x[n - keep:], changed[n - keep:].to(torch.uint8)
        self.ptr = (self.ptr + n) % len(self)
        self.filled = min(len(self), self.filled + n)

    def newest(self, n: int) -> torch.Tensor:
        """The tokens of the n most recently added entries (n <= filled)."""
        return self.tokens[(self.ptr - 1 - torch.arange(n)) % len(self)]

    def draw(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pick = torch.randint(0, self.filled, (n,), generator=generator)
        return self.tokens[pick], self.x[pick], self.changed[pick].float()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"tokens": self.tokens, "x": self.x, "changed": self.changed, "ptr": torch.tensor([self.ptr]),
                "filled": torch.tensor([self.filled])}

    def load(self, saved: dict[str, torch.Tensor]) -> bool:
        """Take a saved pool; False (and nothing changed) when it does not have this pool's shape."""
        if saved.get("tokens") is None or saved["tokens"].shape != self.tokens.shape or "changed" not in saved:
            return False
        self.tokens, self.x, self.changed, self.ptr = saved["tokens"], saved["x"], saved["changed"], int(saved["ptr"][0])
        self.filled = int(saved["filled"][0]) if "filled" in saved else len(self)  # older pools were always full
        return True


def judge_loss(judge: Judge, tokens: torch.Tensor, x: torch.Tensor, changed: torch.Tensor, token_loss_weight: float,
               autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, window BCE, per-character BCE) of windows whose fraction x the generator wrote, `changed`
    (B, T) marking the characters it replaced: BCE of the window logit against g(x), plus
    token_loss_weight times the replaced-token BCE (see the module doc)."""
    with autocast_context(tokens.device, autocast_dtype):
        logits, tok_logits = judge(tokens, token_logits=True)
    seq_loss = F.binary_cross_entropy_with_logits(logits.float(), judge_targets(x))
    tok_loss = F.binary_cross_entropy_with_logits(tok_logits.float(), changed)
    loss = seq_loss + token_loss_weight * tok_loss if token_loss_weight else seq_loss
    return loss, seq_loss, tok_loss


class JudgeTrainer:
    """One judge training run per `cfg` (JudgeTrainConfig) against cfg.generator (see the module doc)."""

    def __init__(self, cfg, config_dict: dict, resume: bool = False, log=print,
                 init_from_generator: bool | None = None):
        if cfg.p_real + cfg.p_generated > 1 + 1e-9:
            raise ConfigError(f"p_real ({cfg.p_real}) + p_generated ({cfg.p_generated}) must be at most 1")
        self.t_run = time.perf_counter()
        self.cfg, self.config_dict, self.log = cfg, config_dict, log
        torch.manual_seed(cfg.seed)
        self.out = Path(cfg.out)
        self.generator, self.tokenizer, self.gen_ckpt = load_generator(cfg.generator)
        self.gen_path = str(Path(cfg.generator).resolve())
        self.corpus = load_corpus(cfg.corpus.path, cfg.corpus.cache_dir, cfg.corpus.val_fraction,
                                  tokenizer=self.tokenizer)
        self.T = T = self.generator.cfg.block_size
        check_length(self.corpus.train, T, "train")
        check_length(self.corpus.val, T, "validation")
        self.judge = Judge(judge_config(cfg.preset, self.tokenizer.n_chars, T))
        if init_from_generator is None:
            init_from_generator = cfg.init_from_generator
        self.initialised = init_from_generator and copy_generator_trunk(self.judge, self.generator)
        self.optimizer = make_optimizer(self.judge, cfg.lr, cfg.weight_decay, (0.9, 0.99))
        self.autocast_dtype = resolve_precision(cfg.precision)
        self.data_gen = torch.Generator().manual_seed(cfg.seed)
        self.sample_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.loop = TrainingLoop(cfg, self.optimizer, {"data": self.data_gen, "sample": self.sample_gen}, "judge", log)
        B = cfg.batch_size
        self.n_real = min(B, round(B * cfg.p_real))
        self.n_pool = B - self.n_real  # windows per batch drawn from the pool
        self.pool = RefillPool(cfg.refill_pool if self.n_pool else 0, T)
        self.p_gen_pool = min(1.0, cfg.p_generated / (1 - cfg.p_real)) if cfg.p_real < 1 else 0.0
        self.refill_time, self.eval_time, self.windows_refilled = 0.0, 0.0, 0
        self.figures, self.train_loss, self.state = None, None, {}

        resumed = resume and (self.out / "config.json").exists()
        if resumed:
            self._resume()
        elif self.initialised:
            log(f"judge trunk initialised from the generator's ({cfg.preset} preset, same shapes)")
        self.loop.tick()  # the clock starts: filling the pool and the eval set count as training time
        if len(self.pool) and not resumed:
            log(f"filling the refill pool: {len(self.pool)} windows of {T} ({cfg.sampler.steps} sampler steps)")
            self.pool.replace_oldest(*self.refill(len(self.pool)))
            self.loop.tick()
        t0 = time.perf_counter()
        self.eval_tokens, self.eval_x = make_eval_set(self.generator, self.corpus.val, cfg.eval_windows, cfg.sampler,
                                                      cfg.seed, self.autocast_dtype)
        self.eval_set_time = time.perf_counter() - t0
        log(f"held-out eval set: {3 * cfg.eval_windows} validation windows ({self.eval_set_time:.1f} s to generate)")
        self.eval_time += self.eval_set_time

    def _resume(self) -> None:
        out = self.out
        ckpt = load_checkpoint(out, expect_kind="judge")
        saved_gen = ckpt.state.get("generator")
        if saved_gen and saved_gen != self.gen_path:
            raise CheckpointError(f"{out} was trained against generator {saved_gen}, this run names {self.gen_path}; "
                                  f"resume with the same generator or use a new --out")
        CharTokenizer.from_dict(ckpt.vocab).check_same(self.tokenizer, "judge checkpoint vs generator")
        if ckpt.model_config != self.judge.cfg:
            raise CheckpointError(f"{out} holds a judge with model {ckpt.model_config.to_dict()}, this run builds "
                                  f"{self.judge.cfg.to_dict()}; resume with the same preset or use a new --out")
        ckpt.load_weights_into(self.judge)
        if len(self.pool) and not self.pool.load(ckpt.load_tensors("pool") if ckpt.has("pool") else {}):
            raise CheckpointError(f"{out} has no refill pool of {len(self.pool)} windows of {self.T}; resume with "
                                  f"the same refill_pool / p_real or use a new --out")
        st = ckpt.state
        self.refill_time, self.eval_time = st.get("refill_time_s", 0.0), st.get("eval_time_s", 0.0)
        self.figures, self.windows_refilled = st.get("figures"), st.get("windows_refilled", 0)
        self.initialised = st.get("init_from_generator", self.initialised)
        self.state = dict(st)
        self.loop.resume(ckpt)

    def refill(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """n fresh pool entries: (tokens, realised x, changed) of train windows re-filled by the generator."""
        t0 = time.perf_counter()
        windows = random_windows(self.corpus.train, n, self.T, self.data_gen)
        x = sample_fractions(n, 0.0, self.p_gen_pool, self.data_gen)
        x = x.clamp_min(1.0 / self.T)  # pool windows hold generated text: at least one re-filled position
        tokens = build_refills(self.generator, windows, x, self.cfg.sampler, self.sample_gen, self.autocast_dtype,
                               temperatures=self.cfg.refill_temperatures)
        self.refill_time += time.perf_counter() - t0
        self.windows_refilled += n
        return tokens, realised_fractions(x, self.T), (tokens != windows).to(torch.uint8)

    def shares(self) -> dict:
        total = max(self.loop.elapsed, 1e-9)
        return {"refill_time_s": self.refill_time, "refill_share": self.refill_time / total,
                "eval_time_s": self.eval_time, "eval_share": self.eval_time / total}

    def step(self, it: int) -> dict:
        cfg = self.cfg
        if len(self.pool) and it > 0 and it % cfg.refill_every == 0:
            self.pool.replace_oldest(*self.refill(max(1, len(self.pool) // 4)))
        parts, targets, changed = [], [], []
        if self.n_real:
            parts.append(random_windows(self.corpus.train, self.n_real, self.T, self.data_gen))
            targets.append(torch.zeros(self.n_real))
            changed.append(torch.zeros(self.n_real, self.T))
        if self.n_pool:
            tokens, x, ch = self.pool.draw(self.n_pool, self.data_gen)
            parts.append(tokens)
            targets.append(x)
            changed.append(ch)
        loss, seq_loss, tok_loss = judge_loss(self.judge, torch.cat(parts), torch.cat(targets), torch.cat(changed),
                                              cfg.token_loss_weight, self.autocast_dtype)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.judge.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.train_loss = float(seq_loss.detach())
        return {"loss": f"{self.train_loss:.4f}", "tok": f"{float(tok_loss.detach()):.4f}",
                "refill": f"{self.refill_time / max(self.loop.tick(), 1e-9):.0%}"}

    def checkpoint(self, iters: int) -> None:
        t0 = time.perf_counter()
        self.figures = judge_figures(self.judge, self.eval_tokens, self.eval_x, self.cfg.eval_windows,
                                     self.autocast_dtype)
        self.judge.train()
        self.eval_time += time.perf_counter() - t0
        elapsed = self.loop.tick()
        figures = self.figures
        self.loop.history.append({"iter": iters, **_json_safe(figures), "train_loss": self.train_loss,
                                  "wall_time_s": elapsed})
        self.log(f"iter {iters}: held-out AUC {figures['auc']:.4f}, Spearman {figures['spearman']:.4f}, "
                 f"score real {figures['score_real']:.3f}, generated {figures['score_generated']:.3f}, "
                 f"train BCE {self.train_loss:.4f}, {elapsed:.0f} s, refill generation "
                 f"{self.refill_time / elapsed:.0%} of the time")
        self.save(iters)

    def save(self, iters: int) -> None:
        cfg = self.cfg
        self.state = {**self.loop.state(iters), **self.shares(), "windows_refilled": self.windows_refilled,
                      "generator": self.gen_path, "generator_iter": self.gen_ckpt.state.get("iter"),
                      "preset": cfg.preset, "block_size": self.T, "init_from_generator": self.initialised,
                      "figures": self.figures, "history": self.loop.history, "train_loss": self.train_loss}
        extra = self.loop.rng_tensors()
        if len(self.pool):
            extra["pool"] = self.pool.tensors()
        save_checkpoint(self.out, kind="judge", model_config=self.judge.cfg, vocab=self.tokenizer.to_dict(),
                        weights=self.judge, state=self.state, config=self.config_dict, optimizer=self.optimizer,
                        extra_tensors=extra)
        write_eval_json(self.out, {**self.figures, "iter": iters, "generator": self.gen_path, "seed": cfg.seed,
                                   **self.shares()})

    def run(self, progress: bool = True) -> dict:
        self.judge.train()
        self.loop.run(self.step, self.checkpoint, progress)
        total = time.perf_counter() - self.t_run
        state = self.state
        if state:
            self.log(f"done: iter {state['iter']}, {state['wall_time_s']:.0f} s training wall time ({total:.0f} s in "
                     f"all), refill generation {state['refill_share']:.0%} of it ({state['refill_time_s']:.0f} s, "
                     f"{state['windows_refilled']} windows), held-out eval set {self.eval_set_time:.0f} s; "
                     f"checkpoint {self.out}, figures {self.out / EVAL_FILE}")
        top = {k: state["figures"][k] for k in FIGURE_KEYS if state.get("figures")}  # also at top level
        return {**state, **top, "eval_set_time_s": self.eval_set_time, "total_time_s": total}


def train_judge(cfg, config_dict: dict, resume: bool = False, progress: bool = True, log=print,
                init_from_generator: bool | None = None) -> dict:
    """Train a judge per `cfg` (JudgeTrainConfig) against cfg.generator; checkpoint and eval.json in cfg.out.

    init_from_generator: copy the generator's trunk into the judge when the presets match
    (None: cfg.init_from_generator).
    """
    return JudgeTrainer(cfg, config_dict, resume, log, init_from_generator).run(progress)


def evaluate_judge_cli(judge_ckpt, generator_ckpt=None, corpus_path=None, windows: int = 256, seed: int = 0,
                       out=None, precision: str | None = None) -> dict:
    """Held-out figures of a judge checkpoint, written as JSON to `out` if given. The generator defaults
    to the one the judge was trained against, the corpus, sampler settings and precision to its training config."""
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
    try:  # the settings the judge was trained with, validated as they were then
        trained = JudgeTrainConfig.model_validate({**jckpt.config, "generator": str(generator_ckpt)})
    except ValidationError as e:
        raise CheckpointError(f"judge {judge_ckpt} stores a training config this dgrpo cannot read:\n"
                              f"{format_errors(e)}") from None
    c = trained.corpus
    corpus = load_corpus(corpus_path if corpus_path is not None else c.path, c.cache_dir, c.val_fraction,
                         tokenizer=tokenizer)
    if windows < 2:
        raise ConfigError(f"--windows must be >= 2, got {windows}")
    autocast_dtype = resolve_precision(precision or trained.precision)
    t0 = time.perf_counter()
    figures = evaluate_judge(judge, generator, corpus.val, windows, trained.sampler, seed, autocast_dtype)
    figures = {**figures, "iter": jckpt.state.get("iter"), "generator": str(Path(generator_ckpt).resolve()),
               "seed": seed, "eval_time_s": time.perf_counter() - t0}
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(_json_safe(figures), indent=2))
        os.replace(tmp, path)
    return _json_safe(figures)
