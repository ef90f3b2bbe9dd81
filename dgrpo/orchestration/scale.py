"""`dgrpo scale RUN_DIR --rollout-workers N`: a new worker target for a live run, through its run directory.
`dgrpo scale RUN_DIR` alone prints the run's state: live or not, its step, placed actors, targets and bounds.

The command writes RUN_DIR/scale.json ({"rollout": N, "judge": M}, atomically); the run's driver
reads it every run.membership_check_s and moves the groups' targets (groups.ActorGroup.resize):
new actors wait to be placed and load the current weights before their first request, surplus ones
finish their requests and leave. The file stays, so a run resumed in RUN_DIR keeps the target.
A file and not an RPC: it needs nothing but the run directory (shared storage on a cluster, where
`ray job submit -- dgrpo scale RUN_DIR ...` runs it), and what was asked stays on record.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..config import TrainConfig, load_config
from ..errors import ConfigError

SCALE_FILE = "scale.json"
FLAGS = {"rollout": "--rollout-workers", "judge": "--judge-workers"}


def read_targets(run_dir: str | Path) -> dict[str, int]:
    """The targets in RUN_DIR/scale.json ({} without one); ValueError if it is not a mapping of role -> int."""
    path = Path(run_dir) / SCALE_FILE
    if not path.is_file():
        return {}
    targets = json.loads(path.read_text())
    if not isinstance(targets, dict) or not all(r in FLAGS and isinstance(n, int) for r, n in targets.items()):
        raise ValueError(f"{path} must map roles ({', '.join(FLAGS)}) to worker counts, got {targets!r}")
    return targets


def write_targets(run_dir: str | Path, targets: dict[str, int]) -> dict[str, tuple[int, int]]:
    """Checks each target against the run's bounds (RUN_DIR/config.yaml) and writes them; -> role: (min, max)."""
    run_dir = Path(run_dir)
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"{run_dir} is not a dgrpo train run directory (no config.yaml); give the run's "
                          f"run.out_dir")
    cfg = load_config(TrainConfig, config)
    bounds = {role: getattr(cfg.resources, role).bounds for role in targets}
    for role, n in targets.items():
        lo, hi = bounds[role]
        if not lo <= n <= hi:
            size = f"a fixed {lo}" if lo == hi else f"{lo}..{hi}"
            raise ConfigError(f"{FLAGS[role]} {n} is outside the run's {role} workers ({size}, resources.{role}); "
                              f"elastic runs set resources.{role}.min_workers and max_workers (resume with them "
                              f"to widen the range)")
    try:
        merged = {**read_targets(run_dir), **targets}
    except ValueError:
        merged = dict(targets)  # a broken file is replaced
    tmp = run_dir / f".{SCALE_FILE}.tmp"
    tmp.write_text(json.dumps(merged) + "\n")
    os.replace(tmp, run_dir / SCALE_FILE)
    return bounds


def live_holder(run_dir: Path) -> dict | None:
    """The holder of RUN/run.lock if a process holds it now (the run is live), else None."""
    import fcntl

    from .rundir import LOCK_FILE
    path = Path(run_dir) / LOCK_FILE
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                return {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def read_state(run_dir: str | Path) -> dict:
    """What `dgrpo scale RUN_DIR` prints: whether the run is live, its step, and per role the placed actors (as
    last logged), the target (scale.json, else the config's) and the bounds."""
    from .metrics import read_jsonl
    from .rundir import describe_holder
    run_dir = Path(run_dir)
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"{run_dir} is not a dgrpo train run directory (no config.yaml); give the run's "
                          f"run.out_dir")
    cfg = load_config(TrainConfig, config)
    try:
        targets = read_targets(run_dir)
    except ValueError:
        targets = {}
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "rollout_workers" in r]
    last = rows[-1] if rows else {}
    holder = live_holder(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    state = {"run_dir": str(run_dir.absolute()), "live": holder is not None,
             "holder": describe_holder(holder) if holder is not None else None,
             "status": "running" if holder is not None else summary.get("status", "not running"),
             "step": last.get("step"), "steps": cfg.run.steps, "roles": {}}
    placed_keys = {"rollout": "rollout_workers", "judge": "judge_workers"}
    for role in FLAGS:
        res = getattr(cfg.resources, role)
        state["roles"][role] = {"placed": last.get(placed_keys[role]), "target": targets.get(role, res.num_workers),
                                "min": res.bounds[0], "max": res.bounds[1]}
    return state


def format_state(state: dict) -> str:
    live = f"live ({state['holder']})" if state["live"] else state["status"]
    step = f"step {state['step']} of {state['steps']}" if state["step"] is not None else "no step logged yet"
    lines = [f"run {state['run_dir']}: {live}, {step}"]
    for role, r in state["roles"].items():
        bounds = f"a fixed {r['min']}" if r["min"] == r["max"] else f"allowed {r['min']}..{r['max']}"
        placed = "?" if r["placed"] is None else r["placed"]
        lines.append(f"{role} workers: {placed} placed (as last logged), target {r['target']}, {bounds} "
                     f"(resources.{role}; change with {FLAGS[role]} N)")
    return "\n".join(lines)


class ScaleControl:
    """The driver's side: reads RUN_DIR/scale.json when it changes (at most every check_s) and resizes groups."""

    def __init__(self, run_dir: Path, groups: dict, check_s: float):
        self.path = Path(run_dir) / SCALE_FILE
        self.groups, self.check_s = groups, check_s
        self.seen = None  # (mtime, size) of the file last read
        self.checked = float("-inf")

    def poll(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.checked < self.check_s:
            return
        self.checked = now
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return
        if (stat.st_mtime_ns, stat.st_size) == self.seen:
            return
        self.seen = (stat.st_mtime_ns, stat.st_size)
        try:
            targets = read_targets(self.path.parent)
        except (ValueError, OSError) as e:
            print(f"scale: ignoring {self.path}: {e}")
            return
        for role, n in targets.items():
            group = self.groups[role]
            if n == group.target:
                continue
            before = group.target
            after = group.resize(n)
            clamped = "" if after == n else f" (asked {n}; the run allows {group.min_size}..{group.max_size})"
            print(f"scale: {role} workers target {before} -> {after}{clamped}; {group.placed()} placed")
