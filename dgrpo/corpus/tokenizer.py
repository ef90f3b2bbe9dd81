"""Character-level tokenizer with one extra [MASK] id.

Ids 0..n_chars-1 are the corpus characters in the order given; mask_id ==
n_chars is the last id, matching DiffusionLM (vocab_size = n_chars + 1).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class VocabularyError(ValueError):
    """A character or id is outside the tokenizer, or two tokenizers differ."""


def _show(chars: Iterable[str], limit: int = 10) -> str:
    chars = list(chars)
    shown = ", ".join(repr(c) for c in chars[:limit])
    if len(chars) > limit:
        shown += f", ... ({len(chars) - limit} more)"
    return shown


class CharTokenizer:
    def __init__(self, chars: list[str]):
        chars = list(chars)
        bad = [c for c in chars if not isinstance(c, str) or len(c) != 1]
        if bad:
            raise VocabularyError(
                f"a vocabulary must be a list of single characters, got {_show(bad)}; "
                f"build it with CharTokenizer.from_text(text) or load a checkpoint's saved vocabulary")
        if len(set(chars)) != len(chars):
            dups = sorted({c for c in chars if chars.count(c) > 1})
            raise VocabularyError(
                f"vocabulary has duplicate characters {_show(dups)}; "
                f"each character must appear once (the checkpoint's vocabulary may be corrupt)")
        if not chars:
            raise VocabularyError("vocabulary is empty; build it from a non-empty corpus")
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        if not text:
            raise VocabularyError("cannot build a vocabulary from empty text; use a non-empty corpus")
        return cls(sorted(set(text)))

    @property
    def n_chars(self) -> int:
        return len(self.chars)

    @property
    def mask_id(self) -> int:
        return len(self.chars)

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1

    def _unknown(self, text: str, allowed: set[str] = frozenset()) -> list[str]:
        return sorted(set(text) - self.stoi.keys() - allowed)

    def encode(self, text: str) -> torch.Tensor:
        try:
            ids = [self.stoi[c] for c in text]
        except KeyError:
            unknown = self._unknown(text)
            raise VocabularyError(
                f"text has {len(unknown)} character(s) not in the corpus vocabulary of "
                f"{self.n_chars} characters: {_show(unknown)}; remove them or use a corpus that "
                f"contains them") from None
        return torch.tensor(ids, dtype=torch.long)

    def encode_prompt(self, text: str, mask_char: str = "_") -> torch.Tensor:
        """Encode a prompt where mask_char marks positions for the model to fill.

        mask_char always means [MASK], even if it is also a corpus character.
        """
        if not isinstance(mask_char, str) or len(mask_char) != 1:
            raise VocabularyError(f"mask_char must be a single character, got {mask_char!r}; "
                                  f"pass e.g. --mask-char _")
        try:
            ids = [self.mask_id if c == mask_char else self.stoi[c] for c in text]
        except KeyError:
            unknown = self._unknown(text, {mask_char})
            raise VocabularyError(
                f"prompt has {len(unknown)} character(s) not in the corpus vocabulary of "
                f"{self.n_chars} characters: {_show(unknown)}; remove them from the prompt, or if "
                f"one of them is meant as the mask marker pass it with --mask-char "
                f"(currently {mask_char!r})") from None
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids, mask_char: str = "_") -> str:
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise VocabularyError(f"decode takes a 1-D sequence of ids, got shape "
                                      f"{tuple(ids.shape)}; use decode_batch for 2-D ids")
            ids = ids.tolist()
        out = []
        for i in ids:
            if i == self.mask_id:
                out.append(mask_char)
            elif 0 <= i < self.n_chars:
                out.append(self.chars[i])
            else:
                raise VocabularyError(
                    f"id {i} is outside the vocabulary (ids 0..{self.mask_id}, {self.mask_id} = "
                    f"[MASK]); the ids were probably produced with a different tokenizer or model")
        return "".join(out)

    def decode_batch(self, ids2d, mask_char: str = "_") -> list[str]:
        if isinstance(ids2d, torch.Tensor) and ids2d.dim() != 2:
            raise VocabularyError(f"decode_batch takes 2-D ids (batch, length), got shape "
                                  f"{tuple(ids2d.shape)}; use decode for a single sequence")
        return [self.decode(row, mask_char) for row in ids2d]

    def to_dict(self) -> dict:
        return {"chars": list(self.chars)}

    @classmethod
    def from_dict(cls, d: dict) -> CharTokenizer:
        if not isinstance(d, dict) or not isinstance(d.get("chars"), list):
            raise VocabularyError(
                f"a saved vocabulary must be a dict {{'chars': [...]}}, got {type(d).__name__}"
                f"{'' if not isinstance(d, dict) else ' with keys ' + str(sorted(d))}; "
                f"the checkpoint's tokenizer entry is missing or corrupt")
        return cls(d["chars"])

    def check_same(self, other: CharTokenizer, what: str = "") -> None:
        if self == other:
            return
        where = f" ({what})" if what else ""
        only_self = sorted(set(self.chars) - set(other.chars))
        only_other = sorted(set(other.chars) - set(self.chars))
        parts = []
        if only_self:
            parts.append(f"only in the first: {_show(only_self)}")
        if only_other:
            parts.append(f"only in the second: {_show(only_other)}")
        if not parts:
            parts.append("same characters in a different order, so ids do not match")
        raise VocabularyError(
            f"vocabularies differ{where}: {self.n_chars} vs {other.n_chars} characters; "
            f"{'; '.join(parts)}; the two checkpoints must come from the same corpus")

    def __eq__(self, other) -> bool:
        if not isinstance(other, CharTokenizer):
            return NotImplemented
        return self.chars == other.chars

    def __hash__(self) -> int:
        return hash(tuple(self.chars))

    def __repr__(self) -> str:
        return f"CharTokenizer(n_chars={self.n_chars}, mask_id={self.mask_id})"
