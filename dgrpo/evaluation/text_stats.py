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


def char_2gram_divergence(texts: list[str], reference: list[str], resamples: int = 200, seed: int = 0) -> dict:
    """Jensen-Shannon divergence, in bits, between the character 2-gram distribution of `texts` (all of them
    pooled) and that of `reference` (held-out real text), with a bootstrap s.e. over `texts`. 0 when the two
    use characters in pairs at the same rates; 1 when they share no pair. Unlike a language model's likelihood it
    does not favour text more predictable than the corpus: too few line breaks, capitals or rare pairs count as
    much as too many."""
    if not texts or not reference:
        raise ValueError("the character 2-gram divergence needs texts and reference texts")
    grams = sorted(set().union(*(ngram_counts(t, 2) for t in reference + texts)))
    index = {g: i for i, g in enumerate(grams)}

    def counts(group: list[str]) -> torch.Tensor:
        m = torch.zeros(len(group), len(grams), dtype=torch.float64)
        for row, t in enumerate(group):
            for g, k in ngram_counts(t, 2).items():
                m[row, index[g]] = k
        return m

    p = counts(reference).sum(0)
    p = p / p.sum()
    per_text = counts(texts)
    g = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, len(texts), (resamples, len(texts)), generator=g)
    weights = torch.zeros(resamples, len(texts), dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(resamples, len(texts), dtype=torch.float64))
    q = torch.cat([per_text.sum(0, keepdim=True), weights @ per_text])
    q = q / q.sum(1, keepdim=True).clamp_min(1e-300)
    m = 0.5 * (p + q)

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(a > 0, a * (a / b).log2(), torch.zeros_like(a)).sum(-1)

    js = 0.5 * kl(p.expand_as(q), m) + 0.5 * kl(q, m)
    return {"mean": float(js[0]), "stderr": float(js[1:].std())}
