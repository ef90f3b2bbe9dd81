"""Metrics sinks of the driver: JSONL log (always), Ray dashboard gauges, TensorBoard, W&B (optional)."""

from __future__ import annotations

import json
import math
from pathlib import Path

# Driver-side gauges exported to the Ray dashboard / Prometheus (name -> metrics key).
DRIVER_GAUGES = {
    "dgrpo_policy_version": "policy_version",
    "dgrpo_reward_mean": "reward_mean",
    "dgrpo_kl": "kl",
    "dgrpo_loss": "loss",
    "dgrpo_clip_frac": "clip_frac",
    "dgrpo_weight_sync_s": "time/sync_s",
    "dgrpo_staleness_mean": "staleness_mean",
    "dgrpo_learner_idle_ratio": "learner_idle_ratio",
    "dgrpo_rollout_idle_ratio": "rollout_idle_ratio",
    "dgrpo_dropped_stale_batches": "dropped_stale_batches",
    "dgrpo_worker_restarts": "worker_restarts",
    "dgrpo_judge_restarts": "judge_restarts",
    "dgrpo_eval_reward_mean": "eval_reward_mean",
    "dgrpo_steps_per_min": "steps_per_min",
    "dgrpo_kl_seq": "kl_seq",
    "dgrpo_eval_kl_seq": "eval_kl_seq",
    "dgrpo_kl_coef": "kl_coef",
    "dgrpo_rollout_workers": "rollout_workers",
    "dgrpo_rollout_workers_target": "rollout_workers_target",
    "dgrpo_judge_workers": "judge_workers",
    "dgrpo_nodes_lost": "nodes_lost",
}
PHASES = ("starting", "generating", "training", "syncing", "evaluating", "checkpointing", "done")


def read_jsonl(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line from a crash: everything before it is intact
    return rows


def truncate_jsonl(path: str | Path, max_step: int) -> int:
    """Keep only records with step <= max_step (resume must not duplicate steps). Returns rows kept."""
    rows = [r for r in read_jsonl(path) if r.get("step", 0) <= max_step]
    p = Path(path)
    tmp = p.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(p)
    return len(rows)


def _missing(key: str, extra: str, error: ImportError):
    from ..errors import RunError
    return RunError(f"{key} is set but the optional package is missing ({error}); "
                    f"install it with: pip install 'diffusion-grpo[{extra}]'")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


class MetricsLogger:
    def __init__(self, out_dir: Path, ray_metrics: bool = False, tensorboard: bool = False,
                 wandb_project: str | None = None, config: dict | None = None):
        self.path = Path(out_dir) / "metrics.jsonl"
        self._fh = open(self.path, "a")
        self._gauges, self._phase, self._keeper = {}, None, None
        if ray_metrics:
            from ray.util import metrics as m

            from ..actors.telemetry import GaugeKeeper
            self._keeper = GaugeKeeper()  # re-sends gauge values so slow steps do not drop out of Prometheus
            self._gauges = {name: m.Gauge(name, f"dgrpo driver metric {key}") for name, key in DRIVER_GAUGES.items()}
            self._phase = m.Gauge("dgrpo_phase", "current driver phase (1 on the active phase)", tag_keys=("phase",))
            kl_target = ((config or {}).get("grpo") or {}).get("kl_target")
            if _finite(kl_target):  # the KL budget, for the alert that compares kl_seq with it
                self._keeper.set(m.Gauge("dgrpo_kl_target", "grpo.kl_target: the KL budget, nats per sequence"),
                                 float(kl_target))
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise _missing("run.tensorboard", "tensorboard", e) from None
            self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
        self._wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise _missing("run.wandb_project", "wandb", e) from None
            self._wandb = wandb.init(project=wandb_project, config=config or {}, dir=str(out_dir))

    def phase(self, name: str) -> None:
        if self._phase is not None:
            for p in PHASES:
                self._keeper.set(self._phase, 1.0 if p == name else 0.0, {"phase": p})

    def log(self, record: dict) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        for name, key in DRIVER_GAUGES.items():
            if name in self._gauges and _finite(record.get(key)):
                self._keeper.set(self._gauges[name], float(record[key]))
        step = int(record.get("step", 0))
        if self._tb is not None:
            for k, v in record.items():
                if _finite(v):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if _finite(v)}, step=step)

    def close(self) -> None:
        self._fh.close()
        if self._keeper is not None:
            self._keeper.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
