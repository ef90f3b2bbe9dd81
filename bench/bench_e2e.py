"""End-to-end GRPO steps/min in sync vs async mode, with the time split per role.

`run_training` runs the same configuration in `sync` and in `async` mode, one
after the other (round-robin when `--repeats` > 1), on one local Ray cluster.
From each run's metrics.jsonl (the driver's per-step records, first `--skip`
steps left out as warm-up) it reports:

- steps/min = 60 x steps / sum of step wall times (the loop only: start-up,
  the first evaluation and the final checkpoint are outside);
- shares of wall time per role:
  generation = sum of worker generate seconds / (workers x wall),
  scoring = sum of judge score seconds / (judges x wall),
  learning = learner busy share (learn_s / wall),
  sync = the driver's publish time / wall (each worker loads the new weights
  with its next request, inside its generation time; with
  run.weight_sync=collective, the broadcast too),
  learner idle = 1 - learning, rollout idle = 1 - generation;
  `other` (sync mode only) = 1 - (generation + scoring + learning + sync):
  the driver's own latency between phases on the critical path (in async
  mode the roles overlap, so their shares need not sum to 1).
The driver's own per-step `learner_idle_ratio` / `rollout_idle_ratio` are
reported beside them (time-weighted means).

`--reference-on learner,rollout` runs every mode with the reference's pass on the learner and on the rollout
workers (grpo.reference_on), round-robin, and compares samples/min between them. While a run goes, the peak
resident memory (VmHWM) of its learner and rollout worker processes is read from /proc (Linux; Ray names
their processes ray::LearnerActor, ray::RolloutWorker).

    python -m bench.bench_e2e [--preset tiny] [--steps 12] [--repeats 2] [--workers 2] [--worker-cpus 0.5]
        [--judge-cpus 0.5] [--reference-on learner] [--set grpo.old_logprob=recompute ...]
        [--generator CKPT] [--judge CKPT] [--corpus PATH] [--quick] [--out bench/results/e2e.json]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import threading
from pathlib import Path

from bench.common import (corpus_path, default_out, local_ray, machine_info, names, pct, print_table,
                          ray_cluster_kind, write_json)
from dgrpo.config import TrainConfig, load_config
from dgrpo.orchestration.cluster import required_resources
from dgrpo.orchestration.driver import run_training


class PeakMemory:
    """Peak RSS (VmHWM, MiB) of the processes whose command line starts with each prefix, polled from /proc
    while the `with` block runs."""

    def __init__(self, prefixes: dict[str, str], every_s: float = 1.0):
        self.prefixes, self.every_s = prefixes, every_s
        self.peak_mib = {name: None for name in prefixes}
        self._stop = threading.Event()

    def poll(self) -> None:
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                name = next((n for n, prefix in self.prefixes.items() if cmdline.startswith(prefix)), None)
                if name is None:
                    continue
                status = (proc / "status").read_text()
            except OSError:  # the process ended
                continue
            hwm = next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM:")),
                       None)
            if hwm is not None:
                self.peak_mib[name] = max(self.peak_mib[name] or 0.0, hwm)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.poll()

    def __enter__(self) -> "PeakMemory":
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def build_config(args, mode: str, out_dir: Path, corpus: str, reference_on: str = "learner") -> TrainConfig:
    reward = ({"kind": "judge", "judge_checkpoint": args.judge} if args.judge
              else {"kind": "char_frequency", "chars": "e"})
    generator = {"checkpoint": args.generator} if args.generator else {"preset": args.preset}
    cfg = {
        "run": {"out_dir": str(out_dir), "steps": args.steps, "mode": mode, "max_staleness": args.max_staleness,
                "eval_every": 10 ** 6, "eval_prompts": args.eval_prompts, "checkpoint_every": 10 ** 6,
                "keep_checkpoints": 1, "metrics_export": False, "log_rollouts": False, "seed": 0,
                "actor_timeout_s": 600},
        "corpus": {"path": corpus},
        "generator": generator,
        "reward": reward,
        "prompts": {"kind": args.prompt_kind},
        "sampler": {"steps": args.sampler_steps},
        "grpo": {"group_size": args.group_size, "prompts_per_step": args.prompts, "minibatch_size":
                 args.minibatch_size, "lr": 1e-4, "replay_steps": args.replay_steps, "reference_on": reference_on},
        "resources": {"rollout": {"num_workers": args.workers, "num_cpus": args.worker_cpus, "precision": "fp32"},
                      "judge": {"num_workers": 1, "num_cpus": args.judge_cpus, "precision": "fp32"},
                      "learner": {"num_cpus": 1.0, "precision": "fp32", "max_restarts": 0},
                      "torch_threads": args.threads},
    }
    return load_config(TrainConfig, overrides=args.set, base=cfg)


def summarise(rows: list[dict], skip: int, n_workers: int, n_judges: int) -> dict:
    steps = [r for r in rows if "reward_mean" in r and "time/step_s" in r]
    used = steps[skip:] if len(steps) > skip else steps
    wall = sum(r["time/step_s"] for r in used)
    gen = sum(r["time/generate_s"] for r in used)
    score = sum(r["time/score_s"] for r in used)
    learn = sum(r["time/learn_s"] for r in used)
    sync = sum(r["time/sync_s"] for r in used)
    weighted = lambda key: sum(r[key] * r["time/step_s"] for r in used) / wall  # noqa: E731
    out = {
        "steps_measured": len(used), "wall_s": wall, "steps_per_min": 60.0 * len(used) / wall,
        "driver_steps_per_min": steps[-1]["steps_per_min"],
        "share_generation": gen / (n_workers * wall), "share_scoring": score / (n_judges * wall),
        "share_learning": learn / wall, "share_sync": sync / wall,
        "share_learner_idle": 1.0 - learn / wall, "share_rollout_idle": 1.0 - gen / (n_workers * wall),
        "driver_learner_idle_ratio": weighted("learner_idle_ratio"),
        "driver_rollout_idle_ratio": weighted("rollout_idle_ratio"),
        "step_s_mean": wall / len(used), "generate_s_per_step": gen / len(used),
        "score_s_per_step": score / len(used), "learn_s_per_step": learn / len(used),
        "sync_s_per_step": sync / len(used),
        "publish_s_per_step": sum(r.get("time/publish_s", 0.0) for r in used) / len(used),
        "ref_replay_s_per_step": sum(r.get("ref_replay_s", 0.0) for r in used) / len(used),
        "sync_load_s_mean": sum(r.get("sync_load_s_mean", 0.0) for r in used) / len(used),
        "staleness_mean": sum(r.get("staleness_mean", 0.0) for r in used) / len(used),
        "dropped_stale_batches": steps[-1].get("dropped_stale_batches", 0),
        "reward_first": steps[0]["reward_mean"], "reward_last": steps[-1]["reward_mean"],
    }
    out["share_unaccounted"] = 1.0 - (out["share_generation"] + out["share_scoring"] + out["share_learning"]
                                      + out["share_sync"])
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "small", "base"], help="fresh generator preset")
    ap.add_argument("--generator", default=None, help="generator checkpoint (instead of a fresh preset)")
    ap.add_argument("--judge", default=None, help="judge checkpoint (reward); default: char_frequency of 'e'")
    ap.add_argument("--corpus", default=None, help="text file; default ../shared tiny Shakespeare or synthetic")
    ap.add_argument("--modes", default="sync,async", help="comma list of sync, async")
    ap.add_argument("--reference-on", default="learner", help="comma list of learner, rollout (grpo.reference_on)")
    ap.add_argument("--steps", type=int, default=12, help="GRPO steps per run")
    ap.add_argument("--skip", type=int, default=1, help="first steps of each run left out (warm-up)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per mode, alternating modes")
    ap.add_argument("--workers", type=int, default=2, help="rollout workers")
    ap.add_argument("--worker-cpus", type=float, default=0.5, help="logical CPUs per rollout worker")
    ap.add_argument("--judge-cpus", type=float, default=0.5, help="logical CPUs of the judge")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per actor")
    ap.add_argument("--sampler-steps", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per GRPO step")
    ap.add_argument("--minibatch-size", type=int, default=32)
    ap.add_argument("--replay-steps", type=int, default=None, help="grpo.replay_steps (default: all)")
    ap.add_argument("--prompt-kind", default="unconditional", choices=["unconditional", "infill"])
    ap.add_argument("--max-staleness", type=int, default=1)
    ap.add_argument("--eval-prompts", type=int, default=8)
    ap.add_argument("--run-dir", default=None, help="keep the runs here (default: a temporary folder, removed)")
    ap.add_argument("--quick", action="store_true", help="3 tiny steps per mode, small batches: seconds")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every run, e.g. grpo.old_logprob=recompute (repeatable)")
    ap.add_argument("--out", default=str(default_out("e2e")), help="JSON output file")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.quick:
        args.preset, args.steps, args.repeats, args.sampler_steps = "tiny", 3, 1, 4
        args.group_size, args.prompts, args.minibatch_size, args.eval_prompts = 4, 4, 16, 4
        args.generator = args.generator if args.generator else None
    modes, sides = names(args.modes), names(args.reference_on)
    variants = [(mode, side) for mode in modes for side in sides]
    info = machine_info(args.threads)

    tmp = Path(tempfile.mkdtemp(prefix="bench_e2e_"))
    base = Path(args.run_dir) if args.run_dir else tmp
    try:
        corpus = corpus_path(args.corpus, args.quick, tmp)
        cfg0 = build_config(args, modes[0], base / "probe", corpus)
        need = required_resources(cfg0)
        n_cpus = max(1, math.ceil(need["CPU"]))
        runs = []
        with local_ray(num_cpus=n_cpus, threads=args.threads):
            for rep in range(args.repeats):
                for mode, side in variants:
                    out_dir = base / f"{mode}_{side}_{rep}"
                    cfg = build_config(args, mode, out_dir, corpus, side)
                    with PeakMemory({"learner": "ray::LearnerActor", "rollout": "ray::RolloutWorker"}) as memory:
                        summary = run_training(cfg, overwrite=True)  # a bench run replaces its own earlier one
                    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()
                            if line.strip()]
                    s = summarise(rows, args.skip, args.workers, 1)
                    if mode != "sync":  # roles overlap in async mode: the shares need not sum to 1
                        s["share_unaccounted"] = None
                    s.update(mode=mode, reference_on=side, repeat=rep, run_wall_s=summary["wall_time_s"],
                             samples_per_min=s["steps_per_min"] * args.prompts * args.group_size,
                             eval_reward_before=summary["eval_reward_before"],
                             eval_reward_after=summary["eval_reward_after"],
                             learner_peak_rss_mib=memory.peak_mib["learner"],
                             rollout_peak_rss_mib=memory.peak_mib["rollout"])
                    runs.append(s)
                    print(f"  {mode}, reference on {side}, run {rep + 1}/{args.repeats}: "
                          f"{s['steps_per_min']:.1f} steps/min", flush=True)
            cluster = ray_cluster_kind()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    # per mode: pool the repeats (sum walls); ratios against sync
    modes_out = []
    for mode, side in variants:
        rs = [r for r in runs if r["mode"] == mode and r["reference_on"] == side]
        wall = sum(r["wall_s"] for r in rs)
        pooled = {"mode": mode, "reference_on": side, "runs": len(rs),
                  "steps_measured": sum(r["steps_measured"] for r in rs),
                  "steps_per_min": 60.0 * sum(r["steps_measured"] for r in rs) / wall,
                  "steps_per_min_runs": [r["steps_per_min"] for r in rs]}
        pooled["samples_per_min"] = pooled["steps_per_min"] * args.prompts * args.group_size
        for key in ("learner_peak_rss_mib", "rollout_peak_rss_mib"):
            seen = [r[key] for r in rs if r[key] is not None]
            pooled[key] = max(seen) if seen else None
        for key in rs[0]:
            if key.startswith("share_") or key.startswith("driver_") or key.endswith("_per_step") \
                    or key in ("step_s_mean", "sync_load_s_mean", "staleness_mean"):
                pooled[key] = None if rs[0][key] is None else sum(r[key] * r["wall_s"] for r in rs) / wall
        pooled["dropped_stale_batches"] = sum(r["dropped_stale_batches"] for r in rs)
        modes_out.append(pooled)
    for m in modes_out:
        same_side_sync = next((b for b in modes_out if b["mode"] == "sync" and b["reference_on"] == m["reference_on"]),
                              None)
        if same_side_sync is not None:
            m["speedup_vs_sync"] = m["steps_per_min"] / same_side_sync["steps_per_min"]
        on_learner = next((b for b in modes_out if b["mode"] == m["mode"] and b["reference_on"] == "learner"), None)
        if on_learner is not None:
            m["speedup_vs_reference_on_learner"] = m["steps_per_min"] / on_learner["steps_per_min"]

    setup = {"preset": None if args.generator else args.preset, "generator": args.generator, "judge": args.judge,
             "reward": "judge" if args.judge else "char_frequency('e')", "steps": args.steps, "skip": args.skip,
             "repeats": args.repeats, "workers": args.workers, "worker_cpus": args.worker_cpus,
             "torch_threads": args.threads, "sampler_steps": args.sampler_steps, "group_size": args.group_size,
             "prompts_per_step": args.prompts, "minibatch_size": args.minibatch_size,
             "replay_steps": args.replay_steps, "max_staleness": args.max_staleness, "reference_on": sides,
             "prompt_kind": args.prompt_kind, "overrides": args.set, "corpus": corpus, "ray_num_cpus": n_cpus,
             "ray_cluster": cluster}
    report = {"bench": "e2e", "threads": args.threads, "machine": info, "setup": setup, "modes": modes_out,
              "runs": runs}
    print(f"\nend-to-end GRPO, {setup['reward']} reward, {'generator ' + args.generator if args.generator else args.preset}"
          f", {args.workers} workers x {args.worker_cpus:g} CPU, {args.prompts}x{args.group_size} samples/step, "
          f"S={args.sampler_steps}, {args.steps} steps per run ({args.skip} skipped), {args.repeats} run(s) per mode;"
          f" {info['cpu']}")
    print_table(modes_out, [
        ("mode", "mode"), ("reference_on", "ref on"), ("steps_per_min", "steps/min", ".1f"),
        ("samples_per_min", "samples/min", ".0f"), ("speedup_vs_sync", "vs sync", ".2f"),
        ("speedup_vs_reference_on_learner", "vs ref on learner", ".2f"),
        ("step_s_mean", "s/step", ".2f"), ("share_generation", "gen", pct), ("share_scoring", "score", pct),
        ("share_learning", "learn", pct), ("share_sync", "sync", pct), ("share_unaccounted", "other", pct),
        ("share_learner_idle", "learner idle", pct), ("share_rollout_idle", "rollout idle", pct),
        ("driver_learner_idle_ratio", "drv learner idle", pct),
        ("driver_rollout_idle_ratio", "drv rollout idle", pct), ("staleness_mean", "staleness", ".2f")])
    print()
    print_table(modes_out, [("mode", "mode"), ("reference_on", "ref on"),
                            ("generate_s_per_step", "gen s/step (sum workers)", ".2f"),
                            ("score_s_per_step", "score s/step", ".3f"), ("learn_s_per_step", "learn s/step", ".2f"),
                            ("ref_replay_s_per_step", "ref replay s", ".2f"), ("sync_s_per_step", "sync s", ".3f"),
                            ("publish_s_per_step", "publish s", ".4f"), ("sync_load_s_mean", "load s", ".4f"),
                            ("dropped_stale_batches", "dropped"), ("learner_peak_rss_mib", "learner MiB", ".0f"),
                            ("rollout_peak_rss_mib", "worker MiB", ".0f")])
    write_json(report, args.out)
    return report


if __name__ == "__main__":
    main()
