"""The reward model reads its score where PPO reads it: at the answer's EOS, whatever the chat template adds after."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def chatml_tokenizer():
    from rlchat.models import DEFAULT_CHAT_TEMPLATE
    from rlchat.tiny import train_tokenizer

    tok = train_tokenizer(["tell me about the red fox", "The red fox is quick. Hope this helps!"] * 20, vocab_size=300)
    # rlchat's default template, like Qwen's and SmolLM2's, renders "<eos>\n" after every turn
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok


def test_chat_pairs_end_at_the_eos_not_the_newline_after_it(chatml_tokenizer):
    from rlchat.run_models import reward_input_ids

    tok = chatml_tokenizer
    prompt = [{"role": "user", "content": "tell me about the red fox"}]
    completion = [{"role": "assistant", "content": "The red fox is quick."}]
    rendered = tok.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"]
    assert rendered[-1] != tok.eos_token_id  # the template really adds something after the EOS
    ids, truncated = reward_input_ids(tok, prompt, completion, max_length=None)
    assert not truncated
    assert ids[-1] == tok.eos_token_id
    assert ids == list(rendered[:len(ids)]) and len(ids) == len(rendered) - 1


def test_text_pairs_end_at_the_eos(chatml_tokenizer):
    from rlchat.run_models import reward_input_ids

    ids, _ = reward_input_ids(chatml_tokenizer, "tell me about the red fox ", "The red fox is quick.", max_length=None)
    assert ids[-1] == chatml_tokenizer.eos_token_id
