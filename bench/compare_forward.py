"""A/B timing of the model forward (and forward+backward) against a baseline transformer.py.

    python -m bench.compare_forward --baseline /tmp/baseline_transformer.py [--compile] [--masked-rows]

Both versions run interleaved in one process with the same weights, so the
ratio is robust to the noise of a shared machine. Prints and writes JSON.
"""

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

from dgrpo.models import transformer as current


def load_module(path: str):
    spec = importlib.util.spec_from_file_location("baseline_transformer", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def build(mod, preset: str):
    kw = {k: v for k, v in current.PRESETS[preset].items() if k in mod.ModelConfig.__dataclass_fields__}
    return mod.Trunk(mod.ModelConfig(vocab_size=66, **kw))


def timed(fn, reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", required=True)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="torch.compile both (as `dgrpo pretrain` does)")
    ap.add_argument("--masked-rows", action="store_true",
                    help="the current model returns half of the positions (rows, as the masked-diffusion loss asks), "
                         "the baseline all of them")
    ap.add_argument("--out", default="bench/results/compare_forward.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    base_mod = load_module(args.baseline)
    models = {"baseline": build(base_mod, args.preset), "current": build(current, args.preset)}
    models["current"].load_state_dict(models["baseline"].state_dict())
    if args.compile:
        models = {name: torch.compile(m) for name, m in models.items()}
    T = current.PRESETS[args.preset]["block_size"]
    x = torch.randint(0, 65, (args.batch, T))
    rows = {"baseline": None, "current": None}
    if args.masked_rows:
        rows["current"] = torch.randperm(args.batch * T, generator=torch.Generator().manual_seed(0))[:args.batch * T // 2]
    results = {name: {"forward_s": [], "train_s": []} for name in models}
    for _ in range(args.rounds):
        for name, m in models.items():
            def forward(m=m, r=rows[name]):  # a baseline from before `rows` takes idx alone
                return m(x) if r is None else m(x, r)
            with torch.no_grad():
                forward()
                results[name]["forward_s"].append(timed(forward, 2))

            def step():
                forward().square().mean().backward()
            step()
            results[name]["train_s"].append(timed(step, 1))
    summary = {"preset": args.preset, "batch": args.batch, "threads": args.threads, "compile": args.compile,
               "masked_rows": args.masked_rows, "tokens": args.batch * T}
    for name, r in results.items():
        summary[name] = {k: min(v) for k, v in r.items()}
    summary["forward_speedup"] = summary["baseline"]["forward_s"] / summary["current"]["forward_s"]
    summary["train_speedup"] = summary["baseline"]["train_s"] / summary["current"]["train_s"]
    print(json.dumps(summary, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
