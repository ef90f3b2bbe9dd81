"""The GRPO learner: policy, frozen reference, AdamW, and one update per call (pure torch).

One `train(batches)` call is one GRPO step, in four named parts:

1. `prepare`: stack the scored rollouts; per group of k samples compute advantages and mark the groups whose
   rewards are all equal (no signal); choose the replay rows: every (sample, denoising step) that revealed tokens,
   or `replay_steps` random steps per sample; turn the rollouts' recorded log-probs into per-token shares of each
   trajectory (a token's own log-prob plus an equal part of its step's selection term, models/trajectory.py).
   With grpo.reference_on=rollout the rollout workers chose the rows (from each request's seed) and replayed the
   reference on them right after sampling (actors/rollout.py): the rows and the reference's terms come with the
   batches, and the learner uses exactly those rows.
2. `reference_pass`: without gradients, the reference policy's shares on those rows (unless the batches
   brought them) and, if
   `old_logprob = "recompute"`, the current policy's (the rollout's then enter only through a truncated
   importance weight). From them `kl_seq`, the KL of the step's trajectories to the reference per sequence:
   exact in both reveal orders (under confidence order it holds the choice of positions), an unbiased estimate
   when steps are subsampled. The KL budget (`kl_target`, kl_control.py) steers kl_coef by it, so the budget
   holds the same KL that `dgrpo evaluate` measures.
3. `update`: for `epochs` passes over shuffled minibatches of the samples of groups with signal, replay the rows
   with gradients and backpropagate `grpo.token_loss` chunk by chunk (PPO-clip surrogate on the ratio of shares,
   KL penalty on the same shares, weights fixed by the loss aggregation); clip the gradient norm; AdamW step
   (skipped, and counted in `nonfinite_updates`, when the loss or gradient is not finite).
4. `statistics`: the step's metrics. The weights are now version v + 1 (unless no update was applied); every
   `reference_reset_every` steps the reference becomes a copy of them.

Why shares: the selection term belongs to a step, the surrogate to tokens. Spreading it evenly over the step's
tokens keeps the token-level PPO machinery (clip, aggregation options) while the shares of a trajectory sum to
its log-likelihood: per-token log-ratios sum to the trajectory's log-ratio (so `kl_seq` with k1 is the exact
trajectory KL estimate), and at ratio 1 the surrogate's gradient is the exact policy gradient of the trajectory.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch

from ..models.sampler import RevealRule
from ..models.trajectory import (ReplayRows, replay_rows, row_logprobs, subsample_scale, token_shares,
                                 trajectory_step_logprobs)
from ..protocols import ScoredBatch, WeightSnapshot
from . import grpo
from .kl_control import AdaptiveKLController


@dataclass
class StackedBatch:
    tokens: torch.Tensor  # (N, T)
    reveal_step: torch.Tensor  # (N, T)
    behaviour: torch.Tensor  # (N, T) recorded sampler log-probs of the revealed tokens
    selection: torch.Tensor  # (N, S) recorded log-probs of each step's choice of positions
    rewards: torch.Tensor  # (N,)
    group: torch.Tensor  # (N,) global group id, rows of a group contiguous
    staleness: torch.Tensor  # (N,) learner version - generating version
    reveal_rank: torch.Tensor  # (N, T) order of each position among its step's reveals (empty if not recorded)
    steps: int
    sampling: dict  # temperature, top_k, top_p and the reveal rule: what the replay must reproduce
    # the rows the workers chose and the reference's terms on them (grpo.reference_on=rollout); None otherwise
    replay_mask: torch.Tensor | None = None  # (N, S) bool
    ref_tokens: torch.Tensor | None = None  # (N, T)
    ref_selection: torch.Tensor | None = None  # (N, S)


SAMPLING_KEYS = ("temperature", "top_k", "top_p", "order", "random_reveal", "reveal_temperature", "reveal_threshold")


def stack_batches(batches: list[ScoredBatch], learner_version: int) -> StackedBatch:
    if not batches:
        raise ValueError("train() needs at least one scored batch")
    first = batches[0].rollout
    settings = lambda r: (r.steps,) + tuple(getattr(r, k) for k in SAMPLING_KEYS)  # noqa: E731
    for b in batches:
        if settings(b.rollout) != settings(first):
            raise ValueError(f"scored batches were sampled with different sampler settings ({settings(b.rollout)} "
                             f"and {settings(first)}); one GRPO step must use one sampling distribution")
        b.validate()
    groups, total = [], 0
    for b in batches:
        groups.append(b.rollout.group_index + total)
        total += b.rollout.num_groups
    group = torch.cat(groups)
    order = torch.argsort(group, stable=True)
    cat = lambda f: torch.cat([f(b) for b in batches])[order]  # noqa: E731

    def selection(b: ScoredBatch) -> torch.Tensor:  # older messages carry none: 0, exact under random order
        r = b.rollout
        return r.selection if r.selection.numel() else torch.zeros(r.num_samples, r.steps)

    def reveal_rank(b: ScoredBatch) -> torch.Tensor:  # only gumbel_confidence needs it (validate checks)
        r = b.rollout
        return r.reveal_rank if r.reveal_rank.numel() else torch.full_like(r.reveal_step, -1)

    with_terms = [b.rollout.has_reference_terms for b in batches]
    if any(with_terms) and not all(with_terms):
        raise ValueError("some rollout batches of the step carry the reference's terms and others do not; the "
                         "workers' requests must all agree with grpo.reference_on")
    terms = {}
    if all(with_terms):
        terms = {"replay_mask": cat(lambda b: b.rollout.replay_mask),
                 "ref_tokens": cat(lambda b: b.rollout.reference_logprobs),
                 "ref_selection": cat(lambda b: b.rollout.reference_selection)}
    settings = {k: getattr(first, k) for k in SAMPLING_KEYS}
    return StackedBatch(
        tokens=cat(lambda b: b.rollout.tokens), reveal_step=cat(lambda b: b.rollout.reveal_step),
        behaviour=cat(lambda b: b.rollout.logprobs), selection=cat(selection),
        rewards=cat(lambda b: b.rewards.float()), group=group[order],
        staleness=cat(lambda b: torch.full((b.num_samples,), learner_version - b.rollout.policy_version)),
        reveal_rank=cat(reveal_rank), steps=first.steps,
        sampling={"temperature": first.temperature, "top_k": first.top_k, "top_p": first.top_p,
                  "rule": RevealRule.of({**settings, "steps": first.steps})}, **terms)


def revealed_mask(reveal_step: torch.Tensor, rows: ReplayRows, steps: int) -> torch.Tensor:
    """(N, T) tokens that belong to one of the selected replay rows."""
    selected = torch.zeros(reveal_step.shape[0], steps, dtype=torch.bool, device=reveal_step.device)
    selected[rows.sample_idx, rows.step_idx] = True
    return (reveal_step >= 0) & selected.gather(1, reveal_step.clamp_min(0))


@dataclass
class StepData:
    """One GRPO step's tensors on the learner's device; `reference_pass` fills ref, old and importance."""
    tokens: torch.Tensor  # (N, T)
    reveal: torch.Tensor  # (N, T) reveal steps
    reveal_rank: torch.Tensor  # (N, T) order among a step's reveals
    rows: ReplayRows  # the (sample, step) rows replayed
    mask: torch.Tensor  # (N, T) tokens of those rows
    scale: torch.Tensor  # (N,) steps with tokens / steps replayed (trajectory.subsample_scale)
    behaviour: torch.Tensor  # (N, T) the rollouts' shares
    behaviour_tokens: torch.Tensor  # (N, T) the rollouts' token log-probs
    behaviour_selection: torch.Tensor  # (N, S)
    advantages: torch.Tensor  # (N,)
    keep: torch.Tensor  # (N,) bool: in a group with signal
    fresh: torch.Tensor  # (N,) bool: sampled by the weights being trained
    steps: int
    sampling: dict
    ref_terms: tuple | None = None  # the reference's (N, T) token log-probs and (N, S) selection terms, if sent
    ref: torch.Tensor | None = None  # (N, T) the reference's shares
    old: torch.Tensor | None = None  # (N, T) PPO's old shares
    old_surrogate: torch.Tensor | None = None  # (N, T) the same with the selection terms weighted down
    importance: torch.Tensor | None = None  # (N, T) truncated importance weight (recompute mode)
    ref_selection: torch.Tensor | None = None  # (N, S) the reference's selection terms
    old_selection: torch.Tensor | None = None  # (N, S) PPO's old policy's selection terms
    old_from_update: bool = False  # recompute mode, one update: the update's own forward gives old (reference_pass)

    def subset(self, keep: torch.Tensor) -> "StepData":
        """The samples where `keep` holds, with their rows renumbered."""
        kept = keep.nonzero().flatten()
        position = torch.full((len(keep),), -1, dtype=torch.long, device=keep.device)
        position[kept] = torch.arange(len(kept), device=keep.device)
        row_kept = keep[self.rows.sample_idx]
        rows = ReplayRows(position[self.rows.sample_idx[row_kept]], self.rows.step_idx[row_kept])
        pick = lambda t: None if t is None else t[kept]  # noqa: E731
        return StepData(self.tokens[kept], self.reveal[kept], self.reveal_rank[kept], rows, self.mask[kept],
                        self.scale[kept],
                        self.behaviour[kept], self.behaviour_tokens[kept], self.behaviour_selection[kept],
                        self.advantages[kept], self.keep[kept],
                        self.fresh[kept], self.steps, self.sampling,
                        None if self.ref_terms is None else tuple(t[kept] for t in self.ref_terms),
                        pick(self.ref), pick(self.old), pick(self.old_surrogate), pick(self.importance),
                        pick(self.ref_selection), pick(self.old_selection), self.old_from_update)


@dataclass
class UpdateSums:
    """Running sums of one step's update, over the replayed tokens of every minibatch and epoch."""
    loss: float = 0.0
    pg_loss: float = 0.0
    kl: float = 0.0
    entropy: float = 0.0
    ratio: float = 0.0
    clipped: float = 0.0
    tokens: float = 0.0
    ratio_max: float = 0.0
    grad_norms: list = field(default_factory=list)
    nonfinite: int = 0
    # the first minibatch, before any update: new shares against the sampler's, on fresh samples and on all
    first_ratio_dev: float = 0.0
    first_gap: dict = field(default_factory=lambda: {"fresh": 0.0, "fresh_tokens": 0.0, "all": 0.0,
                                                     "all_tokens": 0.0})

    @torch.no_grad()
    def add(self, out, tl: grpo.TokenLoss, weights: torch.Tensor, targets: torch.Tensor) -> None:
        t = targets.float()
        self.loss += float(tl.loss.detach())
        self.pg_loss += float((weights * tl.pg * t).sum())
        self.kl += float((tl.kl * t).sum())
        self.entropy += float((out.entropy * t).sum())
        self.ratio += float((tl.ratio * t).sum())
        self.clipped += float((tl.clipped.float() * t).sum())
        self.tokens += float(t.sum())
        self.ratio_max = max(self.ratio_max, float((tl.ratio * t).max()))

    @torch.no_grad()
    def add_first(self, tl: grpo.TokenLoss, new: torch.Tensor, behaviour: torch.Tensor, targets: torch.Tensor,
                  fresh: torch.Tensor) -> None:
        t = targets.float()
        t_fresh = t * fresh[:, None]
        self.first_ratio_dev = max(self.first_ratio_dev, float(((tl.ratio - 1).abs() * t_fresh).max()))
        gap = (new - behaviour).abs()
        self.first_gap["fresh"] += float((gap * t_fresh).sum())
        self.first_gap["fresh_tokens"] += float(t_fresh.sum())
        self.first_gap["all"] += float((gap * t).sum())
        self.first_gap["all_tokens"] += float(t.sum())


class LearnerCore:
    def __init__(self, policy: torch.nn.Module, grpo_cfg, seed: int = 0, device: str = "cpu",
                 autocast_dtype: torch.dtype | None = None, reference: torch.nn.Module | None = None):
        self.cfg = grpo_cfg
        self.device = torch.device(device)
        self.policy = policy.to(self.device).train()
        self.reference = copy.deepcopy(policy) if reference is None else reference.to(self.device)
        self.reference.eval().requires_grad_(False)
        self.autocast_dtype = autocast_dtype
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=grpo_cfg.lr, betas=tuple(grpo_cfg.betas),
                                           weight_decay=grpo_cfg.weight_decay)
        self.generator = torch.Generator().manual_seed(seed)
        self.version = 0
        self.step = 0
        self.kl_controller = (AdaptiveKLController(grpo_cfg.kl_coef, grpo_cfg.kl_target, grpo_cfg.kl_horizon)
                              if grpo_cfg.kl_target is not None else None)
        self.reference_resets = 0

    @property
    def vocab_size(self) -> int:
        return self.policy.mask_id + 1

    @property
    def kl_coef(self) -> float:
        return self.kl_controller.coef if self.kl_controller is not None else self.cfg.kl_coef

    # -- weights ---------------------------------------------------------
    def snapshot(self) -> WeightSnapshot:
        return WeightSnapshot.from_module(self.policy, self.version)

    # -- one GRPO step ---------------------------------------------------
    def train(self, batches: list[ScoredBatch]) -> dict[str, float]:
        t0 = time.perf_counter()
        data, metrics = self.prepare(batches)
        metrics.update(self.reference_pass(data))
        kl_coef = self.kl_coef  # this step's; kl_seq steers the next step's
        metrics["kl_coef"] = kl_coef
        if bool(data.keep.any()):
            trained = data.subset(data.keep)
            sums = self.update(trained, kl_coef)
            if data.old_from_update:  # the update's forward gave pi_old on the samples it trained
                for name in ("old", "old_surrogate", "importance", "old_selection"):
                    getattr(data, name)[data.keep] = getattr(trained, name)
                metrics.update(self.old_policy_metrics(data))
            metrics.update(self.statistics(sums, data))
        else:
            metrics["skipped_update"] = 1.0
        if self.kl_controller is not None:
            self.kl_controller.update(metrics["kl_seq"], self.step)
        if metrics["skipped_update"] == 0.0:
            self.version += 1
        self.end_step(metrics)
        metrics["learn_s"] = time.perf_counter() - t0
        return metrics

    def prepare(self, batches: list[ScoredBatch]) -> tuple[StepData, dict]:
        """Stack the batches; advantages, the groups with signal, the replay rows and the behaviour shares."""
        cfg, dev = self.cfg, self.device
        stacked = stack_batches(batches, self.version)
        k = int(torch.bincount(stacked.group)[0])
        rewards = stacked.rewards
        if cfg.diversity_coef > 0:
            similarity = grpo.group_similarity(stacked.tokens, k, cfg.diversity_ngram, self.vocab_size)
            rewards = rewards - cfg.diversity_coef * similarity
        rewards_gk = rewards.view(-1, k)
        advantages = grpo.group_advantages(rewards_gk, cfg.advantage, cfg.adv_eps).flatten()
        zero_std = grpo.zero_std_groups(rewards_gk)
        keep_groups = ~zero_std if cfg.skip_zero_std_groups else torch.ones_like(zero_std)
        r = stacked.rewards
        metrics = {
            "reward_mean": float(r.mean()), "reward_std": float(r.std(unbiased=False)),
            "reward_min": float(r.min()), "reward_max": float(r.max()),
            "zero_std_ratio": float(zero_std.float().mean()), "num_samples": float(len(r)),
            "num_groups": float(len(zero_std)), "group_size": float(k),
            "staleness_mean": float(stacked.staleness.float().mean()),
            "staleness_max": float(stacked.staleness.max()),
        }
        if cfg.diversity_coef > 0:
            metrics.update(group_similarity=float(similarity.mean()), shaped_reward_mean=float(rewards.mean()))
        tokens, reveal = stacked.tokens.to(dev), stacked.reveal_step.to(dev)
        selection = stacked.selection.to(dev)
        ref_terms = None
        if cfg.reference_on_rollout:
            if stacked.replay_mask is None:
                raise ValueError("grpo.reference_on=rollout: the learner expects every rollout batch to carry the "
                                 "reference's terms (RolloutBatch.replay_mask, reference_logprobs, "
                                 "reference_selection), but this step's batches have none; were they sampled by "
                                 "requests with reference_terms? Set grpo.reference_on=learner to replay the "
                                 "reference here")
            rows = self.sent_rows(stacked.replay_mask.to(dev), reveal, stacked.steps)
            ref_terms = (stacked.ref_tokens.to(dev), stacked.ref_selection.to(dev))
        else:
            rows = replay_rows(reveal, stacked.steps, cfg.replay_steps, self.generator)
        data = StepData(
            tokens=tokens, reveal=reveal, reveal_rank=stacked.reveal_rank.to(dev), rows=rows, mask=revealed_mask(reveal, rows, stacked.steps),
            scale=subsample_scale(reveal, rows, stacked.steps),
            behaviour=token_shares(stacked.behaviour.to(dev), selection, reveal),
            behaviour_tokens=stacked.behaviour.to(dev), behaviour_selection=selection,
            advantages=advantages.to(dev), keep=keep_groups.repeat_interleave(k).to(dev),
            fresh=(stacked.staleness == 0).to(dev), steps=stacked.steps, sampling=stacked.sampling,
            ref_terms=ref_terms)
        return data, metrics

    def sent_rows(self, mask: torch.Tensor, reveal: torch.Tensor, steps: int) -> ReplayRows:
        """The replay rows the workers chose, checked against grpo.replay_steps: each sample replays that many
        of its steps that revealed tokens (all of them if fewer, or if replay_steps is None)."""
        s_range = torch.arange(steps, device=reveal.device)
        with_tokens = (reveal[:, None, :] == s_range[None, :, None]).any(-1).sum(1)
        want = with_tokens if self.cfg.replay_steps is None else with_tokens.clamp_max(self.cfg.replay_steps)
        bad = mask.sum(1) != want
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(f"grpo.reference_on=rollout: sample {i} of the step brings {int(mask[i].sum())} replay "
                             f"rows, but grpo.replay_steps={self.cfg.replay_steps} asks for {int(want[i])}; the "
                             "workers' requests and the learner must use the same grpo.replay_steps")
        return ReplayRows.from_mask(mask)

    @torch.no_grad()
    def reference_pass(self, data: StepData) -> dict:
        """The reference's shares (and in recompute mode the current policy's) on the replay rows; `kl_seq`."""
        cfg, metrics = self.cfg, {}
        replay = lambda model, rows=data.rows: trajectory_step_logprobs(  # noqa: E731
            model, data.tokens, data.reveal, data.steps, reveal_rank=data.reveal_rank, rows=rows,
            rows_per_chunk=cfg.replay_rows_per_chunk, autocast_dtype=self.autocast_dtype, **data.sampling)
        if data.ref_terms is not None:  # the rollout workers replayed the reference
            (ref_tokens, ref_selection), metrics["ref_replay_s"] = data.ref_terms, 0.0
        else:
            t_ref = time.perf_counter()
            ref_tokens, ref_selection = replay(self.reference)
            metrics["ref_replay_s"] = time.perf_counter() - t_ref
        data.ref_selection = ref_selection
        data.ref = token_shares(ref_tokens, ref_selection, data.reveal)
        if cfg.old_logprob == "recompute":
            # with one update, its forward runs the same weights: its detached shares are pi_old on the samples it
            # trains (update(), fill_old); only the samples it leaves out (groups without signal) are replayed here
            data.old_from_update = self.old_from_update(data)
            rows = data.rows
            if data.old_from_update:
                left_out = ~data.keep[rows.sample_idx]
                rows = ReplayRows(rows.sample_idx[left_out], rows.step_idx[left_out])
            old_tokens, data.old_selection = torch.zeros_like(ref_tokens), torch.zeros_like(ref_selection)
            metrics["old_replay_s"] = 0.0
            if rows.sample_idx.numel():
                t_old = time.perf_counter()
                self.policy.eval()
                old_tokens, data.old_selection = replay(self.policy, rows)
                self.policy.train()
                metrics["old_replay_s"] = time.perf_counter() - t_old
            data.old = token_shares(old_tokens, data.old_selection, data.reveal)
            data.old_surrogate = token_shares(old_tokens, data.old_selection, data.reveal, cfg.selection_weight)
            data.importance = grpo.truncated_importance_weight(data.old, data.behaviour, cfg.tis_cap)
            if data.old_from_update:
                return metrics  # kl_seq once the update has given pi_old on the rest (train())
        else:
            data.old, data.old_selection = data.behaviour, data.behaviour_selection
            data.old_surrogate = token_shares(data.behaviour_tokens, data.old_selection, data.reveal,
                                              cfg.selection_weight)
        metrics.update(self.old_policy_metrics(data))
        return metrics

    def old_from_update(self, data: StepData) -> bool:
        """Whether recompute mode can take pi_old from the update's own forward instead of a replay of its own:
        one optimizer step over the samples it trains (no weight changes before the last chunk's forward) and
        no dropout (the update's train-mode forward is then the policy's eval-mode forward)."""
        one_update = self.cfg.epochs == 1 and 0 < int(data.keep.sum()) <= self.cfg.minibatch_size
        rates = [m.p if isinstance(m, torch.nn.Dropout) else getattr(m, "dropout", 0.0) for m in self.policy.modules()]
        no_dropout = not any(r > 0 for r in rates if isinstance(r, float))
        return one_update and no_dropout

    @torch.no_grad()
    def old_policy_metrics(self, data: StepData) -> dict:
        """pi_old's KL to the reference on every sample of the step (`kl_seq`, its selection part) and, in
        recompute mode, its gap to the rollouts' log-probs and the mean truncated importance weight."""
        kl_seq = grpo.sequence_kl(data.old, data.ref, data.mask, data.scale)
        replayed = torch.zeros_like(data.ref_selection, dtype=torch.bool)
        replayed[data.rows.sample_idx, data.rows.step_idx] = True
        kl_selection = torch.where(replayed, data.old_selection - data.ref_selection, 0.0).sum(1) * data.scale
        metrics = {"kl_seq": float(kl_seq.mean()), "kl_seq_selection": float(kl_selection.mean())}
        if self.cfg.old_logprob == "recompute":
            gap = (data.old - data.behaviour).abs()
            metrics["logp_lag"] = float(grpo.masked_mean(gap, data.mask))
            if bool(data.fresh.any()):
                metrics["logp_mismatch"] = float(grpo.masked_mean(gap, data.mask & data.fresh[:, None]))
            metrics["tis_mean"] = float(grpo.masked_mean(data.importance, data.mask))
        return metrics

    def update(self, data: StepData, kl_coef: float) -> UpdateSums:
        """`epochs` passes of minibatch updates over the samples of `data` (the groups with signal)."""
        cfg, sums = self.cfg, UpdateSums()
        n = data.tokens.shape[0]
        for epoch in range(cfg.epochs):
            perm = torch.randperm(n, generator=self.generator)
            for start in range(0, n, cfg.minibatch_size):
                mb = perm[start:start + cfg.minibatch_size].to(self.device)
                in_mb = torch.isin(data.rows.sample_idx, mb)
                mb_rows = ReplayRows(data.rows.sample_idx[in_mb], data.rows.step_idx[in_mb])
                weights = torch.zeros_like(data.behaviour)
                weights[mb] = grpo.aggregation_weights(data.mask[mb], cfg.loss_agg)
                self.optimizer.zero_grad(set_to_none=True)
                mb_loss = 0.0
                for chunk in mb_rows.chunks(cfg.replay_rows_per_chunk):
                    out = row_logprobs(self.policy, data.tokens, data.reveal, chunk, reveal_rank=data.reveal_rank,
                                       autocast_dtype=self.autocast_dtype, with_entropy=True, **data.sampling)
                    new = out.shares()
                    sel = chunk.sample_idx
                    if data.old_from_update:
                        self.fill_old(data, chunk, out, new)
                    surrogate = None if cfg.selection_weight == 1 else (out.shares(cfg.selection_weight),
                                                                        data.old_surrogate[sel])
                    tl = grpo.token_loss(
                        new, data.old[sel], data.ref[sel], data.advantages[sel][:, None], weights[sel], out.targets,
                        clip_low=cfg.clip_eps, clip_high=cfg.clip_eps_high, kl_coef=kl_coef,
                        kl_estimator=cfg.kl_estimator, surrogate_logps=surrogate,
                        importance=None if data.importance is None else data.importance[sel])
                    tl.loss.backward()
                    mb_loss += float(tl.loss.detach())
                    sums.add(out, tl, weights[sel], out.targets)
                    if epoch == 0 and start == 0:  # new == old on fresh rollouts, up to the precision mismatch
                        sums.add_first(tl, new, data.behaviour[sel], out.targets, data.fresh[sel])
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.grad_clip))
                if not (math.isfinite(grad_norm) and math.isfinite(mb_loss)):
                    sums.nonfinite += 1  # an update of NaN/inf would ruin the weights: skip it, the driver stops
                    continue
                sums.grad_norms.append(grad_norm)
                self.optimizer.step()
        return sums

    @torch.no_grad()
    def fill_old(self, data: StepData, chunk: ReplayRows, out, shares: torch.Tensor) -> None:
        """pi_old on a chunk's rows from the update's forward (recompute mode, one update: same weights)."""
        row, pos = out.targets.nonzero(as_tuple=True)
        sample = chunk.sample_idx[row]
        data.old[sample, pos] = shares[row, pos].detach()
        data.old_surrogate[sample, pos] = out.shares(self.cfg.selection_weight)[row, pos].detach()
        data.importance[sample, pos] = grpo.truncated_importance_weight(
            data.old[sample, pos], data.behaviour[sample, pos], self.cfg.tis_cap)
        data.old_selection[chunk.sample_idx, chunk.step_idx] = out.selection.detach().to(data.old_selection.dtype)

    def statistics(self, sums: UpdateSums, data: StepData) -> dict:
        kept_adv = data.advantages[data.keep]
        metrics = {f"adv_{k}": v for k, v in
                   grpo.masked_moments(kept_adv, torch.ones_like(kept_adv, dtype=torch.bool)).items()}
        if self.cfg.old_logprob == "behaviour":
            gap = sums.first_gap
            metrics["logp_lag"] = gap["all"] / max(gap["all_tokens"], 1.0)
            if gap["fresh_tokens"]:
                metrics["logp_mismatch"] = gap["fresh"] / gap["fresh_tokens"]
        n_tok = max(sums.tokens, 1.0)
        n_updates = max(len(sums.grad_norms), 1)
        metrics.update({
            "loss": sums.loss / n_updates, "pg_loss": sums.pg_loss / n_updates,
            "kl": sums.kl / n_tok, "entropy": sums.entropy / n_tok, "ratio_mean": sums.ratio / n_tok,
            "ratio_max": sums.ratio_max, "clip_frac": sums.clipped / n_tok,
            # the learner's shares of the sampled trajectories before any update of this step against the
            # sampler's: on fresh samples the precision/implementation mismatch alone (first_step_ratio_dev,
            # logp_mismatch), on all samples with the policy lag of stale ones (logp_lag)
            "first_step_ratio_dev": sums.first_ratio_dev,
            "grad_norm": sum(sums.grad_norms) / n_updates, "optimizer_steps": float(len(sums.grad_norms)),
            "nonfinite_updates": float(sums.nonfinite),
            "replay_rows": float(int(data.keep[data.rows.sample_idx].sum())),
            "tokens_trained": float(data.mask[data.keep].sum()),
            "skipped_update": 0.0 if sums.grad_norms else 1.0,
        })
        return metrics

    def end_step(self, metrics: dict) -> None:
        """Count the step; reset the reference when due."""
        self.step += 1
        every = self.cfg.reference_reset_every
        if every is not None and self.step % every == 0:
            self.reference.load_state_dict(self.policy.state_dict())
            self.reference_resets += 1
        metrics["reference_resets"] = float(self.reference_resets)

    # -- state for checkpoints -------------------------------------------
    def state_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"reference": {k: v.detach().cpu() for k, v in self.reference.state_dict().items()},
                "learner_rng": {"generator": self.generator.get_state(), "torch": torch.get_rng_state()}}

    def state_scalars(self) -> dict:
        """What a checkpoint's manifest holds of the learner besides its tensors."""
        return {"reference_resets": self.reference_resets,
                "kl_controller": self.kl_controller.state_dict() if self.kl_controller is not None else None}

    def load_state(self, reference: dict[str, torch.Tensor], rng: dict[str, torch.Tensor],
                   version: int, step: int, scalars: dict | None = None) -> None:
        self.reference.load_state_dict(reference)
        self.generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        self.version, self.step = version, step
        scalars = scalars or {}
        self.reference_resets = int(scalars.get("reference_resets", 0))
        saved = scalars.get("kl_controller")
        if self.kl_controller is not None and saved is not None:
            self.kl_controller.load_state_dict(saved)
