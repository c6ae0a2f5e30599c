"""Critic-free RL math (GRPO, RLOO): advantages from a group of responses to the same prompt, the sequence reward
with its KL penalty, and the k3 KL loss term.

Pure functions on torch tensors, like rlchat/ppo_math.py beside it: no I/O, no models. The group stage step
(rlchat/group_step.py) calls them; tests/test_group_math.py checks them against values worked out by hand.

Layout: a batch of B responses holds B / G groups of G responses each, the G responses to one prompt in
consecutive rows (rows g*G .. g*G + G - 1 are group g). Every function that takes `group_size` raises ValueError
when B is not a multiple of it (the config check reports that to the user first).

References
- Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models",
  https://arxiv.org/abs/2402.03300, section 4.1 (GRPO: outcome advantages normalised within the group, the KL
  to the reference as a k3 loss term instead of a reward penalty).
- Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback
  in LLMs", https://arxiv.org/abs/2402.14740, section 3.2 (RLOO: the mean reward of the other k - 1 samples as the
  baseline; the KL penalty in the sequence reward).
- Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective" (Dr. GRPO),
  https://arxiv.org/abs/2503.20783: dividing by the group std weights easy and hard prompts unequally, hence the
  option to skip it (`scale=False`; TRL's `scale_rewards=False`).
- Schulman, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html (k1, k3).
"""

from __future__ import annotations

import torch

from rlchat.ppo_math import kl_estimate, masked_sum

__all__ = ["grouped", "group_std", "grpo_advantages", "rloo_advantages", "sequence_rewards", "token_advantages",
           "kl_loss"]

STD_EPS = 1e-4  # added to the group std: a group whose rewards are all equal gets advantages 0, not 0 / 0


def grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) -> (B / G, G): row g holds the G values of group g. ValueError if B % G != 0 or G < 1."""
    if group_size < 1 or x.shape[0] % group_size:
        raise ValueError(f"a batch of {x.shape[0]} responses does not split into groups of {group_size}")
    return x.reshape(-1, group_size)


def group_std(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) rewards -> (B / G,) sample std (ddof = 1) of each group's rewards. G = 1 gives 0 (no spread)."""
    g = grouped(rewards, group_size)
    if group_size == 1:
        return torch.zeros(g.shape[0], dtype=rewards.dtype, device=rewards.device)
    return g.std(dim=1, unbiased=True)


def grpo_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True,
                    eps: float = STD_EPS) -> torch.Tensor:
    """GRPO outcome advantages (Shao et al. 2024, eq. 3 / section 4.1.2), one per response:

        A_i = (r_i - mean(r_group)) / (std(r_group) + eps)     scale=True  (GRPO)
        A_i =  r_i - mean(r_group)                              scale=False (Dr. GRPO; TRL scale_rewards=False)

    rewards: (B,) total reward of each response; std is the sample std (ddof = 1, as TRL computes it);
    returns (B,). Within a group the advantages sum to 0; a group with equal rewards gets all 0.
    """
    g = grouped(rewards, group_size)  # (B/G, G)
    centred = g - g.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (group_std(rewards, group_size).unsqueeze(1) + eps)
    return centred.reshape(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO advantages (Ahmadian et al. 2024, eq. 6): each response's baseline is the mean reward of the OTHER
    k - 1 responses to its prompt,

        A_i = r_i - (sum_j r_j - r_i) / (k - 1)  =  k / (k - 1) * (r_i - mean(r_group))

    rewards: (B,); returns (B,). Needs k = group_size >= 2 (ValueError otherwise). Unbiased: the baseline does
    not depend on sample i. Within a group the advantages sum to 0.
    """
    if group_size < 2:
        raise ValueError("RLOO's leave-one-out baseline needs at least 2 responses per prompt")
    g = grouped(rewards, group_size)  # (B/G, G)
    others_mean = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return (g - others_mean).reshape(-1)


def sequence_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                     response_mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The reward of each whole response with the KL penalty folded in (RLOO's choice, Ahmadian et al. 2024 eq. 1):

        kl_i = sum_t (logprob_t - ref_logprob_t)         (k1, summed over the real response tokens)
        r_i  = score_i - kl_coef * kl_i

    scores: (B,); logprobs, ref_logprobs: (B, R) at rollout time; returns (rewards (B,), kl (B,)). kl_coef = 0
    gives the scores unchanged (the KL then lives in the loss: `kl_loss`).
    """
    kl = masked_sum(kl_estimate(logprobs, ref_logprobs, "k1"), response_mask, dim=1)  # (B,)
    return scores - kl_coef * kl, kl


def token_advantages(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(B,) sequence advantages -> (B, R): every real token of response i gets A_i (outcome supervision), padding
    gets 0."""
    adv = advantages.unsqueeze(1).expand(response_mask.shape).to(advantages.dtype)  # (B, R)
    return torch.where(response_mask.bool(), adv, torch.zeros_like(adv))


def kl_loss(new_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, response_mask: torch.Tensor,
            denominator: float | torch.Tensor | None = None) -> torch.Tensor:
    """GRPO's KL term (Shao et al. 2024, eq. 4), Schulman's k3 estimator of KL(pi_theta || pi_ref) per token:

        k3_t = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1  =  expm1(-d_t) + d_t,   d_t = new_t - ref_t

    averaged over the real response tokens (or summed and divided by `denominator`, the token count of the whole
    minibatch, as ppo_math.policy_loss does). new_logprobs: (B, R) with grad; ref_logprobs: (B, R) (the reference
    does not change, so the rollout's values are exact). Returns a 0-dim loss, >= 0, exactly 0 when pi = ref.
    Its gradient is that of KL(pi || ref) in expectation, so adding beta * kl_loss keeps the policy near the
    reference without touching the rewards.
    """
    k3 = kl_estimate(new_logprobs, ref_logprobs.to(new_logprobs.dtype), "k3")  # (B, R)
    total = masked_sum(k3, response_mask)
    if denominator is None:
        return total / response_mask.bool().sum().clamp(min=1).to(total.dtype)
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(device=total.device, dtype=total.dtype)
    return total / denominator
