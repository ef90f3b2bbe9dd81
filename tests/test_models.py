"""Trunk / diffusion LM / sampler / exact trajectory replay.

The key invariant (DESIGN.md, "GRPO, exactly"): with the same weights, the
learner's replayed per-token log-probs equal the sampler's recorded ones.
"""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dgrpo.models.diffusion import DiffusionLM, diffusion_loss, mask_tokens
from dgrpo.models.sampler import (PROMPT_STEP, confidence_step_logprob, reveal_schedule, sample, sampling_logprobs,
                                  validate_sampling)
from dgrpo.models.trajectory import (replay_rows, replay_states, row_logprobs, scatter_rows,
                                     trajectory_logprobs)
from dgrpo.models.transformer import (PRESETS, ModelConfig, Trunk, count_params,
                                      forward_flops_per_token, preset_config)
from dgrpo.precision import autocast_context, bf16_is_fast, resolve_precision

N_CHARS = 12
VOCAB = N_CHARS + 1  # + [MASK]
MASK = N_CHARS


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is faster, and far faster when other jobs share the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_cfg(**kw) -> ModelConfig:
    return preset_config("tiny", VOCAB, **kw)


@pytest.fixture(scope="module")
def model() -> DiffusionLM:
    """A tiny random model with sharpened logits, so log-probs are far from uniform."""
    torch.manual_seed(0)
    m = DiffusionLM(tiny_cfg())
    with torch.no_grad():
        m.lm_head.weight.mul_(10.0)
    return m.eval()


def all_masked(B: int, T: int = 32) -> torch.Tensor:
    return torch.full((B, T), MASK, dtype=torch.long)


def partly_masked(B: int, T: int = 32, frac: float = 0.5, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, N_CHARS, (B, T), generator=g)
    return x.masked_fill(torch.rand(B, T, generator=g) < frac, MASK)


class FixedLogits(nn.Module):
    """A 'model' whose logits ignore the input: logits[t] at position t for every sample."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("logits", logits)
        self.calls = 0

    @property
    def mask_id(self) -> int:
        return self.logits.shape[-1]

    def forward(self, idx):
        self.calls += 1
        return self.logits[None].expand(idx.shape[0], -1, -1)


# --- trunk and LM -----------------------------------------------------------------------------

def test_trunk_and_lm_shapes():
    cfg = tiny_cfg()
    idx = torch.randint(0, VOCAB, (3, cfg.block_size))
    assert Trunk(cfg)(idx).shape == (3, cfg.block_size, cfg.n_embd)
    lm = DiffusionLM(cfg)
    assert lm.mask_id == VOCAB - 1 and lm.n_chars == N_CHARS
    logits = lm(idx)
    assert logits.shape == (3, cfg.block_size, N_CHARS) and logits.dtype == torch.float32
    assert lm(idx[:, :7]).shape == (3, 7, N_CHARS)  # shorter windows work too


def test_trunk_is_bidirectional():
    lm = DiffusionLM(tiny_cfg()).eval()
    idx = torch.randint(0, N_CHARS, (1, 16))
    changed = idx.clone()
    changed[0, -1] = (changed[0, -1] + 1) % N_CHARS
    with torch.no_grad():
        a, b = lm(idx), lm(changed)
    assert not torch.allclose(a[0, 0], b[0, 0])  # position 0 sees the last position: no causal mask


def test_presets_and_config_validation():
    for name in PRESETS:
        cfg = preset_config(name, 66)
        assert cfg.vocab_size == 66 and cfg.n_embd % cfg.n_head == 0
    assert preset_config("tiny", 66, block_size=48).block_size == 48
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("huge", 66)
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(n_embd=30, n_head=4).validate()
    with pytest.raises(ValueError, match="dropout"):
        ModelConfig(dropout=1.0).validate()
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({"n_layer": 2, "bogus": 1})
    cfg = tiny_cfg()
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_forward_flops_counts_every_linear_weight():
    """Without attention scores (seq_len 0), forward FLOPs = 2 x weights of every matmul."""
    cfg = tiny_cfg()
    lm = DiffusionLM(cfg)
    linear = sum(m.weight.numel() for m in lm.modules() if isinstance(m, nn.Linear))
    assert forward_flops_per_token(cfg, 0, N_CHARS) == 2 * linear
    extra = forward_flops_per_token(cfg, 32, N_CHARS) - forward_flops_per_token(cfg, 0, N_CHARS)
    assert extra == cfg.n_layer * 4 * 32 * cfg.n_embd  # QK^T and AV
    assert count_params(lm) > linear
    last_mlp_and_head = sum(m.weight.numel() for m in (*lm.trunk.blocks[-1].mlp.modules(), lm.lm_head)
                            if isinstance(m, nn.Linear))
    half = forward_flops_per_token(cfg, 0, N_CHARS, output_fraction=0.5)
    assert half == 2 * linear - last_mlp_and_head  # half the positions skip them: 2 x half the weights


def test_qk_norm_makes_attention_invariant_to_query_and_key_scale():
    """With QK-norm, scaling the query and key weights changes nothing; without it, it does."""
    idx = torch.randint(0, N_CHARS, (2, 16))
    for qk_norm, invariant in ((True, True), (False, False)):
        torch.manual_seed(0)
        lm = DiffusionLM(tiny_cfg(qk_norm=qk_norm, attn_scale=0.8 if qk_norm else None)).eval()
        with torch.no_grad():
            before = lm(idx)
            C = lm.cfg.n_embd
            for block in lm.trunk.blocks:
                block.attn.qkv.weight[:2 * C].mul_(7.0)  # rows of q and k
            after = lm(idx)
        assert torch.allclose(before, after, atol=1e-5) == invariant


@pytest.mark.parametrize("attn_scale", [0.8, None])
def test_compiled_attention_equals_the_sdpa_kernel(attn_scale):
    """Under torch.compile the CPU attention is written out (q k^T, softmax, v) for inductor to fuse;
    outputs and gradients must equal the eager SDPA kernel's. backend="eager" traces the same
    branch without building kernels."""
    torch.manual_seed(0)
    lm = DiffusionLM(tiny_cfg(attn_scale=attn_scale))
    idx = torch.randint(0, N_CHARS, (3, 16))
    eager_out = lm(idx)
    eager_grads = torch.autograd.grad(eager_out.square().mean(), list(lm.parameters()))
    traced = torch.compile(lm, backend="eager")
    traced_out = traced(idx)
    traced_grads = torch.autograd.grad(traced_out.square().mean(), list(lm.parameters()))
    assert torch.allclose(eager_out, traced_out, atol=1e-5)
    for a, b in zip(eager_grads, traced_grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_model_config_fields_added_later_default_to_the_old_behaviour():
    """A checkpoint's config.json written before a field existed loads as it was trained."""
    old = {"vocab_size": 66, "block_size": 128, "n_layer": 4, "n_head": 4, "n_embd": 128,
           "dropout": 0.0, "rope_base": 10000.0}
    cfg = ModelConfig.from_dict(old)
    assert (cfg.activation, cfg.qk_norm, cfg.attn_scale) == ("gelu_tanh", False, None)
    assert preset_config("small", 66).qk_norm  # new models use it
    with pytest.raises(ValueError, match="attn_scale"):
        ModelConfig(attn_scale=0.0).validate()


def test_zero_residual_projections_make_every_block_the_identity():
    lm = DiffusionLM(tiny_cfg()).eval()
    lm.trunk.zero_residual_projections()
    idx = torch.randint(0, N_CHARS, (1, 16))
    changed = idx.clone()
    changed[0, -1] = (changed[0, -1] + 1) % N_CHARS
    with torch.no_grad():
        assert torch.equal(lm(idx)[0, :-1], lm(changed)[0, :-1])  # no position sees another yet


# --- diffusion loss ---------------------------------------------------------------------------

def test_mask_tokens_forward_process():
    x = torch.randint(0, N_CHARS, (4000, 32))
    noisy, masked, t = mask_tokens(x, MASK, torch.Generator().manual_seed(0))
    assert torch.equal(noisy[masked], torch.full_like(noisy[masked], MASK))
    assert torch.equal(noisy[~masked], x[~masked])
    assert float(t.min()) >= 1e-3 and float(t.max()) <= 1.0
    assert abs(float(t.mean()) - 0.5) < 0.02 and abs(float(t.std()) - 1 / math.sqrt(12)) < 0.02  # U(0,1)
    frac = masked.float().mean(1)
    assert float(torch.corrcoef(torch.stack([frac, t]))[0, 1]) > 0.95  # each token masked w.p. t


def test_stratified_t_covers_the_interval_evenly_and_stays_uniform():
    x = torch.randint(0, N_CHARS, (8, 32))
    g = torch.Generator().manual_seed(3)
    ts = []
    for _ in range(2000):
        _, masked, t = mask_tokens(x, MASK, g, stratified=True)
        strata = ((t - 1e-3) / (1 - 1e-3) * 8).floor().long().clamp(max=7)
        assert sorted(strata.tolist()) == list(range(8))  # one t per eighth of (0, 1)
        ts.append(t)
    t = torch.cat(ts)
    assert abs(float(t.mean()) - 0.5) < 0.01 and abs(float(t.std()) - 1 / math.sqrt(12)) < 0.01
    iid = torch.stack([mask_tokens(x, MASK, g)[2].mean() for _ in range(2000)])
    strat = torch.stack([mask_tokens(x, MASK, g, stratified=True)[2].mean() for _ in range(2000)])
    assert float(strat.var()) < 0.2 * float(iid.var())  # the batch-mean t varies far less


def test_complementary_masks_pair_each_window_with_its_complement():
    half = torch.randint(0, N_CHARS, (4, 32))
    x = half.repeat(2, 1)
    noisy, masked, t = mask_tokens(x, MASK, torch.Generator().manual_seed(5), stratified=True,
                                   complementary=True)
    assert torch.equal(masked[4:], ~masked[:4])  # every position is a target exactly once per pair
    assert torch.allclose(t[4:], 1 - t[:4])  # complement of a mask drawn with prob t: prob 1 - t
    assert torch.equal(noisy[masked], torch.full_like(noisy[masked], MASK))
    assert torch.equal(noisy[~masked], x[~masked])
    g = torch.Generator().manual_seed(6)
    t = torch.cat([mask_tokens(x, MASK, g, complementary=True)[2] for _ in range(2000)])
    assert abs(float(t.mean()) - 0.5) < 0.01 and abs(float(t.std()) - 1 / math.sqrt(12)) < 0.01  # still U(0,1)


def test_logits_of_chosen_rows_equal_the_full_forward():
    """model(idx, rows) runs the last MLP on the chosen positions only; what it returns must be
    the full forward's logits at those positions, attention still over every position."""
    torch.manual_seed(0)
    lm = DiffusionLM(tiny_cfg())
    idx = torch.randint(0, N_CHARS + 1, (3, 32))
    rows = torch.tensor([0, 5, 31, 32, 70, 95])  # flat indices into the 3 x 32 positions
    full = lm(idx)
    assert torch.allclose(lm(idx, rows), full.flatten(0, 1)[rows], atol=1e-6)
    assert lm(idx, rows[:0]).shape == (0, N_CHARS)


def test_diffusion_loss_is_ce_on_masked_tokens_only():
    torch.manual_seed(0)
    lm = DiffusionLM(tiny_cfg())
    x = torch.randint(0, N_CHARS, (8, 32))
    noisy, masked, t = mask_tokens(x, MASK, torch.Generator().manual_seed(5))  # the loss's draws
    assert 0 < masked.sum() < masked.numel()
    logits = lm(noisy)  # every position's logits, the reference
    expected = F.cross_entropy(logits[masked], x[masked])
    expected_grads = torch.autograd.grad(expected, list(lm.parameters()))
    loss, ce = diffusion_loss(lm, x, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(loss, expected, atol=1e-6) and torch.allclose(ce, expected, atol=1e-6)
    for got, want in zip(torch.autograd.grad(loss, list(lm.parameters())), expected_grads):
        assert torch.allclose(got, want, atol=1e-7)  # visible positions carry no loss

    elbo, ce2 = diffusion_loss(lm, x, generator=torch.Generator().manual_seed(5), elbo_weight=True)
    per_tok = F.cross_entropy(logits.flatten(0, 1), x.flatten(), reduction="none").view_as(x)
    assert torch.allclose(elbo, (per_tok * masked / t[:, None]).sum() / x.numel(), atol=1e-6)
    assert torch.allclose(ce2, expected, atol=1e-6)


# --- sampler ----------------------------------------------------------------------------------

def test_reveal_schedule_is_linear_and_sums_to_n():
    n = torch.tensor([0, 1, 7, 32, 100, 5])
    for steps in (1, 4, 8, 13, 64):
        counts = reveal_schedule(n, steps)
        assert counts.shape == (len(n), steps)
        assert torch.equal(counts.sum(1), n)
        assert bool((counts >= 0).all())
        lo, hi = n // steps, -(-n // steps)
        assert bool(((counts >= lo[:, None]) & (counts <= hi[:, None])).all())
        cum = counts.cumsum(1)
        s = torch.arange(1, steps + 1)
        assert torch.equal(cum, n[:, None] * s // steps)


@pytest.mark.parametrize("order", ["random", "confidence"])
@pytest.mark.parametrize("steps", [1, 8, 40])  # 40 > T: some steps reveal nothing
def test_sampler_fills_masks_and_records_steps(model, order, steps):
    prompt = torch.cat([all_masked(3), partly_masked(3)])
    out = sample(model, prompt, steps=steps, order=order, generator=torch.Generator().manual_seed(0))
    was_masked = prompt == MASK
    assert out.tokens.shape == prompt.shape and out.tokens.dtype == torch.long
    assert not bool((out.tokens == MASK).any())
    assert bool((out.tokens < N_CHARS).all() and (out.tokens >= 0).all())
    assert torch.equal(out.tokens[~was_masked], prompt[~was_masked])
    assert bool((out.reveal_step[~was_masked] == PROMPT_STEP).all())
    assert bool((out.logprobs[~was_masked] == 0).all())
    rs = out.reveal_step[was_masked]
    assert bool(((rs >= 0) & (rs < steps)).all())
    assert bool((out.logprobs[was_masked] <= 0).all()) and bool(torch.isfinite(out.logprobs).all())
    # the number revealed at each step follows the schedule
    expected = reveal_schedule(was_masked.sum(1), steps)
    for b in range(prompt.shape[0]):
        got = torch.bincount(out.reveal_step[b][was_masked[b]], minlength=steps)
        assert torch.equal(got, expected[b])


def test_sampler_nothing_to_fill(model):
    prompt = partly_masked(2, frac=0.0)
    out = sample(model, prompt, steps=4)
    assert torch.equal(out.tokens, prompt) and bool((out.reveal_step == PROMPT_STEP).all())


def test_sampler_skips_steps_that_reveal_nothing():
    fixed = FixedLogits(torch.zeros(8, 5))
    prompt = torch.zeros(2, 8, dtype=torch.long)
    prompt[0, :3] = fixed.mask_id  # 3 masked positions here, 2 in the other row; 20 steps
    prompt[1, 5:] = fixed.mask_id
    prompt[1, 5] = 1
    out = sample(fixed, prompt, steps=20)
    assert fixed.calls == len(set(out.reveal_step[out.reveal_step >= 0].tolist())) <= 5  # not 20


def test_sampler_is_deterministic_with_a_seeded_generator(model):
    prompt = partly_masked(4)
    for order in ("random", "confidence"):
        a = sample(model, prompt, steps=8, order=order, generator=torch.Generator().manual_seed(7))
        b = sample(model, prompt, steps=8, order=order, generator=torch.Generator().manual_seed(7))
        c = sample(model, prompt, steps=8, order=order, generator=torch.Generator().manual_seed(8))
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.reveal_step, b.reveal_step)
        assert torch.equal(a.logprobs, b.logprobs)
        assert not torch.equal(a.tokens, c.tokens)


def test_sampler_validates_arguments(model):
    prompt = all_masked(1)
    for kwargs, match in [(dict(steps=0), "steps"), (dict(temperature=0.0), "temperature"),
                          (dict(top_k=-1), "top_k"), (dict(top_p=0.0), "top_p"),
                          (dict(top_p=1.5), "top_p"), (dict(order="lifo"), "order")]:
        with pytest.raises(ValueError, match=match):
            sample(model, prompt, **{"steps": 4, **kwargs})
    validate_sampling(4, 0.5, 3, 0.9, "confidence")


def test_top_k_restricts_tokens_to_the_top_k_set():
    T, V, k = 16, 10, 3
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(T, V, generator=g) * 0.3  # flat: without top-k all tokens would show up
    fixed = FixedLogits(logits)
    prompt = torch.full((200, T), fixed.mask_id)
    top = logits.topk(k, dim=-1).indices  # (T, k)
    out = sample(fixed, prompt, steps=4, top_k=k, temperature=1.0, generator=g)
    allowed = torch.zeros(T, V, dtype=torch.bool).scatter_(1, top, True)
    assert bool(allowed.gather(1, out.tokens.T).all())
    assert len(out.tokens.unique()) > k  # positions differ in their top-k sets; it is per position
    free = sample(fixed, prompt, steps=4, generator=g)
    assert not bool(allowed.gather(1, free.tokens.T).all())
    # the recorded log-prob is under the renormalised top-k distribution
    lp = sampling_logprobs(logits, top_k=k)
    assert bool(torch.isinf(lp).sum(-1).eq(V - k).all())
    assert torch.allclose(out.logprobs, lp.gather(1, out.tokens.T).T)


def test_top_p_and_temperature_in_sampling_logprobs():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    assert torch.allclose(sampling_logprobs(logits, 0.5), F.log_softmax(logits / 0.5, -1))
    p = F.softmax(logits, -1)[0]  # 0.64, 0.24, 0.09, 0.03
    lp = sampling_logprobs(logits, top_p=0.7)  # keeps the first token that crosses 0.7
    assert torch.isfinite(lp[0, :2]).all() and torch.isinf(lp[0, 2:]).all()
    assert torch.allclose(lp[0, :2].exp(), p[:2] / p[:2].sum())


def test_confidence_order_reveals_confident_tokens_first():
    """Position t has one dominant token whose logit grows with t, so later positions are
    more confident: confidence order fills them first; random order shows no such trend."""
    T, V = 16, 6
    logits = torch.zeros(T, V)
    logits[:, 0] = torch.linspace(0.0, 6.0, T)
    fixed = FixedLogits(logits)
    prompt = torch.full((300, T), fixed.mask_id)
    pos = torch.arange(T, dtype=torch.float32).expand(300, T).flatten()

    def corr(order):
        out = sample(fixed, prompt, steps=T, order=order, generator=torch.Generator().manual_seed(0))
        return float(torch.corrcoef(torch.stack([pos, out.reveal_step.flatten().float()]))[0, 1]), out

    c_conf, out = corr("confidence")
    c_rand, _ = corr("random")
    assert c_conf < -0.6 and abs(c_rand) < 0.1
    # the mean recorded log-prob falls step by step
    by_step = torch.stack([out.logprobs[out.reveal_step == s].mean() for s in range(T)])
    assert float(by_step[: T // 4].mean()) > float(by_step[-T // 4:].mean()) + 0.5


def test_confidence_step_probabilities_sum_to_one_over_every_outcome():
    """Every (set of positions, tokens there) a confidence-order step can reveal, from a state with one
    position already filled: their probabilities add up to 1."""
    import itertools
    torch.manual_seed(0)
    T, V, m = 5, 3, 2
    logp = torch.randn(1, T, V).mul(2).log_softmax(-1)
    masked = torch.tensor([[True, True, False, True, True]])
    total = 0.0
    for R in itertools.combinations([0, 1, 3, 4], m):
        for tokens in itertools.product(range(V), repeat=m):
            reveal = torch.zeros(1, T, dtype=torch.bool)
            token = torch.zeros(1, T, dtype=torch.long)
            reveal[0, list(R)] = True
            token[0, list(R)] = torch.tensor(tokens)
            total += float(confidence_step_logprob(logp, token, reveal, masked).exp())
    assert total == pytest.approx(1.0, abs=1e-5)


def test_confidence_step_probability_matches_the_sampler():
    """The first step of the sampler (one of three positions revealed) lands on each (position, token) as
    often as confidence_step_logprob says."""
    torch.manual_seed(1)
    T, V, n = 3, 2, 20000
    logits = torch.randn(T, V) * 1.5
    fixed = FixedLogits(logits)
    out = sample(fixed, torch.full((n, T), fixed.mask_id), steps=T, order="confidence", random_reveal=0.0,
                 temperature=1.0, generator=torch.Generator().manual_seed(0))
    first = (out.reveal_step == 0).float().argmax(1)
    outcome = first * V + out.tokens.gather(1, first[:, None]).squeeze(1)
    freq = torch.bincount(outcome, minlength=T * V).double() / n
    logp = sampling_logprobs(logits[None])
    for pos in range(T):
        for tok in range(V):
            reveal = torch.zeros(1, T, dtype=torch.bool)
            reveal[0, pos] = True
            token = torch.full((1, T), tok)
            p = float(confidence_step_logprob(logp, token, reveal, torch.ones(1, T, dtype=torch.bool)).exp())
            assert float(freq[pos * V + tok]) == pytest.approx(p, abs=0.012)


@pytest.mark.parametrize("order", ["random", "confidence"])
def test_kl_to_reference_is_zero_for_the_reference_and_positive_for_a_changed_model(model, order):
    prompt = all_masked(64, 16)
    same = sample(model, prompt, steps=8, order=order, generator=torch.Generator().manual_seed(0), reference=model)
    assert same.kl_to_reference.abs().max() == 0
    assert sample(model, prompt, steps=8, order=order).kl_to_reference is None
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.lm_head.weight.add_(0.3 * torch.randn_like(changed.lm_head.weight))
    out = sample(changed, prompt, steps=8, order=order, generator=torch.Generator().manual_seed(0),
                 reference=model)
    kl = out.kl_to_reference
    assert float(kl.mean()) > 3 * float(kl.std() / len(kl) ** 0.5) > 0
    if order == "random":  # positions do not depend on the model: the revealed tokens' log-ratio is the same KL
        with torch.no_grad():
            ratio = out.logprobs.sum(1) - trajectory_logprobs(model, out.tokens, out.reveal_step, 8).sum(1)
        assert float(ratio.mean()) == pytest.approx(float(kl.mean()), abs=4 * float(ratio.std() / 8))


# --- exact replay -----------------------------------------------------------------------------

REPLAY_CASES = [
    dict(),
    dict(temperature=0.7),
    dict(temperature=1.6),
    dict(top_k=4),
    dict(temperature=0.8, top_k=5),
    dict(top_p=0.8),
]


@pytest.mark.parametrize("order", ["random", "confidence"])
@pytest.mark.parametrize("prompt_kind", ["all_masked", "partly_masked"])
@pytest.mark.parametrize("opts", REPLAY_CASES, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "plain")
def test_replay_equals_recorded_logprobs(model, order, prompt_kind, opts):
    prompt = all_masked(4) if prompt_kind == "all_masked" else partly_masked(4)
    steps = 8
    out = sample(model, prompt, steps=steps, order=order, generator=torch.Generator().manual_seed(3), **opts)
    assert float(out.logprobs.min()) < -0.01  # not a degenerate, deterministic trajectory
    with torch.no_grad():
        for rows_per_chunk in (256, 3, 1):
            replay = trajectory_logprobs(model, out.tokens, out.reveal_step, steps,
                                         rows_per_chunk=rows_per_chunk, **opts)
            assert replay.dtype == torch.float32
            assert float((replay - out.logprobs).abs().max()) <= 1e-5, rows_per_chunk
            assert bool((replay[out.reveal_step == PROMPT_STEP] == 0).all())


def test_replay_with_more_steps_than_tokens(model):
    """Steps that reveal nothing for some samples (S > masked count) are skipped consistently."""
    prompt = partly_masked(5, frac=0.3, seed=4)
    out = sample(model, prompt, steps=20, order="confidence", temperature=0.9,
                 generator=torch.Generator().manual_seed(0))
    rows = replay_rows(out.reveal_step, 20)
    assert len(rows) == sum(len(out.reveal_step[b][out.reveal_step[b] >= 0].unique()) for b in range(5))
    with torch.no_grad():
        replay = trajectory_logprobs(model, out.tokens, out.reveal_step, 20, temperature=0.9, rows_per_chunk=7)
    assert float((replay - out.logprobs).abs().max()) <= 1e-5


def test_replay_states_rebuild_the_sampler_state():
    tokens = torch.tensor([[5, 6, 7, 8]])
    reveal_step = torch.tensor([[-1, 1, 0, 1]])
    rows = replay_rows(reveal_step, 3)
    assert rows.step_idx.tolist() == [0, 1]  # step 2 revealed nothing
    inputs, targets = replay_states(tokens, reveal_step, rows, MASK)
    assert inputs.tolist() == [[5, MASK, MASK, MASK], [5, MASK, 7, MASK]]
    assert targets.tolist() == [[False, False, True, False], [False, True, False, True]]


def test_replay_has_gradients(model):
    out = sample(model, partly_masked(3), steps=6, generator=torch.Generator().manual_seed(0))
    model.zero_grad()
    lp = trajectory_logprobs(model, out.tokens, out.reveal_step, 6, rows_per_chunk=4)
    assert lp.requires_grad
    lp.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads.values())
    assert float(grads["lm_head.weight"].abs().sum()) > 0
    assert float(grads["trunk.wte.weight"].abs().sum()) > 0
    assert float(grads["trunk.blocks.0.attn.qkv.weight"].abs().sum()) > 0
    model.zero_grad()


def test_replay_rows_subsampling(model):
    steps = 8
    out = sample(model, torch.cat([all_masked(3), partly_masked(3, frac=0.15)]), steps=steps,
                 generator=torch.Generator().manual_seed(1))
    full = replay_rows(out.reveal_step, steps)
    for k in (1, 2, 5, 100):
        rows = replay_rows(out.reveal_step, steps, steps_per_sample=k, generator=torch.Generator().manual_seed(k))
        per_sample = torch.bincount(rows.sample_idx, minlength=6)
        full_per_sample = torch.bincount(full.sample_idx, minlength=6)
        assert torch.equal(per_sample, full_per_sample.clamp(max=k))
        for b, s in zip(rows.sample_idx.tolist(), rows.step_idx.tolist()):
            assert bool((out.reveal_step[b] == s).any())  # every chosen step revealed tokens
        # chosen tokens keep their exact log-probs; the rest are 0
        with torch.no_grad():
            lp = trajectory_logprobs(model, out.tokens, out.reveal_step, steps, rows=rows)
        chosen = torch.zeros_like(out.reveal_step, dtype=torch.bool)
        for b, s in zip(rows.sample_idx.tolist(), rows.step_idx.tolist()):
            chosen[b] |= out.reveal_step[b] == s
        assert float((lp[chosen] - out.logprobs[chosen]).abs().max()) <= 1e-5
        assert bool((lp[~chosen] == 0).all())


def test_row_logprobs_entropy_and_scatter(model):
    out = sample(model, all_masked(2), steps=4, generator=torch.Generator().manual_seed(0))
    rows = replay_rows(out.reveal_step, 4)
    with torch.no_grad():
        r = row_logprobs(model, out.tokens, out.reveal_step, rows, with_entropy=True, top_k=3)
    assert r.entropy is not None and bool((r.entropy[r.targets] >= 0).all())
    assert float(r.entropy[r.targets].max()) <= math.log(3) + 1e-5
    assert bool((r.entropy[~r.targets] == 0).all())
    assert int(r.targets.sum()) == 2 * 32  # each token belongs to exactly one row
    summed = scatter_rows(r.targets.float(), rows, 2)
    assert bool((summed == 1).all())


# --- precision --------------------------------------------------------------------------------

def test_resolve_precision(monkeypatch):
    monkeypatch.delenv("DGRPO_PRECISION", raising=False)  # auto follows the hardware
    assert resolve_precision("fp32") is None
    assert resolve_precision("bf16") is torch.bfloat16
    auto = resolve_precision("auto")
    assert auto == (torch.bfloat16 if bf16_is_fast("cpu") else None)
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp16")
    with autocast_context("cpu", None):
        assert not torch.is_autocast_enabled("cpu")
    with autocast_context("cpu", torch.float32):
        assert not torch.is_autocast_enabled("cpu")
    with autocast_context("cpu", torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")


def test_bf16_replay_matches_bf16_sampling_closely():
    """Same precision on both sides keeps the ratio near 1 (small model: bf16 is cheap enough)."""
    torch.manual_seed(0)
    lm = DiffusionLM(tiny_cfg(n_layer=1)).eval()
    out = sample(lm, all_masked(2, 16), steps=4, autocast_dtype=torch.bfloat16,
                 generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        replay = trajectory_logprobs(lm, out.tokens, out.reveal_step, 4, autocast_dtype=torch.bfloat16)
        fp32 = trajectory_logprobs(lm, out.tokens, out.reveal_step, 4)
    assert float((replay - out.logprobs).abs().max()) < 1e-2
    assert float((fp32 - out.logprobs).abs().mean()) < 0.05
