"""Tests for rlchat/group_math.py (GRPO / RLOO): values worked out by hand in the comments, float64, atol 1e-6.

Run: PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/test_group_math.py
"""
from __future__ import annotations

import math

import pytest
import torch

from rlchat import group_math as gm

F64 = torch.float64


def t(rows, dtype=F64):
    return torch.tensor(rows, dtype=dtype)


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# two groups of G = 3: rewards [1, 2, 3] and [0, 0, 3]
REWARDS = [1.0, 2.0, 3.0, 0.0, 0.0, 3.0]


def test_group_std_is_the_sample_std_of_each_group():
    # group 1: mean 2, squared deviations 1 + 0 + 1 = 2, / (3 - 1) = 1 -> std 1
    # group 2: mean 1, squared deviations 1 + 1 + 4 = 6, / 2 = 3 -> std sqrt(3)
    close(gm.group_std(t(REWARDS), 3), [1.0, math.sqrt(3.0)])


def test_grpo_advantages_by_hand():
    # group 1: (r - 2) / (1 + 1e-4) = [-1, 0, 1] / 1.0001
    # group 2: (r - 1) / (sqrt 3 + 1e-4) = [-1, -1, 2] / 1.7321508...
    s3 = math.sqrt(3.0) + 1e-4
    close(gm.grpo_advantages(t(REWARDS), 3), [-1 / 1.0001, 0.0, 1 / 1.0001, -1 / s3, -1 / s3, 2 / s3])


def test_grpo_without_scaling_is_the_distance_to_the_group_mean():
    # --no-scale-rewards (Dr. GRPO): r - mean = [-1, 0, 1] and [-1, -1, 2]
    close(gm.grpo_advantages(t(REWARDS), 3, scale=False), [-1.0, 0.0, 1.0, -1.0, -1.0, 2.0])


def test_rloo_advantages_by_hand():
    # group 1, leave-one-out baselines: (2+3)/2 = 2.5, (1+3)/2 = 2, (1+2)/2 = 1.5 -> 1 - 2.5, 2 - 2, 3 - 1.5
    # group 2: (0+3)/2 = 1.5, 1.5, (0+0)/2 = 0 -> -1.5, -1.5, 3
    close(gm.rloo_advantages(t(REWARDS), 3), [-1.5, 0.0, 1.5, -1.5, -1.5, 3.0])
    # the identity of the docstring: k / (k - 1) * (r - mean)
    close(gm.rloo_advantages(t(REWARDS), 3), 1.5 * gm.grpo_advantages(t(REWARDS), 3, scale=False))


def test_groups_of_equal_rewards_get_zero_advantages_not_nan():
    r = t([2.0, 2.0, 2.0, 2.0])
    close(gm.grpo_advantages(r, 2), [0.0, 0.0, 0.0, 0.0])
    close(gm.rloo_advantages(r, 4), [0.0, 0.0, 0.0, 0.0])


def test_advantages_sum_to_zero_in_every_group():
    r = torch.randn(24, dtype=F64, generator=torch.Generator().manual_seed(0))
    for adv in (gm.grpo_advantages(r, 4), gm.grpo_advantages(r, 4, scale=False), gm.rloo_advantages(r, 4)):
        close(adv.reshape(6, 4).sum(dim=1), torch.zeros(6, dtype=F64))


def test_groups_are_consecutive_rows():
    # the same rewards in another group order give the same per-row advantages: nothing mixes groups
    a = gm.grpo_advantages(t([5.0, 1.0, 0.0, 4.0]), 2)  # groups [5, 1], [0, 4]
    b = gm.grpo_advantages(t([0.0, 4.0, 5.0, 1.0]), 2)
    close(a, torch.cat([b[2:], b[:2]]))
    # std of [5, 1]: mean 3, (4 + 4) / 1 = 8 -> 2 sqrt 2; advantage of 5: 2 / (2 sqrt 2 + 1e-4)
    close(a[0], 2 / (2 * math.sqrt(2) + 1e-4))


def test_bad_group_sizes_raise():
    with pytest.raises(ValueError, match="groups of 4"):
        gm.grpo_advantages(t([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), 4)
    with pytest.raises(ValueError, match="at least 2"):
        gm.rloo_advantages(t([1.0, 2.0]), 1)
    close(gm.group_std(t([1.0, 2.0]), 1), [0.0, 0.0])  # G = 1: no spread


def test_sequence_rewards_subtract_the_summed_k1():
    logprobs = t([[-1.0, -2.0, -9.0], [-0.5, -0.5, -0.5]])
    ref = t([[-1.5, -1.0, 7.0], [-0.5, -1.0, -0.25]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    # row 1: k1 = 0.5 + (-1.0) = -0.5 (the masked third token is ignored); row 2: 0 + 0.5 - 0.25 = 0.25
    rewards, kl = gm.sequence_rewards(t([1.0, 2.0]), logprobs, ref, mask, kl_coef=0.1)
    close(kl, [-0.5, 0.25])
    close(rewards, [1.0 + 0.05, 2.0 - 0.025])
    rewards0, _ = gm.sequence_rewards(t([1.0, 2.0]), logprobs, ref, mask, kl_coef=0.0)
    close(rewards0, [1.0, 2.0])


def test_token_advantages_fill_the_real_tokens():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    close(gm.token_advantages(t([0.5, -2.0]), mask), [[0.5, 0.5, 0.0], [-2.0, 0.0, 0.0]])


def test_kl_loss_is_the_mean_k3_and_zero_at_the_reference():
    new = t([[0.0, math.log(2.0), 5.0]], dtype=F64)
    ref = t([[0.0, 0.0, -5.0]])
    mask = torch.tensor([[True, True, False]])
    # token 1: d = 0 -> 0; token 2: d = log 2, ref/pi = 1/2 -> 1/2 - log(1/2) - 1 = log 2 - 1/2 = 0.193147...
    k3 = math.log(2.0) - 0.5
    close(gm.kl_loss(new, ref, mask), k3 / 2)  # mean over the 2 real tokens
    close(gm.kl_loss(new, ref, mask, denominator=4.0), k3 / 4)  # a minibatch of 4 tokens in all
    close(gm.kl_loss(ref, ref, mask), 0.0)


def test_kl_loss_gradient_pulls_towards_the_reference():
    # d k3 / d new = 1 - exp(ref - new): positive when new > ref, so a gradient step lowers new towards ref
    new = t([[0.3, -0.2]]).requires_grad_(True)
    ref = t([[0.0, 0.0]])
    gm.kl_loss(new, ref, torch.tensor([[True, True]])).backward()
    close(new.grad, [[(1 - math.exp(-0.3)) / 2, (1 - math.exp(0.2)) / 2]])
    assert new.grad[0, 0] > 0 > new.grad[0, 1]
