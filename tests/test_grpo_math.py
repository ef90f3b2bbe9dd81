"""GRPO math checked against hand-computed values (dgrpo.learner.grpo)."""

from __future__ import annotations

import math

import pytest
import torch

from dgrpo.learner.grpo import (
    ADVANTAGE_MODES,
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    aggregate,
    aggregation_weights,
    clipped_surrogate,
    group_advantages,
    kl_penalty,
    masked_mean,
    masked_moments,
    token_ratio,
    truncated_importance_weight,
    zero_std_groups,
)

REWARDS = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]])


def close(actual, expected, atol=1e-6, rtol=1e-6):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


# --------------------------------------------------------------------------- advantages


def test_constants():
    assert ADVANTAGE_MODES == ("zscore", "center", "loo")
    assert KL_ESTIMATORS == ("k1", "k2", "k3")
    assert LOSS_AGGREGATIONS == ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def test_zscore_by_hand():
    # Group 1: mean 2.5, deviations -1.5 -0.5 0.5 1.5,
    # population variance (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25, std = sqrt(1.25) = 1.1180340.
    # z = dev / 1.1180340 = -1.3416408, -0.4472136, 0.4472136, 1.3416408 (eps=1e-6 shifts 7th digit).
    # Group 2 is constant: 0 / (0 + eps) = 0, not NaN.
    adv = group_advantages(REWARDS, "zscore")
    close(adv, [[-1.3416408, -0.4472136, 0.4472136, 1.3416408], [0.0, 0.0, 0.0, 0.0]],
          atol=1e-5, rtol=1e-5)
    assert torch.isfinite(adv).all()
    # The unbiased std (sqrt(5/3) = 1.2909944) would give +-1.1618950 at the ends: not used.
    assert abs(float(adv[0, 0]) + 1.1618950) > 0.1


def test_zscore_default_mode_and_eps():
    # default mode is zscore; with eps=0.5 the first entry is -1.5 / (1.1180340 + 0.5) = -0.9270510
    close(group_advantages(REWARDS)[0], [-1.3416408, -0.4472136, 0.4472136, 1.3416408],
          atol=1e-5, rtol=1e-5)
    close(group_advantages(REWARDS, eps=0.5)[0, 0], -0.9270510, atol=1e-6, rtol=1e-6)


def test_center_by_hand():
    adv = group_advantages(REWARDS, "center")
    close(adv, [[-1.5, -0.5, 0.5, 1.5], [0.0, 0.0, 0.0, 0.0]])


def test_loo_by_hand():
    # r_i - mean of the others:
    # 1 - (2+3+4)/3 = -2;  2 - (1+3+4)/3 = -2/3;  3 - (1+2+4)/3 = 2/3;  4 - (1+2+3)/3 = 2.
    adv = group_advantages(REWARDS, "loo")
    close(adv, [[-2.0, -0.6666667, 0.6666667, 2.0], [0.0, 0.0, 0.0, 0.0]], atol=1e-6, rtol=1e-6)


def test_advantages_do_not_modify_input_and_accept_ints():
    r = REWARDS.clone()
    group_advantages(r, "zscore")
    assert torch.equal(r, REWARDS)
    close(group_advantages(torch.tensor([[0, 2]]), "center"), [[-1.0, 1.0]])


def test_advantages_errors():
    with pytest.raises(ValueError, match="k >= 2"):
        group_advantages(torch.tensor([[1.0], [2.0]]))
    with pytest.raises(ValueError, match="unknown advantage mode"):
        group_advantages(REWARDS, "rank")
    with pytest.raises(ValueError, match="shape"):
        group_advantages(torch.tensor([1.0, 2.0, 3.0]))


def test_zero_std_groups():
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 1e-9, 0.0]])
    assert zero_std_groups(r).tolist() == [False, True, False]
    assert zero_std_groups(r, tol=1e-6).tolist() == [False, True, True]
    assert zero_std_groups(r).dtype == torch.bool


# --------------------------------------------------------------------------- surrogate


def test_token_ratio():
    new = torch.tensor([[0.0, -1.0], [math.log(2.0), -3.0]])
    old = torch.tensor([[0.0, 0.0], [0.0, -3.0 - math.log(0.5)]])
    # exp(0)=1, exp(-1)=0.3678794, exp(ln 2)=2, exp(ln 0.5)=0.5
    close(token_ratio(new, old), [[1.0, 0.3678794], [2.0, 0.5]])


RATIOS = torch.tensor([0.5, 0.9, 1.0, 1.1, 1.5])


def test_surrogate_positive_advantage():
    # A = 2, range [0.8, 1.2]
    # unclipped r*A: 1.0 1.8 2.0 2.2 3.0 ; clipped clip(r)*A: 1.6 1.8 2.0 2.2 2.4
    # min: 1.0 1.8 2.0 2.2 2.4 -> loss = -min; only r=1.5 is clipped (2.4 < 3.0).
    loss, clipped = clipped_surrogate(RATIOS, torch.tensor(2.0))
    close(loss, [-1.0, -1.8, -2.0, -2.2, -2.4])
    assert clipped.tolist() == [False, False, False, False, True]


def test_surrogate_negative_advantage():
    # A = -1: unclipped -0.5 -0.9 -1.0 -1.1 -1.5 ; clipped -0.8 -0.9 -1.0 -1.1 -1.2
    # min: -0.8 -0.9 -1.0 -1.1 -1.5 -> loss 0.8 0.9 1.0 1.1 1.5; only r=0.5 is clipped.
    loss, clipped = clipped_surrogate(RATIOS, torch.tensor(-1.0))
    close(loss, [0.8, 0.9, 1.0, 1.1, 1.5])
    assert clipped.tolist() == [True, False, False, False, False]


def test_surrogate_zero_advantage_never_clipped():
    loss, clipped = clipped_surrogate(RATIOS, torch.tensor(0.0))
    close(loss, [0.0] * 5)
    assert not clipped.any()


def test_surrogate_asymmetric_clip_higher():
    # range [0.8, 1.28]
    # A = +1, r = 0.5 1.25 1.5: unclipped 0.5 1.25 1.5, clipped 0.8 1.25 1.28 -> loss -0.5 -1.25 -1.28
    r = torch.tensor([0.5, 1.25, 1.5])
    loss, clipped = clipped_surrogate(r, torch.tensor(1.0), clip_low=0.2, clip_high=0.28)
    close(loss, [-0.5, -1.25, -1.28])
    assert clipped.tolist() == [False, False, True]
    # symmetric 0.2 clips r=1.25 to 1.2
    loss, clipped = clipped_surrogate(r, torch.tensor(1.0), clip_low=0.2)
    close(loss, [-0.5, -1.2, -1.2])
    assert clipped.tolist() == [False, True, True]
    # A = -1, r = 0.5 0.75 1.5: unclipped -0.5 -0.75 -1.5, clipped -0.8 -0.8 -1.28
    # min -0.8 -0.8 -1.5 -> loss 0.8 0.8 1.5; the low side is still clipped at 0.8.
    r = torch.tensor([0.5, 0.75, 1.5])
    loss, clipped = clipped_surrogate(r, torch.tensor(-1.0), clip_low=0.2, clip_high=0.28)
    close(loss, [0.8, 0.8, 1.5])
    assert clipped.tolist() == [True, True, False]


def test_surrogate_per_sequence_advantages_broadcast():
    ratio = torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.0, 1.5]])
    adv = torch.tensor([[2.0], [-1.0]])
    loss, clipped = clipped_surrogate(ratio, adv)
    # row 0 (A=2): min(1.0,1.6)=1.0, 2.0, min(3.0,2.4)=2.4
    # row 1 (A=-1): min(-0.5,-0.8)=-0.8, -1.0, min(-1.5,-1.2)=-1.5
    close(loss, [[-1.0, -2.0, -2.4], [0.8, 1.0, 1.5]])
    assert clipped.tolist() == [[False, False, True], [True, False, False]]


def test_surrogate_gradient_zero_exactly_where_clipped():
    ratio = torch.tensor([[0.5, 0.9, 1.0, 1.1, 1.5], [0.5, 0.9, 1.0, 1.1, 1.5]], requires_grad=True)
    adv = torch.tensor([[2.0], [-1.0]])
    loss, clipped = clipped_surrogate(ratio, adv)
    loss.sum().backward()
    # d loss / d ratio = -A where unclipped, exactly 0 where clipped
    assert torch.equal(ratio.grad, torch.tensor([[-2.0, -2.0, -2.0, -2.0, 0.0],
                                                 [0.0, 1.0, 1.0, 1.0, 1.0]]))
    assert torch.equal(ratio.grad == 0, clipped)


def test_surrogate_gradient_at_clip_boundary_and_through_logp():
    # clip 0.25: range [0.75, 1.25] (exactly representable). At the boundary the two branches
    # tie, nothing is flagged and the gradient is -A.
    ratio = torch.tensor([0.75, 1.25, 1.5], requires_grad=True)
    loss, clipped = clipped_surrogate(ratio, torch.tensor(1.0), clip_low=0.25)
    loss.sum().backward()
    assert clipped.tolist() == [False, False, True]
    assert ratio.grad.tolist() == [-1.0, -1.0, 0.0]
    # through log-probs: d(-r*A)/d logp_new = -A * r = -2 * 1 = -2 where unclipped
    logp_new = torch.tensor([0.0, math.log(2.0)], requires_grad=True)
    loss, clipped = clipped_surrogate(token_ratio(logp_new, torch.zeros(2)), torch.tensor(2.0))
    loss.sum().backward()
    assert clipped.tolist() == [False, True]
    close(logp_new.grad, [-2.0, 0.0])


def test_surrogate_does_not_modify_inputs():
    r, a = RATIOS.clone(), torch.tensor([2.0, -1.0, 2.0, -1.0, 2.0])
    clipped_surrogate(r, a)
    assert torch.equal(r, RATIOS)
    assert torch.equal(a, torch.tensor([2.0, -1.0, 2.0, -1.0, 2.0]))


# --------------------------------------------------------------------------- KL


def test_kl_estimators_by_hand():
    logp = torch.tensor([0.0, -1.0, -2.0, -0.5])
    ref = torch.tensor([0.0, -2.0, -1.0, -2.5])
    # d = ref - logp = 0, -1, 1, -2
    close(kl_penalty(logp, ref, "k1"), [0.0, 1.0, -1.0, 2.0])
    close(kl_penalty(logp, ref, "k2"), [0.0, 0.5, 0.5, 2.0])
    # k3 = e^d - d - 1: 0, e^-1 = 0.3678794, e - 2 = 0.7182818, e^-2 + 1 = 1.1353353
    close(kl_penalty(logp, ref, "k3"), [0.0, 0.3678794, 0.7182818, 1.1353353])
    close(kl_penalty(logp, ref), [0.0, 0.3678794, 0.7182818, 1.1353353])  # default k3


def test_k3_nonnegative_and_zero_on_equal():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(64, 32, generator=g) * 5
    ref = torch.randn(64, 32, generator=g) * 5
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    assert torch.equal(kl_penalty(logp, logp.clone(), "k3"), torch.zeros(64, 32))


def test_k3_clamped():
    logp = torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64)
    ref = torch.tensor([100.0, -100.0, 1e9], dtype=torch.float64)
    # d clamped to 20: e^20 - 21 = 485165195.40979 - 21 = 485165174.40979
    # d clamped to -20: e^-20 + 19 = 19.0000000021
    k3 = kl_penalty(logp, ref, "k3")
    close(k3, [485165174.40979, 19.0000000021, 485165174.40979], atol=1e-4, rtol=1e-10)
    assert torch.isfinite(kl_penalty(torch.zeros(1), torch.tensor([1e4]), "k3")).all()


def test_kl_unknown_estimator():
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(torch.zeros(2), torch.zeros(2), "k4")


# --------------------------------------------------------------------------- TIS


def test_truncated_importance_weight():
    old = torch.tensor([0.0, -1.0, 0.0, -3.0, 1000.0], requires_grad=True)
    beh = torch.tensor([0.0, 0.0, -1.0, 0.0, 0.0])
    # exp(old - beh) = 1, e^-1 = 0.3678794, e = 2.7182818 -> cap 2, e^-3 = 0.0497871, inf -> cap 2
    w = truncated_importance_weight(old, beh, cap=2.0)
    close(w, [1.0, 0.3678794, 2.0, 0.0497871, 2.0])
    assert not w.requires_grad
    with pytest.raises(ValueError, match="cap"):
        truncated_importance_weight(old, beh, cap=0.0)
    with pytest.raises(ValueError, match="cap"):
        truncated_importance_weight(old, beh, cap=-1.0)


# --------------------------------------------------------------------------- aggregation

# ragged mask: rows with 1, 3 and 0 tokens; masked-out entries hold junk
MASK = torch.tensor([[True, False, False], [True, True, True], [False, False, False]])
PER_TOKEN = torch.tensor([[2.0, 100.0, 100.0], [1.0, 4.0, 7.0], [50.0, 50.0, 50.0]])


def test_aggregation_token_mean():
    # (2 + 1 + 4 + 7) / 4 = 3.5
    close(aggregate(PER_TOKEN, MASK, "token-mean"), 3.5)
    close(aggregate(PER_TOKEN, MASK), 3.5)  # default
    close(aggregation_weights(MASK, "token-mean"), [[0.25, 0, 0], [0.25, 0.25, 0.25], [0, 0, 0]])


def test_aggregation_seq_mean_token_mean():
    # row means 2 and (1+4+7)/3 = 4; the empty row does not count: (2 + 4) / 2 = 3
    close(aggregate(PER_TOKEN, MASK, "seq-mean-token-mean"), 3.0)
    s = 1.0 / 6.0
    close(aggregation_weights(MASK, "seq-mean-token-mean"), [[0.5, 0, 0], [s, s, s], [0, 0, 0]])


def test_aggregation_seq_mean_token_sum():
    # row sums 2 and 12, over 2 non-empty rows: 14 / 2 = 7
    close(aggregate(PER_TOKEN, MASK, "seq-mean-token-sum"), 7.0)
    close(aggregation_weights(MASK, "seq-mean-token-sum"), [[0.5, 0, 0], [0.5, 0.5, 0.5], [0, 0, 0]])


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_aggregation_empty_mask_gives_zero(mode):
    empty = torch.zeros(2, 3, dtype=torch.bool)
    w = aggregation_weights(empty, mode)
    assert torch.equal(w, torch.zeros(2, 3))
    assert float(aggregate(PER_TOKEN[:2], empty, mode)) == 0.0


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_aggregate_ignores_nonfinite_outside_mask(mode):
    junk = PER_TOKEN.clone()
    junk[0, 1] = float("nan")
    junk[2, 0] = float("inf")
    assert torch.equal(aggregate(junk, MASK, mode), aggregate(PER_TOKEN, MASK, mode))


@pytest.mark.parametrize("mode,expected", [("token-mean", 3.5), ("seq-mean-token-mean", 3.0),
                                           ("seq-mean-token-sum", 7.0)])
@pytest.mark.parametrize("bounds", [(0, 1, 3), (0, 2, 3), (0, 1, 2, 3)])
def test_chunked_rows_equal_full(mode, expected, bounds):
    """Weights fixed up front -> per-chunk losses (and their gradients) add up to the full ones."""
    w = aggregation_weights(MASK, mode)
    x_full = PER_TOKEN.clone().requires_grad_(True)
    full = aggregate(x_full, MASK, mode)
    full.backward()

    x = PER_TOKEN.clone().requires_grad_(True)
    total = 0.0
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        part = torch.where(MASK[lo:hi], w[lo:hi] * x[lo:hi], torch.zeros(())).sum()
        part.backward()
        total += float(part.detach())
    assert total == pytest.approx(expected, abs=1e-6)
    assert float(full.detach()) == pytest.approx(expected, abs=1e-6)
    close(x.grad, x_full.grad)
    close(x.grad, w)  # d(sum w*x)/dx = w


def test_aggregation_unknown_mode():
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregation_weights(MASK, "sum")


# --------------------------------------------------------------------------- masked stats


def test_masked_mean():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    m = torch.tensor([[True, False], [True, True]])
    close(masked_mean(x, m), 8.0 / 3.0)  # (1 + 3 + 4) / 3
    assert float(masked_mean(x, torch.zeros(2, 2, dtype=torch.bool))) == 0.0


def test_masked_moments():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    m = torch.tensor([[True, False], [True, True]])
    # values 1, 3, 4: mean 8/3; deviations -5/3, 1/3, 4/3 -> var (25+1+16)/9/3 = 14/9,
    # std = sqrt(14)/3 = 1.2472191; min 1, max 4
    mom = masked_moments(x, m)
    assert set(mom) == {"mean", "std", "min", "max"}
    assert all(isinstance(v, float) for v in mom.values())
    assert mom["mean"] == pytest.approx(2.6666667, abs=1e-6)
    assert mom["std"] == pytest.approx(1.2472191, abs=1e-6)
    assert mom["min"] == 1.0 and mom["max"] == 4.0
    assert masked_moments(x, torch.zeros(2, 2, dtype=torch.bool)) == {
        "mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0}


def test_group_similarity_counts_shared_ngrams_within_groups():
    from dgrpo.learner.grpo import group_similarity
    t = torch.tensor([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1], [1, 1, 1, 1, 1, 1]])
    # groups of 2: two identical samples share every 3-gram; the other pair shares none
    assert group_similarity(t, 2, 3, 10).tolist() == [1.0, 1.0, 0.0, 0.0]
    # one group of 4: sample 0 shares all 4 of its 3-grams with sample 1, none with 2 and 3
    assert group_similarity(t, 4, 3, 10).tolist() == pytest.approx([1 / 3, 1 / 3, 0.0, 0.0])
    with pytest.raises(ValueError, match="do not split into groups"):
        group_similarity(t, 3, 3, 10)
    with pytest.raises(ValueError, match="64-bit hash"):
        group_similarity(t, 2, 16, 66)


def test_token_loss_takes_its_ratio_from_the_surrogate_pair_and_its_kl_from_the_whole_shares():
    from dgrpo.learner.grpo import token_loss
    new = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -2.5]])
    weights, targets, adv = torch.full((1, 2), 0.5), torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 1)
    common = dict(clip_low=0.2, clip_high=None, kl_coef=0.1, kl_estimator="k1")
    whole = token_loss(new, old, ref, adv, weights, targets, **common)
    surrogate_new = new - 0.3  # a weighted-down selection share
    part = token_loss(new, old, ref, adv, weights, targets, surrogate_logps=(surrogate_new, old - 0.3), **common)
    assert torch.allclose(whole.ratio, part.ratio) and torch.allclose(whole.kl, part.kl)  # same log-ratios here
    moved = token_loss(new, old, ref, adv, weights, targets, surrogate_logps=(new - 0.3, old), **common)
    assert torch.allclose(moved.ratio, torch.exp(torch.tensor(-0.3)).expand(1, 2))
    assert torch.allclose(moved.kl, whole.kl)  # the KL penalty ignores the surrogate pair
