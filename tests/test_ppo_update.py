"""One PPO update (the function the PPO stage calls once per step) on the tiny model, in one process (fast).

- Direction: after one update the policy puts more log-probability on the tokens of responses with a positive
  advantage and less on those with a negative one (a sign error in GAE, the loss or the update fails this).
- Invariant: grad_accum 1 and 2 over the same minibatch take the same optimizer step (same gradient, same
  parameters after it), and the logged first-epoch losses are the minibatch's token means (a micro-batch divided
  by its own token count instead of the minibatch's fails this).

The model and the fixed rollout (8 ragged responses, two without EOS) are those of tests/dist_worker.py, whose
2-process version of the invariant lives in tests/test_multiprocess.py. Run:
    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_ppo_update.py
"""
from __future__ import annotations

from pathlib import Path

import pytest


def ppo_update_fn():
    """The PPO update, called as update(cfg, model, optimizer, scheduler, accelerator, trainable, ro, advantages,
    returns)."""
    from rlchat.ppo_update import ppo_update

    return ppo_update


@pytest.fixture
def one_thread():
    """One intra-op thread (the tiny model gains nothing from two on a shared 2-core machine; summation order then
    depends on nothing but the inputs); the global RNG (the update shuffles with it) is restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.random.fork_rng():
        yield
    torch.set_num_threads(before)


def setup(model_dir: Path, grad_accum: int, lr: float, **cfg_fields):
    """(cfg, model, optimizer, scheduler, accelerator, trainable, rollout), as the PPO stage builds them."""
    import torch
    from accelerate import Accelerator

    from rlchat.config import PPOConfig
    from tests import dist_worker as W

    cfg = PPOConfig(run_dir="unused", ppo_epochs=1, mini_batches=1, grad_accum=grad_accum, batch_size=W.B, lr=lr,
                    **cfg_fields)
    accelerator = Accelerator(cpu=True)
    model, tok = W.build_model(str(model_dir))
    ro = W.fixed_rollout(model, tok, list(range(W.B)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, eps=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    return cfg, model, optimizer, scheduler, accelerator, trainable, ro


def advantages_and_returns(cfg, ro):
    """Per-token rewards -> GAE, as the PPO stage computes them (steps 5 and 6), but not whitened: the test below
    compares the logged policy loss with minus the advantages' mean, which whitening would set to 0."""
    from rlchat import ppo_math as pm

    rewards, _ = pm.per_token_rewards(ro.scores, ro.logprobs, ro.ref_logprobs, ro.response_mask, cfg.kl_coef)
    return pm.gae(rewards, ro.values, ro.response_mask, cfg.gamma, cfg.lam)  # (B, R), (B, R)


def policy_logprobs(model, ro):
    """(B, R) log-probabilities of the rollout's response tokens under the current policy (0 on padding)."""
    import torch

    with torch.no_grad():
        logprobs = model(ro.input_ids, ro.attention_mask, ro.response_ids)  # the policy role (forward's default)
    return torch.where(ro.response_mask, logprobs, torch.zeros_like(logprobs))


def test_one_update_raises_the_logprob_of_positive_advantage_tokens(tiny_model, one_thread):
    """Rows 0, 1, 4, 5 score +1 and rows 2, 3, 6, 7 score -1 (each group holds one response without EOS). With no
    KL penalty, gamma = lam = 1 and values set to 0, GAE gives every token its row's score as advantage, so one
    update must raise the log-probability of every +1 response and lower that of every -1 response."""
    import torch

    from rlchat import ppo_math as pm
    from rlchat.ppo_step import advantages_and_returns as stage_advantages_and_returns

    cfg, model, optimizer, scheduler, accelerator, trainable, ro = setup(tiny_model, 1, 1e-3, kl_coef=0.0,
                                                                         gamma=1.0, lam=1.0)
    sign = torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0, 1.0, -1.0, -1.0])  # (B,)
    ro.scores = sign.clone()
    ro.values = torch.zeros_like(ro.values)  # the value head's guesses would shift the advantages off +-1
    # the stage's own steps 5-6 (per-token rewards, GAE, whitening): whitening keeps the signs of +-1 scores
    _, _, advantages, returns = stage_advantages_and_returns(cfg, ro, cfg.kl_coef)  # (B, R)
    before = policy_logprobs(model, ro)
    # the update starts from the rollout's policy: the recomputed logprobs are the rollout's (ratio 1)
    torch.testing.assert_close(before, ro.logprobs, atol=1e-5, rtol=0)

    torch.manual_seed(5)
    ppo_update_fn()(cfg, model, optimizer, scheduler, accelerator, trainable, ro, advantages, returns)
    change = pm.masked_sum(policy_logprobs(model, ro) - before, ro.response_mask, dim=1)  # (B,) per response
    print(f"\nchange of each response's log-probability after one update (score +1, +1, -1, -1, +1, +1, -1, -1): "
          f"{[round(c, 4) for c in change.tolist()]}")
    assert torch.all(change * sign > 0), change.tolist()


def one_update(model_dir: Path, grad_accum: int) -> dict:
    """One update of the dist_worker model on its rollout (scores from a seeded generator)."""
    import torch

    from rlchat import ppo_math as pm

    cfg, model, optimizer, scheduler, accelerator, trainable, ro = setup(model_dir, grad_accum, 1e-3)
    advantages, returns = advantages_and_returns(cfg, ro)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    torch.manual_seed(5)  # the same shuffle of the rows for every grad_accum
    stats = ppo_update_fn()(cfg, model, optimizer, scheduler, accelerator, trainable, ro, advantages, returns)
    state = optimizer.optimizer.state if hasattr(optimizer, "optimizer") else optimizer.state
    # first epoch, one minibatch: ratio 1 and new values = old values, so the losses are plain token means
    expected = {"loss/policy": -pm.masked_mean(advantages, ro.response_mask).item(),
                "loss/value": 0.5 * pm.masked_mean((ro.values - returns) ** 2, ro.response_mask).item()}
    return {
        "stats": stats, "expected": expected,
        "params": {n: p.detach().clone() for n, p in zip(names, trainable)},
        # after Adam's first step exp_avg = (1 - beta1) * the clipped gradient: the gradient itself, which the
        # parameters after one Adam step (about lr * sign(gradient) each) mostly hide
        "exp_avg": {n: state[p]["exp_avg"].detach().clone() for n, p in zip(names, trainable)},
        "tokens": int(ro.response_mask.sum()),
    }


def test_grad_accum_1_and_2_take_the_same_update(tiny_model, one_thread):
    one, two = one_update(tiny_model, 1), one_update(tiny_model, 2)
    assert one["params"].keys() == two["params"].keys()
    # the gradient: entries up to ~0.1; splitting the minibatch in two changes only the summation order
    scale = max(v.abs().max().item() for v in one["exp_avg"].values())
    grad_diff = max((one["exp_avg"][k] - two["exp_avg"][k]).abs().max().item() for k in one["exp_avg"])
    param_diff = max((one["params"][k] - two["params"][k]).abs().max().item() for k in one["params"])
    print(f"\ngrad_accum 1 vs 2: exp_avg max abs diff {grad_diff:.3g} (largest entry {scale:.3g}), parameters "
          f"{param_diff:.3g}; losses {one['stats']} / {two['stats']}; expected {one['expected']}")
    assert grad_diff <= 1e-5 * scale, (grad_diff, scale)
    # Adam's first step moves each parameter by about lr = 1e-3; 1e-6 is 0.1% of that step
    assert param_diff <= 1e-6, param_diff
    # the logged losses are the minibatch's token means, however many micro-batches it was cut into
    for run in (one, two):
        for key, value in run["expected"].items():
            assert run["stats"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (key, run["stats"], value)
