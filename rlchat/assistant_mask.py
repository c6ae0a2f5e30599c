"""Assistant-token masks for `rlchat sft` when TRL cannot make them from the chat template.

TRL's `assistant_only_loss` needs a chat template with `{% generation %}` markers. For a template without them it
swaps in a training version of a fixed list of known templates (`trl.chat_template_utils.get_training_chat_template`:
Qwen, Llama 3, Gemma, Phi-3, ...) and raises ValueError for any other: SmolLM2's ChatML, most custom templates. For
those, rlchat marks the assistant tokens itself, for any template that is prefix-preserving:

  * render(messages[:i], add_generation_prompt=True) is where assistant turn i starts and render(messages[:i+1]) is
    where it ends; both must be prefixes of render(messages), the whole chat. The turn owns the text in between: its
    reply, its end-of-turn token and what the template writes after it before the next turn (ChatML's newline, which
    TRL's own training templates also put inside `{% generation %}`). System and user turns and the generation prompt
    are not trained.
  * The whole chat is tokenized once, and a token is trained when it starts inside an assistant span. Tokenizing each
    prefix on its own would not give the same tokens: BPE can merge characters across a boundary (a generation prompt
    ending in a newline, a reply starting with one), and the model trains on the whole chat's tokens. Tokenizers that
    give no character offsets (python tokenizers) tokenize each boundary's prefix and need its tokens to be a prefix.
  * An assistant turn that opens a chat answers nothing (templates cannot render the empty prompt before it): it is
    not trained.

The result is a pre-tokenized dataset (`input_ids`, `assistant_masks`) that TRL's SFTTrainer takes as is (a dataset
with `input_ids` skips its tokenization): it turns `assistant_masks` into labels (-100 where the mask is 0), truncates
to max_length, drops rows left without a trained token and packs, as for the datasets it tokenizes itself.

A template that is not prefix-preserving (rendering a prefix changes earlier text or tokens) has no such spans: a
ModelError before the stage writes anything.

Imports: errors; checks and data inside a function (datasets and trl too).
"""
from __future__ import annotations

from rlchat.errors import ModelError

GENERATION_FIX = ("pass --no-assistant-only-loss, or use a chat template with {% generation %} markers around the "
                  "assistant replies (or one that renders every prefix of a chat as the start of the whole chat)")


class NotPrefixPreserving(Exception):
    """Rendering the first `turns` messages of a chat is not the start of the whole chat (text or tokens)."""

    def __init__(self, turns: int):
        super().__init__(turns)
        self.turns = turns


def trl_can_mask(tokenizer) -> bool:
    """Whether TRL's SFTTrainer can mask the assistant tokens with this tokenizer's chat template: it has
    `{% generation %}` markers, or it is one of the templates TRL patches (the same test SFTTrainer makes)."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if has_generation_markers(tokenizer.chat_template):
        return True
    try:
        get_training_chat_template(tokenizer)
    except ValueError:  # "patching is not supported for this template"
        return False
    return True


def chat_masks(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(input_ids, assistant_masks) of one chat rendered with the tokenizer's chat template; 1 = trained token (an
    assistant turn's reply and end-of-turn token). NotPrefixPreserving when the template has no assistant spans."""

    def render(turns: list[dict], prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=prompt)

    full = render(messages)
    spans = []  # (message index, start, end): the characters of each assistant turn in `full`
    for i, message in enumerate(messages):
        if message.get("role") != "assistant" or i == 0:
            continue
        start, upto = render(messages[:i], prompt=True), render(messages[:i + 1])
        if not upto.startswith(start):
            raise NotPrefixPreserving(i)
        if not full.startswith(upto):
            raise NotPrefixPreserving(i + 1)
        spans.append((i, len(start), len(upto)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=tokenizer.is_fast)
    ids = list(enc["input_ids"])
    if tokenizer.is_fast:
        starts = [first for first, _ in enc["offset_mapping"]]
        return ids, [int(any(a <= s < b for _, a, b in spans)) for s in starts]
    return ids, _masks_by_prefix(tokenizer, full, ids, spans)


def _masks_by_prefix(tokenizer, full: str, ids: list[int], spans: list[tuple[int, int, int]]) -> list[int]:
    """The masks without character offsets: each span boundary's text prefix, tokenized, must be a token prefix."""
    mask = [0] * len(ids)

    def boundary(chars: int, turns: int) -> int:
        head = list(tokenizer(full[:chars], add_special_tokens=False)["input_ids"])
        if head != ids[:len(head)]:
            raise NotPrefixPreserving(turns)
        return len(head)

    for i, a, b in spans:
        lo, hi = boundary(a, i), boundary(b, i + 1)
        mask[lo:hi] = [1] * (hi - lo)
    return mask


def tokenize_chats(tokenizer, ds, name: str, model: str):
    """`ds` (a `messages` dataset) as a pre-tokenized Dataset with `input_ids` and `assistant_masks`; ModelError
    naming the first row the chat template cannot mark (not prefix-preserving)."""
    import datasets

    from rlchat.checks import template_errors
    from rlchat.data import _rows

    ids, masks = [], []
    for i, row in enumerate(_rows(ds, ["messages"])):
        # Arrow gives every message every key seen in the column; a missing one is None, not absent
        chat = [{k: v for k, v in m.items() if v is not None} for m in row["messages"]]
        try:
            with template_errors(f"row {i} of {name}"):
                row_ids, row_mask = chat_masks(tokenizer, chat)
        except NotPrefixPreserving as err:
            first = f"{err.turns} message{'s' if err.turns != 1 else ''}"
            raise ModelError(
                f"assistant-only loss needs the assistant tokens, and the chat template of {model} cannot mark them: "
                f"TRL cannot patch it (no {{% generation %}} markers) and it is not prefix-preserving (rendering the "
                f"first {first} of row {i} of {name} does not give the start of the longer chat)",
                GENERATION_FIX) from None
        ids.append(row_ids)
        masks.append(row_mask)
    return datasets.Dataset.from_dict({"input_ids": ids, "assistant_masks": masks})


def prepare(cfg, tokenizer, fmt: str, train_ds, eval_ds):
    """(train_ds, eval_ds, masks): the datasets SFTTrainer gets and who masks the assistant tokens: "trl" (the chat
    template, TRL's assistant_only_loss), "rlchat" (pre-tokenized here: TRL cannot use the template) or None (no
    assistant-only loss: another format, or --no-assistant-only-loss)."""
    if not (cfg.assistant_only_loss and fmt == "messages"):
        return train_ds, eval_ds, None
    if trl_can_mask(tokenizer):
        return train_ds, eval_ds, "trl"
    train_ds = tokenize_chats(tokenizer, train_ds, cfg.dataset, cfg.model)
    if eval_ds is not None:
        eval_ds = tokenize_chats(tokenizer, eval_ds, cfg.dataset + (f" (split {cfg.eval_split})"
                                                                     if cfg.eval_split else ""), cfg.model)
    return train_ds, eval_ds, "rlchat"
