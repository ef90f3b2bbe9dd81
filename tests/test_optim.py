"""Muon (fp32 Newton-Schulz) agrees with torch.optim.Muon; the chained optimizer splits its
parameters as documented and its state survives a state_dict round trip."""

import pytest
import torch

from dgrpo.models.diffusion import DiffusionLM
from dgrpo.models.optim import ChainedOptimizer, Muon, make_optimizer, orthogonalize
from dgrpo.models.transformer import preset_config


@pytest.mark.parametrize("shape", [(48, 16), (16, 48)])
def test_muon_matches_torch_muon(shape):
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(shape))
    ref = torch.nn.Parameter(ours.detach().clone())
    kw = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    opt_ours, opt_ref = Muon([ours], **kw), torch.optim.Muon([ref], **kw)
    start = ours.detach().clone()
    for _ in range(3):
        g = torch.randn(shape)
        ours.grad, ref.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_ref.step()
    moved = float((ours.detach() - start).abs().max())
    assert moved > 0.02
    # torch's runs Newton-Schulz in bf16 (8-bit mantissa): agreement to bf16 precision
    assert float((ours.detach() - ref.detach()).abs().max()) < 0.02 * moved
    assert torch.allclose(opt_ours.state[ours]["momentum_buffer"], opt_ref.state[ref]["momentum_buffer"])


def test_muon_update_is_orthogonalised():
    """One step from zero momentum on a gradient with singular values spread 100x: the
    update's singular values all land in Newton-Schulz's band around 1 (times the lr)."""
    torch.manual_seed(1)
    u, v = torch.linalg.qr(torch.randn(32, 32))[0], torch.linalg.qr(torch.randn(32, 32))[0]
    p = torch.nn.Parameter(torch.zeros(32, 32))
    p.grad = u @ torch.diag(torch.logspace(-2, 0, 32)) @ v
    Muon([p], lr=1.0, weight_decay=0.0, nesterov=False, momentum=0.0, adjust_lr_fn=None).step()
    s = torch.linalg.svdvals(p.detach())
    assert 0.6 < float(s.min()) and float(s.max()) < 1.25


def test_muon_split_orthogonalises_each_block_as_its_own_matrix():
    """A fused (3m, n) matrix in a group with split=3 takes the same steps as three (m, n)
    matrices stepped separately (momentum, Newton-Schulz, lr scaling and weight decay per block)."""
    torch.manual_seed(2)
    fused = torch.nn.Parameter(torch.randn(24, 16))
    blocks = [torch.nn.Parameter(b.detach().clone()) for b in fused.detach().chunk(3)]
    kw = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    opt_fused, opt_blocks = Muon([{"params": [fused], "split": 3}], **kw), Muon(blocks, **kw)
    whole = torch.nn.Parameter(fused.detach().clone())  # the unsplit matrix, for contrast
    opt_whole = Muon([whole], **kw)
    start = fused.detach().clone()
    for g in torch.randn(3, 24, 16):
        fused.grad, whole.grad = g.clone(), g.clone()
        for b, gb in zip(blocks, g.chunk(3)):
            b.grad = gb.clone()
        for opt in (opt_fused, opt_blocks, opt_whole):
            opt.step()
    assert float((fused.detach() - start).abs().max()) > 0.02
    torch.testing.assert_close(fused.detach(), torch.cat([b.detach() for b in blocks]), rtol=0, atol=1e-6)
    assert float((whole.detach() - fused.detach()).abs().max()) > 1e-3  # not what the unsplit matrix takes


def test_make_optimizer_splits_only_the_qkv_matrices():
    model = DiffusionLM(preset_config("tiny", vocab_size=11))
    muon = make_optimizer(model, 1e-3, 0.1, (0.9, 0.99), "muon", split_qkv=True).optimizers[0]
    split = [g for g in muon.param_groups if g.get("split", 1) == 3]
    assert len(split) == 1
    names = {p: n for n, p in model.named_parameters()}
    assert sorted(names[p].split(".", 2)[-1] for p in split[0]["params"]) == \
        [f"{i}.attn.qkv.weight" for i in range(model.cfg.n_layer)]
    assert all(not n.endswith("qkv.weight") for g in muon.param_groups if g.get("split", 1) == 1
               for n in (names[p] for p in g["params"]))


@pytest.mark.parametrize("shape", [(3, 96, 32), (3, 32, 96), (2, 32, 32)])
def test_orthogonalize_on_the_small_side_equals_the_direct_iteration(shape):
    """A rectangular batch iterates on its m x m Gram side (Q <- p(A) Q, A <- p(A) A p(A)); the
    result must be the direct iteration's x <- p(x x^T) x, here computed in float64."""
    torch.manual_seed(3)
    g = torch.randn(shape) * torch.logspace(-2, 0, shape[-1])  # a spread of column scales
    coefficients = (3.4445, -4.7750, 2.0315)

    def direct(x, steps=5):
        x = x.mT if x.size(1) > x.size(2) else x
        y = x / x.norm(dim=(1, 2), keepdim=True)
        for _ in range(steps):
            gram = y @ y.mT
            y = coefficients[0] * y + (coefficients[1] * gram + coefficients[2] * gram @ gram) @ y
        return y.mT if g.size(1) > g.size(2) else y

    want = direct(g.double())
    got = orthogonalize(g, coefficients, 5, 1e-7)
    assert got.shape == g.shape
    assert float((got.double() - want).norm() / want.norm()) < 1e-5


def test_make_optimizer_muon_groups_and_round_trip():
    model = DiffusionLM(preset_config("tiny", 20))
    opt = make_optimizer(model, 1e-3, 0.1, (0.9, 0.99), kind="muon")
    assert isinstance(opt, ChainedOptimizer)
    muon, adamw = opt.optimizers
    muon_params = {id(p) for g in muon.param_groups for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in muon_params}
    assert names == {n for n, p in model.named_parameters() if ".blocks." in n and p.dim() == 2}
    assert len(names) == 4 * model.cfg.n_layer
    n_adamw = sum(len(g["params"]) for g in adamw.param_groups)
    assert len(muon_params) + n_adamw == len(list(model.parameters()))

    x = torch.randint(0, 19, (4, 32))
    model(x).logsumexp(-1).mean().backward()
    opt.step()
    sd = opt.state_dict()
    fresh = make_optimizer(model, 1.0, 0.0, (0.5, 0.5), kind="muon")
    fresh.load_state_dict(sd)
    again = fresh.state_dict()
    assert again["param_groups"] == sd["param_groups"]
    for i, s in sd["state"].items():
        for k, v in s.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(again["state"][i][k])), (i, k)
    with pytest.raises(ValueError, match="parameter groups"):
        fresh.load_state_dict({"state": {}, "param_groups": sd["param_groups"][:1]})


def test_make_optimizer_rejects_unknown_kind():
    with pytest.raises(ValueError, match="adamw or muon"):
        make_optimizer(DiffusionLM(preset_config("tiny", 20)), 1e-3, 0.0, (0.9, 0.99), kind="sgd")


def test_muon_step_returns_the_closure_loss():
    p = torch.nn.Parameter(torch.ones(4, 4))
    opt = Muon([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    assert float(opt.step(closure)) == 16.0
    assert float(p.detach().abs().max()) < 1.0  # the step used the closure's gradient
