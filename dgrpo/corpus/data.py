"""Corpus loading, train/val split and window sampling.

The default corpus is tiny shakespeare, downloaded once into a cache dir and
verified by sha256. Any UTF-8 text file can be used instead (corpus.path; the CLI says which flag sets it).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import pathlib
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

import torch

from .tokenizer import CharTokenizer, VocabularyError

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

_LOCAL_FIX = "give a local file as the corpus path, e.g. a copy of tinyshakespeare.txt"


class CorpusError(ValueError):
    """The corpus could not be obtained, read or split."""


def default_cache_dir() -> pathlib.Path:
    env = os.environ.get("DGRPO_CACHE")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "dgrpo"


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_corpus(url: str = TINY_SHAKESPEARE_URL, sha256: str = TINY_SHAKESPEARE_SHA256,
                    cache_dir=None, timeout: float = 30) -> pathlib.Path:
    """Return a local copy of url, downloading it only if no verified copy is cached."""
    cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    # Keyed by checksum so a changed url/content never reuses a stale file.
    name = os.path.basename(urllib.parse.urlparse(url).path) or "corpus.txt"
    target = cache_dir / f"{sha256[:16]}-{name}"
    if target.is_file() and _sha256(target) == sha256:
        return target

    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CorpusError(f"cannot create the corpus cache dir {cache_dir}: {e}; set $DGRPO_CACHE "
                          f"to a writable directory, or {_LOCAL_FIX}") from e

    # Download to a unique temp file and rename, so concurrent workers never
    # see a half-written corpus.
    fd, tmp_name = tempfile.mkstemp(dir=cache_dir, prefix=".download-", suffix=".part")
    tmp = pathlib.Path(tmp_name)
    h = hashlib.sha256()
    try:
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    h.update(chunk)
                    out.write(chunk)
        except (OSError, http.client.HTTPException) as e:
            # URLError's str() wraps the reason in "<urlopen error ...>"; HTTPError's is fine.
            plain = isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError)
            reason = e.reason if plain else e
            raise CorpusError(f"downloading the corpus from {url} failed ({reason}); "
                              f"{_LOCAL_FIX}") from e
        got = h.hexdigest()
        if got != sha256:
            raise CorpusError(f"the corpus downloaded from {url} has the wrong sha256 "
                              f"(expected {sha256}, got {got}), so it was not kept; the file may "
                              f"have changed upstream or the download was corrupted: retry, or "
                              f"{_LOCAL_FIX}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def read_text(path) -> str:
    path = pathlib.Path(path)
    if not path.exists():
        raise CorpusError(f"corpus file {path} does not exist; check the corpus path, or leave it unset to "
                          f"download tiny shakespeare")
    if path.is_dir():
        txt = sorted(p.name for p in path.glob("*.txt"))[:3]
        hint = f" (it contains {', '.join(txt)})" if txt else ""
        raise CorpusError(f"corpus path {path} is a directory{hint}; pass the text file itself, "
                          f"e.g. {path / (txt[0] if txt else 'input.txt')}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CorpusError(f"cannot read corpus file {path}: {e}; check its permissions or give another "
                          f"file as the corpus path") from e
    if not data:
        raise CorpusError(f"corpus file {path} is empty; give a non-empty UTF-8 text file as the corpus path")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise CorpusError(f"corpus file {path} is not valid UTF-8: byte {data[e.start]:#04x} at "
                          f"byte offset {e.start} (line {line}) ({e.reason}); re-save it as UTF-8, "
                          f"e.g. iconv -f latin1 -t utf-8 {path} > {path}.utf8") from None


def load_text(path: str | None = None, cache_dir=None) -> str:
    return read_text(path if path is not None else download_corpus(cache_dir=cache_dir))


@dataclass
class Corpus:
    text: str = field(repr=False)
    tokenizer: CharTokenizer
    train: torch.Tensor = field(repr=False)  # 1-D long ids
    val: torch.Tensor = field(repr=False)


def load_corpus(path: str | None = None, cache_dir=None, val_fraction: float = 0.1,
                tokenizer: CharTokenizer | None = None) -> Corpus:
    """Load, tokenize and split: the first (1 - val_fraction) of the text is train."""
    if not 0 < val_fraction < 1:
        raise CorpusError(f"val_fraction must be strictly between 0 and 1, got {val_fraction}; "
                          f"a typical value is 0.1")
    text = load_text(path, cache_dir)
    n_train = int(len(text) * (1 - val_fraction))
    n_val = len(text) - n_train
    if n_train < 2 or n_val < 2:
        raise CorpusError(f"the corpus has {len(text)} characters, which splits into {n_train} "
                          f"train and {n_val} val characters (val_fraction={val_fraction}); each "
                          f"needs at least 2: use a longer corpus or change val_fraction")
    if tokenizer is None:
        tokenizer = CharTokenizer.from_text(text)
    try:
        ids = tokenizer.encode(text)
    except VocabularyError as e:
        raise VocabularyError(f"{e}. The given tokenizer (e.g. from a checkpoint) was built from a "
                              f"different corpus: use the corpus that checkpoint was trained "
                              f"on") from None
    return Corpus(text=text, tokenizer=tokenizer, train=ids[:n_train], val=ids[n_train:])


def check_length(data: torch.Tensor, block_size: int, what: str) -> None:
    if len(data) <= block_size:
        raise CorpusError(f"the {what} split has {len(data)} characters, fewer than "
                          f"block_size+1 = {block_size + 1}; use a longer corpus or a smaller "
                          f"block size / val_fraction")


def random_windows(data: torch.Tensor, batch_size: int, block_size: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """(batch_size, block_size) contiguous slices of data at uniform random starts."""
    if batch_size < 1 or block_size < 1:
        raise ValueError(f"batch_size and block_size must be >= 1, got {batch_size} and "
                         f"{block_size}")
    if len(data) < block_size:
        raise CorpusError(f"cannot take windows of {block_size} characters from {len(data)} "
                          f"characters; use a longer corpus or a smaller block size")
    device = generator.device if generator is not None else torch.device("cpu")
    starts = torch.randint(0, len(data) - block_size + 1, (batch_size,), generator=generator,
                           device=device).to(data.device)
    return data[starts[:, None] + torch.arange(block_size, device=data.device)]


def fixed_windows(data: torch.Tensor, n: int, block_size: int, seed: int = 0) -> torch.Tensor:
    """The same n windows for the same (data, seed): for held-out evaluation."""
    return random_windows(data, n, block_size, torch.Generator().manual_seed(seed))
