"""The verdict about the text: before (the base generator) and after (a GRPO policy) on every measure, and plain
warnings when the judges' gains are not gains of the text.

A learned judge can be exploited, and a gold judge trained like it shares its blind spots (repeating common
words, losing diversity), so the verdict puts beside the judges what no judge saw: a separate language model's
bits per character, distinct word 2-grams across samples and repeated word 2-grams within a sample. It warns
when the judges rose while the language model found the text less likely, when diversity fell by more than
10%, when repetition rose, and when the proxy rose while the gold judge fell. A change counts when it exceeds
two standard errors (paired by prompt where the measure is per sample).
"""

from __future__ import annotations

MEASURES = (("proxy_reward", "proxy reward"), ("gold_reward", "gold reward"), ("lm_bits_per_char", "LM bits/char"),
            ("distinct_2", "distinct-2"), ("repeated_word_2grams", "rep. word 2-grams"))
SIGNIFICANT = 2.0  # standard errors
DIVERSITY_FLOOR = 0.9  # distinct-2 of the policy relative to the base's


def _rose(metric: dict | None) -> bool:
    return bool(metric) and metric["mean"] > SIGNIFICANT * metric["stderr"] and metric["mean"] > 0


def _in_se(metric: dict) -> str:
    return f"{metric['mean'] / metric['stderr']:.1f} s.e." if metric["stderr"] > 0 else "exact"


def text_verdict(before: dict, after: dict, paired: dict) -> dict:
    """Relative distinct-2 and the warnings, from the base row, the policy row and its paired differences
    (each measure a {mean, stderr} or None)."""
    warnings = []
    proxy, gold, lm = paired.get("proxy_reward"), paired.get("gold_reward"), paired.get("lm_bits_per_char")
    if proxy and gold and proxy["mean"] > 0 and gold["mean"] < 0:
        warnings.append(f"the proxy reward rose ({proxy['mean']:+.4f}) while the gold reward fell "
                        f"({gold['mean']:+.4f}): GRPO optimised the judge, not the text")
    if (_rose(proxy) or _rose(gold)) and _rose(lm):
        warnings.append(f"the judges rose while the language model finds the text less likely ({lm['mean']:+.3f} "
                        f"bits/char, {_in_se(lm)}): the policy may be exploiting what the judges cannot see")
    d2_before, d2_after = before.get("distinct_2"), after.get("distinct_2")
    relative = d2_after["mean"] / d2_before["mean"] if d2_before and d2_after and d2_before["mean"] else None
    if relative is not None and relative < DIVERSITY_FLOOR:
        warnings.append(f"diversity fell: distinct-2 across samples is {100 * relative:.0f}% of the base "
                        f"generator's ({d2_before['mean']:.3f} -> {d2_after['mean']:.3f})")
    repeated = paired.get("repeated_word_2grams")
    if _rose(repeated):
        warnings.append(f"repetition rose: repeated word 2-grams within a sample {repeated['mean']:+.3f} "
                        f"({_in_se(repeated)})")
    return {"distinct_2_relative": relative, "warnings": warnings,
            "proxy_rose_gold_fell": bool(proxy and gold and proxy["mean"] > 0 and gold["mean"] < 0)}


def _cell(metric: dict | None) -> str:
    return "-" if metric is None else f"{metric['mean']:.4f} ± {metric['stderr']:.4f}"


def format_measures(before: dict, after: dict, paired: dict) -> list[str]:
    """The before/after table: one line per measure, with the paired gain where the measure is per sample."""
    lines = [f"{'':20}{'before (base)':>22}{'after (policy)':>22}{'paired gain':>22}"]
    for key, title in MEASURES:
        lines.append(f"{title:20}{_cell(before.get(key)):>22}{_cell(after.get(key)):>22}"
                     f"{_cell(paired.get(key)):>22}")
    return lines
