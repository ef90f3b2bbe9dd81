"""Training step, eager vs torch.compile, interleaved: ratios that survive a shared machine.

Two copies of the same model (same seed, same optimizer) train side by side in one process:
rounds of --steps steps each, alternating which goes first, so both see the same load. One
step is `bench_pretrain.training_step`, what `dgrpo pretrain` does: random windows, masked-diffusion loss (complementary
masks and stratified t, as the defaults), backward, clipping, optimizer step. Prints the
median ms per step of each and the speed-up; writes them to --out.

    python -m bench.compare_compile [--preset small] [--batch 16] [--optimizer muon]
        [--rounds 8] [--steps 10] [--threads 2] [--out bench/results/compare_compile.json]
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench.bench_pretrain import training_step
from bench.common import machine_info, write_json
from bench.roofline import torch_threads


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--optimizer", default="muon", choices=["adamw", "muon"])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="steps per round and variant")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="bench/results/compare_compile.json")
    args = ap.parse_args(argv)
    with torch_threads(args.threads) as threads:
        variants, warmup = {}, {}
        for name in ("eager", "compiled"):
            step, _, cfg = training_step(args.preset, args.batch, optimizer=args.optimizer,
                                         compile=name == "compiled")
            t0 = time.perf_counter()
            for _ in range(3):
                step()
            variants[name], warmup[name] = step, time.perf_counter() - t0
        ms = {name: [] for name in variants}
        for r in range(args.rounds):
            for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    variants[name]()
                ms[name].append(1e3 * (time.perf_counter() - t0) / args.steps)
        info = machine_info()
    median = {name: statistics.median(v) for name, v in ms.items()}
    speedup = median["eager"] / median["compiled"]
    per_round = [e / c for e, c in zip(ms["eager"], ms["compiled"])]
    tokens = args.batch * cfg.block_size
    for name in variants:
        print(f"{name:>9}: {median[name]:6.1f} ms/step, {1e3 * tokens / median[name]:7.0f} tokens/s "
              f"(first 3 steps incl. compiling: {warmup[name]:.1f} s)")
    print(f"compiled / eager: {speedup:.3f}x (per round {min(per_round):.3f}-{max(per_round):.3f}x), "
          f"{threads} thread(s)")
    report = {"bench": "compare_compile", "machine": info, "threads": threads, "preset": args.preset,
              "batch": args.batch, "optimizer": args.optimizer, "rounds": args.rounds, "steps": args.steps,
              "ms_per_step": ms, "median_ms": median, "warmup_s": warmup, "speedup": speedup,
              "speedup_per_round": per_round}
    write_json(report, args.out)
    return report


if __name__ == "__main__":
    main()
