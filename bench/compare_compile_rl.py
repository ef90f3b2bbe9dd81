"""The sampler and the learner's replay, eager vs torch.compile, interleaved: does compiling pay for RL?

Two copies of one model (the same weights) run side by side in one process, in rounds that alternate which goes
first, so both see the same load:

- sampler: `sample()` of a batch of unconditional windows (the model compiled with dynamic shapes: a step runs
  on the rows that still have positions to reveal);
- replay: what the learner does per chunk of replay rows, `row_logprobs` forward with the selection terms, and
  backward.

Before timing, both paths are checked to agree (the same samples from the same seed and replayed log-probs to
--tolerance in fp32). Prints the median ms of each, the speed-up, and the compile time; writes them to --out.

    python -m bench.compare_compile_rl [--preset small] [--batch 16] [--steps 16] [--order confidence]
        [--rows 64] [--rounds 6] [--threads 1] [--out bench/results/compare_compile_rl.json]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import VOCAB, machine_info, write_json
from bench.roofline import torch_threads
from dgrpo.models.diffusion import DiffusionLM
from dgrpo.models.sampler import RevealRule, sample
from dgrpo.models.trajectory import replay_rows, row_logprobs
from dgrpo.models.transformer import preset_config


def build(preset: str, compiled: bool, train: bool = False):
    """The model (the same weights every call), eager or compiled with dynamic shapes."""
    torch.manual_seed(0)
    model = DiffusionLM(preset_config(preset, VOCAB)).train(train)
    if compiled:
        return torch.compile(model, dynamic=True)  # attributes such as mask_id read through to the model
    return model


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=16, help="samples per sample() call")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--order", default="confidence", choices=["random", "confidence"])
    ap.add_argument("--rows", type=int, default=64, help="replay rows per forward+backward chunk")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tolerance", type=float, default=1e-5)
    ap.add_argument("--out", default="bench/results/compare_compile_rl.json")
    args = ap.parse_args(argv)
    rule = RevealRule.of({"order": args.order, "steps": args.steps})
    with torch_threads(args.threads) as threads:
        models = {"eager": build(args.preset, False), "compiled": build(args.preset, True)}
        T = models["eager"].cfg.block_size
        prompt = torch.full((args.batch, T), models["eager"].mask_id)

        def sampler(name):
            return sample(models[name], prompt, steps=args.steps, order=args.order, temperature=1.0,
                          generator=torch.Generator().manual_seed(0))

        # compiling (the first calls), then agreement: the same states through both models
        t0 = time.perf_counter()
        eager_out = sampler("eager")
        eager_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        sampler("compiled")
        compile_s = time.perf_counter() - t0
        rows = replay_rows(eager_out.reveal_step, args.steps)
        chunk = next(rows.chunks(args.rows))
        states = torch.where(eager_out.reveal_step[chunk.sample_idx] < chunk.step_idx[:, None],
                             eager_out.tokens[chunk.sample_idx], models["eager"].mask_id)
        with torch.no_grad():
            sampler_dev = float((models["eager"](states).float().log_softmax(-1)
                                 - models["compiled"](states).float().log_softmax(-1)).abs().max())
        train = {name: build(args.preset, name == "compiled", train=True) for name in models}

        def replay(name):
            out = row_logprobs(train[name], eager_out.tokens, eager_out.reveal_step, chunk, temperature=1.0,
                               rule=rule, reveal_rank=eager_out.reveal_rank)
            loss = -(out.logprobs.sum() + out.selection.sum())
            loss.backward()
            return out

        t0 = time.perf_counter()
        e, c = replay("eager"), replay("compiled")
        replay_compile_s = time.perf_counter() - t0
        replay_dev = float((e.logprobs - c.logprobs).detach().abs().max())
        selection_dev = (e.selection - c.selection).detach().abs()
        print(f"agreement on the same states: log-probs max |diff| {sampler_dev:.2e}; the replay's token log-probs "
              f"{replay_dev:.2e} (tolerance {args.tolerance:g}); its selection terms {float(selection_dev.max()):.2e} "
              f"(median {float(selection_dev.median()):.2e}: a hidden token within rounding of the threshold tau "
              f"counts on one side or the other)", flush=True)

        ms = {f"{part}_{name}": [] for part in ("sample", "replay") for name in models}
        for r in range(args.rounds):
            for name in (["eager", "compiled"] if r % 2 == 0 else ["compiled", "eager"]):
                t0 = time.perf_counter()
                sampler(name)
                ms[f"sample_{name}"].append(1e3 * (time.perf_counter() - t0))
                t0 = time.perf_counter()
                replay(name)
                ms[f"replay_{name}"].append(1e3 * (time.perf_counter() - t0))
        info = machine_info()
    median = {k: statistics.median(v) for k, v in ms.items()}
    speedup = {part: median[f"{part}_eager"] / median[f"{part}_compiled"] for part in ("sample", "replay")}
    for part in ("sample", "replay"):
        print(f"{part:>7}: eager {median[f'{part}_eager']:7.1f} ms, compiled {median[f'{part}_compiled']:7.1f} ms, "
              f"compiled / eager {speedup[part]:.3f}x")
    print(f"first sample() call: eager {eager_first:.1f} s, compiled (compiling) {compile_s:.1f} s; "
          f"first replay of both {replay_compile_s:.1f} s; {threads} thread(s), {info['cpu']}")
    report = {"bench": "compare_compile_rl", "machine": info, "threads": threads, "preset": args.preset,
              "batch": args.batch, "steps": args.steps, "order": args.order, "rows": len(chunk),
              "rounds": args.rounds, "ms": ms, "median_ms": median, "speedup": speedup,
              "agreement": {"logprob_max_diff": sampler_dev,
                            "replay_max_diff": replay_dev, "selection_max_diff": float(selection_dev.max()),
                            "selection_median_diff": float(selection_dev.median()), "tolerance": args.tolerance,
                            "within": sampler_dev <= args.tolerance and replay_dev <= args.tolerance},
              "compile_s": {"sampler_first_call": compile_s, "replay_first_calls": replay_compile_s}}
    write_json(report, args.out)
    return report


if __name__ == "__main__":
    main()
