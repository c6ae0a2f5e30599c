"""Prompts for generation (PPO rollouts, eval): a dataset's prompt column as chat messages, the user's text, and
(given a tokenizer) the chat-template token ids a policy generates from.

    prompts, column, n_truncated = load_prompts("data/prompts.jsonl", tokenizer=tok, max_tokens=256)
"""
from __future__ import annotations

from dataclasses import dataclass

from rlchat.errors import DataError


@dataclass
class Prompt:
    messages: list[dict]             # the prompt as chat messages (user turn(s)): what chat templates render
    text: str                        # the last user turn: what reward functions and judges see
    ids: list[int] | None = None     # chat-template token ids ending with the generation prompt (None: not encoded)


def load_prompts(spec: str, split: str = "train", dataset_config: str | None = None, limit: int | None = None,
                 tokenizer=None, max_tokens: int | None = None) -> tuple[list[Prompt], str, int]:
    """(prompts, column, n_truncated): the first `limit` rows (all when None) of the dataset's prompt column
    ('prompt', 'messages' or 'text').

    With a tokenizer every prompt is encoded (`rlchat.generation.encode_prompt`); beyond max_tokens its oldest
    tokens are dropped (counted in n_truncated), and a prompt with no token left is left out (DataError if none
    remains). DataError (from rlchat.data) for a dataset that does not load, is empty or has no prompt column.
    """
    from rlchat import data

    ds = data.load_any(spec, split=split, config=dataset_config)
    column = data.detect_prompt_column(ds, spec)
    n = len(ds) if limit is None else min(limit, len(ds))
    prompts = [Prompt(messages=data.to_prompt_messages(ds[i], column), text=data.prompt_text(ds[i], column))
               for i in range(n)]
    if tokenizer is None:
        return prompts, column, 0
    from rlchat.checks import template_errors
    from rlchat.generation import encode_prompt_cut

    kept, n_truncated = [], 0
    for i, p in enumerate(prompts):
        with template_errors(f"prompt {i} of {spec}"):
            p.ids, truncated = encode_prompt_cut(tokenizer, p.messages, max_tokens)
        n_truncated += truncated
        if p.ids:
            kept.append(p)
    if not kept:
        raise DataError(f"dataset {spec} has no prompts in column '{column}'", "give it at least one non-empty prompt")
    return kept, column, n_truncated
