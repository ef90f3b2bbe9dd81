"""Character corpus: tokenizer, download/split, window sampling and prompts."""

from .data import (TINY_SHAKESPEARE_SHA256, TINY_SHAKESPEARE_URL, Corpus, CorpusError,
                   check_length, default_cache_dir, download_corpus, fixed_windows, load_corpus,
                   load_text, random_windows, read_text)
from .prompts import PROMPT_KINDS, PromptStream, make_prompts
from .tokenizer import CharTokenizer, VocabularyError

__all__ = [
    "TINY_SHAKESPEARE_SHA256", "TINY_SHAKESPEARE_URL", "Corpus", "CorpusError", "check_length",
    "default_cache_dir", "download_corpus", "fixed_windows", "load_corpus", "load_text",
    "random_windows", "read_text", "PROMPT_KINDS", "PromptStream", "make_prompts",
    "CharTokenizer", "VocabularyError",
]
