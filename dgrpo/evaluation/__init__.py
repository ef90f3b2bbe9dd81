"""Gold evaluation: measures of a policy that the reward never sees (pure torch, no Ray).

docs/EVALUATION.md says what each measure is and why it is independent of the reward.
"""

from .best_of_n import best_of_n_expectation, best_of_n_weights, bon_kl_bound, n_for_kl
from .evaluate import EvaluateOptions, EvaluationError, evaluate, format_report
from .overoptimization import fit_gao, gao_curve, report_series
from .statistics import jackknife_stderr, mean_stderr, paired_difference, per_prompt_means
from .text_stats import TextStats, distinct_over_sets

__all__ = [
    "best_of_n_expectation", "best_of_n_weights", "bon_kl_bound", "n_for_kl", "EvaluateOptions",
    "EvaluationError", "evaluate", "format_report", "fit_gao", "gao_curve", "report_series",
    "jackknife_stderr", "mean_stderr", "paired_difference", "per_prompt_means", "TextStats",
    "distinct_over_sets",
]
