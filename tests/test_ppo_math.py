"""Tests for rlchat/ppo_math.py: hand-worked 1x4 / 2x4 cases, plain-loop references and invariants.

Expected values are worked out in the comments next to them. Hand cases use float64 so that the tight tolerance
(atol 1e-6, rtol 0) tests the formula, not float32 rounding. Run: .venv/bin/pytest tests/test_ppo_math.py -q
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlchat import ppo_math as pm

F64 = torch.float64
BIG = 1e6  # "garbage" put at masked positions; must never change an output at a real position


def t(rows, dtype=F64):
    return torch.tensor(rows, dtype=dtype)


def close(actual, expected, atol=1e-6):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def poison(x, mask, value=BIG):
    """A copy of x with every masked position (mask False) replaced by `value`."""
    return torch.where(mask.bool(), x, torch.full_like(x, value))


# ---------------------------------------------------------------------------------------------------------------
# masked statistics
# ---------------------------------------------------------------------------------------------------------------


def test_masked_sum_and_mean_by_hand():
    x = t([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    close(pm.masked_sum(x, mask), 3.0)  # 1 + 2
    close(pm.masked_mean(x, mask), 1.5)  # (1 + 2) / 2
    close(pm.masked_sum(x, mask, dim=1), [3.0, 0.0])
    # row 1 is fully masked: its mean is 0, not NaN
    close(pm.masked_mean(x, mask, dim=1), [1.5, 0.0])
    close(pm.masked_mean(x, mask, dim=0), [1.0, 2.0, 0.0, 0.0])


def test_masked_mean_fully_masked_is_zero_not_nan():
    x = t([[1.0, 2.0, 3.0, 4.0]])
    none = torch.zeros(1, 4, dtype=torch.bool)
    close(pm.masked_mean(x, none), 0.0)
    close(pm.masked_var(x, none), 0.0)
    close(pm.masked_var(x, none, unbiased=False), 0.0)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32])
def test_mask_dtypes_agree(mask_dtype):
    x = t([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]]).to(mask_dtype)
    close(pm.masked_mean(x, mask), 2.0)
    close(pm.masked_var(x, mask), 1.0)


def test_masked_var_by_hand():
    # real values 1, 2, 3 (100 is padding): mean 2, squared deviations 1 + 0 + 1 = 2
    x = t([[1.0, 2.0, 3.0, 100.0]])
    mask = t([[1, 1, 1, 0]]).bool()
    close(pm.masked_var(x, mask), 1.0)  # 2 / (3 - 1)
    close(pm.masked_var(x, mask, unbiased=False), 2.0 / 3.0)  # 2 / 3
    close(pm.masked_var(x, mask), torch.var(x[mask]))
    close(pm.masked_var(poison(x, mask), mask), 1.0)
    # a single real token: no spread, 0 (not NaN from 0 / 0)
    one = t([[0, 0, 1, 0]]).bool()
    close(pm.masked_var(x, one), 0.0)


def test_masked_whiten_by_hand():
    # mean 2, unbiased var 1 -> (x - 2) / sqrt(1 + 1e-8) = [-1, 0, 1], padding -> 0
    x = t([[1.0, 2.0, 3.0, 100.0]])
    mask = t([[1, 1, 1, 0]]).bool()
    close(pm.masked_whiten(x, mask), [[-1.0, 0.0, 1.0, 0.0]])
    # shift_mean=False adds the mean back: [1, 2, 3], padding still 0
    close(pm.masked_whiten(x, mask, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]])


def test_masked_whiten_invariants_and_no_leak():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, generator=g, dtype=F64) * 3.0 + 5.0
    mask = torch.rand(4, 7, generator=g) > 0.3
    mask[2] = False  # a fully masked row inside the batch
    w = pm.masked_whiten(x, mask)
    close(pm.masked_mean(w, mask), 0.0)
    close(pm.masked_var(w, mask), 1.0)
    assert torch.all(w[~mask] == 0)
    close(pm.masked_whiten(poison(x, mask), mask), w, atol=0)
    # shift_mean=False: same spread, original mean
    w_keep = pm.masked_whiten(x, mask, shift_mean=False)
    close(pm.masked_mean(w_keep, mask), pm.masked_mean(x, mask))
    close(pm.masked_var(w_keep, mask), 1.0)


# ---------------------------------------------------------------------------------------------------------------
# KL estimators and per-token rewards
# ---------------------------------------------------------------------------------------------------------------


def test_kl_estimate_by_hand():
    # d = logp - ref = [1, -0.5, 0, 0.5]
    logp = t([[-1.0, -2.0, -0.5, -3.0]])
    ref = t([[-2.0, -1.5, -0.5, -3.5]])
    close(pm.kl_estimate(logp, ref, "k1"), [[1.0, -0.5, 0.0, 0.5]])
    close(pm.kl_estimate(logp, ref), [[1.0, -0.5, 0.0, 0.5]])  # k1 is the default
    # k2 = 0.5 d^2
    close(pm.kl_estimate(logp, ref, "k2"), [[0.5, 0.125, 0.0, 0.125]])
    # k3 = exp(-d) - 1 + d:  e^-1 = 0.36787944;  e^0.5 - 1.5 = 0.14872127;  0;  e^-0.5 - 0.5 = 0.10653066
    close(pm.kl_estimate(logp, ref, "k3"), [[0.36787944, 0.14872127, 0.0, 0.10653066]])


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_is_exactly_zero_when_policy_equals_ref(kind):
    logp = torch.log_softmax(torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(1)), -1)[..., 0]
    kl = pm.kl_estimate(logp, logp.clone(), kind)
    assert torch.equal(kl, torch.zeros_like(kl))


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_unbiased_estimators_average_to_the_true_kl(kind):
    # Exact expectation over a small vocabulary instead of sampling: sum_v p_v * k(log p_v, log q_v) = KL(p || q)
    g = torch.Generator().manual_seed(2)
    logp = torch.log_softmax(torch.randn(6, generator=g, dtype=F64), -1)
    logq = torch.log_softmax(torch.randn(6, generator=g, dtype=F64), -1)
    true_kl = (logp.exp() * (logp - logq)).sum()
    close((logp.exp() * pm.kl_estimate(logp, logq, kind)).sum(), true_kl, atol=1e-12)


def test_kl_estimate_unknown_kind():
    with pytest.raises(ValueError, match="k4"):
        pm.kl_estimate(t([0.0]), t([0.0]), "k4")


def _reward_case():
    scores = t([1.0, 2.0])
    logp = t([[-1.0, -2.0, -0.5, -3.0], [-1.0, -1.0, -1.0, -1.0]])
    ref = t([[-2.0, -1.5, -0.5, -3.5], [-1.2, -0.8, -9.0, -9.0]])
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0]]).bool()
    return scores, logp, ref, mask


def test_per_token_rewards_by_hand():
    scores, logp, ref, mask = _reward_case()
    rewards, kl = pm.per_token_rewards(scores, logp, ref, mask, kl_coef=0.1)
    # row 0: d = [1, -0.5, 0, (masked)] -> kl [1, -0.5, 0, 0]; -0.1 * kl = [-0.1, 0.05, 0, 0];
    #        last real token is index 2: + score 1.0 -> [-0.1, 0.05, 1.0, 0]
    # row 1: d = [0.2, -0.2, (masked), (masked)] -> kl [0.2, -0.2, 0, 0]; -0.1 * kl = [-0.02, 0.02, 0, 0];
    #        last real token is index 1: + score 2.0 -> [-0.02, 2.02, 0, 0]
    close(kl, [[1.0, -0.5, 0.0, 0.0], [0.2, -0.2, 0.0, 0.0]])
    close(rewards, [[-0.1, 0.05, 1.0, 0.0], [-0.02, 2.02, 0.0, 0.0]])


def test_per_token_rewards_k3_and_no_kl_when_equal():
    scores, logp, ref, mask = _reward_case()
    rewards, kl = pm.per_token_rewards(scores, logp, ref, mask, kl_coef=0.5, kl_kind="k3")
    close(kl, pm.kl_estimate(logp, ref, "k3") * mask)
    # policy == ref: rewards are just the scores on the last real token
    rewards, kl = pm.per_token_rewards(scores, logp, logp.clone(), mask, kl_coef=0.5)
    assert torch.equal(kl, torch.zeros_like(kl))
    close(rewards, [[0.0, 0.0, 1.0, 0.0], [0.0, 2.0, 0.0, 0.0]])


def test_per_token_rewards_score_goes_to_last_true_position():
    scores = t([1.0, 2.0, 3.0])
    zeros = torch.zeros(3, 4, dtype=F64)
    # non-contiguous, right-aligned, and fully masked rows
    mask = t([[1, 0, 1, 0], [0, 0, 1, 1], [0, 0, 0, 0]]).bool()
    rewards, kl = pm.per_token_rewards(scores, zeros, zeros, mask, kl_coef=0.1)
    close(rewards, [[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0]])  # row 2: no score
    close(kl, zeros)


def test_per_token_rewards_masked_positions_do_not_leak():
    scores, logp, ref, mask = _reward_case()
    rewards, kl = pm.per_token_rewards(scores, logp, ref, mask, kl_coef=0.1)
    rewards2, kl2 = pm.per_token_rewards(scores, poison(logp, mask), poison(ref, mask, -BIG), mask, 0.1)
    assert torch.equal(rewards, rewards2) and torch.equal(kl, kl2)


# ---------------------------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------------------------


def reference_gae(rewards, values, mask, gamma, lam):
    """Plain-Python GAE: per row, keep only the real tokens, run the textbook backward recursion, put back."""
    adv = [[0.0] * len(row) for row in rewards.tolist()]
    ret = [[0.0] * len(row) for row in rewards.tolist()]
    for b, (r_row, v_row, m_row) in enumerate(zip(rewards.tolist(), values.tolist(), mask.tolist())):
        idx = [i for i, m in enumerate(m_row) if m]
        last_adv, next_value = 0.0, 0.0
        for i in reversed(idx):
            delta = r_row[i] + gamma * next_value - v_row[i]
            last_adv = delta + gamma * lam * last_adv
            adv[b][i] = last_adv
            ret[b][i] = last_adv + v_row[i]
            next_value = v_row[i]
    return torch.tensor(adv, dtype=rewards.dtype), torch.tensor(ret, dtype=rewards.dtype)


def test_gae_gamma1_lam1_is_reward_to_go_minus_value():
    rewards = t([[1.0, 0.0, 0.0, 2.0]])
    values = t([[0.5, 1.0, 1.5, 2.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    adv, ret = pm.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # reward-to-go = [3, 2, 2, 2]; advantages = rtg - V = [2.5, 1.0, 0.5, 0.0]; returns = rtg
    close(adv, [[2.5, 1.0, 0.5, 0.0]])
    close(ret, [[3.0, 2.0, 2.0, 2.0]])


def test_gae_gamma09_lam08_by_hand():
    # position 3 is padding holding garbage (9.0) that must be ignored; gamma * lam = 0.72
    rewards = t([[0.0, 0.0, 1.0, 9.0]])
    values = t([[0.5, 0.4, 0.2, 9.0]])
    mask = t([[1, 1, 1, 0]]).bool()
    adv, ret = pm.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # t=2 (last real token, V_next = 0): delta = 1 + 0.9*0 - 0.2 = 0.8;     A = 0.8;                  ret = 1.0
    # t=1: delta = 0 + 0.9*0.2 - 0.4 = -0.22;  A = -0.22 + 0.72*0.8   = 0.356;    ret = 0.356 + 0.4 = 0.756
    # t=0: delta = 0 + 0.9*0.4 - 0.5 = -0.14;  A = -0.14 + 0.72*0.356 = 0.11632;  ret = 0.11632 + 0.5 = 0.61632
    close(adv, [[0.11632, 0.356, 0.8, 0.0]])
    close(ret, [[0.61632, 0.756, 1.0, 0.0]])


def test_gae_matches_plain_loop_on_random_masks():
    g = torch.Generator().manual_seed(3)
    B, R = 6, 9
    rewards = torch.randn(B, R, generator=g, dtype=F64)
    values = torch.randn(B, R, generator=g, dtype=F64)
    mask = torch.rand(B, R, generator=g) > 0.35  # arbitrary, non-contiguous
    mask[0] = True  # no padding
    mask[1] = False  # fully masked
    mask[2] = torch.arange(R) < 4  # left-aligned (the usual layout)
    mask[3] = torch.arange(R) >= 5  # right-aligned
    for gamma, lam in [(1.0, 1.0), (0.99, 0.95), (0.9, 0.8), (1.0, 0.0)]:
        adv, ret = pm.gae(rewards, values, mask, gamma, lam)
        ref_adv, ref_ret = reference_gae(rewards, values, mask, gamma, lam)
        close(adv, ref_adv)
        close(ret, ref_ret)


def test_gae_equals_trl_style_loop_for_left_aligned_responses():
    # TRL's loop: zero values on padding, run over every position, no mask inside the recursion.
    g = torch.Generator().manual_seed(4)
    rewards = torch.randn(3, 6, generator=g, dtype=F64)
    values = torch.randn(3, 6, generator=g, dtype=F64)
    lengths = torch.tensor([6, 3, 1])
    mask = torch.arange(6) < lengths[:, None]
    rewards, values = rewards * mask, values * mask
    gamma, lam = 0.95, 0.9
    last, cols = torch.zeros(3, dtype=F64), []
    for i in reversed(range(6)):
        next_v = values[:, i + 1] if i < 5 else torch.zeros(3, dtype=F64)
        last = rewards[:, i] + gamma * next_v - values[:, i] + gamma * lam * last
        cols.append(last)
    trl_adv = torch.stack(cols[::-1], dim=1) * mask
    adv, _ = pm.gae(rewards, values, mask, gamma, lam)
    close(adv, trl_adv)


def test_gae_masked_positions_do_not_leak_and_are_zero():
    g = torch.Generator().manual_seed(5)
    rewards = torch.randn(2, 4, generator=g, dtype=F64)
    values = torch.randn(2, 4, generator=g, dtype=F64)
    mask = t([[1, 0, 1, 0], [0, 0, 0, 0]]).bool()
    adv, ret = pm.gae(rewards, values, mask, 0.9, 0.8)
    adv2, ret2 = pm.gae(poison(rewards, mask), poison(values, mask, -BIG), mask, 0.9, 0.8)
    assert torch.equal(adv, adv2) and torch.equal(ret, ret2)
    assert torch.all(adv[~mask] == 0) and torch.all(ret[~mask] == 0)  # includes the fully masked row


# ---------------------------------------------------------------------------------------------------------------
# PPO losses
# ---------------------------------------------------------------------------------------------------------------


def _policy_case():
    # old = 0, so ratio = exp(new) = [1.5, 0.5, 1.1, 0.5]; cliprange 0.2 -> clip to [0.8, 1.2]
    new = t([[math.log(1.5), math.log(0.5), math.log(1.1), math.log(0.5)]]).requires_grad_()
    old = torch.zeros(1, 4, dtype=F64)
    adv = t([[1.0, 1.0, -1.0, -1.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    return new, old, adv, mask


def test_policy_loss_by_hand():
    new, old, adv, mask = _policy_case()
    loss, clipfrac, approx_kl = pm.policy_loss(new, old, adv, mask, cliprange=0.2)
    # per token max(-A*r, -A*clip(r)):
    #   t0 A=+1 r=1.5: max(-1.5, -1.2) = -1.2   clipped (ratio too high for a good action: no more push)
    #   t1 A=+1 r=0.5: max(-0.5, -0.8) = -0.5   unclipped (pessimistic bound keeps the gradient)
    #   t2 A=-1 r=1.1: max( 1.1,  1.1) =  1.1   inside the range, not clipped
    #   t3 A=-1 r=0.5: max( 0.5,  0.8) =  0.8   clipped
    # loss = (-1.2 - 0.5 + 1.1 + 0.8) / 4 = 0.05; clipfrac = 2 / 4 = 0.5
    close(loss, 0.05)
    close(clipfrac, 0.5)
    # approx_kl = mean(0.5 * log(r)^2) = 0.5 * (0.16440195 + 0.48045301 + 0.00908403 + 0.48045301) / 4 = 0.14179900
    close(approx_kl, 0.14179900)
    assert loss.requires_grad and not clipfrac.requires_grad and not approx_kl.requires_grad
    loss.backward()
    # d loss / d new_t = (1/4) * d(-A r)/d new = -A r / 4 where unclipped, 0 where clipped:
    #   t0: 0;  t1: -0.5/4 = -0.125;  t2: 1.1/4 = 0.275;  t3: 0
    close(new.grad, [[0.0, -0.125, 0.275, 0.0]])


def test_policy_loss_gradient_is_zero_exactly_where_clipped():
    g = torch.Generator().manual_seed(6)
    new = (torch.randn(4, 8, generator=g, dtype=F64) * 0.5).requires_grad_()
    old = torch.zeros(4, 8, dtype=F64)
    adv = torch.randn(4, 8, generator=g, dtype=F64)
    mask = torch.ones(4, 8, dtype=torch.bool)
    eps = 0.2
    loss, clipfrac, _ = pm.policy_loss(new, old, adv, mask, eps)
    loss.backward()
    ratio = new.detach().exp()
    clipped = ((adv > 0) & (ratio > 1 + eps)) | ((adv < 0) & (ratio < 1 - eps))
    assert 0 < clipped.sum() < clipped.numel()  # the case covers both kinds of token
    assert torch.all(new.grad[clipped] == 0)
    close(new.grad[~clipped], (-adv * ratio / adv.numel())[~clipped])
    close(clipfrac, clipped.double().mean())


def test_policy_loss_ratio_exactly_at_clip_edge():
    # Pick cliprange so that 1 + eps is exactly the ratio the function computes (float64, exp of the same input).
    new = t([[0.3]]).requires_grad_()
    old = t([[0.1]])
    ratio = torch.exp(new.detach() - old).item()
    eps = ratio - 1.0  # exact: ratio is in [1, 2), so this subtraction has no rounding
    assert 1.0 + eps == ratio
    for a in (1.0, -1.0):
        loss, clipfrac, _ = pm.policy_loss(new, old, t([[a]]), torch.ones(1, 1, dtype=torch.bool), eps)
        close(loss, -a * ratio)  # both terms are equal: the value is -A * ratio either way
        close(clipfrac, 0.0)  # at the edge is not "clipped"


def test_policy_loss_equals_policy_gradient_when_new_equals_old():
    g = torch.Generator().manual_seed(7)
    old = torch.randn(2, 4, generator=g, dtype=F64)
    new = old.clone().requires_grad_()
    adv = torch.randn(2, 4, generator=g, dtype=F64)
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0]]).bool()
    loss, clipfrac, approx_kl = pm.policy_loss(new, old, adv, mask, 0.2)
    close(loss, -adv[mask].mean())  # ratio 1 everywhere
    close(clipfrac, 0.0)
    close(approx_kl, 0.0)
    loss.backward()
    close(new.grad, -adv * mask / mask.sum())


def test_policy_loss_masked_positions_do_not_leak():
    g = torch.Generator().manual_seed(8)
    old = torch.randn(2, 4, generator=g, dtype=F64)
    new_base = old + 0.3 * torch.randn(2, 4, generator=g, dtype=F64)
    adv = torch.randn(2, 4, generator=g, dtype=F64)
    mask = t([[1, 1, 1, 0], [1, 0, 1, 0]]).bool()
    out, grads = [], []
    for new_in, old_in, adv_in in [(new_base, old, adv), (poison(new_base, mask), poison(old, mask, -BIG),
                                                          poison(adv, mask))]:
        new = new_in.clone().requires_grad_()
        loss, clipfrac, approx_kl = pm.policy_loss(new, old_in, adv_in, mask, 0.2)
        loss.backward()
        out.append(torch.stack([loss.detach(), clipfrac, approx_kl]))
        grads.append(new.grad)
    assert torch.equal(out[0], out[1])
    assert torch.equal(grads[0], grads[1])
    assert torch.all(grads[1][~mask] == 0)


def test_losses_fully_masked_batch_are_zero_not_nan():
    new = torch.zeros(2, 4, dtype=F64, requires_grad=True)
    none = torch.zeros(2, 4, dtype=torch.bool)
    loss, clipfrac, approx_kl = pm.policy_loss(new, new.detach() + 1, new.detach() + 1, none, 0.2)
    vloss, vclipfrac = pm.value_loss(new, new.detach() + 1, new.detach() + 1, none, 0.2)
    for x in (loss, clipfrac, approx_kl, vloss, vclipfrac):
        close(x, 0.0)
    (loss + vloss).backward()
    assert torch.equal(new.grad, torch.zeros_like(new))


def _value_case():
    new = t([[0.5, -0.1, 0.3, 0.1]]).requires_grad_()
    old = torch.zeros(1, 4, dtype=F64)
    ret = t([[1.0, 0.0, -0.5, 0.15]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    return new, old, ret, mask


def test_value_loss_by_hand():
    new, old, ret, mask = _value_case()
    loss, clipfrac = pm.value_loss(new, old, ret, mask, cliprange_value=0.2)
    # v_clip = clip(v, -0.2, 0.2) = [0.2, -0.1, 0.2, 0.1]
    #   t0: (0.5-1)^2 = 0.25,   (0.2-1)^2 = 0.64      -> 0.64    clipped term larger
    #   t1: (-0.1-0)^2 = 0.01,  same                  -> 0.01
    #   t2: (0.3+0.5)^2 = 0.64, (0.2+0.5)^2 = 0.49    -> 0.64    unclipped larger
    #   t3: (0.1-0.15)^2 = 0.0025, same               -> 0.0025
    # loss = 0.5 * (0.64 + 0.01 + 0.64 + 0.0025) / 4 = 0.1615625; clipfrac = 1 / 4
    close(loss, 0.1615625)
    close(clipfrac, 0.25)
    assert loss.requires_grad and not clipfrac.requires_grad
    loss.backward()
    # d/dv of 0.5/4 * (v - ret)^2 = (v - ret) / 4 where the unclipped term counts; 0 at t0 (clipped: v_clip const)
    #   t1: -0.1/4 = -0.025;  t2: 0.8/4 = 0.2;  t3: -0.05/4 = -0.0125
    close(new.grad, [[0.0, -0.025, 0.2, -0.0125]])


def test_value_loss_without_clipping_is_half_mse():
    new, old, ret, mask = _value_case()
    loss, clipfrac = pm.value_loss(new, old, ret, mask, cliprange_value=10.0)
    close(loss, 0.5 * ((new.detach() - ret) ** 2).mean())
    close(clipfrac, 0.0)


def test_value_loss_masked_positions_do_not_leak():
    new, old, ret, _ = _value_case()
    mask = t([[1, 0, 1, 0]]).bool()
    a, _ = pm.value_loss(new, old, ret, mask, 0.2)
    (ga,) = torch.autograd.grad(a, new)
    new2 = poison(new.detach(), mask).requires_grad_()
    b, _ = pm.value_loss(new2, poison(old, mask, -BIG), poison(ret, mask), mask, 0.2)
    (gb,) = torch.autograd.grad(b, new2)
    # real tokens t0 and t2 only: 0.5 * (0.64 + 0.64) / 2 = 0.32
    close(a, 0.32)
    assert torch.equal(a, b) and torch.equal(ga, gb)
    assert torch.all(gb[~mask] == 0)


# `denominator`: the token count of a whole minibatch when the caller splits it into micro-batches or processes.
# The numbers below are chosen so that a denominator ignored (the masked mean over this call's tokens), doubled or
# halved gives another value.


def test_policy_loss_denominator_by_hand():
    new, old, adv, _ = _policy_case()
    mask = t([[1, 1, 1, 0]]).bool()  # 3 real tokens; the denominator says the minibatch holds 10
    loss, clipfrac, approx_kl = pm.policy_loss(new, old, adv, mask, cliprange=0.2, denominator=10.0)
    # per-token terms on the real tokens (see test_policy_loss_by_hand): -1.2, -0.5, 1.1; sum -0.6
    # loss = -0.6 / 10 = -0.06   (the masked mean would be -0.6 / 3 = -0.2; twice the denominator -0.03)
    close(loss, -0.06)
    # clipfrac and approx_kl stay means over this call's 3 real tokens: only t0 is clipped -> 1/3;
    # approx_kl = 0.5 * (0.16440195 + 0.48045301 + 0.00908403) / 3 = 0.10898983
    close(clipfrac, 1 / 3)
    close(approx_kl, 0.10898983)
    loss.backward()
    # d loss / d new_t = -A_t r_t / 10 where unclipped: t1 -0.5/10 = -0.05; t2 1.1/10 = 0.11; t0 clipped, t3 masked
    close(new.grad, [[0.0, -0.05, 0.11, 0.0]])


def test_value_loss_denominator_by_hand():
    new, old, ret, mask = _value_case()
    # a float32 tensor denominator (what the PPO stage passes) on float64 values: converted, not broadcast oddly
    loss, clipfrac = pm.value_loss(new, old, ret, mask, cliprange_value=0.2,
                                   denominator=torch.tensor(5.0, dtype=torch.float32))
    # per-token max errors (see test_value_loss_by_hand): 0.64, 0.01, 0.64, 0.0025; sum 1.2925
    # loss = 0.5 * 1.2925 / 5 = 0.12925   (masked mean over 4: 0.1615625; twice the denominator: 0.064625)
    close(loss, 0.12925)
    close(clipfrac, 0.25)
    loss.backward()
    # d/dv = (v - ret) / 5 where the unclipped term counts: t1 -0.1/5 = -0.02; t2 0.8/5 = 0.16; t3 -0.05/5 = -0.01
    close(new.grad, [[0.0, -0.02, 0.16, -0.01]])


def test_micro_batches_with_the_minibatch_denominator_add_up_to_the_minibatch_loss():
    """Two ragged micro-batches (3 and 1 real tokens), each divided by the minibatch's 4 tokens: their losses and
    gradients add up to the minibatch's masked mean. Each divided by its own count (the denominator ignored) they
    would weigh the lone token of row 1 as much as the three of row 0."""
    g = torch.Generator().manual_seed(11)
    old = torch.randn(2, 4, generator=g, dtype=F64)
    new_all = old + 0.3 * torch.randn(2, 4, generator=g, dtype=F64)
    adv = torch.randn(2, 4, generator=g, dtype=F64)
    values_old = torch.randn(2, 4, generator=g, dtype=F64)
    values_all = values_old + 0.3 * torch.randn(2, 4, generator=g, dtype=F64)
    returns = torch.randn(2, 4, generator=g, dtype=F64)
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0]]).bool()
    n_tokens = mask.sum()  # 4

    def both(new, values, rows, denominator):
        pl, _, _ = pm.policy_loss(new, old[rows], adv[rows], mask[rows], 0.2, denominator)
        vl, _ = pm.value_loss(values, values_old[rows], returns[rows], mask[rows], 0.2, denominator)
        return pl, vl

    new = new_all.clone().requires_grad_()
    values = values_all.clone().requires_grad_()
    whole = both(new, values, slice(None), None)  # one call: the masked mean over all 4 tokens
    (whole[0] + whole[1]).backward()

    parts, grad_new, grad_values = [0.0, 0.0], torch.zeros_like(new_all), torch.zeros_like(values_all)
    for row in (0, 1):
        new_r = new_all[row:row + 1].clone().requires_grad_()
        values_r = values_all[row:row + 1].clone().requires_grad_()
        pl, vl = both(new_r, values_r, slice(row, row + 1), n_tokens)
        (pl + vl).backward()
        parts = [parts[0] + pl.detach(), parts[1] + vl.detach()]
        grad_new[row], grad_values[row] = new_r.grad[0], values_r.grad[0]
    close(parts[0], whole[0].detach(), atol=1e-12)
    close(parts[1], whole[1].detach(), atol=1e-12)
    close(grad_new, new.grad, atol=1e-12)
    close(grad_values, values.grad, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# from logits
# ---------------------------------------------------------------------------------------------------------------


def test_entropy_from_logits():
    close(pm.entropy_from_logits(torch.zeros(4, dtype=F64)), math.log(4))  # uniform over 4
    close(pm.entropy_from_logits(t([1000.0, 1000.0, -1000.0])), math.log(2))  # no overflow
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(2, 3, 7, generator=g, dtype=F64) * 4
    ent = pm.entropy_from_logits(logits)
    assert ent.shape == (2, 3)
    close(ent, torch.distributions.Categorical(logits=logits).entropy())


def test_entropy_with_banned_tokens_is_finite_with_finite_grad():
    logits = t([0.0, 0.0, float("-inf"), float("-inf")]).requires_grad_()
    ent = pm.entropy_from_logits(logits)
    close(ent, math.log(2))
    ent.backward()
    assert torch.all(torch.isfinite(logits.grad))


def test_logprobs_from_logits_matches_log_softmax_gather():
    g = torch.Generator().manual_seed(10)
    logits = torch.randn(2, 3, 11, generator=g) * 3
    labels = torch.randint(0, 11, (2, 3), generator=g)
    expected = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    close(pm.logprobs_from_logits(logits, labels), expected)
    # temperature T: log_softmax(logits / T), not log_softmax(logits) / T
    expected_t = torch.log_softmax(logits / 0.7, -1).gather(-1, labels[..., None]).squeeze(-1)
    close(pm.logprobs_from_logits(logits, labels, temperature=0.7), expected_t)
    assert not torch.allclose(expected_t, expected)
    # bf16 logits are computed in float32
    low = logits.bfloat16()
    out = pm.logprobs_from_logits(low, labels)
    assert out.dtype == torch.float32
    close(out, torch.log_softmax(low.float(), -1).gather(-1, labels[..., None]).squeeze(-1))
    with pytest.raises(ValueError, match="temperature"):
        pm.logprobs_from_logits(logits, labels, temperature=0.0)


def test_logprobs_from_logits_gradient_matches():
    g = torch.Generator().manual_seed(11)
    a = torch.randn(2, 5, generator=g, dtype=F64, requires_grad=True)
    b = a.detach().clone().requires_grad_()
    labels = torch.tensor([1, 4])
    pm.logprobs_from_logits(a, labels).sum().backward()
    torch.log_softmax(b, -1).gather(-1, labels[:, None]).sum().backward()
    close(a.grad, b.grad)


def test_explained_variance():
    returns = t([[1.0, 2.0, 3.0, 50.0]])
    mask = t([[1, 1, 1, 0]]).bool()
    # residual [0, 0, -1]: var = 2/9; var(returns) = 2/3 -> 1 - (2/9)/(2/3) = 2/3
    close(pm.explained_variance(t([[1.0, 2.0, 4.0, -7.0]]), returns, mask), 2.0 / 3.0)
    close(pm.explained_variance(returns, returns, mask), 1.0)  # perfect value head
    close(pm.explained_variance(torch.full_like(returns, 2.0), returns, mask), 0.0)  # predicts the mean
    # constant returns: undefined ratio -> 0.0, never NaN
    close(pm.explained_variance(t([[0.0, 1.0, 2.0, 3.0]]), t([[5.0, 5.0, 5.0, 1.0]]), mask), 0.0)


# ---------------------------------------------------------------------------------------------------------------
# KL controllers
# ---------------------------------------------------------------------------------------------------------------


def test_fixed_kl_controller():
    ctl = pm.FixedKLController(0.05)
    ctl.update(100.0, 64)
    assert ctl.value == 0.05
    other = pm.FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


def test_adaptive_kl_controller_direction_and_values():
    # init 0.1, target 6, horizon 10000, n_steps 256: value *= 1 + clip(kl/6 - 1, -0.2, 0.2) * 0.0256
    def after(kl):
        ctl = pm.AdaptiveKLController(0.1, target=6.0, horizon=10000)
        ctl.update(kl, 256)
        return ctl.value

    assert after(12.0) == pytest.approx(0.1 * 1.00512, abs=1e-12)  # error 1.0 clipped to 0.2
    assert after(6.6) == pytest.approx(0.1 * 1.00256, abs=1e-12)  # error 0.1
    assert after(6.0) == pytest.approx(0.1, abs=1e-12)  # on target: unchanged
    assert after(3.0) == pytest.approx(0.1 * 0.99488, abs=1e-12)  # error -0.5 clipped to -0.2
    assert after(torch.tensor(12.0)) == pytest.approx(0.1 * 1.00512, abs=1e-12)  # tensors accepted
    assert after(12.0) > 0.1 > after(3.0)


def test_adaptive_kl_controller_resume_is_exact():
    kls = [8.0, 7.1, 2.0, 6.3, 9.9, 5.5]
    full = pm.AdaptiveKLController(0.2, target=6.0, horizon=1000)
    for kl in kls:
        full.update(kl, 32)
    first = pm.AdaptiveKLController(0.2, target=6.0, horizon=1000)
    for kl in kls[:3]:
        first.update(kl, 32)
    saved = json.loads(json.dumps(first.state_dict()))  # checkpoints may store it as JSON
    resumed = pm.AdaptiveKLController(123.0, target=6.0, horizon=1000)
    resumed.load_state_dict(saved)
    for kl in kls[3:]:
        resumed.update(kl, 32)
    assert resumed.value == full.value  # bit-exact
    assert resumed.state_dict() == full.state_dict()


def test_adaptive_kl_controller_rejects_bad_settings():
    with pytest.raises(ValueError):
        pm.AdaptiveKLController(0.1, target=0.0, horizon=10)
    with pytest.raises(ValueError):
        pm.AdaptiveKLController(0.1, target=1.0, horizon=0)


def test_module_imports_torch_only():
    import ast
    import pathlib

    tree = ast.parse(pathlib.Path(pm.__file__).read_text())
    imported = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert imported <= {"torch", "__future__"}
