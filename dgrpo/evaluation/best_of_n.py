"""Best-of-N: its KL to the base model, and unbiased estimates of every N from one pool.

KL(best-of-N || base) <= log N - (N - 1) / N nats per sequence (exact for a continuous
selection score without ties; Stiennon et al. 2020, Gao et al. 2022). It is an analytic
bound, not a measurement, and is reported as such.

Drawing a separate pool for every N wastes samples. From a pool of M >= N samples of one
prompt, the expected value of any per-sample quantity at the proxy-argmax of N samples
drawn without replacement is a weighted sum over the pool sorted by proxy score: the i-th
smallest (1-based) is the best of a random N-subset with probability
C(i - 1, N - 1) / C(M, N) (it must be in the subset and the other N - 1 must be below it).
So one pool of 64 per prompt gives the whole curve N = 1..64, each point unbiased, and
N = 1 is the plain pool mean.
"""

from __future__ import annotations

import math

import torch


def bon_kl_bound(n: float) -> float:
    """KL(best-of-n || base) bound in nats per sequence: log n - (n - 1) / n."""
    if n < 1:
        raise ValueError(f"best-of-N needs N >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def n_for_kl(kl_seq: float, max_n: int = 256) -> tuple[int, float]:
    """(N rounded and clipped to [1, max_n], the continuous solution) of log N - (N-1)/N = kl_seq."""
    if not math.isfinite(kl_seq) or kl_seq <= 0:
        return 1, 1.0
    lo, hi = 1.0, float(max_n)
    if bon_kl_bound(hi) <= kl_seq:
        return max_n, math.inf if bon_kl_bound(hi) < kl_seq else hi
    for _ in range(200):  # the bound increases on [1, inf)
        mid = 0.5 * (lo + hi)
        if bon_kl_bound(mid) < kl_seq:
            lo = mid
        else:
            hi = mid
    n = 0.5 * (lo + hi)
    return int(min(max(round(n), 1), max_n)), n


def best_of_n_weights(pool_size: int, n: int) -> torch.Tensor:
    """(pool_size,) float64: probability that the i-th smallest of the pool is the best of n drawn from it."""
    if not 1 <= n <= pool_size:
        raise ValueError(f"best-of-{n} needs 1 <= N <= pool size {pool_size}")
    subsets = math.comb(pool_size, n)
    return torch.tensor([math.comb(i, n - 1) / subsets for i in range(pool_size)], dtype=torch.float64)


def best_of_n_expectation(proxy: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """(P, M) proxy scores and (P, M) values of a pool of M per prompt -> (P,) float64: the expected
    value at the proxy-argmax of n samples drawn without replacement from each prompt's pool."""
    if proxy.shape != values.shape or proxy.dim() != 2:
        raise ValueError(f"proxy and values must both be (prompts, pool), got {tuple(proxy.shape)} "
                         f"and {tuple(values.shape)}")
    order = proxy.argsort(dim=1, stable=True)
    ranked = values.double().gather(1, order)
    return ranked @ best_of_n_weights(proxy.shape[1], n)
