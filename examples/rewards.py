"""Rewards of your own, named in a config by import path (README, "Your own reward").

    reward:
      kind: python
      function: examples.rewards:vowel_share       # or examples.rewards:KnownWords with kwargs

A reward is a function `fn(texts, prompts) -> one float per text`, or a class whose instances are such
functions; the class is built once per judge actor with `reward.kwargs` (plus `tokenizer` and `device` when
its constructor takes them). The judge actors call it on a batch: `texts` are the finished samples,
`prompts` what the sampler started from, with "\x00" at the positions it filled in. Higher is better; every
value must be a finite number. The module must be importable where dgrpo runs: from the directory you start
`dgrpo` in (this file: the repository root), a directory on $PYTHONPATH, or `reward.python_path`.
"""

from __future__ import annotations

import re
from collections import Counter

VOWELS = set("aeiouAEIOU")


def vowel_share(texts: list[str], prompts: list[str]) -> list[float]:
    """The share of each text's letters that are vowels."""
    shares = []
    for text in texts:
        letters = [c for c in text if c.isalpha()]
        shares.append(sum(c in VOWELS for c in letters) / len(letters) if letters else 0.0)
    return shares


class KnownWords:
    """The share of each text's words that occur at least `min_count` times in `corpus`: a spelling reward.

    A class because reading the corpus is done once per judge actor, not once per batch."""

    def __init__(self, corpus: str, min_count: int = 2):
        with open(corpus, encoding="utf-8") as fh:
            counts = Counter(re.findall(r"[A-Za-z']+", fh.read().lower()))
        self.words = {w for w, n in counts.items() if n >= min_count}
        if not self.words:
            raise ValueError(f"{corpus} holds no word {min_count} times or more")

    def __call__(self, texts: list[str], prompts: list[str]) -> list[float]:
        rewards = []
        for text in texts:
            words = re.findall(r"[A-Za-z']+", text.lower())
            rewards.append(sum(w in self.words for w in words) / len(words) if words else 0.0)
        return rewards


class LanguageModelReward:
    """Minus the bits per character of each text under a `dgrpo lm train` language model, scored on the judge
    actor's device: its GPU with `resources.judge.num_gpus: 1` (examples/lm_reward_gpu.yaml)."""

    def __init__(self, checkpoint: str, device="cpu", tokenizer=None):
        import torch

        from dgrpo.models.char_lm import bits_per_char, load_char_lm
        self.torch, self.bits_per_char = torch, bits_per_char
        self.lm, self.tokenizer, _ = load_char_lm(checkpoint, tokenizer=tokenizer, device=device)
        self.device = device

    def __call__(self, texts: list[str], prompts: list[str]) -> list[float]:
        tokens = self.torch.stack([self.tokenizer.encode(t) for t in texts]).to(self.device)
        return (-self.bits_per_char(self.lm, tokens)).tolist()
