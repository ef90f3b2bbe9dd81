"""Repetition and diversity of generated texts: model-free, so no policy can have learned them.

Definitions (documented in docs/EVALUATION.md):

- words: maximal runs of word characters, apostrophes inside allowed ("thou'rt"), lowercased;
  punctuation and line breaks separate words and are not words.
- distinct-n (n = 1..4): unique word n-grams / word n-grams, n-grams never crossing a sample.
  Over a set of samples (one per prompt) it measures diversity across samples; within one
  sample ("per sample") it measures repetition inside it. 0 for a text without any n-gram.
- repeated n-grams: the share of a sample's n-gram occurrences whose n-gram occurs at least
  twice in the sample (the text covered by repeats); reported for character 4-grams and
  word 2-grams. "with with with" has word-2-gram repeats 1.0 where distinct-2 is 0.5.

Counting runs in Python over decoded strings: a few thousand samples of a few hundred
characters take seconds, small next to sampling them.
"""

from __future__ import annotations

import re
from collections import Counter

import torch

from .statistics import jackknife_stderr

WORD = re.compile(r"\w+(?:'\w+)*")
DISTINCT_ORDERS = (1, 2, 3, 4)
REPEATED = {"repeated_char_4grams": ("char", 4), "repeated_word_2grams": ("word", 2)}


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def ngram_counts(units, n: int) -> Counter:
    """Counter of the n-grams of a string (substrings) or of a list of words (tuples)."""
    if isinstance(units, str):
        return Counter(units[i:i + n] for i in range(len(units) - n + 1))
    return Counter(tuple(units[i:i + n]) for i in range(len(units) - n + 1))


def distinct_fraction(counts: Counter) -> float:
    total = sum(counts.values())
    return len(counts) / total if total else 0.0


def repeated_fraction(counts: Counter) -> float:
    total = sum(counts.values())
    return sum(c for c in counts.values() if c >= 2) / total if total else 0.0


class TextStats:
    """Per-sample statistics of decoded texts, and their word n-gram counts for distinct-n over sets.

    values[name]: (len(texts),) float64 for name in distinct_{n}_per_sample and REPEATED.
    word_ngrams[n][i]: Counter of word n-grams of text i.
    """

    def __init__(self, texts: list[str]):
        split = [words(t) for t in texts]
        self.word_ngrams = {n: [ngram_counts(w, n) for w in split] for n in DISTINCT_ORDERS}
        self.values = {f"distinct_{n}_per_sample": torch.tensor([distinct_fraction(c) for c in self.word_ngrams[n]],
                                                                 dtype=torch.float64)
                       for n in DISTINCT_ORDERS}
        for name, (unit, n) in REPEATED.items():
            if unit == "char":
                counts = [ngram_counts(t, n) for t in texts]
            else:
                counts = self.word_ngrams.get(n) or [ngram_counts(w, n) for w in split]
            self.values[name] = torch.tensor([repeated_fraction(c) for c in counts], dtype=torch.float64)


def distinct_over_sets(sets: list[list[Counter]]) -> dict:
    """distinct-n over sets of one sample per prompt, averaged over the sets, with a jackknife s.e.

    sets[j][i]: the n-gram Counter of prompt i's sample in set j (every set holds one sample of
    each of the P prompts). distinct-n of a set falls with its size, so comparable figures need
    sets of equal size: one sample per prompt. The standard error is the delete-one-prompt
    jackknife of the set average; leaving prompt i out of a set removes the n-grams whose every
    occurrence is in prompt i's sample.
    """
    if not sets or len(sets[0]) < 2:
        raise ValueError("distinct-n over sets needs at least one set of at least 2 prompts")
    n_prompts = len(sets[0])
    value, leave_one_out = 0.0, torch.zeros(n_prompts, dtype=torch.float64)
    for counters in sets:
        if len(counters) != n_prompts:
            raise ValueError("every set must hold one sample per prompt")
        union = Counter()
        for c in counters:
            union.update(c)
        total, unique = sum(union.values()), len(union)
        value += unique / total if total else 0.0
        for i, c in enumerate(counters):
            rest = total - sum(c.values())
            only_here = sum(1 for gram, k in c.items() if union[gram] == k)
            leave_one_out[i] += (unique - only_here) / rest if rest else 0.0
    return {"mean": value / len(sets), "stderr": jackknife_stderr(leave_one_out / len(sets))}
