"""The pad token rlchat gives a tokenizer (`rlchat.models.load_tokenizer`, the GGUF converter).

Rule: a pad token distinct from eos where the vocabulary has one. The tokenizer's own pad is kept unless it is the
eos token; otherwise `distinct_pad_token` (a pad-named special token, the unk token, `<|endoftext|>`), else the eos
token, else a new `<|pad|>` token (then the model's embeddings must grow:
`rlchat.models.align_model_with_tokenizer`). Why distinct: rlchat's own masks come from lengths, so pad = eos is
handled; but a transformers sequence classifier (the reward model) takes "the last id != pad" as the last token,
which skips a final eos. The choice is logged on the `rlchat.models` logger, with the other loading messages.
No imports beyond the standard library (the tokenizer is passed in).
"""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("rlchat.models")


def distinct_pad_token(tokenizer: Any) -> str | None:
    """A token of the vocabulary that can pad without being the eos (or bos) token, or None if there is none.

    In order: a special token named like a pad (`<|pad|>`, `<pad>`, `[PAD]`, Llama 3's `<|finetune_right_pad_id|>`),
    the unk token, `<|endoftext|>` (SmolLM2's document separator, its unk too). Padded positions are masked, so any
    id works as long as it is not read as the end of a sequence.
    """
    taken = {tokenizer.eos_token, tokenizer.bos_token}
    vocab = tokenizer.get_vocab()
    added = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()]
    for token in list(tokenizer.all_special_tokens) + added:
        if "pad" in token.lower() and token not in taken and token in vocab:
            return token
    for token in (tokenizer.unk_token, "<|endoftext|>"):
        if token is not None and token not in taken and token in vocab:
            return token
    return None


def set_pad_token(tokenizer: Any, spec: str) -> None:
    """Give `tokenizer` its pad token by the rule above (in place); `spec` names it in the log."""
    if tokenizer.pad_token is not None and tokenizer.pad_token == tokenizer.eos_token:
        choice = distinct_pad_token(tokenizer)
        if choice is not None:
            log.info("tokenizer %s pads with its eos token %r; padding with %r instead", spec, tokenizer.eos_token,
                     choice)
            tokenizer.pad_token = choice
    if tokenizer.pad_token is not None:
        return
    choice = distinct_pad_token(tokenizer)
    if choice is not None:
        tokenizer.pad_token = choice
        log.info("tokenizer %s has no pad token; padding with %r", spec, choice)
    elif tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
        log.info("tokenizer %s has no pad token; padding with its eos token %r", spec, tokenizer.eos_token)
    else:
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
        log.warning("tokenizer %s has no pad, unk or eos token; added a new pad token '<|pad|>' (id %d): the "
                    "model's embeddings must be resized (rlchat.models.align_model_with_tokenizer)",
                    spec, tokenizer.pad_token_id)
