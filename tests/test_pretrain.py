"""Supervised pretraining: it learns, it resumes exactly, and the CLI wraps it with clear errors."""

import math

import pytest
import torch
from click.testing import CliRunner

from dgrpo.config import PretrainConfig
from dgrpo.corpus import fixed_windows, load_corpus
from dgrpo.models.checkpoint import CheckpointError, load_checkpoint
from dgrpo.models.diffusion import DiffusionLM
from dgrpo.models.transformer import preset_config
from dgrpo.entrypoints.cli import main
from dgrpo.training.loop import scheduled_lr
from dgrpo.training.pretrain import ema_with_warmup, evaluate_masked_ce, pretrain

LINES = ["the cat sat on the mat.", "a dog ran to the park.", "we eat bread and jam.",
         "she reads a good book.", "it is cold in winter."]
TEXT = "\n".join(LINES[i % len(LINES)] for i in range(160)) + "\n"  # ~3.6 KB


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def corpus_file(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text(TEXT)
    return f


def cfg(out, **kw) -> PretrainConfig:
    base = dict(preset="tiny", out=str(out), batch_size=16, lr=3e-3, min_lr=3e-3, warmup_iters=0,
                eval_every=10, eval_windows=32, precision="fp32", max_iters=20, compile=False)
    return PretrainConfig(**{**base, **kw})


def weights(path):
    ck = load_checkpoint(path, expect_kind="generator")
    return ck, ck.load_weights_into(DiffusionLM(ck.model_config)).state_dict()


def test_cosine_lr():
    assert scheduled_lr(0, 100, 1.0, 0.1, 10) == pytest.approx(0.1)
    assert scheduled_lr(9, 100, 1.0, 0.1, 10) == pytest.approx(1.0)
    assert scheduled_lr(10, 100, 1.0, 0.1, 10) == pytest.approx(1.0)
    assert scheduled_lr(55, 100, 1.0, 0.1, 10) == pytest.approx(0.55)  # half way: the mean of lr and min_lr
    assert scheduled_lr(100, 100, 1.0, 0.1, 10) == pytest.approx(0.1)
    assert scheduled_lr(20, 100, 1.0, 0.1, 10, time_fraction=1.0) == pytest.approx(0.1)  # time budget


def test_linear_lr_with_a_hold():
    lr = lambda it, **kw: scheduled_lr(it, 110, 1.0, 0.0, 10, shape="linear", **kw)
    assert [lr(i) for i in (10, 35, 60, 85, 110)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    # held at lr for the first 40% of the 100 post-warmup iterations, then linear to min_lr
    assert [lr(i, hold=0.4) for i in (10, 30, 50, 80, 110)] == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.0])
    assert lr(12, hold=0.4, time_fraction=0.7) == pytest.approx(0.5)  # the wall-time budget leads
    assert scheduled_lr(50, 110, 1.0, 0.0, 10, hold=0.4) == pytest.approx(1.0)  # cosine holds too


@pytest.mark.parametrize("zero_init", [True, False])
def test_pretraining_starts_blocks_as_the_identity_when_asked(tmp_path, corpus_file, zero_init):
    corpus = load_corpus(str(corpus_file))
    out = tmp_path / "run"
    pretrain(cfg(out, max_iters=1, lr=1e-9, min_lr=1e-9, zero_init_residual=zero_init), corpus, {},
             progress=False, log=lambda *_: None)
    ck = load_checkpoint(out, expect_kind="generator")
    model = ck.load_weights_into(DiffusionLM(ck.model_config))
    projections = model.trunk.residual_projections()
    assert len(projections) == 2 * ck.model_config.n_layer
    assert all(float(p.detach().abs().max()) < 1e-6 for p in projections) == zero_init


def test_pretraining_lowers_val_loss(tmp_path, corpus_file):
    corpus = load_corpus(str(corpus_file))
    c = cfg(tmp_path / "run", max_iters=30, lr=1e-2, min_lr=1e-3, warmup_iters=5)
    # the same initial weights and validation windows that pretrain() uses
    torch.manual_seed(c.seed)
    model = DiffusionLM(preset_config("tiny", corpus.tokenizer.vocab_size))
    model.trunk.zero_residual_projections()
    val = fixed_windows(corpus.val, c.eval_windows, model.cfg.block_size, seed=c.seed)
    initial = evaluate_masked_ce(model, val, c.batch_size, seed=c.seed)
    uniform = math.log(corpus.tokenizer.n_chars)
    assert abs(initial - uniform) < 0.1  # an untrained model predicts ~uniformly
    logs = []
    state = pretrain(c, corpus, {"test": True}, progress=False, log=logs.append)
    hist = state["history"]
    assert [h["iter"] for h in hist] == [10, 20, 30]
    assert state["iter"] == 30 and state["tokens_seen"] == 30 * 16 * 32
    assert hist[-1]["val_loss"] < initial - 0.25  # at least down to the unigram plateau
    assert all(math.isfinite(h["train_ce"]) for h in hist)
    assert any("val masked-token CE" in line for line in logs)
    ck, _ = weights(tmp_path / "run")
    assert ck.state["val_loss"] == hist[-1]["val_loss"] and ck.config == {"test": True}
    assert ck.has("rng") and "optimizer.safetensors" in ck.files


@pytest.mark.parametrize("optimizer,ema_decay,complementary",
                         [("adamw", 0.0, False), ("muon", 0.0, False), ("muon", 0.9, True)])
def test_resume_matches_an_uninterrupted_run(tmp_path, corpus_file, optimizer, ema_decay, complementary):
    """20 iterations straight == 10 + resumed 10 (constant lr: the schedule depends on max_iters);
    with muon this also round-trips both optimizers' state through one checkpoint file, with an
    EMA both the average (the checkpoint's weights) and the training weights."""
    corpus = load_corpus(str(corpus_file))
    opts = dict(optimizer=optimizer, ema_decay=ema_decay, complementary_masks=complementary)
    straight = pretrain(cfg(tmp_path / "a", **opts), corpus, {}, progress=False, log=lambda *_: None)
    first = pretrain(cfg(tmp_path / "b", max_iters=10, **opts), corpus, {}, progress=False,
                     log=lambda *_: None)
    assert first["iter"] == 10
    logs = []
    resumed = pretrain(cfg(tmp_path / "b", **opts), corpus, {}, resume=True, progress=False,
                       log=logs.append)
    assert "resumed from" in logs[0] and "at iter 10" in logs[0]
    assert straight["iter"] == resumed["iter"] == 20
    assert straight["tokens_seen"] == resumed["tokens_seen"]
    ck_a, wa = weights(tmp_path / "a")
    ck_b, wb = weights(tmp_path / "b")
    assert ck_b.state["iter"] == 20
    for k in wa:
        assert float((wa[k] - wb[k]).abs().max()) <= 1e-6, k
    if ema_decay:
        ta, tb = ck_a.load_tensors("train_weights"), ck_b.load_tensors("train_weights")
        for k in ta:
            assert float((ta[k] - tb[k]).abs().max()) <= 1e-6, k
    assert resumed["val_loss"] == pytest.approx(straight["val_loss"], abs=1e-5)
    assert [h["iter"] for h in resumed["history"]] == [10, 20]


def test_ema_decay_warms_up_then_holds():
    update = ema_with_warmup(0.99)
    for n, weight in [(0, 0.9), (5, 1 - 6 / 15), (1000, 0.01)]:
        avg = [torch.zeros(3)]
        update(avg, [torch.ones(3)], torch.tensor(n))
        assert torch.allclose(avg[0], torch.full((3,), weight)), n


def test_ema_checkpoint_holds_the_average_and_resumes_the_training_weights(tmp_path, corpus_file):
    corpus = load_corpus(str(corpus_file))
    out = tmp_path / "ema"
    state = pretrain(cfg(out, max_iters=10, ema_decay=0.8), corpus, {}, progress=False, log=lambda *_: None)
    ck, averaged = weights(out)
    trained = ck.load_tensors("train_weights")
    assert set(trained) == set(averaged)
    assert any(not torch.equal(trained[k], averaged[k]) for k in trained)  # the average lags the iterate
    model = ck.load_weights_into(DiffusionLM(ck.model_config))
    val = fixed_windows(corpus.val, 32, ck.model_config.block_size, seed=0)
    assert evaluate_masked_ce(model, val, 16, seed=0) == pytest.approx(state["val_loss"], abs=1e-5)
    # without the EMA a resumed run trains on from the training weights, not the average
    pretrain(cfg(out, max_iters=11, lr=1e-12, min_lr=1e-12, ema_decay=0.0), corpus, {}, resume=True, progress=False,
             log=lambda *_: None)
    ck2, plain = weights(out)
    assert not ck2.has("train_weights")
    for k in trained:
        assert float((plain[k] - trained[k]).abs().max()) < 1e-6, k


def test_resume_with_another_optimizer_is_a_clear_error(tmp_path, corpus_file):
    corpus = load_corpus(str(corpus_file))
    pretrain(cfg(tmp_path / "o", max_iters=2, optimizer="adamw"), corpus, {}, progress=False, log=lambda *_: None)
    with pytest.raises(CheckpointError, match=r"trained with optimizer 'adamw'.*--set optimizer=adamw"):
        pretrain(cfg(tmp_path / "o", max_iters=4, optimizer="muon"), corpus, {}, resume=True, progress=False,
                 log=lambda *_: None)
    assert load_checkpoint(tmp_path / "o").state["iter"] == 2  # nothing overwritten


def test_resume_across_the_qkv_split_is_a_clear_error(tmp_path, corpus_file):
    """Checkpoints written before the split default (muon_split_qkv absent: fused) hold one Muon
    param group; resuming them asks for the setting they were trained with."""
    corpus = load_corpus(str(corpus_file))
    quiet = dict(progress=False, log=lambda *_: None)
    pretrain(cfg(tmp_path / "q", max_iters=2, optimizer="muon", muon_split_qkv=False), corpus, {}, **quiet)
    with pytest.raises(CheckpointError, match=r"muon_split_qkv=False.*--set muon_split_qkv=false"):
        pretrain(cfg(tmp_path / "q", max_iters=4, optimizer="muon"), corpus, {}, resume=True, **quiet)
    assert load_checkpoint(tmp_path / "q").state["iter"] == 2  # nothing overwritten
    state = pretrain(cfg(tmp_path / "q", max_iters=4, optimizer="muon", muon_split_qkv=False), corpus, {},
                     resume=True, **quiet)
    assert state["iter"] == 4


def test_resume_without_checkpoint_starts_fresh(tmp_path, corpus_file):
    corpus = load_corpus(str(corpus_file))
    state = pretrain(cfg(tmp_path / "c", max_iters=3), corpus, {}, resume=True, progress=False,
                     log=lambda *_: None)
    assert state["iter"] == 3


def test_resume_of_a_finished_run_returns_its_state(tmp_path, corpus_file):
    corpus = load_corpus(str(corpus_file))
    done = pretrain(cfg(tmp_path / "d", max_iters=3), corpus, {}, progress=False, log=lambda *_: None)
    again = pretrain(cfg(tmp_path / "d", max_iters=3), corpus, {}, resume=True, progress=False,
                     log=lambda *_: None)
    assert again["iter"] == 3 and again["val_loss"] == done["val_loss"]


# --- CLI --------------------------------------------------------------------------------------

def invoke(args):
    return CliRunner().invoke(main, args)


def test_cli_pretrain_writes_a_loadable_checkpoint(tmp_path, corpus_file):
    out = tmp_path / "ckpt"
    r = invoke(["pretrain", "--preset", "tiny", "--corpus", str(corpus_file), "--max-iters", "20",
                "--out", str(out), "--threads", "1", "--set", "batch_size=8", "--set", "eval_windows=16",
                "--set", "compile=false"])  # compiling is test_compiled_training_step_matches_eager's
    assert r.exit_code == 0, r.output
    assert "done: iter 20" in r.output
    ck, _ = weights(out)
    assert ck.state["iter"] == 20 and ck.model_config.block_size == 32
    assert ck.config["preset"] == "tiny" and ck.config["corpus"]["path"] == str(corpus_file)
    assert ck.config["batch_size"] == 8


def test_cli_resume_of_a_finished_run(tmp_path, corpus_file):
    args = ["pretrain", "--preset", "tiny", "--corpus", str(corpus_file), "--max-iters", "3",
            "--out", str(tmp_path / "o"), "--threads", "1", "--set", "batch_size=4", "--set", "compile=false",
            "--resume"]
    assert invoke(args[:-1]).exit_code == 0  # --resume needs a checkpoint in --out
    r = invoke(args)  # nothing left to do: still a clean exit with the summary
    assert r.exit_code == 0, r.output
    assert "done: iter 3" in r.output


def _assert_user_error(r, *needles):
    assert r.exit_code == 2, r.output
    assert "error:" in r.output
    assert "Traceback" not in r.output
    for n in needles:
        assert n in r.output, (n, r.output)


def test_cli_missing_corpus(tmp_path):
    r = invoke(["pretrain", "--preset", "tiny", "--corpus", str(tmp_path / "missing.txt"),
                "--max-iters", "2", "--out", str(tmp_path / "o")])
    _assert_user_error(r, "missing.txt", "does not exist")
    assert not (tmp_path / "o").exists()


def test_cli_invalid_value(tmp_path, corpus_file):
    r = invoke(["pretrain", "--corpus", str(corpus_file), "--out", str(tmp_path / "o"), "--set", "lr=-1"])
    _assert_user_error(r, "lr", "greater than 0")
    assert not (tmp_path / "o").exists()


def test_cli_complementary_masks_need_an_even_batch(tmp_path, corpus_file):
    r = invoke(["pretrain", "--corpus", str(corpus_file), "--out", str(tmp_path / "o"), "--set", "batch_size=15",
                "--set", "complementary_masks=true"])
    _assert_user_error(r, "batch_size must be even", "15")
    assert not (tmp_path / "o").exists()


def test_cli_unknown_key(tmp_path, corpus_file):
    r = invoke(["pretrain", "--corpus", str(corpus_file), "--out", str(tmp_path / "o"), "--set", "foo=1"])
    _assert_user_error(r, "foo", "unknown key")


def test_cli_corpus_too_short_for_block(tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("abc" * 20)
    r = invoke(["pretrain", "--preset", "tiny", "--corpus", str(f), "--max-iters", "2",
                "--out", str(tmp_path / "o")])
    _assert_user_error(r, "block_size")


def test_a_failed_compile_says_how_to_train_without_it(tmp_path, corpus_file, monkeypatch):
    class Broken:  # what torch.compile returns when the backend cannot build its kernels
        def __init__(self, model):
            self.mask_id = model.mask_id

        def __call__(self, *args, **kwargs):
            raise torch._dynamo.exc.TorchDynamoException("no C++ compiler found")

    def broken_compile(model, **_):
        return Broken(model)
    monkeypatch.setattr(torch, "compile", broken_compile)
    r = invoke(["pretrain", "--preset", "tiny", "--corpus", str(corpus_file), "--max-iters", "2",
                "--out", str(tmp_path / "o"), "--threads", "1", "--set", "compile=true"])
    _assert_user_error(r, "torch.compile of the training step failed", "no C++ compiler found",
                       "--set compile=false")
    assert not (tmp_path / "o").exists()


def test_compiled_training_step_matches_eager(tmp_path, corpus_file):
    """compile=True changes speed, not the computation: same losses and weights to fp32 noise."""
    corpus = load_corpus(str(corpus_file))
    eager = pretrain(cfg(tmp_path / "e", max_iters=4, eval_every=4), corpus, {}, progress=False, log=lambda *_: None)
    compiled = pretrain(cfg(tmp_path / "c", max_iters=4, eval_every=4, compile=True), corpus, {}, progress=False,
                        log=lambda *_: None)
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], abs=1e-4)
    _, we = weights(tmp_path / "e")
    _, wc = weights(tmp_path / "c")
    assert we.keys() == wc.keys()  # saved from the plain module: no "_orig_mod." prefixes
    for k in we:
        assert float((we[k] - wc[k]).abs().max()) <= 1e-4, k
