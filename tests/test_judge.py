import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from scipy import stats

from dgrpo.config import JudgeTrainConfig, SamplerConfig, to_dict
from dgrpo.corpus import CharTokenizer, VocabularyError, fixed_windows, load_corpus
from dgrpo.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dgrpo.models.diffusion import DiffusionLM
from dgrpo.models.generation import generate_texts
from dgrpo.models.judge import Judge, judge_config, load_judge
from dgrpo.models.transformer import preset_config
from dgrpo.entrypoints.cli import main
from dgrpo.training.train_judge import (auc, average_ranks, build_refills, copy_generator_trunk, judge_targets,
                                         realised_fractions, sample_fractions, spearman, train_judge)

FIGURES = ("auc", "spearman", "score_real", "score_generated")


@pytest.fixture(autouse=True)
def one_thread():
    # tiny models on a shared 2-core machine: a second torch thread only adds contention
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def judge_cfg(generator, corpus, out, **kw) -> JudgeTrainConfig:
    base = dict(generator=generator, preset="tiny", out=str(out), max_iters=6, batch_size=8, warmup_iters=2,
                lr=1e-3, refill_pool=16, refill_every=2, eval_every=3, eval_windows=8, precision="fp32",
                sampler={"steps": 4}, corpus={"path": corpus})
    base.update(kw)
    return JudgeTrainConfig(**base)


def quiet(*args):
    pass


# --- the model ---------------------------------------------------------------------------------

def test_judge_forward_and_score():
    torch.manual_seed(0)
    judge = Judge(judge_config("tiny", n_chars=10, block_size=16))
    assert (judge.n_chars, judge.mask_id, judge.cls_id) == (10, 10, 11)
    assert judge.cfg.vocab_size == 12 and judge.cfg.block_size == 16
    tokens = torch.randint(0, 10, (5, 16))
    logits = judge(tokens)
    assert logits.shape == (5,) and logits.requires_grad
    s = judge.score(tokens)
    assert s.shape == (5,) and s.dtype == torch.float32 and not s.requires_grad
    assert bool(((s >= 0) & (s <= 1)).all())
    assert torch.allclose(s, torch.sigmoid(logits.detach()))
    assert judge.training  # score() runs in eval mode and restores the mode
    # batched: each row's score does not depend on the other rows
    assert torch.allclose(judge.score(tokens[2:3]), s[2:3], atol=1e-6)
    assert judge.score(tokens[:, :8]).shape == (5,)  # shorter windows fit the rotary table
    with pytest.raises(ValueError, match="longer than the judge's block of 16"):
        judge(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(VocabularyError, match=r"must lie in 0..10 .*got ids in 11..11"):
        judge(torch.full((1, 4), 11))  # [CLS] is not an input character
    with pytest.raises(ValueError, match=r"shape \(batch, length\)"):
        judge(torch.zeros(4, dtype=torch.long))


def test_token_logits_and_pooled_window_logit():
    torch.manual_seed(0)
    judge = Judge(judge_config("tiny", n_chars=10, block_size=16))
    tokens = torch.randint(0, 10, (3, 16))
    logits, per_token = judge(tokens, token_logits=True)
    assert per_token.shape == (3, 16)
    assert torch.allclose(logits, judge(tokens))
    cls = judge.trunk(torch.cat([torch.full((3, 1), judge.cls_id), tokens], 1))[:, 0]
    assert torch.allclose(logits, judge.head(cls).squeeze(-1) + per_token.mean(1), atol=1e-6)


def test_copy_generator_trunk():
    torch.manual_seed(0)
    gen = DiffusionLM(preset_config("tiny", 11, block_size=16))  # 10 chars + [MASK]
    judge = Judge(judge_config("tiny", 10, 16))
    cls_row = judge.trunk.wte.weight[judge.cls_id].clone()
    assert copy_generator_trunk(judge, gen)
    assert torch.equal(judge.trunk.wte.weight[:11], gen.trunk.wte.weight)
    assert torch.equal(judge.trunk.wte.weight[judge.cls_id], cls_row)  # [CLS] keeps its own init
    assert torch.equal(judge.trunk.blocks[1].mlp.fc.weight, gen.trunk.blocks[1].mlp.fc.weight)
    other = Judge(judge_config("small", 10, 16))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    assert not copy_generator_trunk(other, gen)  # different width: nothing copied
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())


def test_load_judge_is_frozen_and_checks_vocabulary(tmp_path):
    tok = CharTokenizer.from_text("abc de")
    judge = Judge(judge_config("tiny", tok.n_chars, 8))
    save_checkpoint(tmp_path / "j", kind="judge", model_config=judge.cfg, vocab=tok.to_dict(), weights=judge)
    loaded, loaded_tok, ckpt = load_judge(tmp_path / "j")
    assert loaded_tok == tok and ckpt.kind == "judge"
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = torch.randint(0, tok.n_chars, (3, 8))
    assert torch.allclose(loaded.score(x), judge.score(x))
    load_judge(tmp_path / "j", tokenizer=CharTokenizer.from_text("abc de"))  # same corpus: fine
    with pytest.raises(VocabularyError, match="judge .* and the generator were built on different corpora"):
        load_judge(tmp_path / "j", tokenizer=CharTokenizer.from_text("abc dx"))
    gen = DiffusionLM(preset_config("tiny", tok.vocab_size, block_size=8))
    save_checkpoint(tmp_path / "g", kind="generator", model_config=gen.cfg, vocab=tok.to_dict(), weights=gen)
    with pytest.raises(CheckpointError, match="holds a generator checkpoint, expected a judge"):
        load_judge(tmp_path / "g")


# --- figures -----------------------------------------------------------------------------------

def test_average_ranks_auc_spearman_by_hand():
    assert average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    # positives 0.8, 0.4, 0.9 vs negatives 0.1, 0.4, 0.35: 3 + (2 + 0.5 tie) + 3 = 8.5 of 9 pairs
    assert auc(torch.tensor([0.1, 0.4, 0.35]), torch.tensor([0.8, 0.4, 0.9])) == pytest.approx(8.5 / 9)
    assert auc(torch.tensor([0.0, 0.1]), torch.tensor([0.5, 0.6])) == 1.0
    assert auc(torch.tensor([0.5, 0.6]), torch.tensor([0.0, 0.1])) == 0.0
    assert auc(torch.tensor([0.5, 0.5]), torch.tensor([0.5])) == 0.5
    # ranks [1,2,3] vs [1,3,2]: centred (-1,0,1).(-1,1,0) = 1 over |.||.| = 2
    assert spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 30.0, 20.0])) == pytest.approx(0.5)
    assert spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 4.0, 9.0])) == pytest.approx(1.0)
    assert spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (50,), generator=g).float()  # many ties
    b = a + torch.randint(0, 3, (50,), generator=g).float()
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a.numpy(), b.numpy()).statistic, abs=1e-12)
    neg, pos = torch.rand(40, generator=g).round(decimals=1), torch.rand(30, generator=g).round(decimals=1) + 0.2
    u = stats.mannwhitneyu(pos.numpy(), neg.numpy()).statistic
    assert auc(neg, pos) == pytest.approx(u / (40 * 30), abs=1e-12)


# --- training data -----------------------------------------------------------------------------

def test_targets_and_fraction_mixture():
    x = torch.tensor([0.0, 0.3, 1.0])
    assert torch.equal(judge_targets(x), x)  # g(x) = x
    f = sample_fractions(4000, 0.25, 0.25, torch.Generator().manual_seed(0))
    assert bool(((f >= 0) & (f <= 1)).all())
    assert abs(float((f == 0).float().mean()) - 0.25) < 0.03
    assert abs(float((f == 1).float().mean()) - 0.25) < 0.03
    mid = f[(f > 0) & (f < 1)]
    assert abs(float(mid.mean()) - 0.5) < 0.03
    assert realised_fractions(torch.tensor([0.0, 0.26, 1.0]), 10).tolist() == pytest.approx([0.0, 0.3, 1.0])
    with pytest.raises(ValueError, match="sum to at most 1"):
        sample_fractions(4, 0.7, 0.5)


def test_build_refills_masks_exactly_round_x_T():
    torch.manual_seed(0)
    n_chars, T = 6, 20
    gen = DiffusionLM(preset_config("tiny", n_chars + 1, block_size=T))
    windows = torch.full((4, T), 5)  # id 5 everywhere; the random generator rarely writes 5
    gen.lm_head.weight.data[5] = -10.0 * gen.lm_head.weight.data.new_ones(gen.cfg.n_embd)  # ...and here never
    gen.trunk.ln_f.bias.data.fill_(1.0)
    gen.trunk.ln_f.weight.data.zero_()  # constant hidden state, so logit(5) = -10 * n_embd
    x = torch.tensor([0.0, 0.25, 0.5, 1.0])
    out = build_refills(gen, windows, x, SamplerConfig(steps=3), torch.Generator().manual_seed(1))
    assert out.shape == windows.shape and not bool((out == gen.mask_id).any())
    assert (out != windows).sum(1).tolist() == [0, 5, 10, 20]
    assert torch.equal(out[0], windows[0])


# --- a judge trained for a few seconds ---------------------------------------------------------

@pytest.fixture(scope="module")
def trained_judge(tmp_path_factory, tiny_generator, tiny_corpus_file):
    out = tmp_path_factory.mktemp("judge") / "judge"
    # random-order refills: a judge trained on confidence-order refills learns their own artefacts (repeated common
    # words) and need not find uniform noise synthetic; the test below is about training, not about the sampler
    cfg = judge_cfg(tiny_generator, tiny_corpus_file, out, max_iters=250, batch_size=32, warmup_iters=10, lr=2e-3,
                    p_real=0.5, p_generated=0.5, refill_pool=64, refill_every=25, eval_every=125,
                    eval_windows=16, sampler={"steps": 4, "order": "random", "temperature": 1.0})
    torch.set_num_threads(1)
    state = train_judge(cfg, to_dict(cfg), progress=False, log=quiet, init_from_generator=False)
    return str(out), state


def test_trained_judge_scores_real_text_lower_than_random(trained_judge, tiny_corpus_file):
    path, state = trained_judge
    judge, tok, ckpt = load_judge(path)
    assert ckpt.state["iter"] == 250 and state["iter"] == 250
    corpus = load_corpus(tiny_corpus_file, tokenizer=tok)
    real = fixed_windows(corpus.val, 64, judge.cfg.block_size, seed=1)  # held-out text
    noise = torch.randint(0, tok.n_chars, real.shape, generator=torch.Generator().manual_seed(0))
    s_real, s_noise = judge.score(real), judge.score(noise)
    assert float(s_real.mean()) + 0.1 < float(s_noise.mean()), (s_real.mean(), s_noise.mean())


def test_training_writes_checkpoint_state_and_eval_json(trained_judge, tiny_generator):
    path, state = trained_judge
    figures = json.loads((Path(path) / "eval.json").read_text())
    assert set(FIGURES) <= set(figures) and figures["iter"] == 250
    for key in FIGURES:
        assert figures[key] == pytest.approx(state["figures"][key])
    assert 0 <= figures["auc"] <= 1 and -1 <= figures["spearman"] <= 1
    ckpt = load_checkpoint(path, expect_kind="judge")
    assert ckpt.state["generator"] == str(Path(tiny_generator).resolve())
    assert 0 < ckpt.state["refill_share"] < 1 and ckpt.state["refill_time_s"] > 0
    assert [h["iter"] for h in ckpt.state["history"]] == [125, 250]
    assert ckpt.has("rng") and ckpt.has("pool") and (Path(path) / "optimizer.safetensors").is_file()


def test_judge_eval_cli_prints_figures_and_writes_json(trained_judge, tmp_path):
    path, _ = trained_judge
    res = CliRunner().invoke(main, ["judge", "eval", "--judge", path, "--windows", "12", "--seed", "3",
                                    "--out", str(tmp_path / "eval.json")])
    assert res.exit_code == 0, res.output
    printed = json.loads(res.output)
    written = json.loads((tmp_path / "eval.json").read_text())
    assert set(FIGURES) <= set(printed) and printed == written
    assert printed["n_windows"] == 12 and printed["seed"] == 3


# --- resume ------------------------------------------------------------------------------------

def test_resume_continues_exactly(tmp_path, tiny_generator, tiny_corpus_file):
    # constant lr (min_lr = lr, no warmup) so the schedule does not depend on max_iters
    kw = dict(lr=1e-3, min_lr=1e-3, warmup_iters=0, eval_every=2, refill_every=2)
    straight = judge_cfg(tiny_generator, tiny_corpus_file, tmp_path / "a", max_iters=6, **kw)
    train_judge(straight, to_dict(straight), progress=False, log=quiet)
    first = judge_cfg(tiny_generator, tiny_corpus_file, tmp_path / "b", max_iters=4, **kw)
    train_judge(first, to_dict(first), progress=False, log=quiet)
    logs = []
    second = judge_cfg(tiny_generator, tiny_corpus_file, tmp_path / "b", max_iters=6, **kw)
    state = train_judge(second, to_dict(second), resume=True, progress=False, log=logs.append)
    assert any("resumed from" in line and "iter 4" in line for line in logs)
    assert state["iter"] == 6 and [h["iter"] for h in state["history"]] == [2, 4, 6]
    a, _, _ = load_judge(tmp_path / "a")
    b, _, _ = load_judge(tmp_path / "b")
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(pa, pb, atol=1e-6), name
    ca, cb = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    assert torch.equal(ca.load_tensors("pool")["tokens"], cb.load_tensors("pool")["tokens"])
    # a different generator is refused
    other = judge_cfg(str(tmp_path / "a"), tiny_corpus_file, tmp_path / "b", max_iters=8, **kw)
    with pytest.raises(CheckpointError, match="holds a judge checkpoint, expected a generator"):
        train_judge(other, to_dict(other), resume=True, progress=False, log=quiet)


def test_judge_train_cli(tmp_path, tiny_generator, tiny_corpus_file):
    out = tmp_path / "j"
    res = CliRunner().invoke(main, ["judge", "train", "--generator", tiny_generator, "--corpus", tiny_corpus_file,
                                    "--preset", "tiny", "--out", str(out), "--max-iters", "2", "--threads", "1",
                                    "--set", "batch_size=4", "--set", "refill_pool=8", "--set", "eval_windows=8",
                                    "--set", "sampler.steps=2"])
    assert res.exit_code == 0, res.output
    assert load_checkpoint(out, expect_kind="judge").state["iter"] == 2
    assert set(FIGURES) <= set(json.loads((out / "eval.json").read_text()))
    res = CliRunner().invoke(main, ["judge", "train", "--generator", str(tmp_path / "nope"), "--corpus",
                                    tiny_corpus_file, "--out", str(tmp_path / "other")])
    assert res.exit_code == 2 and "does not exist" in res.output


# --- sampling, best-of-N -----------------------------------------------------------------------

def test_sample_cli_unconditional_and_infill(tiny_generator):
    res = CliRunner().invoke(main, ["sample", "-k", tiny_generator, "-n", "2", "--steps", "4", "--length", "20"])
    assert res.exit_code == 0, res.output
    assert res.output.count("---\n") == 2 and "reward" not in res.output
    prompt = "KING:\n____ the ____ ____.\n"
    out = generate_texts(tiny_generator, num=3, prompt=prompt, steps=4, seed=1)
    assert len(out) == 3
    for text, reward in out:
        assert reward is None and len(text) == len(prompt)
        assert all(c == p for c, p in zip(text, prompt) if p != "_")
    res = CliRunner().invoke(main, ["sample", "-k", tiny_generator, "--length", "33"])
    assert res.exit_code == 2 and "block size 32" in res.output


def test_sample_best_of_n_keeps_the_judge_favourite(tiny_generator, trained_judge):
    judge_path, _ = trained_judge
    res = CliRunner().invoke(main, ["sample", "-k", tiny_generator, "-n", "2", "--steps", "4", "--judge",
                                    judge_path, "--best-of", "3"])
    assert res.exit_code == 0, res.output
    rewards = [float(line.split()[-1]) for line in res.output.splitlines() if line.startswith("--- reward")]
    assert len(rewards) == 2 and all(0 <= r <= 1 for r in rewards)
    # the same seed and prompt rows: best-of-4 of 2 prompts == max over the 8 samples drawn without selection
    common = dict(steps=4, seed=5, judge_checkpoint=judge_path)
    every = generate_texts(tiny_generator, num=8, best_of=1, **common)
    best = generate_texts(tiny_generator, num=2, best_of=4, **common)
    assert all(r is not None for _, r in every)
    for i, (text, reward) in enumerate(best):
        group = every[4 * i:4 * i + 4]
        top = max(group, key=lambda tr: tr[1])
        assert reward == pytest.approx(top[1]) and text == top[0]


def test_sample_out_writes_json_lines_with_rewards_and_settings(tiny_generator, trained_judge, tmp_path):
    out = tmp_path / "samples.jsonl"
    res = CliRunner().invoke(main, ["sample", "-k", tiny_generator, "-n", "3", "--steps", "4", "--seed", "2",
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2] and all("reward" not in r for r in rows)
    assert [r["text"] for r in rows] == [text for text, _ in generate_texts(tiny_generator, num=3, steps=4, seed=2)]
    assert rows[0]["settings"] == {"checkpoint": tiny_generator, "prompt": None, "mask_char": "_", "length": None,
                                   **SamplerConfig(steps=4).model_dump(), "seed": 2, "judge": None, "best_of": 1,
                                   "precision": "auto"}
    assert f"wrote 3 samples to {out}" in res.output
    judge_path, _ = trained_judge
    res = CliRunner().invoke(main, ["sample", "-k", tiny_generator, "-n", "2", "--steps", "4", "--judge", judge_path,
                                    "--best-of", "2", "--out", str(out), "--overwrite"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    printed = [float(line.split()[-1]) for line in res.output.splitlines() if line.startswith("--- reward")]
    assert [round(r["reward"], 4) for r in rows] == printed  # the file holds what was printed
    assert rows[0]["settings"]["judge"] == judge_path and rows[0]["settings"]["best_of"] == 2


def test_sample_best_of_errors(tiny_generator, trained_judge):
    res = CliRunner().invoke(main, ["sample", "-k", tiny_generator, "--best-of", "4"])
    assert res.exit_code == 2 and "needs a judge" in res.output
    res = CliRunner().invoke(main, ["sample", "-k", tiny_generator, "--length", "16", "--judge", trained_judge[0]])
    assert res.exit_code == 2 and "exactly 32 characters" in res.output
