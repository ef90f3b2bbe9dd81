"""The GRPO learner: policy, frozen reference, AdamW, and one update per call (pure torch).

One `train(batches)` call is one GRPO step:

1. Stack the scored rollouts; per group of k samples compute advantages and
   drop groups whose rewards are all equal (they carry no signal).
2. Choose the replay rows: every (sample, denoising step) that revealed tokens,
   or `replay_steps` random steps per sample (exact log-probs, estimated loss).
3. Without gradients: the reference policy's log-probs on those tokens, and, if
   `old_logprob = "recompute"`, the current policy's (then the rollout's
   behaviour log-probs only enter through a truncated importance weight).
   From them the KL per sequence of the step's samples (`kl_seq`, all groups; a KL
   estimate under random order only, docs/LEVERS.md), which the KL budget
   (`kl_target`, kl_control.py) steers kl_coef by.
4. For `epochs` passes over shuffled minibatches of the samples of groups with
   signal: replay the rows with gradients, per-token ratio exp(logp - logp_old),
   PPO-clip surrogate, KL(policy || reference) on the same tokens, weights fixed
   by the loss aggregation, backward chunk by chunk, clip the gradient norm,
   AdamW step (skipped, and counted in `nonfinite_updates`, when the loss or
   gradient is not finite).
5. The weights are now version v + 1 (unless no update was applied); every
   `reference_reset_every` steps the reference becomes a copy of them.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch

from ..models.trajectory import ReplayRows, replay_rows, row_logprobs, trajectory_logprobs
from ..protocols import ScoredBatch, WeightSnapshot
from . import grpo
from .kl_control import AdaptiveKLController


@dataclass
class StackedBatch:
    tokens: torch.Tensor  # (N, T)
    reveal_step: torch.Tensor  # (N, T)
    behaviour: torch.Tensor  # (N, T) recorded sampler log-probs
    rewards: torch.Tensor  # (N,)
    group: torch.Tensor  # (N,) global group id, rows of a group contiguous
    staleness: torch.Tensor  # (N,) learner version - generating version
    steps: int
    temperature: float
    top_k: int
    top_p: float


def stack_batches(batches: list[ScoredBatch], learner_version: int) -> StackedBatch:
    if not batches:
        raise ValueError("train() needs at least one scored batch")
    first = batches[0].rollout
    for b in batches:
        r = b.rollout
        if (r.steps, r.temperature, r.top_k, r.top_p) != (first.steps, first.temperature, first.top_k, first.top_p):
            raise ValueError("scored batches were sampled with different sampler settings; "
                             "one GRPO step must use one sampling distribution")
        b.validate()
    groups, total = [], 0
    for b in batches:
        groups.append(b.rollout.group_index + total)
        total += b.rollout.num_groups
    group = torch.cat(groups)
    order = torch.argsort(group, stable=True)
    cat = lambda f: torch.cat([f(b) for b in batches])[order]  # noqa: E731
    return StackedBatch(
        tokens=cat(lambda b: b.rollout.tokens), reveal_step=cat(lambda b: b.rollout.reveal_step),
        behaviour=cat(lambda b: b.rollout.logprobs), rewards=cat(lambda b: b.rewards.float()),
        group=group[order],
        staleness=cat(lambda b: torch.full((b.num_samples,), learner_version - b.rollout.policy_version)),
        steps=first.steps, temperature=first.temperature, top_k=first.top_k, top_p=first.top_p)


def revealed_mask(reveal_step: torch.Tensor, rows: ReplayRows, steps: int) -> torch.Tensor:
    """(N, T) tokens that belong to one of the selected replay rows."""
    selected = torch.zeros(reveal_step.shape[0], steps, dtype=torch.bool, device=reveal_step.device)
    selected[rows.sample_idx, rows.step_idx] = True
    return (reveal_step >= 0) & selected.gather(1, reveal_step.clamp_min(0))


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
    def kl_coef(self) -> float:
        return self.kl_controller.coef if self.kl_controller is not None else self.cfg.kl_coef

    # -- weights ---------------------------------------------------------
    def snapshot(self) -> WeightSnapshot:
        return WeightSnapshot.from_module(self.policy, self.version)

    # -- one GRPO step ---------------------------------------------------
    def train(self, batches: list[ScoredBatch]) -> dict[str, float]:
        t0 = time.perf_counter()
        cfg = self.cfg
        data = stack_batches(batches, self.version)
        k = int(torch.bincount(data.group)[0])
        rewards_gk = data.rewards.view(-1, k)
        advantages = grpo.group_advantages(rewards_gk, cfg.advantage, cfg.adv_eps).flatten()
        zero_std = grpo.zero_std_groups(rewards_gk)
        keep_groups = ~zero_std if cfg.skip_zero_std_groups else torch.ones_like(zero_std)
        keep = keep_groups.repeat_interleave(k)
        metrics = {
            "reward_mean": float(data.rewards.mean()), "reward_std": float(data.rewards.std(unbiased=False)),
            "reward_min": float(data.rewards.min()), "reward_max": float(data.rewards.max()),
            "zero_std_ratio": float(zero_std.float().mean()), "num_samples": float(len(data.rewards)),
            "num_groups": float(len(zero_std)), "group_size": float(k),
            "staleness_mean": float(data.staleness.float().mean()), "staleness_max": float(data.staleness.max()),
        }
        dev = self.device
        tokens, reveal, behaviour = data.tokens.to(dev), data.reveal_step.to(dev), data.behaviour.to(dev)
        fresh = (data.staleness == 0).to(dev)  # generated by the weights being trained: no policy lag
        rows = replay_rows(reveal, data.steps, cfg.replay_steps, self.generator)
        mask = revealed_mask(reveal, rows, data.steps)
        sampling = dict(temperature=data.temperature, top_k=data.top_k, top_p=data.top_p)
        t_ref = time.perf_counter()
        with torch.no_grad():
            ref_lp = trajectory_logprobs(self.reference, tokens, reveal, data.steps, rows=rows,
                                         rows_per_chunk=cfg.replay_rows_per_chunk,
                                         autocast_dtype=self.autocast_dtype, **sampling)
            if cfg.old_logprob == "recompute":
                self.policy.eval()
                old_lp = trajectory_logprobs(self.policy, tokens, reveal, data.steps, rows=rows,
                                             rows_per_chunk=cfg.replay_rows_per_chunk,
                                             autocast_dtype=self.autocast_dtype, **sampling)
                self.policy.train()
                tis = grpo.truncated_importance_weight(old_lp, behaviour, cfg.tis_cap)
                gap = (old_lp - behaviour).abs()
                metrics["logp_lag"] = float(grpo.masked_mean(gap, mask))
                if bool(fresh.any()):
                    metrics["logp_mismatch"] = float(grpo.masked_mean(gap, mask & fresh[:, None]))
                metrics["tis_mean"] = float(grpo.masked_mean(tis, mask))
            else:
                old_lp, tis = behaviour, torch.ones_like(behaviour)
            # pi_old's KL to the reference on every sample of the step, before the update
            kl_seq = grpo.sequence_kl_k1(old_lp, ref_lp, mask, (reveal >= 0).sum(dim=1))
        metrics["ref_replay_s"] = time.perf_counter() - t_ref
        kl_coef = self.kl_coef
        metrics.update(kl_seq=float(kl_seq.mean()), kl_coef=kl_coef)
        if self.kl_controller is not None:
            self.kl_controller.update(metrics["kl_seq"], self.step)
        if not bool(keep.any()):
            metrics.update(skipped_update=1.0)
            self.end_step(metrics)
            metrics["learn_s"] = time.perf_counter() - t0
            return metrics

        # the update sees only the groups with signal
        kept = keep.nonzero().flatten().to(dev)
        position = torch.full((len(keep),), -1, dtype=torch.long, device=dev)
        position[kept] = torch.arange(len(kept), device=dev)
        rows_kept = keep.to(dev)[rows.sample_idx]
        rows = ReplayRows(position[rows.sample_idx[rows_kept]], rows.step_idx[rows_kept])
        tokens, reveal, behaviour, mask = tokens[kept], reveal[kept], behaviour[kept], mask[kept]
        ref_lp, old_lp, tis, fresh = ref_lp[kept], old_lp[kept], tis[kept], fresh[kept]
        adv = advantages.to(dev)[kept]
        n = tokens.shape[0]
        metrics.update({f"adv_{k_}": v for k_, v in
                        grpo.masked_moments(adv, torch.ones_like(adv, dtype=torch.bool)).items()})

        sums = {"loss": 0.0, "pg_loss": 0.0, "kl": 0.0, "entropy": 0.0, "ratio": 0.0, "clipped": 0.0, "tokens": 0.0}
        ratio_max, grad_norms, first_ratio_dev, nonfinite = 0.0, [], 0.0, 0
        first_gap = {"fresh": 0.0, "fresh_tokens": 0.0, "all": 0.0, "all_tokens": 0.0}
        for epoch in range(cfg.epochs):
            perm = torch.randperm(n, generator=self.generator)
            for start in range(0, n, cfg.minibatch_size):
                mb = perm[start:start + cfg.minibatch_size].to(dev)
                in_mb = torch.isin(rows.sample_idx, mb)
                mb_rows = ReplayRows(rows.sample_idx[in_mb], rows.step_idx[in_mb])
                first_minibatch = epoch == 0 and start == 0
                weights = torch.zeros_like(behaviour)
                weights[mb] = grpo.aggregation_weights(mask[mb], cfg.loss_agg)
                self.optimizer.zero_grad(set_to_none=True)
                mb_loss = 0.0
                for chunk in mb_rows.chunks(cfg.replay_rows_per_chunk):
                    out = row_logprobs(self.policy, tokens, reveal, chunk, autocast_dtype=self.autocast_dtype,
                                       with_entropy=True, **sampling)
                    sel = chunk.sample_idx
                    targets = out.targets
                    new_lp = out.logprobs
                    ratio = grpo.token_ratio(new_lp, old_lp[sel])
                    pg, clipped = grpo.clipped_surrogate(ratio, adv[sel][:, None], cfg.clip_eps, cfg.clip_eps_high)
                    kl = grpo.kl_penalty(new_lp, ref_lp[sel], cfg.kl_estimator)
                    per_token = tis[sel] * pg + kl_coef * kl
                    w = weights[sel] * targets
                    loss = torch.where(targets, w * per_token, torch.zeros_like(per_token)).sum()
                    loss.backward()
                    with torch.no_grad():
                        t = targets.float()
                        mb_loss += float(loss)
                        sums["loss"] += float(loss)
                        sums["pg_loss"] += float((w * pg * tis[sel]).sum())
                        sums["kl"] += float((kl * t).sum())
                        sums["entropy"] += float((out.entropy * t).sum())
                        sums["ratio"] += float((ratio * t).sum())
                        sums["clipped"] += float((clipped.float() * t).sum())
                        sums["tokens"] += float(t.sum())
                        ratio_max = max(ratio_max, float((ratio * t).max()))
                        if first_minibatch:  # new == old on fresh rollouts, up to the precision mismatch
                            t_fresh = t * fresh[sel, None]
                            first_ratio_dev = max(first_ratio_dev, float(((ratio - 1).abs() * t_fresh).max()))
                            gap = (new_lp - behaviour[sel]).abs()
                            first_gap["fresh"] += float((gap * t_fresh).sum())
                            first_gap["fresh_tokens"] += float(t_fresh.sum())
                            first_gap["all"] += float((gap * t).sum())
                            first_gap["all_tokens"] += float(t.sum())
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.grad_clip))
                if not (math.isfinite(grad_norm) and math.isfinite(mb_loss)):
                    nonfinite += 1  # an update of NaN/inf would ruin the weights: skip it, the driver stops the run
                    continue
                grad_norms.append(grad_norm)
                self.optimizer.step()
        if cfg.old_logprob == "behaviour":
            metrics["logp_lag"] = first_gap["all"] / max(first_gap["all_tokens"], 1.0)
            if first_gap["fresh_tokens"]:
                metrics["logp_mismatch"] = first_gap["fresh"] / first_gap["fresh_tokens"]
        n_tok = max(sums["tokens"], 1.0)
        n_updates = max(len(grad_norms), 1)
        metrics.update({
            "loss": sums["loss"] / n_updates, "pg_loss": sums["pg_loss"] / n_updates,
            "kl": sums["kl"] / n_tok, "entropy": sums["entropy"] / n_tok, "ratio_mean": sums["ratio"] / n_tok,
            "ratio_max": ratio_max, "clip_frac": sums["clipped"] / n_tok,
            # the learner's log-probs of the sampled tokens before any update of this step against the
            # sampler's: on fresh samples the precision/implementation mismatch alone (first_step_ratio_dev,
            # logp_mismatch), on all samples with the policy lag of stale ones (logp_lag)
            "first_step_ratio_dev": first_ratio_dev,
            "grad_norm": sum(grad_norms) / n_updates, "optimizer_steps": float(len(grad_norms)),
            "nonfinite_updates": float(nonfinite),
            "replay_rows": float(len(rows)), "tokens_trained": float(mask.sum()),
            "skipped_update": 0.0 if grad_norms else 1.0,
        })
        if grad_norms:
            self.version += 1
        self.end_step(metrics)
        metrics["learn_s"] = time.perf_counter() - t0
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
