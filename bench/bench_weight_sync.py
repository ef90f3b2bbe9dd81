"""Weight-sync latency from the learner to N rollout workers, against model size.

What the driver does once per policy version, timed in two parts:

- publish: `WeightSnapshot.from_module(model, v)` (CPU float32 copy of the
  state dict) + `ray.put` (one copy into the object store);
- load: every worker's `RolloutWorker.set_weights(ref)` (fetch the shared
  object, `load_state_dict`) until the last ack.

A private local Ray cluster (`num_cpus = max N + 1`, 127.0.0.1, no dashboard)
holds N `RolloutWorker` actors (1 CPU, 1 torch thread each); for each preset
the N values and repetitions are measured round-robin, figures are medians.
The workers' own `load_s` (inside the actor) is reported beside the driver's
wall time; the difference is Ray's task round trip and object fetch.

    python -m bench.bench_weight_sync [--presets tiny,small,base] [--workers 1,2,4] [--reps 9]
        [--quick] [--out bench/results/weight_sync.json]
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import (VOCAB, default_out, ints, local_ray, machine_info, median, names, print_table,
                          ray_cluster_kind, write_json)
from dgrpo.actors.rollout import RolloutWorker
from dgrpo.config import SamplerConfig
from dgrpo.models.diffusion import DiffusionLM
from dgrpo.models.transformer import count_params, preset_config
from dgrpo.protocols import WeightSnapshot

SAMPLER = SamplerConfig(steps=4)


def sync_once(ray, model: torch.nn.Module, workers: list, version: int) -> dict:
    t0 = time.perf_counter()
    snap = WeightSnapshot.from_module(model, version)
    t1 = time.perf_counter()
    ref = ray.put(snap)
    t2 = time.perf_counter()
    acks = ray.get([w.set_weights.remote(ref) for w in workers], timeout=300)
    t3 = time.perf_counter()
    if any(a["version"] != version for a in acks):
        raise RuntimeError(f"a worker acknowledged the wrong version: {acks}")
    del ref
    return {"snapshot_s": t1 - t0, "put_s": t2 - t1, "publish_s": t2 - t0, "load_s": t3 - t2,
            "total_s": t3 - t0, "worker_load_s_max": max(a["load_s"] for a in acks),
            "nbytes": snap.nbytes}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="tiny,small,base", help="comma list of tiny, small, base")
    ap.add_argument("--workers", default="1,2,4", help="comma list of worker counts N")
    ap.add_argument("--reps", type=int, default=9, help="syncs per (preset, N), round-robin over N")
    ap.add_argument("--quick", action="store_true", help="tiny preset, N = 1, 2, 2 reps: a few seconds")
    ap.add_argument("--out", default=str(default_out("weight_sync")), help="JSON output file")
    args = ap.parse_args(argv)
    presets, counts, reps = names(args.presets), ints(args.workers), args.reps
    if args.quick:
        presets, counts, reps = ["tiny"], [1, 2], 2
    n_max = max(counts)
    info = machine_info(1)

    rows = []
    with local_ray(num_cpus=n_max + 1) as ray:
        Worker = ray.remote(RolloutWorker).options(num_cpus=1, max_restarts=0)
        version = 0
        for preset in presets:
            torch.manual_seed(0)
            model = DiffusionLM(preset_config(preset, VOCAB))
            t0 = time.perf_counter()
            workers = [Worker.remote(i, model.cfg, SAMPLER, "fp32", 1) for i in range(n_max)]
            ray.get([w.info.remote() for w in workers], timeout=300)
            start_s = time.perf_counter() - t0
            version += 1
            sync_once(ray, model, workers, version)  # warm-up: first load, first fetch
            samples = {n: [] for n in counts}
            for _ in range(reps):
                for n in counts:
                    version += 1
                    samples[n].append(sync_once(ray, model, workers[:n], version))
            for n in counts:
                s = samples[n]
                mb = s[0]["nbytes"] / 2**20
                row = {"preset": preset, "params": count_params(model), "mb": mb, "workers": n, "reps": len(s),
                       "actor_start_s": start_s}
                for key in ("snapshot_s", "put_s", "publish_s", "load_s", "total_s", "worker_load_s_max"):
                    row[key] = median(x[key] for x in s)
                row["total_s_all"] = [x["total_s"] for x in s]
                row["rpc_overhead_s"] = max(row["load_s"] - row["worker_load_s_max"], 0.0)
                row["delivered_mb_per_s"] = n * mb / row["total_s"]
                rows.append(row)
            print(f"  {preset}: {mb:.2f} MB, {reps} reps x N in {counts}", flush=True)
            for w in workers:
                ray.kill(w, no_restart=True)

    for r in rows:  # latency relative to N = 1 of the same preset (measured interleaved)
        base = next((b for b in rows if b["preset"] == r["preset"] and b["workers"] == min(counts)), None)
        r["total_vs_min_n"] = r["total_s"] / base["total_s"]

    report = {"bench": "weight_sync", "threads": 1, "machine": info, "ray_num_cpus": n_max + 1, "ray_cluster": ray_cluster_kind(),
              "note": "publish = WeightSnapshot.from_module + ray.put (driver process); load = all "
                      "set_weights acks; medians over reps",
              "results": rows}
    print(f"\nweight sync, local Ray cluster (num_cpus={n_max + 1}), {info['cpu']}; medians of {reps} reps")
    ms = lambda v: f"{1e3 * v:.2f}"  # noqa: E731
    print_table(rows, [("preset", "preset"), ("params", "params"), ("mb", "MB", ".2f"), ("workers", "N"),
                       ("snapshot_s", "snapshot ms", ms), ("put_s", "put ms", ms), ("publish_s", "publish ms", ms),
                       ("load_s", "load ms", ms), ("worker_load_s_max", "in-actor ms", ms),
                       ("total_s", "total ms", ms), ("total_vs_min_n", "vs N=min", ".2f"),
                       ("delivered_mb_per_s", "MB/s delivered", ".0f")])
    write_json(report, args.out)
    return report


if __name__ == "__main__":
    main()
