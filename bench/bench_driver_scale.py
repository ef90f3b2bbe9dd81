"""The driver at scale, simulated: its own CPU time per step and the weight broadcast at 1..64 rollout workers.

The rollout workers are a test double, `PremadeRollout`: a real RolloutWorker (it holds a generator
replica and loads every broadcast snapshot into it) that samples one real batch at its first request and
then answers every request with that batch after a fixed delay (--delay-s), relabelled with the
request's id and the version it holds. A step's generation therefore takes the delay whatever the
worker count, and what the driver does besides is measured:

part 1, overhead   the real Driver in sync mode, N workers, one request of one prompt group per worker
                   per step (grpo.prompts_per_step = N), the real learner (tiny preset, one replayed
                   step) and judge (char_frequency). Per step, from metrics.jsonl: the step's wall time,
                   the driver process's CPU time (time/driver_cpu_s: everything its threads did, Ray's
                   included), and time/sync_s (publish + every worker's load acknowledged).
part 2, broadcast  ActorGroup.publish of one snapshot of --broadcast-preset to N PremadeRollout actors
                   until every one has acknowledged its load (the driver's own code path); median of --reps.
part 3, Ray's floor  the same calls without the driver: N stand-in workers each get a RolloutRequest and
                   answer at once (num_returns=2, a 4 KB batch and a receipt), then one stand-in judge scores
                   all N batches in one call (num_returns=N+1); this process's CPU per worker and step is
                   what Ray itself costs the caller for the calls a driver step makes (median of --reps
                   rounds of 10 steps).

Every actor asks for 0.01 CPU so that 64 of them can be placed on a small machine; they share its cores,
so the broadcast's loads run side by side only as far as the cores allow. Each actor is a process holding
torch and a model replica: a worker count whose actors would need more than MEMORY_SHARE of the memory
available (estimated from the previous count's; --memory-share) is not run, and the report says so (`not_run`). Figures
are medians over the steps after the first (which starts the actors).

    python -m bench.bench_driver_scale [--workers 1,4,16,64] [--steps 6] [--delay-s 2] [--reps 5]
        [--broadcast-preset small] [--memory-share 0.6] [--quick] [--out bench/results/driver_scale.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import ray
import torch

from bench.common import (SHARED_CORPUS, default_out, ints, local_ray, machine_info, median, print_table,
                          process_tree, write_json)
from dgrpo.actors.rollout import RolloutWorker
from dgrpo.config import TrainConfig
from dgrpo.orchestration.driver import Driver
from dgrpo.orchestration.groups import ActorManager
from dgrpo.orchestration.metrics import read_jsonl

LENGTH = 32  # characters per sample (the tiny preset's block)
MEMORY_SHARE = 0.6  # of the memory available: a worker count whose actors would need more is not run


class PremadeRollout(RolloutWorker):
    """Samples once, then answers every training request with that batch after `delay_s` (a stand-in for
    sampling); evaluation requests are sampled."""

    delay_s = 2.0

    def generate(self, request, reference=None):
        if request.request_id < 0:  # the driver's held-out evaluation: really sampled
            return super().generate(request, reference)
        t0 = time.perf_counter()
        if not hasattr(self, "premade"):
            self.premade = super().generate(request)
        time.sleep(max(0.0, self.delay_s - (time.perf_counter() - t0)))
        return dataclasses.replace(self.premade, request_id=request.request_id, policy_version=self.version,
                                   worker_id=self.worker_id,
                                   timings={**self.premade.timings, "generate_s": time.perf_counter() - t0})


def premade_class(delay_s: float) -> type:
    return type("PremadeRollout", (PremadeRollout,), {"delay_s": delay_s})


def corpus_file(tmp: Path) -> str:
    if SHARED_CORPUS.is_file():
        return str(SHARED_CORPUS)
    path = tmp / "text.txt"
    path.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(4000)))
    return str(path)


def run_config(out_dir: Path, corpus: str, workers: int, steps: int) -> TrainConfig:
    tiny = {"num_cpus": 0.01}
    return TrainConfig.model_validate({
        "run": {"out_dir": str(out_dir), "steps": steps, "eval_every": 10_000, "eval_prompts": 4,
                "checkpoint_every": 10_000, "metrics_export": False, "actor_timeout_s": 900,
                "placement_timeout_s": 900},
        "corpus": {"path": corpus},
        "generator": {"preset": "tiny"},
        "reward": {"kind": "char_frequency", "chars": "e"},
        "prompts": {"length": LENGTH},
        "sampler": {"steps": 8},
        "grpo": {"group_size": 8, "prompts_per_step": workers, "minibatch_size": 8 * workers, "replay_steps": 1},
        "resources": {"torch_threads": 1, "rollout": {"num_workers": workers, **tiny}, "judge": tiny,
                      "learner": {**tiny, "precision": "fp32"}},
    })


def overhead(ray, workers: int, steps: int, delay_s: float, corpus: str, tmp: Path) -> dict:
    """Part 1: the real driver loop with N premade workers; medians over steps 2..steps."""
    cfg = run_config(tmp / f"run_{workers}", corpus, workers, steps)
    cls = type("ScaleDriver", (Driver,), {"rollout_cls": premade_class(delay_s)})
    t0 = time.perf_counter()
    driver = cls(cfg, quiet=True)
    try:
        driver.run()
        placed = driver.workers.placed()
        pss_mb = actors_pss_mb()
    finally:
        driver.close()
    rows = [r for r in read_jsonl(Path(cfg.run.out_dir) / "metrics.jsonl") if "num_samples" in r][1:]
    step_s = median([r["time/step_s"] for r in rows])
    cpu_s = median([r["time/driver_cpu_s"] for r in rows])
    return {"workers": workers, "placed": placed, "steps_measured": len(rows), "step_s": step_s,
            "driver_cpu_s": cpu_s, "driver_cpu_pct": 100 * cpu_s / step_s,
            "sync_s": median([r["time/sync_s"] for r in rows]), "learn_s": median([r["time/learn_s"] for r in rows]),
            "generate_s_per_request": median([r["time/generate_s"] / workers for r in rows]),
            "actors_pss_mb": pss_mb, "wall_s": time.perf_counter() - t0}


def broadcast(ray, workers: int, preset: str, reps: int) -> dict:
    """Part 2: one snapshot to N actors through ActorGroup.publish, until every load is acknowledged."""
    from dgrpo.config import SamplerConfig, TrainConfig
    from dgrpo.models.diffusion import DiffusionLM
    from dgrpo.models.transformer import preset_config
    from dgrpo.orchestration.cluster import make_actor
    from dgrpo.protocols import WeightSnapshot
    torch.manual_seed(0)
    model = DiffusionLM(preset_config(preset, 66))
    role = TrainConfig.model_validate({"resources": {"rollout": {"num_cpus": 0.01}}}).resources.rollout
    manager = ActorManager(timeout_s=900, max_failures=0, counters={}, placement_timeout_s=900)
    group = manager.group("rollout", workers, lambda i: make_actor(PremadeRollout, role, i, model.cfg,
                                                                   SamplerConfig(steps=4), "fp32", 1))
    try:
        manager.wait_placed()
        times, loads = [], []
        for version in range(reps + 1):  # the first is a warm-up
            t0 = time.perf_counter()
            snapshot = WeightSnapshot.from_module(model, version)
            group.publish(ray.put(snapshot))
            while group.loading():
                manager.results(methods=())
            if version:
                times.append(time.perf_counter() - t0)
                loads.append(max(group.take_load_seconds()))
            else:
                group.take_load_seconds()
        return {"workers": workers, "preset": preset, "mb": snapshot.nbytes / 2**20, "broadcast_s": median(times),
                "broadcast_s_min": min(times), "worker_load_s_max": median(loads)}
    finally:
        manager.close()


class StandInWorker:
    def info(self):
        return {}

    def generate_by_ref(self, request, weights=None):
        return bytes(4096), {"request_id": request.request_id}


class StandInJudge:
    def score_by_ref(self, refs):
        batches = ray.get(refs)
        return (*[b[:64] for b in batches], [{"ok": True}] * len(batches))


def ray_floor(ray, workers: int, reps: int, steps: int = 10) -> dict:
    """Part 3: the calls of a driver step (a request per worker, one batched scoring call) without the driver;
    the caller's CPU per worker and step, median of `reps` rounds."""
    from dgrpo.protocols import RolloutRequest
    gens = [ray.remote(StandInWorker).options(num_cpus=0.01).remote() for _ in range(workers)]
    judge = ray.remote(StandInJudge).options(num_cpus=0.01).remote()
    try:
        ray.get([g.info.remote() for g in gens])
        request = RolloutRequest(request_id=0, prompts=torch.zeros(1, LENGTH, dtype=torch.long), group_size=8, seed=0)
        rounds = []
        for _ in range(reps + 1):  # the first is a warm-up
            cpu0 = sum(os.times()[:2])
            for _step in range(steps):
                outs = [g.generate_by_ref.options(num_returns=2).remote(request) for g in gens]
                ray.get([answer for _batch, answer in outs])
                scored = judge.score_by_ref.options(num_returns=workers + 1).remote([batch for batch, _ in outs])
                ray.get(scored[-1])
            rounds.append((sum(os.times()[:2]) - cpu0) / (steps * workers))
        return {"workers": workers, "cpu_ms_per_worker_step": 1000 * median(rounds[1:])}
    finally:
        for actor in [*gens, judge]:
            ray.kill(actor)


def actors_pss_mb() -> float:
    """Proportional set size (shared pages split among their users) of the Ray actor processes this process
    started, MB: what they take of the machine's memory."""
    total_kb = 0
    for pid in process_tree(os.getpid()) - {os.getpid()}:
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::"):
                rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
                total_kb += int(next(ln for ln in rollup.splitlines() if ln.startswith("Pss:")).split()[1])
        except (OSError, ValueError, StopIteration):
            pass
    return total_kb / 1024


def available_mb() -> float:
    line = next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemAvailable:"))
    return int(line.split()[1]) / 1024


def cpu_flags() -> list[str]:
    try:
        line = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        return []
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma")
    return [f for f in line.split(":", 1)[1].split() if f in wanted]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", default="1,4,16,64", help="comma list of rollout worker counts")
    ap.add_argument("--steps", type=int, default=6, help="GRPO steps per worker count (the first is not measured)")
    ap.add_argument("--delay-s", type=float, default=2.0, help="seconds each premade request takes")
    ap.add_argument("--reps", type=int, default=5, help="broadcasts per worker count (after one warm-up)")
    ap.add_argument("--broadcast-preset", default="small", help="model broadcast in part 2 (tiny, small, base)")
    ap.add_argument("--memory-share", type=float, default=MEMORY_SHARE,
                    help="most of the available memory the actors of one worker count may take")
    ap.add_argument("--quick", action="store_true", help="1 and 2 workers, 3 steps, 0.2 s delay, tiny: seconds")
    ap.add_argument("--out", default=str(default_out("driver_scale")), help="JSON output file")
    args = ap.parse_args(argv)
    counts, steps, delay, reps, preset = ints(args.workers), args.steps, args.delay_s, args.reps, args.broadcast_preset
    if args.quick:
        counts, steps, delay, reps, preset = [1, 2], 3, 0.2, 2, "tiny"
    info = {**machine_info(1), "cpu_flags": cpu_flags()}
    over, casts, floors, skipped = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="dgscale_") as tmp, local_ray(num_cpus=max(os.cpu_count() or 1, 2)) as ray:
        corpus = corpus_file(Path(tmp))
        for n in counts:
            if over:  # n workers, a learner and a judge: as much memory each as the last count's actors took
                need = over[-1]["actors_pss_mb"] / (over[-1]["workers"] + 2) * (n + 2)
                if need > args.memory_share * available_mb():
                    skipped.append({"workers": n, "needs_mb": need, "available_mb": available_mb()})
                    print(f"{n} workers: not run; their actors need about {need:.0f} MB, more than "
                          f"{args.memory_share:.0%} of the {available_mb():.0f} MB available")
                    continue
            over.append(overhead(ray, n, steps, delay, corpus, Path(tmp)))
            print_table([over[-1]], [("workers", "workers"), ("step_s", "step s", ".3f"),
                                     ("driver_cpu_s", "driver CPU s", ".4f"), ("driver_cpu_pct", "% of step", ".2f"),
                                     ("sync_s", "sync s", ".3f"), ("actors_pss_mb", "actors MB (PSS)", ".0f")])
            casts.append(broadcast(ray, n, preset, reps))
            floors.append(ray_floor(ray, n, reps))
    print_table(over, [("workers", "workers"), ("step_s", "step s", ".3f"), ("driver_cpu_s", "driver CPU s/step", ".4f"),
                       ("driver_cpu_pct", "driver CPU % of step", ".2f"), ("sync_s", "sync s (tiny)", ".3f"),
                       ("learn_s", "learn s", ".3f"), ("actors_pss_mb", "actors MB (PSS)", ".0f")],
                title=f"driver overhead, {delay:g} s premade requests, sync mode")
    print_table(casts, [("workers", "workers"), ("mb", "MB", ".2f"), ("broadcast_s", "broadcast s", ".4f"),
                        ("broadcast_s_min", "min s", ".4f"), ("worker_load_s_max", "slowest load s", ".4f")],
                title=f"broadcast of one {preset} snapshot (ActorGroup.publish until every ack)")
    print_table(floors, [("workers", "workers"), ("cpu_ms_per_worker_step", "caller CPU ms per worker-step", ".3f")],
                title="Ray's own cost of a step's calls (a request per worker, one batched scoring call)")
    report = {"bench": "driver_scale", "machine": info, "delay_s": delay, "steps": steps, "reps": reps,
              "overhead": over, "broadcast": casts, "ray_floor": floors, "not_run": skipped}
    write_json(report, args.out)
    return report


if __name__ == "__main__":
    main()
