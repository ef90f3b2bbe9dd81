"""Matmul roofline of this machine: GFLOP/s of an n x n x n matmul in fp32 and bf16.

The figure to compare a model's achieved GFLOP/s with is the matmul rate in
the precision the model runs in (DESIGN.md, notes for this machine). On a CPU
without native bf16 (AVX2 only, no AMX / AVX512-BF16) bf16 matmul is emulated
and orders of magnitude slower than fp32; this script shows it.

    python bench/roofline.py [--n 1024] [--threads N] [--quick] [--out bench/results/roofline.json]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

from dgrpo.precision import cpu_name

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "roofline.json"


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Temporarily run torch with `threads` intra-op threads (None: leave as is)."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


def as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)} or a torch.dtype")


def measure_matmul_gflops(dtype=torch.float32, n: int = 1024, threads: int | None = None,
                          min_time: float = 0.5, max_reps: int = 1000, device: str = "cpu") -> float:
    """GFLOP/s (2 n^3 per matmul) of the fastest (n, n) @ (n, n) matmul in `dtype`.

    Runs one untimed warm-up matmul, then times matmuls one by one until `min_time`
    seconds have passed (at least one: a slow emulated dtype costs one matmul, not a
    fixed count) and reports the fastest, which is what the machine can do.
    """
    dtype = as_dtype(dtype)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    with torch_threads(threads):
        g = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(n, n, generator=g, device=device).to(dtype)
        b = torch.randn(n, n, generator=g, device=device).to(dtype)
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        torch.mm(a, b)  # warm-up: kernels, caches, thread pool
        sync()
        times, start = [], time.perf_counter()
        while True:
            t0 = time.perf_counter()
            torch.mm(a, b)
            sync()
            times.append(time.perf_counter() - t0)
            if time.perf_counter() - start >= min_time or len(times) >= max_reps:
                break
    # the fastest matmul: on a shared machine the mean mostly measures the other jobs
    return 2.0 * n ** 3 / min(times) / 1e9


def machine_info() -> dict:
    return {"cpu": cpu_name(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "bf16_native": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
            "python": sys.version.split()[0]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1024, help="matrix size (default 1024)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16, fp16")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds of timed matmuls per dtype")
    ap.add_argument("--quick", action="store_true", help="n=256, 0.1 s per dtype")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output file")
    args = ap.parse_args(argv)
    n, min_time = (min(args.n, 256), 0.1) if args.quick else (args.n, args.min_time)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    results = {}
    with torch_threads(args.threads) as threads:
        info = machine_info()
        for name in dtypes:
            results[name] = measure_matmul_gflops(name, n=n, min_time=min_time)
    report = {"bench": "roofline", "n": n, "threads": threads, "machine": info, "gflops": results}
    print(f"matmul roofline: {n}x{n}x{n}, {threads} torch thread(s), {info['cpu']}, "
          f"native bf16: {info['bf16_native']}")
    print(f"{'dtype':>6} {'GFLOP/s':>10}")
    for name, v in results.items():
        print(f"{name:>6} {v:10.1f}")
    if "fp32" in results and "bf16" in results:
        print(f"bf16 / fp32 = {results['bf16'] / results['fp32']:.3g}")
    from bench.common import write_json  # bench.common imports this module
    write_json(report, args.out)
    return report


if __name__ == "__main__":
    main()
