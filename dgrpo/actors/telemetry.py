"""Per-actor metrics for the Ray dashboard (ray.util.metrics), off outside Ray."""

from __future__ import annotations

import torch


def pick_device() -> torch.device:
    """The GPU Ray assigned to this actor if any, else the CPU: one code path for both."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class ActorTelemetry:
    def __init__(self, role: str, actor_id: str, enabled: bool = False):
        self.tags = {"role": role, "actor_id": actor_id}
        self.enabled = enabled
        self._metrics = {}
        if enabled:
            from ray.util import metrics as m
            keys = ("role", "actor_id")
            self._metrics = {
                "policy_version": m.Gauge("dgrpo_worker_policy_version", "policy version held", tag_keys=keys),
                "samples_per_s": m.Gauge("dgrpo_rollout_samples_per_s", "rollout samples/s", tag_keys=keys),
                "tokens_per_s": m.Gauge("dgrpo_rollout_tokens_per_s", "generated tokens/s", tag_keys=keys),
                "samples_total": m.Counter("dgrpo_rollout_samples_total", "samples generated", tag_keys=keys),
                "judge_latency_s": m.Histogram("dgrpo_judge_latency_s", "judge batch latency (s)",
                                               boundaries=[0.01, 0.03, 0.1, 0.3, 1, 3, 10], tag_keys=keys),
                "judge_samples_total": m.Counter("dgrpo_judge_samples_total", "samples scored", tag_keys=keys),
            }

    def gauge(self, name: str, value: float) -> None:
        if self.enabled:
            self._metrics[name].set(float(value), tags=self.tags)

    def observe_rollout(self, samples: int, tokens: int, seconds: float) -> None:
        if self.enabled:
            self._metrics["samples_per_s"].set(samples / max(seconds, 1e-9), tags=self.tags)
            self._metrics["tokens_per_s"].set(tokens / max(seconds, 1e-9), tags=self.tags)
            self._metrics["samples_total"].inc(samples, tags=self.tags)

    def observe_judge(self, samples: int, seconds: float) -> None:
        if self.enabled:
            self._metrics["judge_latency_s"].observe(seconds, tags=self.tags)
            self._metrics["judge_samples_total"].inc(samples, tags=self.tags)
