"""Pretraining throughput: one process at N threads vs N data-parallel processes at one thread.

Each round trains the same configuration from scratch for --iters iterations once per
mode, alternating modes so both see the same machine load; the figure is the trainer's
own tokens/s (training time only: no start-up, no evaluation). The ratio is per round,
then the median over rounds.

    python bench/bench_data_parallel.py [--preset small] [--processes 2] [--iters 200]
        [--rounds 3] [--set KEY=VALUE ...] [--out bench/results/data_parallel.json]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from bench.common import SHARED_CORPUS, machine_info, median, print_table, write_json
from dgrpo.corpus import load_corpus
from dgrpo.models.pretrain import pretrain, pretrain_data_parallel
from dgrpo.orchestration.config import PretrainConfig


def run(mode: str, cfg: PretrainConfig, corpus, processes: int) -> dict:
    if mode == "one process":
        torch.set_num_threads(processes)
        state = pretrain(cfg, corpus, {}, progress=False, log=lambda *_: None)
    else:
        state = pretrain_data_parallel(cfg.model_copy(update={"processes": processes}), corpus, {},
                                       threads_per_rank=1)
    return {"tokens_per_s": state["tokens_seen"] / state["wall_time_s"],
            "iters_per_s": state["iter"] / state["wall_time_s"], "val_loss": state["val_loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--corpus", default=str(SHARED_CORPUS))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="PretrainConfig field (e.g. complementary_masks=true)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/data_parallel.json"))
    args = ap.parse_args()
    corpus = load_corpus(args.corpus)
    overrides = dict(kv.split("=", 1) for kv in args.overrides)
    modes = ["one process", f"{args.processes} processes"]
    rows, ratios = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            figures = {}
            for mode in (modes if r % 2 == 0 else modes[::-1]):
                cfg = PretrainConfig(**{"preset": args.preset, "max_iters": args.iters, "eval_every": args.iters,
                                        "eval_windows": 64, "out": str(Path(tmp) / mode.replace(" ", "_")),
                                        **overrides})
                figures[mode] = run(mode, cfg, corpus, args.processes)
                rows.append({"round": r, "mode": mode, **figures[mode]})
                print(f"round {r} {mode}: {figures[mode]['tokens_per_s']:.0f} tokens/s", flush=True)
            ratios.append(figures[modes[1]]["tokens_per_s"] / figures[modes[0]]["tokens_per_s"])
    print_table(rows, [("round", "round"), ("mode", "mode"), ("tokens_per_s", "tokens/s", ".0f"),
                       ("iters_per_s", "iters/s", ".2f")],
                title=f"{args.preset}, {args.iters} iterations per run")
    print(f"{modes[1]} / one process at {args.processes} threads: median {median(ratios):.3f}x "
          f"(rounds: {', '.join(f'{x:.3f}' for x in ratios)})")
    write_json({"bench": "data_parallel", "machine": machine_info(args.processes), "preset": args.preset,
                "iters": args.iters, "processes": args.processes, "overrides": overrides, "runs": rows,
                "ratios": ratios, "median_ratio": median(ratios)}, args.out)


if __name__ == "__main__":
    main()
