"""The autoregressive character LM of the gold evaluation: causality, BOS scoring, training, checkpoints, CLI."""

import json
import math

import pytest
import torch
from click.testing import CliRunner

from dgrpo.corpus import CharTokenizer, VocabularyError, load_corpus
from dgrpo.models.char_lm import CharLM, bits_per_char, char_logprobs, lm_config, load_char_lm
from dgrpo.training.lm import train_char_lm
from dgrpo.models.checkpoint import CheckpointError
from dgrpo.models.transformer import ModelConfig
from dgrpo.entrypoints.cli import main
from dgrpo.config import LMTrainConfig, to_dict

N_CHARS = 20


def tiny_lm(seed: int = 0) -> CharLM:
    torch.manual_seed(seed)
    return CharLM(lm_config("tiny", N_CHARS)).eval()


def test_changing_a_later_character_leaves_earlier_log_probs_unchanged():
    lm = tiny_lm()
    x = torch.randint(0, N_CHARS, (3, 24))
    y = x.clone()
    y[:, 10] = (x[:, 10] + 1) % N_CHARS
    with torch.no_grad():
        a, b = char_logprobs(lm, x), char_logprobs(lm, y)
    assert torch.equal(a[:, :10], b[:, :10])  # positions before 10 never see x_10
    assert not torch.allclose(a[:, 10:], b[:, 10:])  # x_10 is scored at 10 and read from 11 on


def test_first_character_is_scored_from_bos_alone_and_bits_are_minus_log2_p_over_length():
    lm = tiny_lm()
    x = torch.randint(0, N_CHARS, (2, 16))
    with torch.no_grad():
        logp = char_logprobs(lm, x)
        alone = torch.log_softmax(lm(torch.full((2, 1), lm.bos_id)), dim=-1)[:, 0]
    assert torch.allclose(logp[:, 0], alone.gather(1, x[:, :1]).squeeze(1), atol=1e-5)
    expected = -logp.double().sum(1) / (16 * math.log(2))
    assert torch.allclose(bits_per_char(lm, x, chunk_rows=1), expected, atol=1e-9)


@pytest.mark.parametrize("attn_scale", [0.8, None])
def test_compiled_causal_attention_equals_the_sdpa_kernel(attn_scale):
    """The written-out attention that torch.compile takes on CPU applies the same causal mask as SDPA."""
    torch.manual_seed(0)
    lm = CharLM(lm_config("tiny", N_CHARS, attn_scale=attn_scale))
    idx = torch.randint(0, N_CHARS + 1, (2, 12))
    eager = lm(idx)
    traced = torch.compile(lm, backend="eager")(idx)
    assert torch.allclose(eager, traced, atol=1e-5)


def test_config_and_input_checks():
    with pytest.raises(ValueError, match="causal"):
        CharLM(ModelConfig(vocab_size=N_CHARS + 1, block_size=16, n_layer=1, n_head=2, n_embd=16))
    assert ModelConfig.from_dict({"vocab_size": 66}).causal is False  # checkpoints before the field: bidirectional
    lm = tiny_lm()
    with pytest.raises(ValueError, match="longer than"):
        char_logprobs(lm, torch.zeros(1, lm.cfg.block_size + 1, dtype=torch.long))
    with pytest.raises(VocabularyError):
        char_logprobs(lm, torch.full((1, 4), lm.bos_id))


def _cfg(tmp_path, corpus, **kw):
    base = dict(preset="tiny", out=str(tmp_path / "lm"), max_iters=40, batch_size=16, warmup_iters=5, lr=3e-3,
                eval_every=20, eval_windows=8, precision="fp32", corpus={"path": corpus})
    return LMTrainConfig(**{**base, **kw})


def test_bits_per_char_of_a_repeated_string_fall_as_it_trains(tmp_path):
    corpus_file = tmp_path / "rep.txt"
    corpus_file.write_text("the king and the queen. " * 400)
    cfg = _cfg(tmp_path, str(corpus_file))
    corpus = load_corpus(str(corpus_file))
    torch.manual_seed(cfg.seed)
    fresh = CharLM(lm_config("tiny", corpus.tokenizer.n_chars))
    text = corpus.tokenizer.encode("the king and the queen. the king")[None]
    before = float(bits_per_char(fresh, text))
    state = train_char_lm(cfg, corpus, to_dict(cfg), progress=False, log=lambda *a: None)
    lm, tok, ckpt = load_char_lm(cfg.out, tokenizer=corpus.tokenizer)
    after = float(bits_per_char(lm, text))
    assert after < before - 1.0, (before, after)
    history = [h["val_bits_per_char"] for h in state["history"]]
    assert len(history) == 2 and history[1] < history[0]
    assert ckpt.kind == "lm" and ckpt.state["val_bits_per_char"] == history[-1]


def test_checkpoint_round_trip_and_resume(tmp_path, tiny_corpus_file):
    cfg = _cfg(tmp_path, tiny_corpus_file, max_iters=6, eval_every=3)
    corpus = load_corpus(tiny_corpus_file)
    train_char_lm(cfg, corpus, to_dict(cfg), progress=False, log=lambda *a: None)
    lm, tok, ckpt = load_char_lm(cfg.out, tokenizer=corpus.tokenizer)
    assert tok == corpus.tokenizer and ckpt.state["iter"] == 6 and ckpt.model_config.causal
    x = corpus.val[:lm.cfg.block_size][None]
    first = bits_per_char(lm, x)
    again, _, _ = load_char_lm(cfg.out)
    assert torch.equal(bits_per_char(again, x), first)
    longer = _cfg(tmp_path, tiny_corpus_file, max_iters=9, eval_every=3)
    logs = []
    state = train_char_lm(longer, corpus, to_dict(longer), resume=True, progress=False, log=logs.append)
    assert state["iter"] == 9 and any("resumed" in line for line in logs)
    with pytest.raises(VocabularyError, match="another corpus"):
        load_char_lm(cfg.out, tokenizer=CharTokenizer(list("abc")))
    with pytest.raises(CheckpointError, match="expected a lm checkpoint"):
        load_char_lm(_not_an_lm(tmp_path))


def _not_an_lm(tmp_path):
    from dgrpo.models.checkpoint import save_checkpoint
    from dgrpo.models.diffusion import DiffusionLM
    from dgrpo.models.transformer import preset_config
    model = DiffusionLM(preset_config("tiny", 10))
    path = tmp_path / "gen"
    save_checkpoint(path, kind="generator", model_config=model.cfg, vocab={"chars": list("abcdefghi")}, weights=model)
    return path


def test_lm_train_cli(tmp_path, tiny_corpus_file):
    out = tmp_path / "cli_lm"
    result = CliRunner().invoke(main, ["lm", "train", "--corpus", tiny_corpus_file, "--preset", "tiny",
                                       "--max-iters", "4", "--out", str(out), "--threads", "1",
                                       "--set", "eval_every=2", "--set", "eval_windows=4", "--set", "precision=fp32"])
    assert result.exit_code == 0, result.output
    assert "bits/char" in result.output and (out / "config.json").is_file()
    manifest = json.loads((out / "config.json").read_text())
    assert manifest["kind"] == "lm" and manifest["config"]["corpus"]["path"] == tiny_corpus_file
    bad = CliRunner().invoke(main, ["lm", "train", "--corpus", str(tmp_path / "missing.txt"), "--out",
                                    str(tmp_path / "other")])
    assert bad.exit_code == 2 and "does not exist" in bad.output
