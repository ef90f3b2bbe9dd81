"""Judge refresh: keep training the judge against the current policy (pure torch, no Ray).

A judge that stays frozen while GRPO optimises against it is exploited: the policy
finds texts the judge scores as real that are not. The refresher keeps training
the judge on what the policy writes now, so an exploit stops paying once the judge
has seen it (the adversarial, GAN-like refresh). Each optimizer step sees a batch of

* real windows of the train split, target x = 0, drawn fresh every step (share p_real);
* recent policy samples from a bounded buffer, target x = the share of positions the
  policy wrote (1 for unconditional samples, the masked share for infills), with the
  written positions as the replaced-token labels (share p_policy);
* the refill pool stored in the judge's checkpoint (the base generator's refills it
  was trained on), so that it does not forget the base generator's mistakes (the rest).

The losses are the judge's own (training.judge.judge_loss, with the token-loss weight
it was trained with); the optimizer is AdamW at a constant learning rate. Each
`train(iters)` makes a new judge version. Before training it measures how well the
judge being replaced separates a fixed set of held-out validation windows from the
policy samples that arrived since the last version (samples it has never trained on):
auc_before near 0.5 means the policy's current texts pass as real to the judge that
scored them; auc_after is the same figure for the new judge, in-sample for the
policy samples (it has just trained on them).
"""

from __future__ import annotations

import json
import time

import torch

from ..config import JudgeRefreshConfig
from ..corpus import Corpus, fixed_windows, random_windows
from ..models.checkpoint import optimizer_from_tensors, optimizer_to_tensors
from ..models.judge import Judge, load_judge
from ..models.optim import make_optimizer
from ..protocols import WeightSnapshot
from .train_judge import RefillPool, auc, judge_loss, judge_scores

STATE_SETS = ("model", "optimizer", "buffer", "rng")  # the tensor sets of state()


def batch_split(cfg: JudgeRefreshConfig) -> tuple[int, int, int]:
    """Windows per judge batch: (real, policy samples, refills of the judge checkpoint's pool)."""
    B = cfg.batch_size
    n_real = round(B * cfg.p_real)
    n_policy = max(1, round(B * cfg.p_policy))
    return n_real, n_policy, max(0, B - n_real - n_policy)


class JudgeRefresher:
    """judge: the judge to go on training (its weights are version 0); refills: the refill pool of its
    checkpoint, or None (then the batches hold real windows and policy samples only: p_real + p_policy = 1)."""

    def __init__(self, judge: Judge, cfg: JudgeRefreshConfig, train_data: torch.Tensor, val_data: torch.Tensor,
                 refills: RefillPool | None, token_loss_weight: float, seed: int = 0,
                 autocast_dtype: torch.dtype | None = None, device: torch.device | str = "cpu"):
        self.n_real, self.n_policy, self.n_refill = batch_split(cfg)
        if self.n_refill and (refills is None or not refills.filled):
            raise ValueError(f"judge_refresh takes {self.n_refill} of every {cfg.batch_size} windows from the judge "
                             f"checkpoint's refill pool, but it has none; set judge_refresh.p_real + p_policy = 1")
        self.cfg, self.device, self.autocast_dtype = cfg, torch.device(device), autocast_dtype
        self.judge = judge.to(self.device).train().requires_grad_(True)
        self.T = T = judge.cfg.block_size
        self.train_data, self.refills, self.token_loss_weight = train_data, refills, token_loss_weight
        self.optimizer = make_optimizer(self.judge, cfg.lr, cfg.weight_decay, (0.9, 0.99))
        self.buffer = RefillPool(cfg.policy_buffer, T)
        self.eval_real = fixed_windows(val_data, cfg.eval_windows, T, seed=seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.version, self.iters, self.samples_seen = 0, 0, 0
        self.fresh = 0  # samples added since the last version: not yet trained on

    # -- data --------------------------------------------------------------------
    def add_policy_samples(self, tokens: torch.Tensor, generated: torch.Tensor) -> int:
        """tokens (N, T) policy samples, generated (N, T) True where the policy wrote the character."""
        if tokens.shape != generated.shape or tokens.dim() != 2 or tokens.shape[1] != self.T:
            raise ValueError(f"policy samples must be (N, {self.T}) tokens with a mask of the same shape, "
                             f"got {tuple(tokens.shape)} and {tuple(generated.shape)}")
        generated = generated.bool()
        self.buffer.replace_oldest(tokens.long(), generated.float().mean(dim=1), generated)
        self.fresh = min(self.fresh + len(tokens), self.buffer.filled)
        self.samples_seen += len(tokens)
        return self.buffer.filled

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens, x, changed) of one optimizer step: real windows, policy samples, refills."""
        T, g = self.T, self.generator
        tokens = [random_windows(self.train_data, self.n_real, T, g)]
        x, changed = [torch.zeros(self.n_real)], [torch.zeros(self.n_real, T)]
        for source, n in ((self.buffer, self.n_policy), (self.refills, self.n_refill)):
            if n:
                drawn_tokens, drawn_x, drawn_changed = source.draw(n, g)
                tokens.append(drawn_tokens)
                x.append(drawn_x)
                changed.append(drawn_changed)
        to = lambda parts: torch.cat(parts).to(self.device)  # noqa: E731
        return to(tokens), to(x), to(changed)

    # -- a version ------------------------------------------------------------------
    def separation(self, policy_tokens: torch.Tensor) -> dict[str, float]:
        """AUC of held-out real windows (negatives) vs policy samples (positives) and their mean scores."""
        real = judge_scores(self.judge, self.eval_real.to(self.device), self.autocast_dtype)
        policy = judge_scores(self.judge, policy_tokens.to(self.device), self.autocast_dtype)
        return {"auc": auc(real.cpu(), policy.cpu()), "score_real": float(real.mean()),
                "score_policy": float(policy.mean())}

    def train(self, iters: int) -> dict[str, float]:
        """`iters` optimizer steps, then the weights are the next version. Returns the figures of this version."""
        if not self.buffer.filled:
            raise ValueError("judge refresh has no policy samples to train on yet; add_policy_samples first")
        t0 = time.perf_counter()
        fresh = self.buffer.newest(min(self.fresh, self.cfg.eval_windows))
        before = self.separation(fresh) if len(fresh) else {}
        sums = {"loss": 0.0, "token_loss": 0.0}
        for _ in range(iters):
            loss, seq_loss, tok_loss = judge_loss(self.judge, *self.batch(), self.token_loss_weight,
                                                  self.autocast_dtype)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.judge.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
            sums["loss"] += float(seq_loss.detach())
            sums["token_loss"] += float(tok_loss.detach())
        after = self.separation(fresh) if len(fresh) else {}
        self.iters += iters
        self.version += 1
        self.fresh = 0
        return {"loss": sums["loss"] / max(iters, 1), "token_loss": sums["token_loss"] / max(iters, 1),
                **{f"{k}_before": v for k, v in before.items()}, **{f"{k}_after": v for k, v in after.items()},
                "fresh_samples": float(len(fresh)), "buffer": float(self.buffer.filled),
                "samples_seen": float(self.samples_seen), "iters": float(self.iters),
                "train_s": time.perf_counter() - t0}

    def snapshot(self) -> WeightSnapshot:
        return WeightSnapshot.from_module(self.judge, self.version)

    # -- state ----------------------------------------------------------------------
    def state(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
        """(tensor sets named in STATE_SETS, JSON-safe scalars): everything a resumed refresher needs."""
        opt_tensors, opt_meta = optimizer_to_tensors(self.optimizer)
        tensors = {"model": {k: v.detach().cpu().clone() for k, v in self.judge.state_dict().items()},
                   "optimizer": {k: v.clone() for k, v in opt_tensors.items()},  # else they alias the live state
                   "buffer": {k: v.clone() for k, v in self.buffer.tensors().items()},
                   "rng": {"generator": self.generator.get_state()}}
        meta = {"version": self.version, "iters": self.iters, "samples_seen": self.samples_seen, "fresh": self.fresh,
                "optimizer": opt_meta}
        return tensors, json.loads(json.dumps(meta))

    def load_state(self, tensors: dict[str, dict[str, torch.Tensor]], meta: dict) -> None:
        missing = [name for name in STATE_SETS if name not in tensors]
        if missing:
            raise ValueError(f"judge refresh state lacks {missing}; it was not written by JudgeRefresher.state()")
        self.judge.load_state_dict(tensors["model"])
        optimizer_from_tensors(self.optimizer, tensors["optimizer"], meta["optimizer"])
        if not self.buffer.load(tensors["buffer"]):
            raise ValueError(f"judge refresh state holds a buffer of shape {tuple(tensors['buffer']['tokens'].shape)}, "
                             f"this run keeps {len(self.buffer)} samples of {self.T}; resume with the same "
                             f"judge_refresh.policy_buffer")
        self.generator.set_state(tensors["rng"]["generator"])
        self.version, self.iters = int(meta["version"]), int(meta["iters"])
        self.samples_seen, self.fresh = int(meta["samples_seen"]), int(meta["fresh"])


def refresher_from_checkpoint(judge_checkpoint: str, cfg: JudgeRefreshConfig, corpus: Corpus, seed: int = 0,
                              autocast_dtype: torch.dtype | None = None,
                              device: torch.device | str = "cpu") -> JudgeRefresher:
    """A refresher of the judge in `judge_checkpoint` (`dgrpo judge train --out`), with the refill pool and
    token-loss weight it was trained with; corpus: the run's, in the generator's vocabulary."""
    judge, _, ckpt = load_judge(judge_checkpoint, tokenizer=corpus.tokenizer, device=device)
    refills = None
    if ckpt.has("pool"):
        saved = ckpt.load_tensors("pool")
        refills = RefillPool(*saved["tokens"].shape)
        refills.load(saved)
    return JudgeRefresher(judge, cfg, corpus.train, corpus.val, refills, ckpt.config.get("token_loss_weight", 1.0),
                          seed, autocast_dtype, device)
