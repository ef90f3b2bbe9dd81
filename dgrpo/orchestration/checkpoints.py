"""The run's checkpoints, from the driver's side: writing one (the learner saves its state and the driver's
in one atomic checkpoint; checkpoints/best.json follows the best evaluation; old ones are pruned) and
resuming from the newest usable one on --resume (torn and corrupt ones are skipped; the logs cut back to it).
"""

from __future__ import annotations

from pathlib import Path

from ..config import TrainConfig, to_dict
from ..errors import RunError
from ..models.checkpoint import CheckpointError, load_checkpoint
from .groups import ActorGroup
from .heldout import HeldOut
from .judge_refresh_role import JudgeRefreshRole
from .metrics import truncate_jsonl
from .rundir import (checkpoint_path, find_checkpoints, keep_last_checkpoints, remove_partial_checkpoints,
                     truncate_rollout_log, write_best)


def save_checkpoint(cfg: TrainConfig, out: Path, step: int, state: dict, learner: ActorGroup, heldout: HeldOut,
                    judge_refresh: JudgeRefreshRole | None) -> Path:
    """Checkpoint `step`: the learner's state with the driver's (`state`, the evaluations and the best added)
    and the judge trainer's; -> its path."""
    path = checkpoint_path(out, step)
    best = heldout.best
    state = {**state, "eval_history": heldout.history, "best": best}
    trainer_tensors = None
    if judge_refresh is not None:
        state["judge_refresh"], trainer_tensors = judge_refresh.checkpoint()
    learner.call("save", str(path), state, to_dict(cfg), trainer_tensors)
    if best is not None and best["step"] == step:
        write_best(out, best)
    best_path = out / "checkpoints" / best["checkpoint"] if best else None
    keep_last_checkpoints(out, cfg.run.keep_checkpoints, protect=best_path)
    return path


def load_newest(out: Path, learner: ActorGroup, judge_refresh: bool) -> tuple[Path, dict, int, object]:
    """The newest usable checkpoint, loaded into the learner -> (its path, the driver's state, the policy
    version, the judge refresh state saved in it when `judge_refresh`); RunError if there is none."""
    remove_partial_checkpoints(out)
    for path in reversed(find_checkpoints(out)):
        try:
            ckpt = load_checkpoint(path, expect_kind="generator")
        except CheckpointError as e:
            print(f"skipping unusable checkpoint {path}: {e}")
            continue
        try:  # a checkpoint whose tensors are corrupt or truncated is skipped too
            state = learner.call("load", str(path), passthrough=(CheckpointError,))
            saved_refresh = JudgeRefreshRole.saved(ckpt, state) if judge_refresh else None
        except CheckpointError as e:
            print(f"skipping unusable checkpoint {path}: {getattr(e, 'cause', e)}")
            continue
        # the policy version is the learner's (the manifest's), not in the driver's state
        return path, state, int(ckpt.state["version"]), saved_refresh
    raise RunError(f"--resume: no usable checkpoint under {out / 'checkpoints'}; start without --resume")


def resume_run(out: Path, learner: ActorGroup, prompts, counters: dict, heldout: HeldOut,
               judge_refresh: JudgeRefreshRole | None) -> tuple[int, int, int]:
    """The run's state from its newest usable checkpoint: the learner's loaded, the prompt stream's, the counters,
    evaluations and judge refresh restored, the logs cut back to it -> (step, policy version, requests issued)."""
    path, state, version, saved_refresh = load_newest(out, learner, judge_refresh is not None)
    step, requests_issued = state["step"], state["request_counter"]
    prompts.load_state_dict(state["prompts"])
    counters.update(state["counters"])
    heldout.restore(state.get("eval_history", []), state.get("best"))
    kept = truncate_logs(out, step, requests_issued)
    print(f"resumed from {path}: step {step}, policy version {version}, {kept} metric rows kept")
    if judge_refresh is not None:
        judge_refresh.restore(saved_refresh, step)
    elif "judge_refresh" in state:
        print(f"note: the checkpoint holds judge version {state['judge_refresh']['version']} of a judge "
              f"refresh; with judge_refresh.enabled=false the judges score with reward.judge_checkpoint")
    return step, version, requests_issued


def truncate_logs(out: Path, step: int, request_counter: int) -> int:
    """Cuts the run's logs back to a resumed checkpoint -> the metric rows kept."""
    kept = truncate_jsonl(out / "metrics.jsonl", step)
    truncate_jsonl(out / "samples.jsonl", step)
    truncate_rollout_log(out / "rollouts.msgpack", request_counter)
    return kept
