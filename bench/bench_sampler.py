"""Sampler throughput: samples/s, characters/s and achieved GFLOP/s vs the matmul roofline.

For each preset, reveal order, step count and batch size, unconditional
generation of full windows (every position [MASK]) is timed. FLOPs are counted
from the forwards the sampler actually ran (a hook counts them and their
tokens) times `forward_flops_per_token` (matmul FLOPs only), and compared with
the measured matmul GFLOP/s in the precision used (fp32 on a CPU without fast
bf16). Each cell repeats sample() for --min-time seconds and reports the
fastest call (mean kept in the JSON): on a shared machine the mean mostly
measures the other jobs. A randomly initialised model is used (speed does not depend on the
weights) unless --checkpoint is given.

    python bench/bench_sampler.py [--presets small] [--base] [--steps 16,32,64]
        [--batch-sizes 8,32] [--orders random,confidence] [--checkpoint DIR]
        [--precision auto] [--threads N] [--quick] [--out bench/results/sampler.json]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench.common import write_json
from bench.roofline import machine_info, measure_matmul_gflops, torch_threads
from dgrpo.models.diffusion import DiffusionLM
from dgrpo.models.sampler import sample
from dgrpo.models.transformer import count_params, forward_flops_per_token, preset_config
from dgrpo.precision import resolve_precision

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "sampler.json"
VOCAB = 66  # tiny Shakespeare: 65 characters + [MASK]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


class ForwardCounter:
    """Counts forward calls and input tokens of a module through a forward hook."""

    def __init__(self, module: torch.nn.Module):
        self.forwards = 0
        self.tokens = 0
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.forwards += 1
        self.tokens += inputs[0].numel()

    def reset(self) -> None:
        self.forwards = self.tokens = 0

    def close(self) -> None:
        self._handle.remove()


def load_models(presets: list[str], checkpoint: str | None) -> list[tuple[str, DiffusionLM]]:
    if checkpoint:
        from dgrpo.models.checkpoint import load_checkpoint
        ck = load_checkpoint(checkpoint, expect_kind="generator")
        model = ck.load_weights_into(DiffusionLM(ck.model_config))
        return [(f"checkpoint:{Path(checkpoint).name}", model.eval())]
    torch.manual_seed(0)
    return [(name, DiffusionLM(preset_config(name, VOCAB)).eval()) for name in presets]


def bench_one(model: DiffusionLM, batch_size: int, steps: int, order: str, autocast_dtype,
              min_time: float, min_runs: int = 1, warmup: bool = True) -> dict:
    cfg = model.cfg
    T = cfg.block_size
    prompt = torch.full((batch_size, T), model.mask_id, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    counter = ForwardCounter(model)
    try:
        if warmup:
            sample(model, prompt[:1], steps=min(steps, 2), order=order, generator=gen,
                   autocast_dtype=autocast_dtype)
        counter.reset()
        times, start = [], time.perf_counter()
        while True:
            t0 = time.perf_counter()
            sample(model, prompt, steps=steps, order=order, generator=gen, autocast_dtype=autocast_dtype)
            times.append(time.perf_counter() - t0)
            if len(times) >= min_runs and time.perf_counter() - start >= min_time:
                break
    finally:
        counter.close()
    runs = len(times)
    forwards, tokens = counter.forwards / runs, counter.tokens / runs  # per sample() call
    best, mean = min(times), sum(times) / runs  # best: least disturbed by other jobs on the machine
    flops = forward_flops_per_token(cfg, T, model.n_chars) * tokens
    return {"batch_size": batch_size, "steps": steps, "order": order, "block_size": T, "runs": runs,
            "seconds_best": best, "seconds_mean": mean, "forwards_per_sample_run": forwards,
            "samples_per_s": batch_size / best, "chars_per_s": batch_size * T / best,
            "samples_per_s_mean": batch_size / mean, "ms_per_forward": 1e3 * best / max(forwards, 1),
            "gflops": flops / best / 1e9}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="small", help="comma list of tiny, small, base (default small)")
    ap.add_argument("--base", action="store_true", help="also run the base preset")
    ap.add_argument("--checkpoint", default=None, help="generator checkpoint instead of random presets")
    ap.add_argument("--orders", default="random,confidence")
    ap.add_argument("--steps", default="16,32,64", help="comma list of denoising step counts")
    ap.add_argument("--batch-sizes", default="8,32", help="comma list of batch sizes")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds of timed sampling per cell")
    ap.add_argument("--min-runs", type=int, default=2, help="sample() calls per cell, at least")
    ap.add_argument("--quick", action="store_true", help="tiny preset, small grid: a few seconds")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output file")
    args = ap.parse_args(argv)

    presets = _names(args.presets)
    if args.base and "base" not in presets:
        presets.append("base")
    steps_list, batch_sizes, orders = _ints(args.steps), _ints(args.batch_sizes), _names(args.orders)
    min_time, min_runs, roofline_n, roofline_time = args.min_time, args.min_runs, 1024, 1.0
    if args.quick:
        presets, steps_list, batch_sizes = ["tiny"], [4, 8], [4]
        min_time, min_runs, roofline_n, roofline_time = 0.0, 1, 256, 0.1
    autocast_dtype = resolve_precision(args.precision)
    precision = "bf16" if autocast_dtype == torch.bfloat16 else "fp32"

    rows = []
    with torch_threads(args.threads) as threads:
        info = machine_info()
        roofline = measure_matmul_gflops(autocast_dtype or torch.float32, n=roofline_n, min_time=roofline_time)
        for label, model in load_models(presets, args.checkpoint):
            for batch_size in batch_sizes:
                for order in orders:
                    for steps in steps_list:
                        r = bench_one(model, batch_size, steps, order, autocast_dtype, min_time, min_runs)
                        r.update(preset=label, params=count_params(model), roofline_fraction=r["gflops"] / roofline)
                        rows.append(r)
                        print(f"  {label} B={batch_size} {order} S={steps}: {r['samples_per_s']:.1f} samples/s, "
                              f"{r['gflops']:.1f} GFLOP/s", flush=True)

    report = {"bench": "sampler", "precision": precision, "threads": threads, "machine": info,
              "roofline_gflops": roofline, "roofline_n": roofline_n,
              "flops_note": "matmul FLOPs of the forwards actually run (forward_flops_per_token x tokens)",
              "results": rows}
    print(f"\nsampler throughput (fastest sample() call per cell), {precision}, {threads} torch thread(s), {info['cpu']}; "
          f"{precision} matmul roofline {roofline:.1f} GFLOP/s (n={roofline_n})")
    head = (f"{'preset':>8} {'B':>4} {'order':>10} {'S':>4} {'fwd':>4} {'samples/s':>10} {'chars/s':>10} "
            f"{'ms/fwd':>8} {'GFLOP/s':>8} {'roofline':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['preset']:>8} {r['batch_size']:>4} {r['order']:>10} {r['steps']:>4} "
              f"{r['forwards_per_sample_run']:>4.0f} {r['samples_per_s']:>10.2f} {r['chars_per_s']:>10.0f} "
              f"{r['ms_per_forward']:>8.2f} {r['gflops']:>8.1f} {100 * r['roofline_fraction']:>7.1f}%")
    write_json(report, args.out)
    return report


if __name__ == "__main__":
    main()
