"""PPO rollouts: the `Rollout` a PPO step trains on, and the rollout pass that fills it (`score_rollout`).

The models (policy, reference, value, reward behind one `ActorCritic`) are in rlchat/actor_critic.py:

    model = build_shared(base_lm, lora_config, reward_parts, temperature)                    # actor_critic.py
    response_ids = model.generate(prompt_ids, prompt_mask, generation_config(...))         # (B, R)
    rollout = score_rollout(model, prompt_ids, prompt_mask, response_ids, stop_ids, pad_id, eos_id)  # no grad
    new_logprobs = model(rollout.input_ids, rollout.attention_mask, rollout.response_ids, "policy")  # (B, R) grads
    new_values = model(rollout.input_ids, rollout.attention_mask, rollout.response_ids, "value")     # (B, R) grads

Shapes: B batch, P prompt (left padded), R response (right padded after the first EOS), T = P + R. Position t of
every (B, R) tensor belongs to response token t; its logprob and its value come from the hidden state at sequence
position P + t - 1 (the state that predicted the token).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlchat.actor_critic import ActorCritic
from rlchat.generation import cut_at_stop


# ------------------------------------------------------------------------------------------------------ Rollout


@dataclass
class Rollout:
    """One batch of experience: B prompts, their sampled responses, and what every model said about them.

    Tensors are on the model's device; all per-token tensors are (B, R) and 0 where `response_mask` is False.
    """

    prompt_ids: torch.Tensor       # (B, P) long  prompt tokens, left padded with the pad token
    prompt_mask: torch.Tensor      # (B, P) bool  True on real prompt tokens (False on left padding)
    response_ids: torch.Tensor     # (B, R) long  sampled tokens; everything after the first EOS is the pad token
    response_mask: torch.Tensor    # (B, R) bool  True on real response tokens, up to and including the first EOS
    logprobs: torch.Tensor         # (B, R) float log pi_old(a_t | s_t): the policy that sampled, at the temperature
    ref_logprobs: torch.Tensor     # (B, R) float log pi_ref(a_t | s_t): the reference (base / SFT) policy
    values: torch.Tensor           # (B, R) float V(s_t): value of the state before token t, from the value head
    entropy: torch.Tensor          # (B, R) float entropy of pi_old(. | s_t) at the temperature (a diagnostic)
    has_eos: torch.Tensor          # (B,) bool    the response ended with an EOS within the length limit
    model_scores: torch.Tensor | None = None  # (B,) float raw score of the shared reward adapter (None if absent)
    scores: torch.Tensor | None = None        # (B,) float final score: sources combined, normalised, EOS penalty
    prompts: list[str] = field(default_factory=list)      # B prompt texts (the user's turn), for reward functions
    completions: list[str] = field(default_factory=list)  # B decoded responses (special tokens dropped)

    @property
    def input_ids(self) -> torch.Tensor:  # (B, T) prompt followed by response
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:  # (B, T) True on real prompt and response tokens
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    @property
    def lengths(self) -> torch.Tensor:  # (B,) number of real response tokens (the EOS included)
        return self.response_mask.sum(dim=1)

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]


# --------------------------------------------------------------------------------------------- rollout steps


@torch.no_grad()
def score_rollout(model: ActorCritic, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                  response_ids: torch.Tensor, stop_ids: list[int], pad_id: int, end_id: int | None = None) -> Rollout:
    """Truncate the responses at EOS and run the rollout pass (logprobs, ref_logprobs, values, reward adapter
    score). The final `scores` are filled in by the caller (rewards.py combines the sources).

    end_id: the reward adapter reads a response cut at the length limit (no EOS) at this token appended after it,
    as the reward model saw every answer in training (the chat template closes each answer with its EOS) and as
    eval and text reward models score it; without it such a response is read at a mid-sentence token the reward
    model never learnt to score. The token is for the reward read only: it is not part of the response.
    """
    response_ids, response_mask, has_eos = cut_at_stop(response_ids, stop_ids, pad_id)
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)  # (B, T)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)  # (B, T)
    P = prompt_ids.shape[1]
    last_index = P + response_mask.sum(dim=1) - 1  # (B,) position of the last real response token
    extra = 0
    if end_id is not None and model.has_reward and not bool(has_eos.all()):
        cut = ~has_eos  # (B,) responses that hit the length limit
        column = torch.where(cut, torch.full_like(last_index, end_id), torch.full_like(last_index, pad_id))  # (B,)
        input_ids = torch.cat([input_ids, column[:, None]], dim=1)  # (B, T + 1)
        attention_mask = torch.cat([attention_mask, cut[:, None]], dim=1)  # (B, T + 1)
        last_index = torch.where(cut, torch.full_like(last_index, input_ids.shape[1] - 1), last_index)
        extra = 1
    out = model.score(input_ids, attention_mask, response_ids, last_index, extra=extra)
    zeros = torch.zeros_like(out["logprobs"])
    masked = {k: torch.where(response_mask, out[k], zeros) for k in ("logprobs", "ref_logprobs", "values", "entropy")}
    return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
                   response_mask=response_mask, has_eos=has_eos, model_scores=out["model_scores"], **masked)
