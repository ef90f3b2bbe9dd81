"""The verdict about the text: before (the base generator) and after (a GRPO policy) on every measure, beside the
held-out real text the prompts come from, and plain warnings when the judges' gains are not gains of the text.

A learned judge can be exploited, and a gold judge trained like it shares its blind spots (repeating common
words, losing diversity), so the verdict puts beside the judges what no judge saw: a separate language model's
bits per character, the divergence of the text's character 2-grams from real text's, distinct word 2-grams
across samples and repeated word 2-grams within a sample. It warns when the judges rose while the language model
found the text less likely, when the character 2-grams moved away from real text, when diversity fell by more
than 10%, when repetition rose, and when the proxy rose while the gold judge fell. A change counts when it exceeds
two standard errors (paired by prompt where the measure is per sample).

A language model's likelihood favours text more predictable than the corpus (a low sampling temperature writes
it), so when the LM finds the held-out real text less likely than the base generator's samples its bits per
character cannot say which text is more like the corpus: the verdict then notes the LM's change instead of
warning about it, and the character 2-gram divergence, which counts too few line breaks or capitals as much as
too many, speaks for the form of the text.
"""

from __future__ import annotations

MEASURES = (("proxy_reward", "proxy reward"), ("gold_reward", "gold reward"), ("lm_bits_per_char", "LM bits/char"),
            ("char_2gram_js", "char 2-gram JS"), ("distinct_2", "distinct-2"), ("repeated_word_2grams", "rep. word 2-grams"))
SIGNIFICANT = 2.0  # standard errors
DIVERSITY_FLOOR = 0.9  # distinct-2 of the policy relative to the base's


def _rose(metric: dict | None) -> bool:
    return bool(metric) and metric["mean"] > SIGNIFICANT * metric["stderr"] and metric["mean"] > 0


def _in_se(metric: dict) -> str:
    return f"{metric['mean'] / metric['stderr']:.1f} s.e." if metric["stderr"] > 0 else "exact"


def _unpaired_change(before: dict | None, after: dict | None) -> dict | None:
    if not before or not after:
        return None
    return {"mean": after["mean"] - before["mean"], "stderr": (before["stderr"] ** 2 + after["stderr"] ** 2) ** 0.5}


def text_verdict(before: dict, after: dict, paired: dict, real: dict | None = None) -> dict:
    """Relative distinct-2, the warnings and the notes, from the base row, the policy row, its paired differences
    and the held-out real text's measures (each measure a {mean, stderr} or None)."""
    warnings, notes = [], []
    proxy, gold, lm = paired.get("proxy_reward"), paired.get("gold_reward"), paired.get("lm_bits_per_char")
    judges_rose = _rose(proxy) or _rose(gold)
    if proxy and gold and proxy["mean"] > 0 and gold["mean"] < 0:
        warnings.append(f"the proxy reward rose ({proxy['mean']:+.4f}) while the gold reward fell "
                        f"({gold['mean']:+.4f}): GRPO optimised the judge, not the text")
    lm_real, lm_base = (real or {}).get("lm_bits_per_char"), before.get("lm_bits_per_char")
    lm_ranks = not (lm_real and lm_base and lm_real["mean"] >= lm_base["mean"])
    if judges_rose and _rose(lm):
        if lm_ranks:
            warnings.append(f"the judges rose while the language model finds the text less likely "
                            f"({lm['mean']:+.3f} bits/char, {_in_se(lm)}): the policy may be exploiting what the "
                            f"judges cannot see")
        else:
            notes.append(f"the language model finds the text less likely ({lm['mean']:+.3f} bits/char), but it "
                         f"finds the held-out real text less likely still ({lm_real['mean']:.3f} against the base's "
                         f"{lm_base['mean']:.3f}): its bits per character cannot say which text is more like the "
                         f"corpus here, so the character 2-gram divergence to real text speaks for the form")
    divergence = _unpaired_change(before.get("char_2gram_js"), after.get("char_2gram_js"))
    if judges_rose and _rose(divergence):
        warnings.append(f"the judges rose while the text's character 2-grams moved away from real text's (JS "
                        f"{before['char_2gram_js']['mean']:.4f} -> {after['char_2gram_js']['mean']:.4f} bits, "
                        f"{_in_se(divergence)})")
    d2_before, d2_after = before.get("distinct_2"), after.get("distinct_2")
    relative = d2_after["mean"] / d2_before["mean"] if d2_before and d2_after and d2_before["mean"] else None
    if relative is not None and relative < DIVERSITY_FLOOR:
        warnings.append(f"diversity fell: distinct-2 across samples is {100 * relative:.0f}% of the base "
                        f"generator's ({d2_before['mean']:.3f} -> {d2_after['mean']:.3f})")
    repeated = paired.get("repeated_word_2grams")
    if _rose(repeated):
        warnings.append(f"repetition rose: repeated word 2-grams within a sample {repeated['mean']:+.3f} "
                        f"({_in_se(repeated)})")
    return {"distinct_2_relative": relative, "warnings": warnings, "notes": notes,
            "proxy_rose_gold_fell": bool(proxy and gold and proxy["mean"] > 0 and gold["mean"] < 0)}


def _cell(metric: dict | None) -> str:
    return "-" if metric is None else f"{metric['mean']:.4f} ± {metric['stderr']:.4f}"


def format_measures(before: dict, after: dict, paired: dict, real: dict | None = None) -> list[str]:
    """The before/after table: one line per measure, with the paired gain where the measure is per sample and
    the held-out real text's value when given."""
    lines = [f"{'':20}{'before (base)':>22}{'after (policy)':>22}{'paired gain':>22}"
             + (f"{'held-out text':>22}" if real else "")]
    for key, title in MEASURES:
        lines.append(f"{title:20}{_cell(before.get(key)):>22}{_cell(after.get(key)):>22}"
                     f"{_cell(paired.get(key)):>22}" + (f"{_cell(real.get(key)):>22}" if real else ""))
    return lines
