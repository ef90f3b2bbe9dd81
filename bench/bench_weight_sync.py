"""Weight sync from the learner to N rollout workers: the object store against a collective broadcast.

The driver's own path (dgrpo/orchestration/weights.py) between a real LearnerActor and N RolloutWorker
actors on a private local Ray cluster (127.0.0.1, no dashboard), timed per version from the driver's
publish until every worker has acknowledged its load (and, collective, the learner's send has returned):

object_store  learner: WeightSnapshot.from_module + ray.put (one object); each worker fetches it from the
              object store and loads it (load_state_dict)
collective    learner: a torch.distributed broadcast (gloo on CPU) of every state_dict tensor as rank 0;
              each worker receives them into its model in place. A membership's first broadcast also
              builds the group (`first_s`, not in the medians)

Presets: tiny, small, base, and `large` (the base preset at 8 layers of width 1024, about 400 MB) standing
for a real model's snapshot. One learner and max(N) workers are started per preset; N goes down by
retiring workers, and the two paths alternate on the same actors, one version each, --reps times
after a warm-up. Every actor asks for 0.01 CPU so that N of them fit the machine; they share its cores.
A (preset, N) whose actors would need more than MEMORY_SHARE of the memory available is not run.

    python -m bench.bench_weight_sync [--presets small,base,large] [--workers 1,2,4,8,16]
        [--paths object_store,collective] [--reps 5] [--quick] [--out bench/results/weight_sync.json]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from bench.common import (VOCAB, default_out, ints, local_ray, machine_info, median, names, print_table,
                          ray_cluster_kind, write_json)
from dgrpo.actors.learner import LearnerActor
from dgrpo.actors.rollout import RolloutWorker
from dgrpo.config import GRPOConfig, SamplerConfig, TrainConfig
from dgrpo.corpus import CharTokenizer
from dgrpo.models.diffusion import DiffusionLM
from dgrpo.models.transformer import count_params, preset_config
from dgrpo.orchestration.cluster import make_actor
from dgrpo.orchestration.groups import ActorManager
from dgrpo.orchestration.weights import CollectiveSync, ObjectStoreSync
from dgrpo.protocols import WeightSnapshot

LARGE = {"n_layer": 8, "n_embd": 1024, "n_head": 16}  # on the base preset: about 100 M parameters, 400 MB
PROCESS_MB = 300  # an actor process without its model (torch, Ray)
MEMORY_SHARE = 0.6


def model_config(preset: str):
    return preset_config("base", VOCAB, **LARGE) if preset == "large" else preset_config(preset, VOCAB)


def needed_mb(model_mb: float, workers: int) -> float:
    """Workers: process, model and a loaded copy; learner: policy, reference and a snapshot; the object."""
    return workers * (PROCESS_MB + 2 * model_mb) + PROCESS_MB + 4 * model_mb


def available_mb() -> float:
    line = next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemAvailable:"))
    return int(line.split()[1]) / 1024


def sync_once(manager, workers, sync, version: int) -> tuple[float, float]:
    """One version through `sync` -> (seconds until every ack, the slowest worker's own load seconds)."""
    t0 = time.perf_counter()
    sync.publish(version)
    while workers.loading() or sync.sending():
        for _call, answer in manager.results(methods=("broadcast_weights",), timeout=0.5):
            sync.answered(answer)
    seconds = time.perf_counter() - t0
    expected = version if isinstance(sync, CollectiveSync) else 0  # the object is the learner's own (untrained) v0
    held = {s.version for s in workers.slots if not s.retiring}
    if held != {expected}:
        raise RuntimeError(f"after version {version} the workers hold {held}")
    return seconds, max(workers.take_load_seconds() or [0.0])


def bench_preset(ray, preset: str, counts: list[int], paths: list[str], reps: int) -> tuple[list, list]:
    torch.manual_seed(0)
    cfg = model_config(preset)
    model = DiffusionLM(cfg)
    snapshot = WeightSnapshot.from_module(model, 0)
    mb = snapshot.nbytes / 2**20
    runnable = [n for n in counts if needed_mb(mb, n) <= MEMORY_SHARE * available_mb()]
    skipped = [{"preset": preset, "workers": n, "needs_mb": needed_mb(mb, n), "available_mb": available_mb()}
               for n in counts if n not in runnable]
    for s in skipped:
        print(f"  {preset}, {s['workers']} workers: not run; about {s['needs_mb']:.0f} MB needed, more than "
              f"{MEMORY_SHARE:.0%} of the {s['available_mb']:.0f} MB available")
    if not runnable:
        return [], skipped
    role = TrainConfig.model_validate({"resources": {"rollout": {"num_cpus": 0.01}}}).resources.rollout
    vocab = CharTokenizer([chr(32 + i) for i in range(VOCAB - 1)]).to_dict()
    init = ray.put(snapshot)
    del snapshot
    manager = ActorManager(timeout_s=900, max_failures=0, counters={}, placement_timeout_s=900)
    rows = []
    try:
        learner = manager.group("learner", 1, lambda _: make_actor(LearnerActor, role, GRPOConfig(), cfg, vocab, init,
                                                                   precision="fp32", torch_threads=1),
                                restartable=False)
        workers = manager.group("rollout", max(runnable), lambda i: make_actor(
            RolloutWorker, role, i, cfg, SamplerConfig(steps=4), "fp32", 1), min_size=1, max_size=max(runnable))
        t0 = time.perf_counter()
        manager.wait_placed()
        while workers.placed() < max(runnable):
            manager.results(methods=(), timeout=0.5)
        print(f"  {preset} ({mb:.1f} MB): learner and {max(runnable)} workers started in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        syncs = {"object_store": ObjectStoreSync(learner, workers),
                 "collective": CollectiveSync(learner, workers, {}, timeout_s=600)}
        version = 0
        for n in sorted(runnable, reverse=True):
            workers.resize(n)
            samples = {p: [] for p in paths}
            first = {}
            for rep in range(reps + 1):
                for path in paths:
                    version += 1
                    seconds, load = sync_once(manager, workers, syncs[path], version)
                    if rep == 0:
                        first[path] = seconds  # the object's first fetch; the collective's group build
                    else:
                        samples[path].append((seconds, load))
            for path in paths:
                times = [s for s, _ in samples[path]]
                rows.append({"preset": preset, "params": count_params(model), "mb": mb, "workers": n, "path": path,
                             "reps": len(times), "sync_s": median(times), "sync_s_min": min(times),
                             "sync_s_all": times, "first_s": first[path],
                             "worker_load_s_max": median([lo for _, lo in samples[path]]),
                             "delivered_mb_per_s": n * mb / median(times)})
            print(f"  {preset}, {n} workers: " + ", ".join(f"{r['path']} {r['sync_s']:.3f} s" for r in rows[-2:]),
                  flush=True)
    finally:
        manager.close()
    return rows, skipped


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="small,base,large", help="comma list of tiny, small, base, large")
    ap.add_argument("--workers", default="1,2,4,8,16", help="comma list of worker counts N")
    ap.add_argument("--paths", default="object_store,collective", help="comma list of object_store, collective")
    ap.add_argument("--reps", type=int, default=5, help="versions per (preset, N, path), after one warm-up")
    ap.add_argument("--quick", action="store_true", help="tiny preset, N = 1, 2, 2 reps: seconds")
    ap.add_argument("--out", default=str(default_out("weight_sync")), help="JSON output file")
    args = ap.parse_args(argv)
    presets, counts, paths, reps = names(args.presets), ints(args.workers), names(args.paths), args.reps
    if args.quick:
        presets, counts, reps = ["tiny"], [1, 2], 2
    info = machine_info(1)
    rows, skipped = [], []
    with local_ray(num_cpus=max(os.cpu_count() or 1, 2)) as ray:
        for preset in presets:
            r, s = bench_preset(ray, preset, counts, paths, reps)
            rows += r
            skipped += s
    rows.sort(key=lambda r: (presets.index(r["preset"]), r["workers"], paths.index(r["path"])))
    for r in rows:  # against the object store at the same preset and N
        base = next((b for b in rows if (b["preset"], b["workers"], b["path"]) == (r["preset"], r["workers"],
                                                                                   "object_store")), None)
        r["vs_object_store"] = r["sync_s"] / base["sync_s"] if base else None
    print(f"\nweight sync, learner -> N workers, local Ray cluster on {info['cpu']} ({info['logical_cpus']} logical "
          f"CPUs); medians of {reps}")
    print_table(rows, [("preset", "preset"), ("mb", "MB", ".1f"), ("workers", "N"), ("path", "path"),
                       ("sync_s", "sync s", ".4f"), ("sync_s_min", "min s", ".4f"), ("first_s", "first s", ".3f"),
                       ("worker_load_s_max", "slowest load s", ".4f"), ("vs_object_store", "vs object store", ".2f"),
                       ("delivered_mb_per_s", "MB/s delivered", ".0f")])
    report = {"bench": "weight_sync", "machine": info, "ray_cluster": ray_cluster_kind(), "reps": reps,
              "results": rows, "not_run": skipped,
              "note": "sync_s: from the driver's publish until every worker acknowledged (collective: and the "
                      "learner's send returned); first_s: the first version at that N (object fetch, group build)"}
    write_json(report, args.out)
    return report


if __name__ == "__main__":
    main()
