"""Per-actor metrics for the Ray dashboard (ray.util.metrics), off outside Ray."""

from __future__ import annotations

import threading


def placement() -> dict:
    """Where this actor runs: its process and Ray node (what the driver's groups record per slot)."""
    import os

    import ray
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    return {"pid": os.getpid(), "node_id": node}


class GaugeKeeper:
    """Sets Ray gauges and re-sends their last values every `interval_s` from a daemon thread.

    Ray's metrics agent drops a gauge series about two report intervals (~20 s)
    after its emitter last set it, so a value set once per GRPO step would
    vanish from Prometheus/Grafana whenever a step takes longer than that.
    """

    def __init__(self, interval_s: float = 5.0):
        self.interval_s = interval_s
        self._last: dict = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def set(self, gauge, value: float, tags: dict | None = None) -> None:
        gauge.set(value, tags=tags)
        with self._lock:
            self._last[(id(gauge), tuple(sorted((tags or {}).items())))] = (gauge, value, tags)
            if self._thread is None:
                self._thread = threading.Thread(target=self._refresh, name="dgrpo-gauge-keeper", daemon=True)
                self._thread.start()

    def _refresh(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                last = list(self._last.values())
            for gauge, value, tags in last:
                try:
                    gauge.set(value, tags=tags)
                except Exception:  # metrics must never break the run (e.g. during shutdown)
                    return

    def close(self) -> None:
        self._stop.set()


class ActorTelemetry:
    def __init__(self, role: str, actor_id: str, enabled: bool = False):
        self.tags = {"role": role, "actor_id": actor_id}
        self.enabled = enabled
        self._metrics = {}
        self._keeper = GaugeKeeper()
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
            self._keeper.set(self._metrics[name], float(value), self.tags)

    def observe_rollout(self, samples: int, tokens: int, seconds: float) -> None:
        if self.enabled:
            self._keeper.set(self._metrics["samples_per_s"], samples / max(seconds, 1e-9), self.tags)
            self._keeper.set(self._metrics["tokens_per_s"], tokens / max(seconds, 1e-9), self.tags)
            self._metrics["samples_total"].inc(samples, tags=self.tags)

    def observe_judge(self, samples: int, seconds: float) -> None:
        if self.enabled:
            self._metrics["judge_latency_s"].observe(seconds, tags=self.tags)
            self._metrics["judge_samples_total"].inc(samples, tags=self.tags)
