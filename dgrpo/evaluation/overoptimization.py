"""Over-optimisation curves: proxy and gold reward against d = sqrt(KL), with Gao et al.'s fits.

Gao, Schulman & Hilton (2022) model the reward gained over the initial policy as

    best-of-N:  R_bon(d) = d (a - b d)
    RL:         R_rl(d)  = d (a - b log d)

with d = sqrt(KL(policy || initial)). Both are linear in (a, b), so they are fitted by
least squares on the features (d, -d^2) and (d, -d log d), no intercept (R(0) = 0); the
gains are taken against the d = 0 point of the same curve (the base generator). R^2 is
1 - SS_res / SS_tot around the mean gain.

A series is one curve: the best-of-N rows of one evaluation, or the GRPO checkpoints of
one run (grouped by run directory and kl_coef) together with that evaluation's base row.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

FORMS = {"bon": "d (a - b d)", "rl": "d (a - b log d)"}


def gao_features(form: str, d: torch.Tensor) -> torch.Tensor:
    d = torch.as_tensor(d, dtype=torch.float64)
    if form == "bon":
        second = d.square()
    elif form == "rl":
        second = torch.where(d > 0, d * d.clamp_min(1e-300).log(), torch.zeros_like(d))
    else:
        raise ValueError(f"unknown Gao form {form!r}; one of {sorted(FORMS)}")
    return torch.stack([d, -second], dim=1)


def gao_curve(form: str, a: float, b: float, d) -> torch.Tensor:
    return gao_features(form, d) @ torch.tensor([a, b], dtype=torch.float64)


def fit_gao(form: str, d, gain) -> dict | None:
    """Least-squares (a, b) of gain = R(d) in the given form; None with fewer than 3 points at d > 0:
    two points determine both coefficients exactly, so a curve through them would show a shape no data
    supports (and an R² of 1)."""
    d = torch.as_tensor(d, dtype=torch.float64).flatten()
    y = torch.as_tensor(gain, dtype=torch.float64).flatten()
    if int((d > 0).sum()) < 3:
        return None
    X = gao_features(form, d)
    coef = torch.linalg.lstsq(X, y[:, None]).solution.flatten()
    residual = float((y - X @ coef).square().sum())
    total = float((y - y.mean()).square().sum())
    a, b = float(coef[0]), float(coef[1])
    return {"form": FORMS[form], "a": a, "b": b, "r2": 1 - residual / total if total > 0 else None,
            "n_points": int(d.numel())}


def _value(metric) -> float | None:
    return None if metric is None else metric["mean"]


def _stderr(metric) -> float | None:
    return None if metric is None else metric["stderr"]


def _series(label: str, method: str, rows: list[dict], base: dict, **info) -> dict:
    series = {"label": label, "method": method, **info, "d": [r["sqrt_kl"] for r in rows],
              "points": [r["name"] for r in rows], "fits": {}}
    for reward in ("proxy", "gold"):
        key = f"{reward}_reward"
        values = [_value(r[key]) for r in rows]
        series[reward] = values
        series[f"{reward}_stderr"] = [_stderr(r[key]) for r in rows]
        r0 = _value(base[key])
        series[f"{reward}_base"] = r0
        if r0 is not None and None not in values:
            series["fits"][reward] = fit_gao(method, series["d"], [v - r0 for v in values])
        else:
            series["fits"][reward] = None
    return series


def report_series(report: dict, source: str = "") -> list[dict]:
    """The curves of one `dgrpo evaluate` report: its best-of-N rows, and its policies by run and kl_coef."""
    rows = report["rows"]
    out = []
    bon = sorted((r for r in rows if r["kind"] == "best_of_n"), key=lambda r: r["n"])
    if bon:
        pool_mean = next((r for r in bon if r["n"] == 1), bon[0])
        out.append(_series(f"best-of-N{f' ({source})' if source else ''}", "bon", bon, pool_mean, source=source))
    base = next((r for r in rows if r["kind"] == "base"), None)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["kind"] == "policy":
            groups.setdefault((r.get("run"), r.get("kl_coef")), []).append(r)
    for (run, kl_coef), members in groups.items():
        members = sorted(members, key=lambda r: (r.get("step") or 0, r["sqrt_kl"]))
        kl_target = members[0].get("kl_target")
        setting = (f" kl_target={kl_target:g}" if kl_target is not None else
                   f" kl_coef={kl_coef:g}" if kl_coef is not None else "")
        levers = "".join(f", {lever}" for lever in members[0].get("levers") or [])
        label = f"GRPO{setting}{levers} ({Path(run).name if run else '?'})"
        curve = ([base] if base is not None else []) + members
        out.append(_series(label, "rl", curve, base if base is not None else members[0], source=source,
                           run=run, kl_coef=kl_coef))
    return out


def format_fit(fit: dict | None) -> str:
    if fit is None:
        return "no fit (fewer than 3 points at d > 0)"
    r2 = "n/a" if fit["r2"] is None or not math.isfinite(fit["r2"]) else f"{fit['r2']:.2f}"
    return f"a={fit['a']:.3g}, b={fit['b']:.3g}, R²={r2}"
