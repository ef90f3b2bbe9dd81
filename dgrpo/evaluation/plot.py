"""`dgrpo report --overoptimization A.json B.json ... --out plot.png`: the over-optimisation plot.

Proxy and gold reward against d = sqrt(KL) for every curve of the given `dgrpo evaluate`
reports (best-of-N, and GRPO checkpoints grouped by run and kl_coef), each with its fitted
Gao curve; the coefficients go in the legend and, with every plotted point, in a JSON
beside the PNG (same name, .json).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .evaluate import EvaluationError
from .overoptimization import format_fit, gao_curve, report_series


def load_reports(paths) -> list[tuple[str, dict]]:
    out = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise EvaluationError(f"{path} does not exist; pass files written by `dgrpo evaluate --out`")
        try:
            report = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EvaluationError(f"{path} is not valid JSON ({e})") from None
        if not isinstance(report, dict) or report.get("kind") != "dgrpo-evaluate":
            raise EvaluationError(f"{path} is not a `dgrpo evaluate` report")
        out.append((path.stem, report))
    return out


def plot_overoptimization(paths, out: str | Path) -> dict:
    """Draw the plot to `out` (PNG) and write the curves and fits to `out` with suffix .json."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = load_reports(paths)
    many = len(reports) > 1
    curves = [c for name, report in reports for c in report_series(report, name if many else "")]
    if not curves:
        raise EvaluationError("the reports hold no best-of-N rows and no policy rows: nothing to plot")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(9, 6))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, curve in enumerate(curves):
        colour = "black" if curve["method"] == "bon" and i == 0 else colours[i % len(colours)]
        d = torch.tensor(curve["d"], dtype=torch.float64)
        grid = torch.linspace(0, float(d.max()) if len(d) else 1.0, 100, dtype=torch.float64)
        for reward, marker, style in (("proxy", "o", "--"), ("gold", "s", "-")):
            values = curve[reward]
            if None in values:
                continue
            fit = curve["fits"][reward]
            ax.errorbar(curve["d"], values, yerr=curve[f"{reward}_stderr"], fmt=marker, color=colour, capsize=2,
                        markerfacecolor="none" if reward == "proxy" else colour,
                        label=f"{curve['label']}: {reward} ({format_fit(fit)})")
            if fit is not None:
                ax.plot(grid.tolist(), (gao_curve(curve["method"], fit["a"], fit["b"], grid)
                                        + curve[f"{reward}_base"]).tolist(), style, color=colour, alpha=0.8)
    ax.set_xlabel("d = sqrt(KL(policy || base)), sqrt(nats per sequence); best-of-N: the bound log N - (N-1)/N")
    ax.set_ylabel("reward = 1 - judge score")
    ax.set_title("Over-optimisation: proxy (open, dashed) and gold (filled, solid) reward vs d")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    summary = {"plot": str(out), "reports": [str(p) for p in paths],
               "forms": {"bon": "R(d) = d (a - b d)", "rl": "R(d) = d (a - b log d)",
                         "gain": "reward minus the curve's d = 0 value"},
               "curves": curves}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    return summary
