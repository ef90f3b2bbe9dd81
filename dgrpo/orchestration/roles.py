"""The run's actors, one group per role, each with its fault policy (what becomes of its lost calls):

    learner    one actor, not restartable: its optimizer state lives only there, so its death stops the run
               (resume from the last checkpoint); one that dies before it was placed is started once more
    rollout    run.resources.rollout bounds; Ray restarts a worker, a lost request is issued again (requeue)
    judge      run.resources.judge bounds; a lost scoring call is sent to another judge (resubmit)
    judge trainer (judge_refresh.enabled)   judge_refresh_role.py

The groups themselves (placement, deadlines, recovery, membership) are groups.py's; the weight path
between learner and workers weights.py's; live resizing scale.py's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import ray

from ..actors.rollout import StaleWorkerError
from ..config import TrainConfig
from ..protocols import WeightSnapshot
from .cluster import describe_needs, make_actor
from .groups import ActorGroup, ActorManager
from .judge_refresh_role import JudgeRefreshRole
from .scale import ScaleControl
from .weights import weight_sync


@dataclass
class Roles:
    reference: object  # the starting generator's weights (an ObjectRef): held-out evaluations measure the KL to it
    learner: ActorGroup
    workers: ActorGroup
    judges: ActorGroup
    weights: object  # weights.py's sync for run.weight_sync
    scale: ScaleControl
    judge_refresh: JudgeRefreshRole | None


def start_roles(cfg: TrainConfig, actors: ActorManager, model, tokenizer, out: Path, classes: dict,
                counters: dict) -> Roles:
    """Starts every role's actors in `actors`; classes: role -> actor class (tests substitute failing ones)."""
    run, res = cfg.run, cfg.resources
    vocab, metrics_on = tokenizer.to_dict(), run.metrics_export
    init = ray.put(WeightSnapshot.from_module(model, version=0))
    learner = actors.group(
        "learner", 1, lambda _: make_actor(classes["learner"], res.learner, cfg.grpo, model.cfg, vocab, init,
                                           seed=run.seed, precision=res.learner.precision,
                                           torch_threads=res.torch_threads),
        restartable=False, call_names={"train_by_ref": "a step"}, needs=describe_needs(res.learner))
    # grpo.reference_on=rollout: every worker (a restarted or added one too) holds the learner's reference
    reference = init if cfg.grpo.reference_on_rollout else None
    workers = actors.group(
        "rollout", res.rollout.num_workers,
        lambda i: make_actor(classes["rollout"], res.rollout, i, model.cfg, cfg.sampler, res.rollout.precision,
                             res.torch_threads, metrics_on, reference=reference,
                             replay_rows_per_chunk=cfg.grpo.replay_rows_per_chunk),
        *res.rollout.bounds, on_lost={"generate_by_ref": "requeue"}, restarted=(StaleWorkerError,),
        carry_method="generate_by_ref",
        needs=describe_needs(res.rollout))
    judges = actors.group(
        "judge", res.judge.num_workers,
        lambda i: make_actor(classes["judge"], res.judge, i, cfg.reward, vocab, res.torch_threads, metrics_on,
                             precision=res.judge.precision),
        *res.judge.bounds, on_lost={"score_by_ref": "resubmit"}, load_method="set_judge",
        needs=describe_needs(res.judge))
    judge_refresh = None
    if cfg.judge_refresh.enabled:
        judge_refresh = JudgeRefreshRole(
            cfg, actors, judges,
            lambda _: make_actor(classes["judge_trainer"], res.judge_trainer, cfg.judge_refresh,
                                 cfg.reward.judge_checkpoint, cfg.corpus, vocab, seed=run.seed,
                                 precision=res.judge_trainer.precision, torch_threads=res.torch_threads),
            counters)
    return Roles(reference=init, learner=learner, workers=workers, judges=judges,
                 weights=weight_sync(run, learner, workers, counters),
                 scale=ScaleControl(out, {"rollout": workers, "judge": judges}, run.membership_check_s),
                 judge_refresh=judge_refresh)
