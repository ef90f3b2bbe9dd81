"""The run directory of `dgrpo train`: its checkpoints, and what a resume keeps of its logs.

    RUN/config.yaml          the resolved config
    RUN/metrics.jsonl        one line per step (and per evaluation)
    RUN/samples.jsonl        held-out samples of each evaluation
    RUN/rollouts.msgpack     every consumed scored batch (run.log_rollouts)
    RUN/checkpoints/step_N/  the last run.keep_checkpoints checkpoints, written atomically
    RUN/checkpoints/best.json names the best checkpoint on the held-out selection measure (never pruned)
    RUN/summary.json         the summary of the finished run
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..protocols import CodecError
from ..protocols.rollout_log import RolloutLogWriter, read_rollout_log


def find_checkpoints(out_dir: Path) -> list[Path]:
    return sorted((Path(out_dir) / "checkpoints").glob("step_*"))


def checkpoint_path(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step_{step:06d}"


def remove_partial_checkpoints(out_dir: Path) -> None:
    """Hidden temp/old directories left by a writer that was killed mid-write never load; drop them."""
    for junk in (Path(out_dir) / "checkpoints").glob(".step_*"):
        shutil.rmtree(junk, ignore_errors=True)


def keep_last_checkpoints(out_dir: Path, keep: int, protect: Path | None = None) -> None:
    """Remove all but the newest `keep` checkpoints; `protect` (the best one) is kept besides them."""
    for old in [p for p in find_checkpoints(out_dir) if p != protect][:-keep]:
        shutil.rmtree(old, ignore_errors=True)


BEST_POINTER = "best.json"


def write_best(out_dir: Path, best: dict) -> None:
    """checkpoints/best.json, atomically: the best checkpoint's directory name, step, measure and value."""
    path = Path(out_dir) / "checkpoints" / BEST_POINTER
    tmp = path.with_name(f".{BEST_POINTER}.tmp")
    tmp.write_text(json.dumps(best, indent=2))
    os.replace(tmp, path)


def read_best(out_dir: Path) -> dict | None:
    """The best pointer of a run directory (None when the run kept none)."""
    path = Path(out_dir) / "checkpoints" / BEST_POINTER
    return json.loads(path.read_text()) if path.is_file() else None


def truncate_rollout_log(path: Path, request_counter: int) -> int:
    """On resume: keep the logged batches of requests issued before the checkpoint (the
    resumed run issues the later ids again and logs them itself). Returns batches kept."""
    if not path.is_file():
        return 0
    tmp, kept = path.with_name(path.name + ".tmp"), 0
    tmp.unlink(missing_ok=True)
    with RolloutLogWriter(tmp) as out:
        try:
            for msg in read_rollout_log(path):
                if getattr(msg, "rollout", msg).request_id < request_counter:
                    out.write(msg)
                    kept += 1
        except CodecError:
            pass  # a frame torn by the crash: everything before it is intact
    tmp.replace(path)
    return kept
