"""The loop pretraining and judge training share (pure torch, no Ray).

Iterations from a resumed start to `max_iters`, a learning rate that follows
whichever of iterations or the wall-time budget is further along, a progress
bar, and an evaluation + checkpoint every `eval_every` iterations, at the last
one and when `max_minutes` runs out. The wall time of earlier sessions carries
over on resume, as do the optimizer state and the trainer's random streams, so
a resumed run takes exactly the steps of an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
from tqdm import tqdm

from ..models.checkpoint import Checkpoint

UNBOUNDED_ITERS = 10_000_000  # max_iters of a run that only its time budget (max_minutes) ends


def scheduled_lr(it: int, max_iters: int, lr: float, min_lr: float, warmup: int,
                 time_fraction: float = 0.0, shape: str = "cosine", hold: float = 0.0) -> float:
    """Linear warmup, then lr held for the first `hold` of the run, then a cosine or linear
    decay to min_lr; with a wall-time budget the schedule follows whichever of iterations or
    time is further along."""
    if it < warmup:
        return lr * (it + 1) / warmup
    progress = min(1.0, max(time_fraction, (it - warmup) / max(1, max_iters - warmup)))
    decayed = max(0.0, progress - hold) / (1.0 - hold)
    if shape == "linear":
        return lr - (lr - min_lr) * decayed
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * decayed))


class TrainingLoop:
    """cfg: max_iters, max_minutes, eval_every, lr, min_lr, warmup_iters (PretrainConfig, JudgeTrainConfig).
    rngs: the trainer's named random streams, saved in and restored from its checkpoints."""

    def __init__(self, cfg, optimizer, rngs: dict[str, torch.Generator], desc: str, log=print,
                 lr_shape: str = "cosine", lr_hold: float = 0.0):
        self.cfg, self.optimizer, self.rngs = cfg, optimizer, rngs
        self.desc, self.log = desc, log
        self.lr_shape, self.lr_hold = lr_shape, lr_hold
        self.start_iter, self.elapsed, self.history = 0, 0.0, []
        self._started = None

    def resume(self, ckpt: Checkpoint) -> dict:
        """Go on from `ckpt`: optimizer state, random streams, iteration, wall time, history. Returns its state."""
        ckpt.load_optimizer_into(self.optimizer)
        saved = ckpt.load_tensors("rng")
        for name, generator in self.rngs.items():
            generator.set_state(saved[name])
        st = ckpt.state
        self.start_iter, self.elapsed, self.history = st["iter"], st["wall_time_s"], st.get("history", [])
        self.log(f"resumed from {ckpt.path} at iter {self.start_iter}")
        return st

    def state(self, iters: int) -> dict:
        return {"iter": iters, "wall_time_s": self.elapsed}

    def rng_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"rng": {name: g.get_state() for name, g in self.rngs.items()}}

    def tick(self) -> float:
        """Wall time so far, earlier sessions included; the first call starts the clock."""
        if self._started is None:
            self._started = time.perf_counter() - self.elapsed
        self.elapsed = time.perf_counter() - self._started
        return self.elapsed

    def run(self, step: Callable[[int], dict], checkpoint: Callable[[int], None], progress: bool = True) -> None:
        """step(it) trains one iteration and returns the progress bar's figures; checkpoint(iters_done)
        evaluates and saves."""
        cfg = self.cfg
        if self._started is None:  # the clock starts now unless the trainer started it earlier
            self._started = time.perf_counter() - self.elapsed
        # with only a time budget (max_iters UNBOUNDED_ITERS) the bar counts iterations and minutes only
        total = None if cfg.max_minutes and cfg.max_iters >= UNBOUNDED_ITERS else cfg.max_iters
        desc = f"{self.desc} (at most {cfg.max_minutes:g} min)" if cfg.max_minutes else self.desc
        iters = range(self.start_iter, cfg.max_iters)
        bar = tqdm(iter(iters) if total is None else iters, initial=self.start_iter, total=total,
                   disable=not progress, desc=desc, dynamic_ncols=True, mininterval=5.0)
        for it in bar:
            time_fraction = self.elapsed / (60 * cfg.max_minutes) if cfg.max_minutes else 0.0
            lr = scheduled_lr(it, cfg.max_iters, cfg.lr, cfg.min_lr, cfg.warmup_iters, time_fraction,
                              self.lr_shape, self.lr_hold)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            figures = step(it)
            self.tick()
            bar.set_postfix(figures, refresh=False)
            last = it + 1 == cfg.max_iters
            out_of_time = cfg.max_minutes is not None and self.elapsed > 60 * cfg.max_minutes
            if (it + 1) % cfg.eval_every == 0 or last or out_of_time:
                checkpoint(it + 1)
            if out_of_time:
                self.log(f"stopping: max_minutes={cfg.max_minutes} reached at iter {it + 1}")
                break
        bar.close()
