"""Pretraining throughput: tokens/s of forward + backward + optimizer step, GFLOP/s vs roofline.

One iteration is what `dgrpo pretrain` does per step (`training_step`): random windows,
masked-diffusion loss, backward, gradient clipping, optimizer step (AdamW, or
Muon + AdamW with --optimizers muon), optionally with the step compiled
(--compile measures both; the compile time is reported apart). FLOPs are
3 x forward matmul FLOPs (backward ~ 2 x forward) per token; the roofline is
the measured matmul GFLOP/s in the precision used. The median iteration time is
reported (mean and best kept in the JSON). Data are random ids
(speed does not depend on the text).

    python bench/bench_pretrain.py [--presets small] [--base] [--batch-sizes 16,64]
        [--optimizers adamw,muon] [--compile] [--precision auto] [--threads N] [--quick]
        [--out bench/results/pretrain.json]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench.common import write_json
from bench.roofline import machine_info, measure_matmul_gflops, torch_threads
from dgrpo.corpus import random_windows
from dgrpo.models.diffusion import DiffusionLM, diffusion_loss
from dgrpo.models.optim import make_optimizer
from dgrpo.models.transformer import count_params, forward_flops_per_token, preset_config
from dgrpo.precision import autocast_context, resolve_precision

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "pretrain.json"
VOCAB = 66


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def training_step(preset: str, batch_size: int, autocast_dtype=None, optimizer: str = "adamw",
                  compile: bool = False):
    """A fresh model (seed 0) and one `dgrpo pretrain` iteration on it as a function: random
    windows (each twice, complementary masks, stratified t), loss, backward, clipping,
    optimizer step; the function returns the optimizer step's seconds. Returns (step, model, cfg)."""
    torch.manual_seed(0)
    cfg = preset_config(preset, VOCAB)
    model = DiffusionLM(cfg).train()
    step_model = torch.compile(model) if compile else model
    opt = make_optimizer(model, 1e-3, 0.1, (0.9, 0.99), kind=optimizer)
    data = torch.randint(0, VOCAB - 1, (200_000,), generator=torch.Generator().manual_seed(0))
    data_gen, mask_gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)

    def step() -> float:
        x = random_windows(data, batch_size // 2, cfg.block_size, data_gen).repeat(2, 1)
        with autocast_context("cpu", autocast_dtype):
            loss, _ = diffusion_loss(step_model, x, generator=mask_gen, stratified_t=True, complementary=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        t0 = time.perf_counter()
        opt.step()
        return time.perf_counter() - t0

    return step, model, cfg


def bench_one(preset: str, batch_size: int, autocast_dtype, min_time: float, min_iters: int,
              warmup_iters: int = 2, optimizer: str = "adamw", compile: bool = False) -> dict:
    step, model, cfg = training_step(preset, batch_size, autocast_dtype, optimizer, compile)

    t0 = time.perf_counter()
    for _ in range(warmup_iters):
        step()
    warmup_s = time.perf_counter() - t0
    times, opt_times, start = [], [], time.perf_counter()
    while True:
        t0 = time.perf_counter()
        opt_times.append(step())
        times.append(time.perf_counter() - t0)
        if len(times) >= min_iters and time.perf_counter() - start >= min_time:
            break
    iters = len(times)
    median = sorted(times)[iters // 2]  # robust to other jobs on a shared machine
    tokens = batch_size * cfg.block_size
    # complementary masks: half of all positions are masked, and only those run the last MLP and the head
    flops = 3 * forward_flops_per_token(cfg, cfg.block_size, model.n_chars, output_fraction=0.5) * tokens
    return {"preset": preset, "optimizer": optimizer, "compile": compile, "warmup_s": warmup_s,
            "params": count_params(model), "batch_size": batch_size,
            "block_size": cfg.block_size, "iters": iters, "seconds": time.perf_counter() - start,
            "ms_per_iter": 1e3 * median, "ms_per_iter_mean": 1e3 * sum(times) / iters,
            "ms_per_iter_best": 1e3 * min(times), "optimizer_ms": 1e3 * sorted(opt_times)[iters // 2],
            "tokens_per_s": tokens / median,
            "gflops": flops / median / 1e9}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="small", help="comma list of tiny, small, base (default small)")
    ap.add_argument("--base", action="store_true", help="also run the base preset")
    ap.add_argument("--batch-sizes", default="16,64", help="comma list of batch sizes")
    ap.add_argument("--optimizers", default="muon", help="comma list of adamw, muon (default muon, as dgrpo pretrain)")
    ap.add_argument("--compile", action="store_true", help="also measure each cell with torch.compile")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--min-time", type=float, default=5.0, help="seconds of timed iterations per cell")
    ap.add_argument("--min-iters", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny preset, a few iterations")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output file")
    args = ap.parse_args(argv)

    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    if args.base and "base" not in presets:
        presets.append("base")
    batch_sizes, min_time, min_iters, roofline_n, roofline_time = (
        _ints(args.batch_sizes), args.min_time, args.min_iters, 1024, 1.0)
    if args.quick:
        presets, batch_sizes, min_time, min_iters, roofline_n, roofline_time = ["tiny"], [8], 0.0, 3, 256, 0.1
    optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    compiles = [False, True] if args.compile else [False]
    autocast_dtype = resolve_precision(args.precision)
    precision = "bf16" if autocast_dtype == torch.bfloat16 else "fp32"

    rows = []
    with torch_threads(args.threads) as threads:
        info = machine_info()
        roofline = measure_matmul_gflops(autocast_dtype or torch.float32, n=roofline_n, min_time=roofline_time)
        for preset in presets:
            for batch_size in batch_sizes:
                for optimizer in optimizers:
                    for compile in compiles:
                        r = bench_one(preset, batch_size, autocast_dtype, min_time, min_iters,
                                      optimizer=optimizer, compile=compile)
                        r["roofline_fraction"] = r["gflops"] / roofline
                        rows.append(r)
                        print(f"  {preset} B={batch_size} {optimizer}{' compiled' if compile else ''}: "
                              f"{r['tokens_per_s']:.0f} tokens/s, {r['gflops']:.1f} GFLOP/s", flush=True)

    report = {"bench": "pretrain", "precision": precision, "threads": threads, "machine": info,
              "roofline_gflops": roofline, "roofline_n": roofline_n,
              "flops_note": "3 x forward matmul FLOPs per token (forward + backward; the last MLP and the head on the masked half of the positions only), optimizer not counted",
              "results": rows}
    print(f"\npretraining throughput (fwd+bwd+optimizer, median iteration), {precision}, {threads} torch thread(s), {info['cpu']}; "
          f"{precision} matmul roofline {roofline:.1f} GFLOP/s (n={roofline_n})")
    head = (f"{'preset':>7} {'params':>9} {'B':>4} {'T':>4} {'optimizer':>9} {'compile':>7} {'warmup s':>8} "
            f"{'ms/iter':>9} {'opt ms':>7} {'tokens/s':>10} {'GFLOP/s':>8} {'roofline':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['preset']:>7} {r['params']:>9} {r['batch_size']:>4} {r['block_size']:>4} {r['optimizer']:>9} "
              f"{'yes' if r['compile'] else 'no':>7} {r['warmup_s']:>8.1f} {r['ms_per_iter']:>9.1f} {r['optimizer_ms']:>7.1f} "
              f"{r['tokens_per_s']:>10.0f} {r['gflops']:>8.1f} {100 * r['roofline_fraction']:>7.1f}%")
    write_json(report, args.out)
    return report


if __name__ == "__main__":
    main()
