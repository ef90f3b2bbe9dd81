"""The GPU check: what one CUDA device does with this project's roles, in a few minutes, written to one JSON.

    python -m bench.bench_gpu [--device auto|cuda|cpu] [--grpo-minutes 2] [--quick] [--out ...]

1. the device: its name, memory and bf16 support, and its matmul roofline in bf16 and fp32. Where the device is
   `auto` and there is no CUDA device the report says so and nothing else runs (exit 0): the check is for the
   first GPU machine, and on a CPU it only says that it did not run.
2. sampler: `sample()` samples/s and chars/s, small and base presets, 16 steps, batches of 64 and 256, random
   and confidence order, bf16 where the device has it.
3. learner: `LearnerCore.train` seconds a step on sampled batches of the small preset (4 prompts x 8, 16 steps),
   replaying 4 steps a sample and all of them, with the reference's pass on the learner and off it.
4. GRPO for `--grpo-minutes`, twice: in this process, one role after the other (sampling, the reference's
   terms, the update: each one's share of the time), and where Ray is installed `dgrpo train` with two rollout
   workers on a quarter of the GPU each and the learner and judge beside them: steps and samples per minute.
   (Ray's wheel does not fit the 64 MiB a lent GPU machine takes along: bench/gpu_check.sh.)

`--device cpu --quick` runs every part on the CPU at the tiny preset in seconds (the suite's check of this code).
bench/gpu_check.sh runs this and the CUDA tests on a GPU machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import tempfile
import time
from pathlib import Path

import torch

from bench.common import default_out, machine_info, synthetic_corpus_text, write_json
from bench.roofline import measure_matmul_gflops
from dgrpo.config import GRPOConfig
from dgrpo.learner.core import LearnerCore
from dgrpo.models.diffusion import DiffusionLM
from dgrpo.models.sampler import RevealRule, sample
from dgrpo.models.trajectory import reference_terms
from dgrpo.models.transformer import preset_config
from dgrpo.protocols import RolloutBatch, ScoredBatch

VOCAB = 65


def device_report(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"type": device.type}
    props = torch.cuda.get_device_properties(device)
    return {"type": "cuda", "name": props.name, "memory_gib": props.total_memory / 2**30,
            "multiprocessors": props.multi_processor_count, "bf16": torch.cuda.is_bf16_supported(),
            "torch_cuda": torch.version.cuda}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_best(fn, device: torch.device, reps: int) -> float:
    fn()  # warm-up: kernels, allocator, caches
    synchronize(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def bench_sampler(device, dtype, presets, batch_sizes, steps: int, reps: int) -> list[dict]:
    rows = []
    for preset in presets:
        model = DiffusionLM(preset_config(preset, VOCAB)).to(device).eval()
        T = model.cfg.block_size
        for batch in batch_sizes:
            prompts = torch.full((batch, T), model.mask_id, dtype=torch.long, device=device)
            for order in ("random", "confidence"):
                gen = torch.Generator(device=device).manual_seed(0)
                run = lambda: sample(model, prompts, steps=steps, order=order, generator=gen,  # noqa: E731
                                     autocast_dtype=dtype)
                seconds = timed_best(run, device, reps)
                rows.append({"preset": preset, "batch": batch, "order": order, "steps": steps, "seconds": seconds,
                             "samples_per_s": batch / seconds, "chars_per_s": batch * T / seconds})
                print(f"  sampler {preset} B={batch} {order}: {batch / seconds:,.0f} samples/s", flush=True)
    return rows


def scored_batch(model: DiffusionLM, device, dtype, prompts: int, group: int, steps: int, seed: int) -> ScoredBatch:
    T = model.cfg.block_size
    gen = torch.Generator(device=device).manual_seed(seed)
    masked = torch.full((prompts * group, T), model.mask_id, dtype=torch.long, device=device)
    with torch.no_grad():
        out = sample(model.eval(), masked, steps=steps, temperature=1.0, generator=gen, autocast_dtype=dtype)
    cpu = lambda t: t.cpu()  # noqa: E731  (batches travel through the object store on the CPU)
    batch = RolloutBatch(request_id=seed, tokens=cpu(out.tokens), reveal_step=cpu(out.reveal_step),
                         logprobs=cpu(out.logprobs), group_index=torch.arange(prompts).repeat_interleave(group),
                         policy_version=0, worker_id=0, steps=steps, temperature=1.0, top_k=0, top_p=1.0,
                         order="random", random_reveal=0.0, selection=cpu(out.selection))
    rewards = torch.rand(prompts * group, generator=torch.Generator().manual_seed(seed))
    return ScoredBatch(rollout=batch, rewards=rewards, judge_id=0)


def bench_learner(device, dtype, preset: str, steps: int, reps: int) -> list[dict]:
    rows = []
    model = DiffusionLM(preset_config(preset, VOCAB)).to(device)
    prompts, group = 4, 8
    for replay in (4, None):
        for reference_on in ("learner", "rollout"):
            cfg = GRPOConfig(group_size=group, prompts_per_step=prompts, minibatch_size=prompts * group,
                             replay_steps=replay, reference_on=reference_on)
            learner = LearnerCore(DiffusionLM(model.cfg).to(device), cfg, seed=0, device=str(device),
                                  autocast_dtype=dtype)
            times = []
            for rep in range(reps + 1):
                batch = scored_batch(learner.policy, device, dtype, prompts, group, steps, seed=rep)
                if reference_on == "rollout":  # the terms a rollout worker would send with the batch
                    r = batch.rollout
                    mask, logprobs, selection = reference_terms(
                        learner.reference, r.tokens.to(device), r.reveal_step.to(device), steps, replay, rep,
                        rule=RevealRule.of(vars(r)), autocast_dtype=dtype, temperature=r.temperature,
                        top_k=r.top_k, top_p=r.top_p)
                    batch = dataclasses.replace(batch, rollout=dataclasses.replace(
                        r, replay_mask=mask.cpu(), reference_logprobs=logprobs.cpu(),
                        reference_selection=selection.cpu()))
                synchronize(device)
                t0 = time.perf_counter()
                learner.train([batch])
                synchronize(device)
                if rep:  # the first step is the warm-up
                    times.append(time.perf_counter() - t0)
            seconds = min(times)
            label = "all" if replay is None else str(replay)
            rows.append({"preset": preset, "steps": steps, "replay": label, "reference_on": reference_on,
                         "samples": prompts * group, "seconds": seconds, "samples_per_s": prompts * group / seconds})
            print(f"  learner {preset} replay {label}, reference on {reference_on}: {seconds:.3f} s a step",
                  flush=True)
    return rows


def inprocess_grpo(device, dtype, preset: str, minutes: float, max_steps: int | None = None) -> dict:
    """GRPO steps in this process, one role after the other as one GPU would run them without Ray: sample with the
    latest weights, score (share of one character), the reference's terms (as a rollout worker sends them), train."""
    start = DiffusionLM(preset_config(preset, VOCAB)).to(device)
    prompts, group, steps = 8, 8, 16 if preset != "tiny" else 4
    cfg = GRPOConfig(group_size=group, prompts_per_step=prompts, minibatch_size=prompts * group, replay_steps=4,
                     reference_on="rollout")
    learner = LearnerCore(DiffusionLM(start.cfg).to(device), cfg, seed=0, device=str(device), autocast_dtype=dtype)
    learner.policy.load_state_dict(start.state_dict())
    sampler_model = DiffusionLM(start.cfg).to(device).eval()
    spent = {"sample_s": 0.0, "reference_s": 0.0, "learn_s": 0.0}
    rewards, n, t_start = [], 0, time.perf_counter()
    while time.perf_counter() - t_start < 60 * minutes and (max_steps is None or n < max_steps):
        t0 = time.perf_counter()
        sampler_model.load_state_dict(learner.policy.state_dict())
        batch = scored_batch(sampler_model, device, dtype, prompts, group, steps, seed=n)
        batch = dataclasses.replace(batch, rewards=(batch.rollout.tokens == 5).float().mean(1))
        synchronize(device)
        t1 = time.perf_counter()
        r = batch.rollout
        mask, logprobs, selection = reference_terms(
            start.eval(), r.tokens.to(device), r.reveal_step.to(device), steps, 4, n, rule=RevealRule.of(vars(r)),
            autocast_dtype=dtype, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p)
        batch = dataclasses.replace(batch, rollout=dataclasses.replace(
            r, replay_mask=mask.cpu(), reference_logprobs=logprobs.cpu(), reference_selection=selection.cpu()))
        synchronize(device)
        t2 = time.perf_counter()
        learner.train([batch])
        synchronize(device)
        t3 = time.perf_counter()
        spent["sample_s"] += t1 - t0
        spent["reference_s"] += t2 - t1
        spent["learn_s"] += t3 - t2
        rewards.append(float(batch.rewards.mean()))
        n += 1
    wall = time.perf_counter() - t_start
    return {"steps": n, "wall_time_s": wall, "steps_per_min": 60 * n / wall,
            "samples_per_min": 60 * n * prompts * group / wall,
            "shares": {k: v / wall for k, v in spent.items()}, "reward_first_last": [rewards[0], rewards[-1]]}


def ray_grpo(device, preset: str, minutes: float, out_dir: Path) -> dict:
    """`dgrpo train` on an embedded Ray cluster: two rollout workers on a quarter of the GPU each."""
    if importlib.util.find_spec("ray") is None:
        return {"ran": False, "reason": "Ray is not installed here"}
    from dgrpo import read_metrics, train
    corpus = out_dir / "corpus.txt"
    corpus.write_text(synthetic_corpus_text(200_000))
    gpu = 0.25 if device.type == "cuda" else 0.0
    summary = train(
        run={"out_dir": str(out_dir / "grpo"), "steps": 100_000, "max_minutes": minutes, "mode": "async",
             "eval_every": 100_000, "eval_prompts": 16, "checkpoint_every": 100_000, "metrics_export": False},
        corpus={"path": str(corpus)}, generator={"preset": preset}, reward={"kind": "char_frequency", "chars": "e"},
        sampler={"steps": 16}, grpo={"group_size": 8, "prompts_per_step": 8, "minibatch_size": 64, "replay_steps": 4,
                                      "reference_on": "rollout"},
        resources={"rollout": {"num_workers": 2, "num_gpus": gpu, "num_cpus": 1},
                   "judge": {"num_gpus": gpu / 2, "num_cpus": 1}, "learner": {"num_gpus": gpu, "num_cpus": 1}},
        quiet=True)
    rows = [r for r in read_metrics(out_dir / "grpo") if "num_samples" in r]
    minutes_run = summary["wall_time_s"] / 60
    learn, step = sum(r["time/learn_s"] for r in rows), sum(r["time/step_s"] for r in rows)
    return {"ran": True, "steps": summary["steps"], "wall_time_s": summary["wall_time_s"],
            "steps_per_min": summary["steps"] / minutes_run,
            "samples_per_min": sum(r["num_samples"] for r in rows) / minutes_run,
            "learner_share_of_step": learn / step if step else None, "gpu_per_rollout_worker": gpu}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--grpo-minutes", type=float, default=2.0, help="the length of each GRPO run (in process, on Ray)")
    ap.add_argument("--no-ray", dest="ray", action="store_false", help="skip the GRPO run on Ray")
    ap.add_argument("--quick", action="store_true", help="tiny preset, small batches, one rep: seconds")
    ap.add_argument("--out", type=Path, default=default_out("gpu_check"))
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    report = {"bench": "gpu_check", "machine": machine_info(), "device": device_report(device)}
    if args.device == "auto" and device.type != "cuda":
        report["ran"] = False
        report["reason"] = "no CUDA device: the check did not run (it is meant for a GPU machine)"
        print(report["reason"])
        write_json(report, args.out)
        return report
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if bf16 else None
    report["precision"] = "bf16" if bf16 else "fp32"
    quick = args.quick
    report["roofline_gflops"] = {
        name: measure_matmul_gflops(dt, n=256 if quick else 8192, min_time=0.05 if quick else 0.5,
                                    device=str(device))
        for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)) if name == "fp32" or bf16}
    presets = ["tiny"] if quick else ["small", "base"]
    report["sampler"] = bench_sampler(device, dtype, presets, [4] if quick else [64, 256], 4 if quick else 16,
                                      1 if quick else 3)
    report["learner"] = bench_learner(device, dtype, "tiny" if quick else "small", 4 if quick else 16,
                                      1 if quick else 3)
    preset = "tiny" if quick else "small"
    report["grpo_in_process"] = inprocess_grpo(device, dtype, preset, args.grpo_minutes, 3 if quick else None)
    print(f"  GRPO in process: {report['grpo_in_process']['samples_per_min']:,.0f} samples/min", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        report["grpo_ray"] = (ray_grpo(device, preset, args.grpo_minutes, Path(tmp)) if args.ray else
                              {"ran": False, "reason": "--no-ray"})
    report["ran"] = True
    write_json(report, args.out)
    return report


if __name__ == "__main__":
    main()
