"""Training step, eager vs torch.compile, interleaved: ratios that survive a shared machine.

Two copies of the same model (same seed, same optimizer) train side by side in one process:
rounds of --steps steps each, alternating which goes first, so both see the same load. One
step is what `dgrpo pretrain` does: random windows, masked-diffusion loss (complementary
masks and stratified t, as the defaults), backward, clipping, optimizer step. Prints the
median ms per step of each and the speed-up; writes them to --out.

    python -m bench.compare_compile [--preset small] [--batch 16] [--optimizer muon]
        [--rounds 8] [--steps 10] [--threads 2] [--out bench/results/compare_compile.json]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import VOCAB, machine_info, write_json
from bench.roofline import torch_threads
from dgrpo.corpus import random_windows
from dgrpo.models.diffusion import DiffusionLM, diffusion_loss
from dgrpo.models.pretrain import make_optimizer
from dgrpo.models.transformer import preset_config


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
        data = torch.randint(0, VOCAB - 1, (200_000,), generator=torch.Generator().manual_seed(0))
        variants = {}
        for name in ("eager", "compiled"):
            torch.manual_seed(0)
            cfg = preset_config(args.preset, VOCAB)
            model = DiffusionLM(cfg).train()
            variants[name] = dict(model=model, step_model=torch.compile(model) if name == "compiled" else model,
                                  opt=make_optimizer(model, 1e-3, 0.1, (0.9, 0.99), kind=args.optimizer),
                                  data_gen=torch.Generator().manual_seed(1), mask_gen=torch.Generator().manual_seed(2))

        def step(v: dict) -> None:
            x = random_windows(data, args.batch // 2, cfg.block_size, v["data_gen"]).repeat(2, 1)
            loss, _ = diffusion_loss(v["step_model"], x, generator=v["mask_gen"], stratified_t=True,
                                     complementary=True)
            v["opt"].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(v["model"].parameters(), 1.0)
            v["opt"].step()

        warmup = {}
        for name, v in variants.items():
            t0 = time.perf_counter()
            for _ in range(3):
                step(v)
            warmup[name] = time.perf_counter() - t0
        ms = {name: [] for name in variants}
        for r in range(args.rounds):
            for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step(variants[name])
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
