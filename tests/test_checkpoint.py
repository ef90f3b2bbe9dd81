"""Checkpoint directories: round trip, clear errors for every broken shape, atomic overwrite."""

import json

import pytest
import torch

import dgrpo.models.checkpoint as ckpt_mod
from dgrpo.corpus import CharTokenizer, VocabularyError
from dgrpo.models.checkpoint import (CONFIG_FILE, MODEL_FILE, OPTIMIZER_FILE, CheckpointError,
                                     load_checkpoint, save_checkpoint)
from dgrpo.models.diffusion import DiffusionLM, diffusion_loss
from dgrpo.models.optim import make_optimizer
from dgrpo.models.transformer import preset_config

TEXT = "to be, or not to be: that is the question.\n"
TOK = CharTokenizer.from_text(TEXT)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def trained(seed: int = 0, steps: int = 2):
    """A tiny model and AdamW after a few steps, so the optimizer has state."""
    torch.manual_seed(seed)
    cfg = preset_config("tiny", TOK.vocab_size)
    model = DiffusionLM(cfg)
    opt = make_optimizer(model, 1e-2, 0.1, (0.9, 0.99))
    x = torch.randint(0, TOK.n_chars, (4, cfg.block_size), generator=torch.Generator().manual_seed(seed))
    for _ in range(steps):
        loss, _ = diffusion_loss(model, x, generator=torch.Generator().manual_seed(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return cfg, model, opt


def save(path, model, cfg, opt=None, **kw):
    return save_checkpoint(path, kind="generator", model_config=cfg, vocab=TOK.to_dict(), weights=model,
                           optimizer=opt, **kw)


@pytest.fixture
def saved(tmp_path):
    cfg, model, opt = trained()
    path = save(tmp_path / "ckpt", model, cfg, opt, state={"iter": 7, "note": "x"}, config={"lr": 0.01},
                extra_tensors={"rng": {"data": torch.Generator().manual_seed(3).get_state()},
                               "reference": {"w": torch.arange(6.0).view(2, 3)}})
    return path, cfg, model, opt


def test_round_trip(saved):
    path, cfg, model, opt = saved
    ck = load_checkpoint(path, expect_kind="generator")
    assert ck.kind == "generator" and ck.model_config == cfg
    assert ck.state == {"iter": 7, "note": "x"} and ck.config == {"lr": 0.01}
    assert CharTokenizer.from_dict(ck.vocab) == TOK
    assert set(ck.files) == {MODEL_FILE, OPTIMIZER_FILE, "rng.safetensors", "reference.safetensors"}

    fresh = DiffusionLM(ck.model_config)
    ck.load_weights_into(fresh)
    for (n, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), n  # bitwise

    fresh_opt = make_optimizer(fresh, 1.0, 0.0, (0.5, 0.5))
    ck.load_optimizer_into(fresh_opt)
    a, b = opt.state_dict(), fresh_opt.state_dict()
    assert a["param_groups"] == b["param_groups"]  # lr, betas, weight decay restored
    assert a["state"].keys() == b["state"].keys() and len(a["state"]) == len(list(model.parameters()))
    for idx in a["state"]:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a["state"][idx][key], b["state"][idx][key]), (idx, key)
    assert float(b["state"][0]["step"]) == 2.0

    # the restored optimizer takes the same next step as the original
    x = torch.randint(0, TOK.n_chars, (2, cfg.block_size))
    for m, o in ((model, opt), (fresh, fresh_opt)):
        loss, _ = diffusion_loss(m, x, generator=torch.Generator().manual_seed(9))
        o.zero_grad()
        loss.backward()
        o.step()
    for pa, pb in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(pa, pb)

    assert ck.has("rng") and not ck.has("nope")
    assert torch.equal(ck.load_tensors("rng")["data"], torch.Generator().manual_seed(3).get_state())
    assert torch.equal(ck.load_tensors("reference")["w"], torch.arange(6.0).view(2, 3))
    with pytest.raises(CheckpointError, match="has no nope.safetensors"):
        ck.load_tensors("nope")


def test_weights_from_a_plain_state_dict(tmp_path):
    cfg, model, _ = trained()
    path = save(tmp_path / "sd", {k: v.clone() for k, v in model.state_dict().items()}, cfg)
    ck = load_checkpoint(path)
    assert ck.files == [MODEL_FILE] and not (path / OPTIMIZER_FILE).exists()
    assert torch.equal(ck.load_weights_into(DiffusionLM(cfg)).lm_head.weight, model.lm_head.weight)
    with pytest.raises(CheckpointError, match=OPTIMIZER_FILE):
        ck.load_optimizer_into(make_optimizer(model, 1e-3, 0.0, (0.9, 0.99)))


def test_missing_dir(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist.*dgrpo pretrain --out"):
        load_checkpoint(tmp_path / "nowhere")


def test_not_a_directory(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is not a directory"):
        load_checkpoint(f)


def test_missing_config_json(saved):
    path = saved[0]
    (path / CONFIG_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"has no {CONFIG_FILE}"):
        load_checkpoint(path)


def test_invalid_json(saved):
    path = saved[0]
    text = (path / CONFIG_FILE).read_text()
    (path / CONFIG_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(path)


def test_not_a_dgrpo_manifest_or_wrong_version(saved):
    path = saved[0]
    manifest = json.loads((path / CONFIG_FILE).read_text())
    (path / CONFIG_FILE).write_text(json.dumps({"hello": 1}))
    with pytest.raises(CheckpointError, match="not a dgrpo checkpoint"):
        load_checkpoint(path)
    (path / CONFIG_FILE).write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(path)
    (path / CONFIG_FILE).write_text(json.dumps({**manifest, "model": {**manifest["model"], "n_head": 5}}))
    with pytest.raises(CheckpointError, match="invalid model"):
        load_checkpoint(path)


def test_missing_model_file(saved):
    path = saved[0]
    (path / MODEL_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"{MODEL_FILE}.*missing"):
        load_checkpoint(path)


def test_missing_model_file_not_listed(saved):
    """Even if the manifest does not list it, loading the weights says what is missing."""
    path, cfg = saved[0], saved[1]
    manifest = json.loads((path / CONFIG_FILE).read_text())
    manifest["files"] = []
    (path / CONFIG_FILE).write_text(json.dumps(manifest))
    (path / MODEL_FILE).unlink()
    ck = load_checkpoint(path)
    with pytest.raises(CheckpointError, match=f"has no {MODEL_FILE}"):
        ck.load_weights_into(DiffusionLM(cfg))


@pytest.mark.parametrize("name", [MODEL_FILE, OPTIMIZER_FILE])
def test_truncated_safetensors(saved, name):
    path, cfg, model, opt = saved
    f = path / name
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    ck = load_checkpoint(path)  # the manifest itself is fine
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        if name == MODEL_FILE:
            ck.load_weights_into(DiffusionLM(cfg))
        else:
            ck.load_optimizer_into(make_optimizer(model, 1e-3, 0.0, (0.9, 0.99)))


def test_wrong_shapes(saved):
    path = saved[0]
    other = DiffusionLM(preset_config("small", TOK.vocab_size))
    with pytest.raises(CheckpointError, match="do not fit the model.*wrong shapes.*different model configuration"):
        load_checkpoint(path).load_weights_into(other)


def test_optimizer_of_another_model(saved):
    path = saved[0]
    other = DiffusionLM(preset_config("tiny", TOK.vocab_size, n_layer=1))
    with pytest.raises(CheckpointError, match="does not fit this optimizer"):
        load_checkpoint(path).load_optimizer_into(make_optimizer(other, 1e-3, 0.0, (0.9, 0.99)))


def test_wrong_kind(saved):
    path = saved[0]
    with pytest.raises(CheckpointError, match="holds a generator checkpoint, expected a judge"):
        load_checkpoint(path, expect_kind="judge")


def test_atomic_overwrite(tmp_path, monkeypatch):
    cfg, old_model, old_opt = trained(seed=0)
    path = save(tmp_path / "ckpt", old_model, cfg, old_opt, state={"iter": 1})
    _, new_model, new_opt = trained(seed=1)

    real_save_file = ckpt_mod.save_file
    calls = []

    def failing_save_file(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real_save_file(*args, **kwargs)

    monkeypatch.setattr(ckpt_mod, "save_file", failing_save_file)
    with pytest.raises(OSError, match="simulated"):
        save(path, new_model, cfg, new_opt, state={"iter": 2})
    assert len(calls) == 2

    ck = load_checkpoint(path)
    assert ck.state == {"iter": 1}
    restored = ck.load_weights_into(DiffusionLM(cfg))
    assert torch.equal(restored.lm_head.weight, old_model.lm_head.weight)
    assert not torch.equal(restored.lm_head.weight, new_model.lm_head.weight)
    ck.load_optimizer_into(make_optimizer(restored, 1e-3, 0.0, (0.9, 0.99)))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "ckpt"]
    assert leftovers == []  # no .tmp- (or .old-) directories left behind

    monkeypatch.setattr(ckpt_mod, "save_file", real_save_file)
    save(path, new_model, cfg, new_opt, state={"iter": 2})  # a later write replaces it
    assert load_checkpoint(path).state == {"iter": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_vocabulary_mismatch(saved):
    ck = load_checkpoint(saved[0])
    tok = CharTokenizer.from_dict(ck.vocab)
    tok.check_same(CharTokenizer.from_text(TEXT))
    with pytest.raises(VocabularyError, match="vocabularies differ.*only in the second: 'z'"):
        tok.check_same(CharTokenizer.from_text(TEXT + "z"), "generator vs judge")
    with pytest.raises(VocabularyError, match="different order"):
        tok.check_same(CharTokenizer(list(reversed(tok.chars))))
