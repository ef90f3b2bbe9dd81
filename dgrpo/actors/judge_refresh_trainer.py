"""JudgeTrainerActor: a thin Ray shell over JudgeRefresher (judge refresh, training/judge_refresh.py).

The driver forwards every trained step's scored batches by reference (`add_batches`) and asks
for a new judge version every judge_refresh.publish_every steps (`refresh`); the answer
carries the new judge's weights (which the driver broadcasts to the judge actors) and the
trainer's whole state, from which a restarted trainer goes on (`load_state`).
"""

from __future__ import annotations

import time
import warnings

import torch

from ..config import CorpusConfig, JudgeRefreshConfig
from ..corpus import CharTokenizer, load_corpus
from ..precision import describe_precision, pick_device, resolve_precision
from ..protocols import WeightSnapshot
from ..training.judge_refresh import refresher_from_checkpoint
from .references import fetch
from .telemetry import placement


class TrainerRestartedError(RuntimeError):
    """A call reached a restarted trainer before it got its state back (load_state)."""


class JudgeTrainerActor:
    def __init__(self, refresh_cfg: JudgeRefreshConfig, judge_checkpoint: str, corpus_cfg: CorpusConfig, vocab: dict,
                 seed: int = 0, precision: str = "auto", torch_threads: int = 1):
        import ray
        torch.set_num_threads(torch_threads)
        device = pick_device()
        c = corpus_cfg
        corpus = load_corpus(c.path, c.cache_dir, c.val_fraction, tokenizer=CharTokenizer.from_dict(vocab))
        self.refresher = refresher_from_checkpoint(judge_checkpoint, refresh_cfg, corpus, seed,
                                                   resolve_precision(precision, device), device)
        self.iters = refresh_cfg.iters_per_publish
        print(f"precision: judge trainer: {describe_precision(precision, device)}", flush=True)
        # Ray restarted this actor: it holds the initial judge until the driver sends its last state
        with warnings.catch_warnings():  # Ray's own property reads a deprecated one of its own
            warnings.simplefilter("ignore", DeprecationWarning)
            self.waiting_for_state = ray.get_runtime_context().was_current_actor_reconstructed

    def _check_state(self, what: str) -> None:
        if self.waiting_for_state:
            raise TrainerRestartedError(f"judge trainer restarted; {what} waits for load_state")

    def add_samples(self, tokens: torch.Tensor, generated: torch.Tensor) -> int:
        self._check_state("add_samples")
        return self.refresher.add_policy_samples(tokens, generated)

    def add_batches(self, refs: list, sizes: list[int]) -> int:
        """The policy samples of a trained step's scored batches (references; `sizes`: their samples).
        A batch lost with its node since is counted as seen and left out."""
        self._check_state("add_batches")
        return self._add_batches(refs, sizes)

    def _add_batches(self, refs: list, sizes: list[int]) -> int:
        batches, lost = fetch(refs)
        if lost:
            print(f"judge trainer: {len(lost)} scored batch(es) were lost with their node; going on without their "
                  f"{sum(sizes[i] for i in lost)} samples", flush=True)
            self.refresher.samples_seen += sum(sizes[i] for i in lost)
        if batches:
            self.refresher.add_policy_samples(torch.cat([b.rollout.tokens for b in batches]),
                                              torch.cat([b.rollout.reveal_step >= 0 for b in batches]))
        return self.refresher.buffer.filled

    def refresh(self) -> dict:
        """Train iters_per_publish steps into the next judge version -> its weights, metrics and the full state.
        With no policy samples yet (all dropped, or lost with a restart) it trains nothing and says so."""
        self._check_state("refresh")
        r = self.refresher
        metrics = r.train(self.iters) if r.buffer.filled else {"skipped": 1.0}
        return {"snapshot": r.snapshot(), "state": r.state(), "metrics": metrics, "version": r.version}

    def publish(self) -> WeightSnapshot:
        self._check_state("publish")
        return self.refresher.snapshot()

    def state(self) -> tuple[dict, dict]:
        self._check_state("state")
        return self.refresher.state()

    def load_state(self, restore: tuple) -> dict:
        """restore = (state, policy samples sent after it): the state of the last version, then the samples
        it had not seen, in the order they were sent: each (tokens, generated), or (refs, sizes) of scored
        batches (add_batches)."""
        t0 = time.perf_counter()
        state, samples = restore
        self.refresher.load_state(*state)
        for first, second in samples:
            if isinstance(first, torch.Tensor):
                self.refresher.add_policy_samples(first, second)
            else:
                self._add_batches(first, second)
        self.waiting_for_state = False
        return {"version": self.refresher.version, "load_s": time.perf_counter() - t0}

    def info(self) -> dict:
        r = self.refresher
        return {**placement(), "version": r.version, "buffer": r.buffer.filled, "samples_seen": r.samples_seen,
                "iters": r.iters, "device": str(r.device)}
