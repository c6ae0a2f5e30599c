"""One GRPO / RLOO step (`rlchat grpo`, `rlchat rloo`): the PPO loop's step with group advantages, no value model.

rlchat/stages/ppo.py runs the loop for all three algorithms (checkpoints, resume, metrics, held-out scores,
multi-process rules); for grpo/rloo it calls this step instead of ppo_step.ppo_step, and step 8 (the metrics row)
is ppo_step.step_metrics for all of them:

    out = group_step(cfg, setup)            # steps 1-7 below; setup is ppo_step.PPOSetup
    row = step_metrics(setup, loop, out)    # step 8

  1. batch_size / G prompts (G = num_generations; each process its own), each repeated G times in consecutive rows
  2. sample a response per row (the G rows of a prompt differ by sampling)
  3. the rollout pass: policy and reference logprobs, the reward adapter's score (no value rows: the reference,
     the policy and the reward adapter are the only roles)
  4. score: reward sources combined and normalised, missing-EOS penalty (as PPO)
  5. the reward of each response: its score; with kl_in 'reward' minus kl_coef * sum_t k1_t
  6. advantages from the group (rlchat/group_math.py): GRPO (r - mean) / std, or r - mean with
     --no-scale-rewards; RLOO r - mean of the others; every token of a response gets its advantage. A process
     samples whole groups, so no statistic crosses processes
  7. ppo_epochs x mini_batches optimizer steps of grad_accum micro-batches (ppo_update.MicroBatches), ONE policy
     pass each: clipped-ratio loss (ppo_math.policy_loss) + with kl_in 'loss' kl_coef * k3 to the reference
     (group_math.kl_loss; the reference's logprobs from the rollout are exact: it never changes)

Metrics beside PPO's (there are no value/* keys):
    objective/rewards    mean reward of a response: the score, minus kl_coef * KL with kl_in 'reward'
    loss/kl              the k3 KL term before kl_coef (0 with kl_in 'reward'), averaged like loss/policy
    group/reward_std     mean std (ddof 1) of the rewards within a group
    group/zero_std_frac  fraction of groups whose G rewards are all equal: their advantages are 0, no signal
"""
from __future__ import annotations

import time


def group_step(cfg, s):
    """Steps 1-7 on ppo_step.PPOSetup `s`; returns a ppo_step.StepOutput with `returns` None and `rewards` (B, 1)."""
    from rlchat import group_math as gm
    from rlchat.ppo_step import StepOutput, rollout_and_score

    G = cfg.num_generations
    t0 = time.perf_counter()
    ro, parts, t1 = rollout_and_score(cfg, s, repeat=G)  # steps 1-4
    t2 = time.perf_counter()

    # 5. the reward of each response, with the KL penalty when it lives in the reward
    kl_coef = s.kl_ctl.value
    in_reward = kl_coef if cfg.kl_in == "reward" else 0.0
    rewards, _ = gm.sequence_rewards(ro.scores, ro.logprobs, ro.ref_logprobs, ro.response_mask, in_reward)  # (B,)
    kl = ro.logprobs - ro.ref_logprobs  # (B, R) k1 per token (0 on padding: the rollout zeroes both there)

    # 6. advantages from the group, the same for every token of a response
    if cfg.stage == "rloo":
        adv = gm.rloo_advantages(rewards, G)  # (B,)
    else:
        adv = gm.grpo_advantages(rewards, G, scale=cfg.scale_rewards)  # (B,)
    advantages = gm.token_advantages(adv, ro.response_mask)  # (B, R)

    # 7. the clipped-ratio updates, one policy pass per micro-batch
    stats = group_update(cfg, s, ro, advantages, kl_coef if cfg.kl_in == "loss" else 0.0)
    std = gm.group_std(rewards, G)  # (B/G,)
    stats["group/reward_std"] = std.mean().item()
    stats["group/zero_std_frac"] = (std == 0).float().mean().item()
    return StepOutput(ro, parts, rewards.unsqueeze(1), kl, None, stats, kl_coef,
                      (t0, t1, t2, time.perf_counter()))


def group_update(cfg, s, ro, advantages, kl_coef: float) -> dict:
    """ppo_epochs x mini_batches optimizer steps over the rollout: policy_loss(ratio clipped at cliprange) +
    kl_coef * kl_loss (k3 to the reference; skipped when kl_coef is 0), token means over each minibatch (all
    processes), as ppo_update computes them. Returns loss/policy, loss/kl (per optimizer step), policy/clipfrac,
    policy/approx_kl (per micro-batch). Raises ppo_update.NonFiniteLoss before a NaN/inf loss's backward."""
    import torch

    from rlchat import group_math as gm
    from rlchat import ppo_math as pm
    from rlchat.actor_critic import POLICY
    from rlchat.ppo_update import MicroBatches, check_loss

    sums = {"loss/policy": 0.0, "loss/kl": 0.0, "policy/clipfrac": 0.0, "policy/approx_kl": 0.0}
    n = 0
    batches = MicroBatches(cfg, ro, s.accelerator, s.optimizer, s.scheduler, s.trainable, s.reduce)
    for idx, (p_ids, p_mask, r_ids, r_mask), denom in batches:
        R = r_ids.shape[1]
        new_logprobs = s.model(torch.cat([p_ids, r_ids], dim=1), torch.cat([p_mask, r_mask], dim=1), r_ids,
                               POLICY)  # (b, R')
        pl, clipfrac, approx_kl = pm.policy_loss(new_logprobs, ro.logprobs[idx, :R], advantages[idx, :R], r_mask,
                                                 cfg.cliprange, denom)
        check_loss(pl, "policy")
        loss = pl
        if kl_coef > 0:
            kl = gm.kl_loss(new_logprobs, ro.ref_logprobs[idx, :R], r_mask, denom)
            check_loss(kl, "KL")
            loss = pl + kl_coef * kl
            sums["loss/kl"] += kl.item()
        s.accelerator.backward(loss)
        sums["loss/policy"] += pl.item()  # micro-batch parts of the minibatch's token mean: they add up
        sums["policy/clipfrac"] += clipfrac.item()
        sums["policy/approx_kl"] += approx_kl.item()
        n += 1
    return {k: v / max(batches.updates if k.startswith("loss/") else n, 1) for k, v in sums.items()}
