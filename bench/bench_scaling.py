"""Rollout scaling: samples/s with 1, 2, ... RolloutWorker actors and the scaling efficiency.

N `RolloutWorker` actors, each asking Ray for `cpus / N` logical CPUs
(fractional CPUs on this machine; on a GPU machine use `--gpus-per-worker 1`
for whole GPUs) and running 1 torch thread, each get the same number of
identical requests (same prompt count, group size and sampler steps) at once;
throughput(N) = samples / wall time until the last batch is back, and

    scaling efficiency(N) = throughput(N) / (N x throughput(1)),

which cannot honestly exceed 1. On 2 physical cores 2 workers should reach
close to 2x one worker (efficiency near 1) and a 3rd worker only shares cores.
With `--thread-reference`, one worker with `cpus` torch threads (intra-op
parallelism instead of more actors) is measured too.

Every worker group lives for the whole run (the cluster has
`cpus x groups` logical CPUs so they all fit; only one group works at a time)
and the groups are measured round-robin, `--reps` times; figures are medians.

    python -m bench.bench_scaling [--preset small] [--workers 1,2] [--cpus 2] [--requests 6]
        [--prompts 1] [--group-size 8] [--steps 16] [--reps 3] [--thread-reference] [--quick] [--out ...]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from bench.common import (VOCAB, default_out, ints, local_ray, machine_info, median, pct, print_table,
                          ray_cluster_kind, write_json)
from dgrpo.actors.rollout import RolloutWorker
from dgrpo.config import SamplerConfig
from dgrpo.models.diffusion import DiffusionLM
from dgrpo.models.transformer import preset_config
from dgrpo.protocols import RolloutRequest, WeightSnapshot


def run_group(ray, workers: list, prompts: torch.Tensor, group_size: int, requests: int, seed: int) -> dict:
    """Every worker gets `requests` identical requests at once; wall time until the last batch."""
    t0 = time.perf_counter()
    refs = [w.generate.remote(RolloutRequest(request_id=seed + j * len(workers) + i, prompts=prompts,
                                             group_size=group_size, seed=seed + j))
            for j in range(requests) for i, w in enumerate(workers)]
    batches = ray.get(refs, timeout=600)
    wall = time.perf_counter() - t0
    samples = sum(b.num_samples for b in batches)
    busy = sum(b.timings["generate_s"] for b in batches)
    return {"wall_s": wall, "samples": samples, "samples_per_s": samples / wall,
            "busy_share": busy / (len(workers) * wall)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small", help="tiny, small or base (random init)")
    ap.add_argument("--workers", default="1,2", help="comma list of worker counts N")
    ap.add_argument("--cpus", type=float, default=2.0, help="CPUs shared by the N workers (each gets cpus/N)")
    ap.add_argument("--gpus-per-worker", type=float, default=0.0, help="whole GPUs per worker on a GPU machine")
    ap.add_argument("--requests", type=int, default=6, help="requests per worker per measurement")
    ap.add_argument("--prompts", type=int, default=1, help="prompts per request")
    ap.add_argument("--group-size", type=int, default=8, help="samples per prompt")
    ap.add_argument("--steps", type=int, default=16, help="sampler steps")
    ap.add_argument("--reps", type=int, default=3, help="measurements per group, round-robin")
    ap.add_argument("--thread-reference", action="store_true",
                    help="also measure 1 worker with `cpus` torch threads (slow on an oversubscribed machine)")
    ap.add_argument("--quick", action="store_true", help="tiny preset, N = 1, 2, few requests: seconds")
    ap.add_argument("--out", default=str(default_out("scaling")), help="JSON output file")
    args = ap.parse_args(argv)
    preset, counts, requests, reps, steps = args.preset, ints(args.workers), args.requests, args.reps, args.steps
    if args.quick:
        preset, counts, requests, reps, steps = "tiny", [1, 2], 2, 1, 4
    if 1 not in counts:
        counts = [1] + counts
    ref_threads = max(1, int(math.floor(args.cpus)))
    groups = [(n, 1) for n in counts]
    if args.thread_reference and ref_threads > 1:
        groups.append((1, ref_threads))
    info = machine_info(1)

    torch.manual_seed(0)
    model = DiffusionLM(preset_config(preset, VOCAB))
    T = model.cfg.block_size
    prompts = torch.full((args.prompts, T), model.mask_id, dtype=torch.long)
    sampler = SamplerConfig(steps=steps)
    cluster_cpus = args.cpus * len(groups)
    results: dict[tuple[int, int], list[dict]] = {g: [] for g in groups}
    with local_ray(num_cpus=cluster_cpus) as ray:
        snap = ray.put(WeightSnapshot.from_module(model, 1))
        handles = {}
        for n, threads in groups:
            Worker = ray.remote(RolloutWorker).options(
                num_cpus=args.cpus / n if args.gpus_per_worker == 0 else 1,
                num_gpus=args.gpus_per_worker, max_restarts=0)
            handles[n, threads] = [Worker.remote(i, model.cfg, sampler, "fp32", threads)
                                   for i in range(n)]
        for g, ws in handles.items():
            ray.get([w.set_weights.remote(snap) for w in ws], timeout=300)
            run_group(ray, ws, prompts, args.group_size, 1, seed=0)  # warm-up
        for rep in range(reps):
            for g in groups:
                results[g].append(run_group(ray, handles[g], prompts, args.group_size, requests,
                                            seed=1000 * (rep + 1)))
            print(f"  rep {rep + 1}/{reps} done", flush=True)
        for ws in handles.values():
            for w in ws:
                ray.kill(w, no_restart=True)
        cluster = ray_cluster_kind()

    rows = []
    for (n, threads), rs in results.items():
        rows.append({"workers": n, "torch_threads": threads,
                     "cpus_per_worker": args.cpus / n if args.gpus_per_worker == 0 else 1.0,
                     "gpus_per_worker": args.gpus_per_worker, "reps": len(rs),
                     "samples": rs[0]["samples"], "wall_s": median(r["wall_s"] for r in rs),
                     "samples_per_s": median(r["samples_per_s"] for r in rs),
                     "samples_per_s_all": [r["samples_per_s"] for r in rs],
                     "chars_per_s": median(r["samples_per_s"] for r in rs) * T,
                     "busy_share": median(r["busy_share"] for r in rs)})
    base = next(r for r in rows if r["workers"] == 1 and r["torch_threads"] == 1)
    for r in rows:
        r["speedup"] = r["samples_per_s"] / base["samples_per_s"]
        r["efficiency"] = r["speedup"] / r["workers"] if r["torch_threads"] == 1 else None
        r["label"] = f"{r['workers']} x 1 thr" if r["torch_threads"] == 1 else f"1 x {r['torch_threads']} thr"
    scaling = [r for r in rows if r["torch_threads"] == 1]
    report = {"bench": "scaling", "threads": 1, "machine": info, "preset": preset, "block_size": T,
              "steps": steps, "request": {"prompts": args.prompts, "group_size": args.group_size,
                                          "requests_per_worker": requests},
              "cpus": args.cpus, "ray_num_cpus": cluster_cpus, "ray_cluster": cluster,
              "efficiency_note": "efficiency = throughput(N) / (N x throughput(1)); the thread reference "
                                 "row is 1 worker with more torch threads, its speedup is vs 1 x 1 thread",
              "results": rows,
              "efficiency": {str(r["workers"]): r["efficiency"] for r in scaling}}
    print(f"\nrollout scaling, preset {preset} (T={T}), S={steps}, requests of {args.prompts}x{args.group_size} "
          f"samples, {requests} per worker, {args.cpus:g} CPUs shared; {info['cpu']}; medians of {reps} reps")
    print_table(rows, [("label", "workers"), ("cpus_per_worker", "CPU/worker", ".2f"), ("wall_s", "wall s", ".2f"),
                       ("samples_per_s", "samples/s", ".2f"), ("chars_per_s", "chars/s", ".0f"),
                       ("busy_share", "busy", pct), ("speedup", "speedup", ".2f"),
                       ("efficiency", "efficiency", ".2f")])
    write_json(report, args.out)
    return report


if __name__ == "__main__":
    main()
