"""Generation shared by ppo, eval, chat and export: prompts in, responses out.

- `encode_prompt`: a chat prompt as token ids, the generation prompt appended, oldest tokens dropped past a limit;
  `max_positions` / `prompt_limit`: how long a prompt may be so that the response still fits the model.
- `stop_token_ids`: the ids that end a response; `generation_config`: one explicit GenerationConfig (sampling
  when temperature > 0, greedy at 0), built from scratch so a model's saved defaults cannot change decoding.
- `left_pad` / `right_pad`: lists of ids -> (ids, mask) tensors; every mask here is bool, True = real token.
- `cut_at_stop`: THE stop rule: a response ends after its first stop token (which is kept); every caller cuts
  with it. `response_lists` and `decode_responses` turn cut responses back into token lists and text.
- `position_ids_from_mask`: positions that count real tokens only, as `generate` numbers them.
- `generate` (one batch, cut), `sequence_logprobs` (summed log pi(y|x) at temperature 1) and `token_logprobs`
  (per-token log pi_T(y_t|x,y<t) at a sampling temperature T).

Shapes: B batch, P prompt (left padded), R response (right padded), T = P + R, V vocabulary.
Imports torch and transformers lazily (inside functions) except for type names.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch


# ------------------------------------------------------------------------------------------------ prompts


# A token spans at most this many characters in practice (long whitespace runs are the longest); a prompt is cut to
# max_tokens * this many characters BEFORE tokenizing, so a 50 MB prompt is never tokenized whole (gigabytes).
MAX_CHARS_PER_TOKEN = 64


def encode_prompt(tokenizer, messages: list[dict], max_tokens: int | None = None) -> list[int]:
    """Token ids of a chat prompt with the generation prompt appended; the oldest tokens are dropped beyond
    max_tokens (the chat template adds its own special tokens, so the tokenizer adds none)."""
    return encode_prompt_cut(tokenizer, messages, max_tokens)[0]


def encode_prompt_cut(tokenizer, messages: list[dict], max_tokens: int | None = None) -> tuple[list[int], bool]:
    """(ids, truncated): `encode_prompt`, saying whether tokens were dropped. Beyond max_tokens *
    MAX_CHARS_PER_TOKEN characters only the end of the rendered prompt is tokenized (its first, possibly split,
    token is dropped)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    cut_chars = max_tokens is not None and len(text) > max_tokens * MAX_CHARS_PER_TOKEN
    if cut_chars:
        text = text[-max_tokens * MAX_CHARS_PER_TOKEN:]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if cut_chars:
        ids = ids[1:]
    truncated = cut_chars or (max_tokens is not None and len(ids) > max_tokens)
    if max_tokens is not None and len(ids) > max_tokens:
        ids = ids[-max_tokens:]
    return ids, truncated


def max_positions(model) -> int | None:
    """The longest sequence the model's position embeddings cover, or None if its config does not say."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def prompt_limit(model, max_new_tokens: int) -> int | None:
    """Prompt tokens kept so that prompt + max_new_tokens fits the model (at least 1); None = no limit known."""
    limit = max_positions(model)
    return None if limit is None else max(1, limit - max_new_tokens)


def stop_token_ids(model, tokenizer) -> list[int]:
    """The ids that end a response: the model's generation_config eos id(s) plus the tokenizer's eos."""
    ids = []
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    for x in ([eos] if isinstance(eos, int) else list(eos or [])) + [tokenizer.eos_token_id]:
        if x is not None and x not in ids:
            ids.append(int(x))
    return ids


def generation_config(max_new_tokens: int, temperature: float, top_p: float, stop_ids: list[int], pad_id: int,
                      bos_id: int | None = None):
    """Sampling at `temperature` with nucleus `top_p` when temperature > 0 (top_k off and no repetition penalty:
    the sampling distribution must be the one the logprobs describe); greedy decoding at temperature 0. Stops at
    any of `stop_ids`. Built from scratch so nothing in the model's own generation_config.json (top_k=50,
    penalties, ...) leaks in."""
    from transformers import GenerationConfig

    sample = temperature > 0
    kwargs = dict(do_sample=sample, num_beams=1, max_new_tokens=max_new_tokens, min_new_tokens=0,
                  eos_token_id=list(stop_ids) or None, pad_token_id=pad_id, use_cache=True, repetition_penalty=1.0)
    if bos_id is not None:
        kwargs["bos_token_id"] = bos_id
    if sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return GenerationConfig(**kwargs)


# ------------------------------------------------------------------------------------------------ padding


def _pad(seqs: list[list[int]], pad_id: int, width: int, left: bool, device):
    import torch

    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        if s:
            cols = slice(width - len(s), width) if left else slice(0, len(s))
            ids[i, cols] = torch.tensor(s, dtype=torch.long)
            mask[i, cols] = True
    return ids.to(device), mask.to(device)


def left_pad(seqs: list[list[int]], pad_id: int, device=None):
    """(ids (B, P) long, mask (B, P) bool True on real tokens), every sequence right-aligned (left padding)."""
    return _pad(seqs, pad_id, max(len(s) for s in seqs), True, device)


def right_pad(seqs: list[list[int]], pad_id: int, device=None):
    """(ids (B, R) long, mask (B, R) bool True on real tokens), every sequence left-aligned; R >= 1."""
    return _pad(seqs, pad_id, max(1, max(len(s) for s in seqs)), False, device)


def position_ids_from_mask(attention_mask: "torch.Tensor") -> "torch.Tensor":
    """(B, T) positions 0, 1, ... counted over real tokens; 0 on left padding. This is what `generate` uses
    (cumsum of the mask minus one), so logprobs recomputed with it match the ones that sampled the tokens."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# ------------------------------------------------------------------------------------------------ stopping


def cut_at_stop(response_ids: "torch.Tensor", stop_ids: list[int], pad_id: int):
    """Cut each response after its first stop token (the stop token is kept).

    response_ids (B, R) -> (response_ids with pad after the first stop (B, R), response_mask (B, R) bool: True up
    to and including the first stop, has_stop (B,) bool). A response with no stop token keeps all R tokens.
    """
    import torch

    B, R = response_ids.shape
    is_stop = torch.zeros_like(response_ids, dtype=torch.bool)
    for s in stop_ids:
        is_stop |= response_ids == s
    has_stop = is_stop.any(dim=1)  # (B,)
    positions = torch.arange(R, device=response_ids.device).expand(B, R)  # (B, R)
    first_stop = torch.where(is_stop, positions, torch.full_like(positions, R)).min(dim=1).values  # (B,) R if none
    response_mask = positions <= first_stop.unsqueeze(1)  # (B, R)
    response_ids = torch.where(response_mask, response_ids, torch.full_like(response_ids, pad_id))
    return response_ids, response_mask, has_stop


def response_lists(response_ids: "torch.Tensor", response_mask: "torch.Tensor") -> list[list[int]]:
    """The real tokens of each (B, R) response row, as lists (a cut response ends with its stop token)."""
    return [row[:n] for row, n in zip(response_ids.tolist(), response_mask.sum(dim=1).tolist())]


def decode_responses(tokenizer, responses: list[list[int]], stop_ids: list[int]) -> list[str]:
    """The text of each cut response: its final stop token and all other special tokens dropped (not stripped)."""
    out = []
    for toks in responses:
        if toks and toks[-1] in stop_ids:
            toks = toks[:-1]
        out.append(tokenizer.decode(toks, skip_special_tokens=True))
    return out


# ---------------------------------------------------------------------------------------- generate, logprobs


def generate(model, tokenizer, prompt_ids: list[list[int]], gen_config, stop_ids: list[int]):
    """Generate for one batch of prompts. Returns (response token lists incl. the stop token, has_stop flags)."""
    import torch

    device = next(model.parameters()).device
    ids, mask = left_pad(prompt_ids, tokenizer.pad_token_id, device)  # (B, P)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask.long(), generation_config=gen_config)
    response_ids, response_mask, has_stop = cut_at_stop(out[:, ids.shape[1]:], stop_ids, tokenizer.pad_token_id)
    return response_lists(response_ids, response_mask), has_stop.tolist()


def sequence_logprobs(model, prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> list[float]:
    """Summed log pi(y | x) over the response tokens of each (prompt, response), at temperature 1.

    Prompts are left padded and responses right padded, positions count real tokens only (as `generate` does), so
    the log-probs are those of the tokens as they were generated. An empty response sums to 0.
    """
    return [sum(lp) for lp in token_logprobs(model, prompt_ids, response_ids, pad_id)]


def token_logprobs(model, prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int,
                   temperature: float = 1.0) -> list[list[float]]:
    """log pi_T(y_t | x, y_<t) for every response token of each (prompt, response), where pi_T is the model's
    distribution at `temperature` (softmax(logits / T): what sampling at T draws from). Padding as in
    `sequence_logprobs`; each list has the response's length."""
    import torch

    device = next(model.parameters()).device
    p_ids, p_mask = left_pad(prompt_ids, pad_id, device)       # (B, P)
    r_ids, r_mask = right_pad(response_ids, pad_id, device)    # (B, R)
    input_ids = torch.cat([p_ids, r_ids], dim=1)               # (B, T)
    attention_mask = torch.cat([p_mask, r_mask], dim=1)        # (B, T)
    P = p_ids.shape[1]
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask.long(),
                       position_ids=position_ids_from_mask(attention_mask)).logits
        logits = logits[:, P - 1:-1].float() / temperature     # (B, R, V): the state before each response token
        logp = torch.log_softmax(logits, dim=-1).gather(-1, r_ids.unsqueeze(-1)).squeeze(-1)  # (B, R)
    return [row[:len(r)] for row, r in zip(logp.tolist(), response_ids)]
