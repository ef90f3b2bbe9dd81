import hashlib
import http.server
import json
import pathlib
import threading

import pytest
import torch

from dgrpo.corpus import (PROMPT_KINDS, TINY_SHAKESPEARE_SHA256, CharTokenizer, CorpusError,
                          PromptStream, VocabularyError, check_length, download_corpus,
                          fixed_windows, load_corpus, make_prompts, random_windows, read_text)

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20
SHAKESPEARE = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinyshakespeare.txt"


# --- tokenizer -------------------------------------------------------------------------------

def test_round_trip_and_ids():
    tok = CharTokenizer.from_text(TEXT)
    assert tok.chars == sorted(set(TEXT))
    assert tok.mask_id == tok.n_chars == len(tok.chars) and tok.vocab_size == tok.n_chars + 1
    ids = tok.encode(TEXT)
    assert ids.dtype == torch.long and ids.shape == (len(TEXT),)
    assert int(ids.max()) < tok.mask_id
    assert tok.decode(ids) == TEXT and tok.decode(ids.tolist()) == TEXT
    assert tok.decode_batch(ids[:20].view(2, 10)) == [TEXT[:10], TEXT[10:20]]
    assert CharTokenizer(["b", "a"]).encode("ab").tolist() == [1, 0]  # given order kept


def test_mask_id_handling():
    tok = CharTokenizer(["a", "b", "c", "_"])
    ids = tok.encode_prompt("a_c", mask_char="_")  # "_" is in the vocab but means mask here
    assert ids.tolist() == [0, tok.mask_id, 2]
    assert tok.encode_prompt("a#c", mask_char="#").tolist() == [0, tok.mask_id, 2]
    assert tok.decode(ids, mask_char="?") == "a?c"
    with pytest.raises(VocabularyError, match="--mask-char"):
        tok.encode_prompt("a#c")
    with pytest.raises(VocabularyError, match="outside the vocabulary"):
        tok.decode([tok.mask_id + 1])


def test_unknown_characters_are_named():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(VocabularyError) as e:
        tok.encode("abxzy")
    msg = str(e.value)
    assert "'x'" in msg and "'y'" in msg and "'z'" in msg and "3 characters" in msg


def test_dict_round_trip_and_validation():
    tok = CharTokenizer.from_text(TEXT)
    d = json.loads(json.dumps(tok.to_dict()))
    assert CharTokenizer.from_dict(d) == tok
    for bad in [{"chars": ["a", "a"]}, {"chars": ["ab"]}, {"chars": [1]}, {}, ["a"], {"chars": []}]:
        with pytest.raises(VocabularyError):
            CharTokenizer.from_dict(bad)


def test_check_same():
    a = CharTokenizer.from_text("abc")
    a.check_same(CharTokenizer.from_text("cab"))
    with pytest.raises(VocabularyError, match="same corpus") as e:
        a.check_same(CharTokenizer.from_text("abd"), what="reference policy")
    assert "'c'" in str(e.value) and "'d'" in str(e.value) and "reference policy" in str(e.value)
    with pytest.raises(VocabularyError, match="different order"):
        a.check_same(CharTokenizer(["b", "a", "c"]))


# --- reading and downloading -----------------------------------------------------------------

def test_read_text_errors(tmp_path):
    with pytest.raises(CorpusError, match="does not exist; check the corpus path"):
        read_text(tmp_path / "nope.txt")
    (tmp_path / "input.txt").write_text("hi")
    with pytest.raises(CorpusError, match="is a directory.*input.txt"):
        read_text(tmp_path)
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(CorpusError, match="is empty"):
        read_text(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes(b"ab\ncd\xe9f")
    with pytest.raises(CorpusError, match="not valid UTF-8") as e:
        read_text(tmp_path / "latin1.txt")
    assert "byte offset 5" in str(e.value) and "line 2" in str(e.value) and "iconv" in str(e.value)
    assert read_text(tmp_path / "input.txt") == "hi"


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    hits = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self):
            hits.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}", hits
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_download_caches_verified_file(server, tmp_path):
    root, base, hits = server
    data = TEXT.encode()
    (root / "input.txt").write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    cache = tmp_path / "cache"
    path = download_corpus(f"{base}/input.txt", sha, cache_dir=cache)
    assert path.read_bytes() == data and path.parent == cache and len(hits) == 1
    assert download_corpus(f"{base}/input.txt", sha, cache_dir=cache) == path
    assert len(hits) == 1  # served from the cache
    assert [p.name for p in cache.iterdir()] == [path.name]  # no temp files left


def test_download_wrong_checksum_not_kept(server, tmp_path):
    root, base, _ = server
    (root / "input.txt").write_bytes(b"not the expected bytes")
    cache = tmp_path / "cache"
    with pytest.raises(CorpusError, match="expected 0{64}, got [0-9a-f]{64}"):
        download_corpus(f"{base}/input.txt", "0" * 64, cache_dir=cache)
    assert list(cache.iterdir()) == []


def test_download_failures_suggest_local_file(server, tmp_path):
    _, base, _ = server
    cache = tmp_path / "cache"
    with pytest.raises(CorpusError, match="404.*give a local file as the corpus path"):
        download_corpus(f"{base}/missing.txt", "0" * 64, cache_dir=cache)
    with pytest.raises(CorpusError, match="failed.*give a local file as the corpus path"):
        download_corpus("http://127.0.0.1:1/x", "0" * 64, cache_dir=cache, timeout=5)
    assert list(cache.iterdir()) == []


# --- splitting and windows -------------------------------------------------------------------

def test_deterministic_split(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(TEXT)
    c = load_corpus(str(path), val_fraction=0.25)
    n_train = int(len(TEXT) * 0.75)
    assert c.tokenizer.decode(c.train) == TEXT[:n_train]
    assert c.tokenizer.decode(c.val) == TEXT[n_train:]
    assert torch.equal(load_corpus(str(path), val_fraction=0.25).train, c.train)
    assert "text=" not in repr(c)  # the whole corpus is not printed

    tok = CharTokenizer.from_text(TEXT + "XYZ")  # e.g. from a checkpoint: superset is fine
    assert load_corpus(str(path), tokenizer=tok).tokenizer is tok
    with pytest.raises(VocabularyError, match="checkpoint"):
        load_corpus(str(path), tokenizer=CharTokenizer.from_text("abc"))
    for vf in (0, 1, -0.1):
        with pytest.raises(CorpusError, match="val_fraction"):
            load_corpus(str(path), val_fraction=vf)
    path.write_text("abc")
    with pytest.raises(CorpusError, match="at least 2"):
        load_corpus(str(path))


def test_check_length():
    check_length(torch.arange(9), 8, "val")
    with pytest.raises(CorpusError, match="the val split has 8 characters.*smaller block size"):
        check_length(torch.arange(8), 8, "val")


def test_random_windows_are_contiguous_slices():
    data = torch.arange(100)
    g = torch.Generator().manual_seed(0)
    w = random_windows(data, 64, 10, g)
    assert w.shape == (64, 10) and w.dtype == data.dtype
    assert torch.equal(w - w[:, :1], torch.arange(10).expand(64, 10))
    assert int(w.min()) >= 0 and int(w.max()) <= 99
    assert random_windows(torch.arange(10), 3, 10).tolist() == [list(range(10))] * 3
    with pytest.raises(CorpusError):
        random_windows(torch.arange(5), 1, 10)


def test_fixed_windows_deterministic():
    data = torch.arange(1000)
    a = fixed_windows(data, 16, 32, seed=3)
    assert torch.equal(a, fixed_windows(data, 16, 32, seed=3))
    assert not torch.equal(a, fixed_windows(data, 16, 32, seed=4))


# --- prompts ---------------------------------------------------------------------------------

def test_make_prompts():
    windows = torch.arange(40).view(4, 10) % 7
    mask_id = 7
    assert (make_prompts(windows, mask_id) == mask_id).all()
    g = torch.Generator().manual_seed(0)
    for frac, k in [(0.5, 5), (0.3, 3), (0.01, 1), (1.0, 10)]:
        p = make_prompts(windows, mask_id, "infill", frac, g)
        masked = p == mask_id
        assert masked.sum(1).tolist() == [k] * 4
        assert torch.equal(p[~masked], windows[~masked])
    with pytest.raises(ValueError, match="unconditional, infill"):
        make_prompts(windows, mask_id, "prefix")
    for frac in (0, 1.5):
        with pytest.raises(ValueError, match="mask_fraction"):
            make_prompts(windows, mask_id, "infill", frac)
    assert PROMPT_KINDS == ("unconditional", "infill")


def test_prompt_stream_resume():
    data = torch.arange(500) % 50
    s = PromptStream(data, 16, 50, "infill", 0.5, seed=1)
    s.next(4)
    state = json.loads(json.dumps(s.state_dict()))
    expected = [s.next(4), s.next(3)]
    assert state["drawn"] == 4 and state["seed"] == 1

    t = PromptStream(data, 16, 50, "infill", 0.5, seed=1)
    t.load_state_dict(state)
    assert all(torch.equal(a, t.next(len(a))) for a in expected)
    assert t.drawn == s.drawn == 11
    assert torch.equal(PromptStream(data, 16, 50, "infill", 0.5, seed=1).next(4),
                       PromptStream(data, 16, 50, "infill", 0.5, seed=1).next(4))
    with pytest.raises(ValueError, match="block_size=16.*block_size=8"):
        PromptStream(data, 8, 50, "infill", 0.5, seed=1).load_state_dict(state)


# --- the real corpus -------------------------------------------------------------------------

@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="shared/data/tinyshakespeare.txt not present")
def test_tiny_shakespeare():
    assert hashlib.sha256(SHAKESPEARE.read_bytes()).hexdigest() == TINY_SHAKESPEARE_SHA256
    c = load_corpus(str(SHAKESPEARE))
    assert len(c.text) == 1_115_394
    assert c.tokenizer.n_chars == 65 and c.tokenizer.vocab_size == 66
    assert len(c.train) + len(c.val) == 1_115_394
    assert c.tokenizer.decode(c.val[:20]) == c.text[len(c.train):len(c.train) + 20]
