"""Helpers shared by the benchmark scripts: machine info, JSON output, tables, small utilities.

Every script writes one JSON file whose top level holds `bench` (its name),
`machine` (CPU model, torch/Ray/Python versions, torch threads, load average,
date) and its measured figures, and prints the figures as a table.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from bench.roofline import cpu_name, measure_matmul_gflops, torch_threads  # noqa: F401  (re-exported)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SHARED_CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"
VOCAB = 66  # tiny Shakespeare: 65 characters + [MASK]


def default_out(name: str) -> Path:
    return RESULTS_DIR / f"{name}.json"


def process_tree(root: int) -> set[int]:
    """`root` and every process descended from it (from /proc)."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    tree, todo = {root}, [root]
    while todo:
        pid = todo.pop()
        children = [c for c, p in parent.items() if p == pid and c not in tree]
        tree.update(children)
        todo += children
    return tree


def machine_info(threads: int | None = None) -> dict:
    """CPU model, versions, torch threads, load average and date of this measurement."""
    info = {
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": threads if threads is not None else torch.get_num_threads(),
        "bf16_native": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "cuda": torch.cuda.is_available(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import ray
        info["ray"] = ray.__version__
    except ImportError:  # pragma: no cover - ray is a dependency
        pass
    with contextlib.suppress(OSError):
        info["loadavg_1m"] = os.getloadavg()[0]
    return info


def write_json(report: dict, out: str | os.PathLike) -> Path:
    """Write `report` (made JSON-safe) to `out`, creating folders; prints `wrote OUT`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=_json_default))
    print(f"wrote {out}")
    return out


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, torch.dtype):
        return str(o)
    raise TypeError(f"cannot serialise {type(o).__name__}")


def print_table(rows: Sequence[dict], columns: Sequence[tuple], title: str | None = None) -> str:
    """Print rows as an aligned table. columns: (key, header[, format spec or callable]).

    Returns the printed text. Missing keys print as '-'.
    """
    cells = []
    for r in rows:
        line = []
        for col in columns:
            key, fmt = col[0], (col[2] if len(col) > 2 else "")
            v = r.get(key)
            if v is None:
                line.append("-")
            elif callable(fmt):
                line.append(fmt(v))
            else:
                line.append(format(v, fmt) if fmt else str(v))
        cells.append(line)
    headers = [c[1] for c in columns]
    widths = [max([len(h)] + [len(line[i]) for line in cells]) for i, h in enumerate(headers)]
    out = []
    if title:
        out.append(title)
    head = "  ".join(h.rjust(w) for h, w in zip(headers, widths))
    out += [head, "-" * len(head)]
    out += ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells]
    text = "\n".join(out)
    print(text, flush=True)
    return text


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def ints(text: str) -> list[int]:
    return [int(v) for v in str(text).split(",") if v.strip()]


def names(text: str) -> list[str]:
    return [v.strip() for v in str(text).split(",") if v.strip()]


def median(xs: Iterable[float]) -> float:
    xs = list(xs)
    return float(statistics.median(xs)) if xs else float("nan")


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def roofline_gflops(quick: bool, threads: int | None = None) -> tuple[float, int]:
    """Measured fp32 matmul GFLOP/s (the roofline quoted on this machine) and the n used."""
    n, min_time = (256, 0.05) if quick else (1024, 1.0)
    return measure_matmul_gflops(torch.float32, n=n, threads=threads, min_time=min_time), n


def synthetic_corpus_text(n_chars: int = 24000, seed: int = 0) -> str:
    """Structured made-up text (speaker lines from a small word list), as in the tests."""
    rng = random.Random(seed)
    speakers = ["KING", "QUEEN", "ROMEO", "NURSE"]
    words = ("the king and queen of rome shall speak to my lord good night sweet prince "
             "what is this that i see here now thou art a fool come away with me").split()
    parts, size = [], 0
    while size < n_chars:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(4, 9)))
        block = f"{rng.choice(speakers)}:\n{line.capitalize()}.\n\n"
        parts.append(block)
        size += len(block)
    return "".join(parts)


def corpus_path(path: str | None, quick: bool, tmp_dir: str | os.PathLike) -> str:
    """`path` if given; else tiny Shakespeare from ../shared (full runs) or a synthetic file (quick)."""
    if path:
        return str(path)
    if not quick and SHARED_CORPUS.is_file():
        return str(SHARED_CORPUS)
    p = Path(tmp_dir) / "synthetic_corpus.txt"
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(synthetic_corpus_text())
    return str(p)


@contextlib.contextmanager
def local_ray(num_cpus: float, threads: int = 1):
    """A private local Ray cluster on 127.0.0.1 (no dashboard), shut down on exit.

    If this process is already connected to Ray (e.g. a test session's shared
    cluster), that cluster is used as is and left running: the caller must make
    sure it has `num_cpus` free. `ray_cluster_kind()` says which happened.
    """
    import ray
    global _RAY_KIND
    if ray.is_initialized():
        _RAY_KIND = "existing"
        yield ray
        return
    ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads)}})
    _RAY_KIND = "own"
    try:
        yield ray
    finally:
        ray.shutdown()


_RAY_KIND = None


def ray_cluster_kind() -> str | None:
    """'own' if the last local_ray() started its cluster, 'existing' if it reused one."""
    return _RAY_KIND
