"""One PPO update: `ppo_epochs` passes over a batch of rollouts (rlchat/rollout.py::Rollout) in `mini_batches`
shuffled minibatches, each one optimizer step accumulated over `grad_accum` micro-batches.

    stats = ppo_update(cfg, model, optimizer, scheduler, accelerator, trainable, rollout, advantages, returns,
                       reduce=dist.all_sum if processes > 1 else None)

The losses are rlchat/ppo_math.py's (clipped policy loss + vf_coef * clipped value loss, token means over the
minibatch); this file slices the batch, runs the model's training passes, and steps the optimizer and scheduler.
"""
from __future__ import annotations


class NonFiniteLoss(ArithmeticError):
    """A policy or value loss came out NaN or infinite; the PPO loop turns it into a one-line error."""

    def __init__(self, which: str, value: float):
        super().__init__(f"the {which} loss is NaN or infinite ({value})")
        self.which, self.value = which, value


def ppo_update(cfg, model, optimizer, scheduler, accelerator, trainable, ro, advantages, returns,
               reduce=None) -> dict:
    """ppo_epochs passes over the rollout in mini_batches minibatches of grad_accum micro-batches.

    Each loss is a token-level mean over the whole minibatch: every micro-batch's masked sum is divided by the
    minibatch's token count, over all processes when `reduce` sums across them (DDP then averages the processes'
    gradients, so the count is divided by the number of processes). Two processes holding halves of a batch take
    the same optimizer step as one process holding all of it.

    Returns the step's averaged statistics (loss/policy, loss/value, policy/clipfrac, policy/approx_kl,
    value/clipfrac). Raises NonFiniteLoss (before its backward) when a loss is NaN or infinite."""
    import torch

    from rlchat import ppo_math as pm
    from rlchat.actor_critic import POLICY, POLICY_AND_VALUE, VALUE

    core_of = accelerator.unwrap_model
    sums = {"loss/policy": 0.0, "loss/value": 0.0, "policy/clipfrac": 0.0, "policy/approx_kl": 0.0,
            "value/clipfrac": 0.0}
    n = 0  # micro-batches (for the per-micro-batch fractions); the losses are per optimizer step
    batches = MicroBatches(cfg, ro, accelerator, optimizer, scheduler, trainable, reduce)
    for idx, (p_ids, p_mask, r_ids, r_mask), denom in batches:
        input_ids = torch.cat([p_ids, r_ids], dim=1)  # (b, T')
        attention_mask = torch.cat([p_mask, r_mask], dim=1)  # (b, T')
        R = r_ids.shape[1]
        if core_of(model).shared_critic:
            # one pass: the value head reads the policy's hidden states
            new_logprobs, new_values = model(input_ids, attention_mask, r_ids, POLICY_AND_VALUE)
            pl, clipfrac, approx_kl = pm.policy_loss(new_logprobs, ro.logprobs[idx, :R],
                                                     advantages[idx, :R], r_mask, cfg.cliprange, denom)
            vl, vclipfrac = pm.value_loss(new_values, ro.values[idx, :R], returns[idx, :R], r_mask,
                                          cfg.cliprange_value, denom)
            check_loss(pl, "policy")
            check_loss(vl, "value")
            accelerator.backward(pl + cfg.vf_coef * vl)
        else:
            # policy, then value: one role's activations at a time (their parameters are disjoint, so
            # two backward passes give the gradient of policy_loss + vf_coef * value_loss)
            new_logprobs = model(input_ids, attention_mask, r_ids, POLICY)  # (b, R')
            pl, clipfrac, approx_kl = pm.policy_loss(new_logprobs, ro.logprobs[idx, :R],
                                                     advantages[idx, :R], r_mask, cfg.cliprange, denom)
            check_loss(pl, "policy")
            accelerator.backward(pl)
            del new_logprobs
            new_values = model(input_ids, attention_mask, r_ids, VALUE)  # (b, R')
            vl, vclipfrac = pm.value_loss(new_values, ro.values[idx, :R], returns[idx, :R], r_mask,
                                          cfg.cliprange_value, denom)
            check_loss(vl, "value")
            accelerator.backward(cfg.vf_coef * vl)
            del new_values
        sums["loss/policy"] += pl.item()  # micro-batch parts of the minibatch's token mean: they add up
        sums["loss/value"] += vl.item()
        sums["policy/clipfrac"] += clipfrac.item()
        sums["policy/approx_kl"] += approx_kl.item()
        sums["value/clipfrac"] += vclipfrac.item()
        n += 1
    return {k: v / max(batches.updates if k.startswith("loss/") else n, 1) for k, v in sums.items()}


class MicroBatches:
    """Iterate (idx, (prompt_ids, prompt_mask, response_ids, response_mask), denominator) over every micro-batch of
    ppo_epochs passes x mini_batches shuffled minibatches x grad_accum micro-batches of a rollout; after the last
    micro-batch of each minibatch (the caller has run its backward passes) clip the gradient norm and step the
    optimizer and scheduler. `denominator` is the minibatch's response-token count over all processes divided by
    the number of processes (see ppo_update); `updates` counts the optimizer steps taken.
    Used by ppo_update and by grpo/rloo's group_update (rlchat/group_step.py)."""

    def __init__(self, cfg, ro, accelerator, optimizer, scheduler, trainable, reduce=None):
        self.cfg, self.ro, self.accelerator, self.reduce = cfg, ro, accelerator, reduce
        self.optimizer, self.scheduler, self.trainable = optimizer, scheduler, trainable
        self.updates = 0

    def __iter__(self):
        import torch

        cfg, ro = self.cfg, self.ro
        B = len(ro)
        mini = B // cfg.mini_batches
        micro = mini // cfg.grad_accum
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(B)
            for m in range(cfg.mini_batches):
                mb = order[m * mini:(m + 1) * mini]
                n_tokens = ro.response_mask[mb.to(ro.response_mask.device)].sum().float()
                world = 1
                if self.reduce is not None:
                    n_tokens, world = self.reduce(n_tokens), self.accelerator.num_processes
                denom = (n_tokens / world).clamp(min=1.0 / world)
                for a in range(cfg.grad_accum):
                    idx = mb[a * micro:(a + 1) * micro].to(ro.prompt_ids.device)
                    yield idx, _trim(ro, idx), denom
                self.accelerator.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.updates += 1


def check_loss(loss, which: str) -> None:
    import torch

    if not torch.isfinite(loss):
        raise NonFiniteLoss(which, loss.item())


def _trim(ro, idx):
    """The rows `idx` of prompt/response ids and masks, without columns that are padding in every one of them
    (left padding of the prompts, tail of the responses): less compute, same result (positions count real
    tokens only, and the tail comes after every real token)."""
    p_mask = ro.prompt_mask[idx]  # (b, P)
    r_mask = ro.response_mask[idx]  # (b, R)
    first = int(p_mask.any(dim=0).long().argmax())  # first prompt column with a real token in some row
    R = max(1, int(r_mask.sum(dim=1).max()))
    return ro.prompt_ids[idx, first:], p_mask[:, first:], ro.response_ids[idx, :R], r_mask[:, :R]
