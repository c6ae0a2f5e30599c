"""PPO math for RLHF: masked statistics, KL estimates, per-token rewards, GAE, PPO losses, KL controllers.

Pure functions on torch tensors: no I/O, no models, nothing imported but torch. The PPO stage
(`rlchat/stages/ppo.py`) calls them; `tests/test_ppo_math.py` checks them against hand-worked values.

Shapes: `B` batch, `R` response length, `V` vocabulary. Every per-token tensor is (B, R), aligned with the
response tokens (position t holds the quantity for response token t).

Masks: `response_mask` (bool, or 0/1 of any dtype) is True/1 on real response tokens and False/0 on padding.
One name, one polarity, everywhere. Values at masked positions never reach an output at a real position: they
are replaced with `torch.where` before any arithmetic, so even inf or NaN there cannot leak (in the forward
pass). Outputs at masked positions are 0.

References
- Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO: A Case Study on TL;DR Summarization",
  https://arxiv.org/abs/2403.17031 (per-token KL penalty, score on the last token, whitening, clipped losses).
- Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", https://arxiv.org/abs/1909.08593
  (the adaptive KL controller, section 2.2).
- Schulman et al. 2015, "High-Dimensional Continuous Control Using Generalized Advantage Estimation",
  https://arxiv.org/abs/1506.02438 (GAE).
- Schulman, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html (k1, k2, k3).

Left out on purpose: sequence-level loss aggregation (losses here are token-level means over the whole batch,
as in TRL's PPO trainer), entropy bonuses and any distributed reduction (the caller owns those).
"""

from __future__ import annotations

import torch

__all__ = [
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "kl_estimate",
    "per_token_rewards",
    "gae",
    "policy_loss",
    "value_loss",
    "entropy_from_logits",
    "logprobs_from_logits",
    "explained_variance",
    "FixedKLController",
    "AdaptiveKLController",
]

KL_KINDS = ("k1", "k2", "k3")


def _bool_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`mask` as bool, broadcast to the shape of `x` (so counts are per element of `x`)."""
    return torch.broadcast_to(mask.to(device=x.device).bool(), x.shape)


# ---------------------------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------------------------


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `x` over the positions where `mask` is True.

    x: any shape, e.g. (B, R); mask: same shape or broadcastable to it, True = count this position.
    sum = sum_i x_i * m_i (masked entries are replaced by 0, never multiplied, so inf/NaN there cannot leak).
    dim=None sums everything (0-dim result); otherwise sums along `dim` (e.g. dim=1 -> (B,)).
    """
    mask = _bool_mask(x, mask)
    kept = torch.where(mask, x, torch.zeros_like(x))
    return kept.sum() if dim is None else kept.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is True.

    mean = sum_i x_i * m_i / sum_i m_i. A fully masked tensor (dim=None) or row (along `dim`) gives 0, not NaN:
    the count is clamped to at least 1 and the masked sum is 0.
    """
    mask = _bool_mask(x, mask)
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return masked_sum(x, mask, dim=dim) / count.clamp(min=1).to(x.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, reduce=None) -> torch.Tensor:
    """Variance of `x` over all positions where `mask` is True (one scalar over the whole tensor).

    With n = sum_i m_i and mu = masked_mean(x, mask):
        var = sum_i m_i * (x_i - mu)^2 / (n - 1)   if unbiased (Bessel's correction, as TRL's masked_var)
        var = sum_i m_i * (x_i - mu)^2 / n         otherwise
    n == 0 gives 0; n == 1 with unbiased=True also gives 0 (one sample shows no spread), never NaN.

    reduce: None, or a function that sums a tensor over all processes of a data-parallel run (e.g.
    `rlchat.dist.all_sum`); then n, mu and the squared deviations are those of every process's x together, so
    each process gets the variance of the global batch (the same number a single process holding it all gets).
    """
    mu, n = _global_mean(x, mask, reduce)
    sum_sq = masked_sum((x - mu) ** 2, mask)
    if reduce is not None:
        sum_sq = reduce(sum_sq)
    denom = n - 1 if unbiased else n
    return sum_sq / denom.clamp(min=1)


def _global_mean(x: torch.Tensor, mask: torch.Tensor, reduce) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked mean, masked count) of x, over all processes when `reduce` sums across them."""
    mask = _bool_mask(x, mask)
    if reduce is None:
        return masked_mean(x, mask), mask.sum().to(x.dtype)
    both = reduce(torch.stack([masked_sum(x, mask).detach(), mask.sum().to(x.dtype)]))  # (2,)
    return both[0] / both[1].clamp(min=1), both[1]


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8, reduce=None
) -> torch.Tensor:
    """Normalise `x` to zero mean and unit variance using statistics of the masked positions only.

        whitened_i = (x_i - mu) / sqrt(var + eps)          (mu, var = masked_mean, unbiased masked_var)
        if not shift_mean: whitened_i += mu                (keep the mean; TRL does this for rewards)
        whitened_i = 0 where mask is False

    Used on advantages (shift_mean=True) before the policy loss, as in the N+ implementation details (#17).
    The result has masked mean ~0 (or mu when shift_mean=False) and unbiased masked variance ~1.
    reduce: as in masked_var; with it every process whitens its part with the statistics of the global batch.
    """
    mask = _bool_mask(x, mask)
    mu, _ = _global_mean(x, mask, reduce)
    var = masked_var(x, mask, unbiased=True, reduce=reduce)
    whitened = (x - mu) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mu
    return torch.where(mask, whitened, torch.zeros_like(whitened))


# ---------------------------------------------------------------------------------------------------------------
# KL and rewards
# ---------------------------------------------------------------------------------------------------------------


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi (Schulman's k1/k2/k3).

    logprobs, ref_logprobs: (B, R) log pi(a_t|s_t) and log ref(a_t|s_t) of the sampled tokens.
    With d = logprobs - ref_logprobs and r = ref/pi = exp(-d):
        k1 = d                      unbiased, high variance, can be negative per token
        k2 = 0.5 * d^2              biased (low bias near ref), always >= 0
        k3 = (r - 1) - log r        unbiased, always >= 0; computed as expm1(-d) + d for precision
    All three are exactly 0 where logprobs == ref_logprobs. Returns (B, R), no masking (see per_token_rewards).
    Unknown `kind` -> ValueError.
    """
    d = logprobs - ref_logprobs
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d**2
    if kind == "k3":
        return torch.expm1(-d) + d
    raise ValueError(f"unknown KL estimator kind {kind!r}; expected one of {', '.join(KL_KINDS)}")


def per_token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float | torch.Tensor,
    kl_kind: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: a KL penalty on every real token plus the reward-model score on the last one.

    scores: (B,) reward-model score of each response. logprobs, ref_logprobs, response_mask: (B, R).
        kl_t      = kl_estimate(logprobs_t, ref_logprobs_t, kl_kind)   on real tokens, 0 on masked ones
        rewards_t = -kl_coef * kl_t
        rewards_{last} += score,  last = the last position where response_mask is True in that row
    Responses are normally left-aligned (real tokens first, then padding), but only the last True position
    is used, so any mask layout works. A row with no real token gets no score: its rewards are all 0.
    N+ implementation details #10 (per-token KL penalty, score at the EOS/last token).

    Returns (rewards (B, R), kl (B, R)); kl is what the KL controller and the logs should see.
    Pass detached tensors (rollout quantities); this is not meant to be differentiated.
    """
    mask = _bool_mask(logprobs, response_mask)
    zeros = torch.zeros_like(logprobs)
    kl = torch.where(mask, kl_estimate(logprobs, ref_logprobs, kl_kind), zeros)  # (B, R)
    rewards = torch.where(mask, -kl_coef * kl, zeros)  # (B, R)

    R = logprobs.shape[-1]
    positions = torch.arange(R, device=logprobs.device).expand_as(mask)  # (B, R)
    last = torch.where(mask, positions, torch.full_like(positions, -1)).max(dim=-1).values  # (B,)
    has_token = last >= 0  # (B,)
    rows = torch.arange(logprobs.shape[0], device=logprobs.device)[has_token]
    rewards = rewards.clone()
    rewards[rows, last[has_token]] += scores.to(rewards.dtype)[has_token]
    return rewards, kl


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens (Schulman et al. 2015, eq. 16).

    rewards, values, response_mask: (B, R). Walking backwards over the real tokens t of a row:
        delta_t = r_t + gamma * V_next - V_t
        A_t     = delta_t + gamma * lam * A_next
        returns_t = A_t + V_t
    where "next" is the next REAL token of the row; after the last real token V_next = 0 and A_next = 0
    (the episode ends there, nothing to bootstrap). Masked positions are skipped as if they were not there
    (they neither add reward nor discount), and their advantage and return are 0. For the usual left-aligned
    responses this is the same as TRL's loop with values zeroed on padding.

    Returns (advantages (B, R), returns (B, R)). Pass detached tensors (call under torch.no_grad()):
    advantages and returns are targets, not something to differentiate through.
    """
    mask = _bool_mask(rewards, response_mask)
    zeros = torch.zeros_like(rewards)
    rewards = torch.where(mask, rewards, zeros)
    values = torch.where(mask, values.to(rewards.dtype), zeros)

    R = rewards.shape[-1]
    advantages = torch.zeros_like(rewards)  # (B, R)
    next_value = torch.zeros_like(rewards[..., 0])  # (B,) value of the next real token; 0 past the end
    next_advantage = torch.zeros_like(rewards[..., 0])  # (B,)
    for t in reversed(range(R)):
        real = mask[..., t]
        delta = rewards[..., t] + gamma * next_value - values[..., t]
        advantage = delta + gamma * lam * next_advantage
        # A masked position leaves the running values untouched, so the chain skips over it.
        next_advantage = torch.where(real, advantage, next_advantage)
        next_value = torch.where(real, values[..., t], next_value)
        advantages[..., t] = torch.where(real, advantage, zeros[..., t])
    returns = torch.where(mask, advantages + values, zeros)
    return advantages, returns


# ---------------------------------------------------------------------------------------------------------------
# PPO losses
# ---------------------------------------------------------------------------------------------------------------


def policy_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange: float,
    denominator: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate loss (to minimise), token-level mean over the whole batch.

    new_logprobs: (B, R) with grad (current policy); old_logprobs, advantages: (B, R) detached (rollout time).
        ratio_t = exp(new_t - old_t)
        loss    = masked_mean( max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps)) )
        clipfrac  = masked fraction of tokens where the clipped term is strictly the larger (no gradient there)
        approx_kl = masked_mean( 0.5 * (new_t - old_t)^2 )
    approx_kl is the k2 estimator of KL(old || new), as TRL's PPO trainer logs it; CleanRL logs k3 instead;
    both agree to second order. A ratio exactly at 1 +/- eps does not count as clipped.

    denominator: None (the masked mean above), or the number to divide the masked sum by instead: the token count
    of the whole minibatch when it is split into micro-batches or across processes, so the summed gradients are
    those of one token-level mean (clipfrac and approx_kl stay means over this batch).
    Returns (loss: 0-dim with grad, clipfrac: 0-dim detached, approx_kl: 0-dim detached).
    Sign: advantages > 0 means "do more of this"; minimising the loss raises those tokens' probability.
    """
    mask = _bool_mask(new_logprobs, response_mask)
    zeros = torch.zeros_like(new_logprobs)
    # Zero the log-ratio on padding before exp, so garbage there can't become inf (or NaN in backward).
    log_ratio = torch.where(mask, new_logprobs - old_logprobs, zeros)  # (B, R)
    adv = torch.where(mask, advantages.to(new_logprobs.dtype), zeros)  # (B, R)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = _reduce_loss(torch.maximum(unclipped, clipped), mask, denominator)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(new_logprobs.dtype), mask)
        approx_kl = masked_mean(0.5 * log_ratio**2, mask)
    return loss, clipfrac, approx_kl


def value_loss(
    new_values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange_value: float,
    denominator: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (N+ implementation details #13), token-level mean over the whole batch.

    new_values: (B, R) with grad; old_values (rollout values) and returns (from gae): (B, R) detached.
        v_clip_t = clip(v_t, old_t - c, old_t + c)
        loss     = 0.5 * masked_mean( max((v_t - ret_t)^2, (v_clip_t - ret_t)^2) )
        clipfrac = masked fraction of tokens where the clipped error is strictly the larger
    denominator: as in policy_loss.
    Returns (loss: 0-dim with grad, clipfrac: 0-dim detached).
    """
    mask = _bool_mask(new_values, response_mask)
    zeros = torch.zeros_like(new_values)
    v = torch.where(mask, new_values, zeros)
    old = torch.where(mask, old_values.to(v.dtype), zeros)
    ret = torch.where(mask, returns.to(v.dtype), zeros)
    v_clip = old + torch.clamp(v - old, -cliprange_value, cliprange_value)
    err = (v - ret) ** 2
    err_clip = (v_clip - ret) ** 2
    loss = 0.5 * _reduce_loss(torch.maximum(err, err_clip), mask, denominator)
    with torch.no_grad():
        clipfrac = masked_mean((err_clip > err).to(v.dtype), mask)
    return loss, clipfrac


def _reduce_loss(x: torch.Tensor, mask: torch.Tensor, denominator) -> torch.Tensor:
    if denominator is None:
        return masked_mean(x, mask)
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(device=x.device, dtype=x.dtype)
    return masked_sum(x, mask) / denominator


# ---------------------------------------------------------------------------------------------------------------
# From logits
# ---------------------------------------------------------------------------------------------------------------


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim: (..., V) -> (...).

        H = -sum_v p_v * log p_v,   log p = logits - logsumexp(logits)   (log_softmax, stable for large logits)
    Logits of -inf (banned tokens) contribute 0, with finite gradients.
    """
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    # p == 0 exactly where logp == -inf; clamping keeps 0 * logp finite in forward and backward.
    return -(p * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(dim=-1)


def logprobs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probability of `labels` under softmax(logits / temperature): (..., V), (...) -> (...).

        logprob = logits[label] / T - logsumexp(logits / T)
    Same value as log_softmax(logits / T).gather(-1, labels), without materialising the full (..., V)
    log-softmax. Use the sampling temperature here, so the logprobs describe the policy that generated the
    tokens (N+ implementation details #6). Half-precision logits (bf16/fp16) are upcast to float32 one row of
    the first dim at a time, to keep memory low and logsumexp accurate. temperature <= 0 -> ValueError.
    Align first: labels are the tokens that `logits` predict (logits[:, t] scores token t + 1 of input_ids).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    def one(chunk: torch.Tensor, chunk_labels: torch.Tensor) -> torch.Tensor:
        if temperature != 1.0:
            chunk = chunk / temperature
        picked = chunk.gather(-1, chunk_labels.unsqueeze(-1)).squeeze(-1)
        return picked - torch.logsumexp(chunk, dim=-1)

    labels = labels.long()
    if logits.dtype in (torch.float16, torch.bfloat16) and logits.dim() > 1:
        return torch.stack([one(row.float(), row_labels) for row, row_labels in zip(logits, labels)])
    return one(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, labels)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, reduce=None) -> torch.Tensor:
    """How much of the variance of the returns the value head explains (a diagnostic, as CleanRL logs it).

        ev = 1 - var(returns - values) / var(returns)     (masked, population variances)
    1 = perfect, 0 = no better than a constant, < 0 = worse. When var(returns) == 0 the ratio is undefined
    and this returns 0.0 (not NaN), so metrics.jsonl stays valid JSON. Returns a detached 0-dim tensor.
    reduce: as in masked_var (the variances of the global batch).
    """
    with torch.no_grad():
        returns = returns.to(values.dtype)
        var_returns = masked_var(returns, mask, unbiased=False, reduce=reduce)
        var_residual = masked_var(returns - values, mask, unbiased=False, reduce=reduce)
        if var_returns.item() == 0.0:
            return torch.zeros((), dtype=values.dtype, device=values.device)
        return 1.0 - var_residual / var_returns


# ---------------------------------------------------------------------------------------------------------------
# KL controllers (Ziegler et al. 2019, section 2.2)
# ---------------------------------------------------------------------------------------------------------------


class FixedKLController:
    """A constant KL coefficient beta: `.value` never changes; `update` is a no-op."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient beta that steers the measured KL towards `target` (Ziegler et al. 2019, eq. 2).

        error   = clip(current_kl / target - 1, -0.2, 0.2)
        beta   *= 1 + error * n_steps / horizon
    current_kl: the mean per-sequence KL of the last batch (sum of kl over real tokens, averaged over rows);
    n_steps: how many episodes (sequences) that batch held. KL above target raises beta, below lowers it.
    `state_dict()` / `load_state_dict()` carry beta (and target, horizon) so a resumed run continues exactly.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0:
            raise ValueError(f"target KL must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))
