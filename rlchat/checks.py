"""Input checks that need the model or the tokenizer, run by the stages BEFORE their first write (begin_stage).

Without them TRL and peft find these problems inside the trainer constructors or the first training step, after
the run directory says the stage is running: a refused input then leaves a "failed" stage and files behind.

- `check_lora_targets(model, targets)`: every name in --lora-target-modules names a module of the model (peft's own
  matching rule), so peft cannot fail with "Target modules ... not found" after the stage began;
- `max_positions(model)` / `check_fits(model, tokens, what, fix)`: lengths against the model's position table (a
  longer sequence is an IndexError in the embedding mid-run);
- `check_sft_rows(tokenizer, ds, fmt, cfg)`: EVERY row through the tokenizer's chat template (roles it refuses,
  broken content), an assistant turn to learn from when the loss is on assistant tokens only, and at least one row
  whose trained tokens survive truncation to --max-length;
- `template_errors(what)`: a chat template's jinja error as a one-line DataError.

Imports: errors (torch, transformers, peft and jinja2 inside functions).
"""
from __future__ import annotations

from contextlib import contextmanager

from rlchat.errors import ConfigError, DataError, first_line

def max_positions(model) -> int | None:
    """The longest sequence the model's position table covers (None when its config does not say)."""
    from rlchat.generation import max_positions as positions

    return positions(model)


def check_fits(model, tokens: int, what: str, fix: str) -> None:
    """ConfigError when `tokens` (e.g. max_prompt_length + response_length) exceed the model's positions."""
    n = max_positions(model)
    if n is not None and tokens > n:
        raise ConfigError(f"{what} is {tokens} tokens, but the model has only {n} positions", fix)


def _target_names(targets) -> list[str] | None:
    """The module names of a --lora-target-modules value; None for "all-linear" / peft's default."""
    if targets is None or targets == "all-linear" or targets == ["all-linear"]:
        return None
    if isinstance(targets, str):
        targets = targets.split(",")
    return [t.strip() for t in targets if t and t.strip()]


def check_lora_targets(model, targets, flag: str = "--lora-target-modules") -> None:
    """ConfigError naming the entries of `targets` that match no module of `model` (peft's rule: the module's full
    name, or its name after the last dots: `q_proj` matches `model.layers.0.self_attn.q_proj`); a "re:<regex>"
    must fully match the name of at least one linear layer (peft's rule for a regex)."""
    if isinstance(targets, str) and targets.startswith("re:"):
        return _check_lora_regex(model, targets[3:], flag)
    names = _target_names(targets)
    if not names:
        return
    modules = [n for n, _ in model.named_modules() if n]
    missing = [t for t in names if not any(m == t or m.endswith("." + t) for m in modules)]
    if not missing:
        return
    import torch

    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    raise ConfigError(f"{flag} names module{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} that "
                      f"the model does not have", f"use all-linear or names from: {', '.join(linear[:20])}")


def _check_lora_regex(model, regex: str, flag: str) -> None:
    import re

    import torch

    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if not any(re.fullmatch(regex, n) for n in linear):  # the config check compiled it already
        raise ConfigError(f"{flag} re:{regex} matches no linear layer of the model (the regex must match the whole "
                          f"module name, e.g. {linear[0] if linear else 'model.layers.0.self_attn.q_proj'})",
                          "fix the regex, e.g. re:.*layers\\.(2[2-9])\\..*_proj for layers 22-29")


@contextmanager
def template_errors(what: str, fix: str = "check the roles (system, user, assistant) and contents of its chats, "
                    "or use a tokenizer whose chat template accepts them"):
    """A chat template's jinja error (raise_exception in the template, a syntax or undefined error) as DataError."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - filtered below
        import jinja2

        if isinstance(err, jinja2.TemplateError):
            raise DataError(f"the chat template refused {what}: {first_line(err)[:200]}", fix) from None
        raise


def check_sft_rows(tokenizer, ds, fmt: str, max_length: int, assistant_only: bool, name: str,
                   positions: int | None = None) -> int:
    """Render every row of an SFT dataset the way SFTTrainer will (DataError naming the first bad row) and check
    that training has tokens to learn from and that no truncated row is longer than the model's `positions`;
    returns the number of rows whose trained part is cut off entirely by max_length (TRL drops them: no trained
    token is left)."""
    from rlchat.data import _rows

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    column_sets = {"messages": ["messages"], "prompt_completion": ["prompt", "completion"], "text": ["text"]}
    cut, rows, longest = 0, 0, 0
    for i, row in enumerate(_rows(ds, column_sets[fmt])):
        rows += 1
        prefix_len = 0
        with template_errors(f"row {i} of {name}"):
            if fmt == "messages":
                chat = [{k: v for k, v in m.items() if v is not None} for m in row["messages"]]
                if assistant_only and not any(m.get("role") == "assistant" and m.get("content") for m in chat):
                    raise DataError(f"row {i} of {name} has no assistant turn with content, and the loss is on "
                                    "assistant replies only", "give every chat an assistant reply, remove the rows "
                                    "without one, or pass --no-assistant-only-loss")
                full = tokenizer.apply_chat_template(chat, tokenize=False)
                if assistant_only:
                    first = next(j for j, m in enumerate(chat) if m.get("role") == "assistant")
                    prefix_len = n_tokens(tokenizer.apply_chat_template(
                        chat[:first], tokenize=False, add_generation_prompt=True) if first else "")
            elif fmt == "prompt_completion":
                prompt, completion = row["prompt"], row["completion"]
                if isinstance(prompt, list):
                    full = tokenizer.apply_chat_template(list(prompt) + list(completion), tokenize=False)
                    prefix = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
                else:
                    full, prefix = prompt + completion, prompt
                prefix_len = n_tokens(prefix)
            else:
                full = row["text"]
        longest = max(longest, n_tokens(full) if positions is not None and len(full) > positions else 0)
        if prefix_len >= max_length:
            cut += 1
    if rows and max_length < 2:
        raise ConfigError(f"max_length {max_length} leaves no token to predict", "raise --max-length")
    if rows and cut == rows:
        raise ConfigError(f"max_length {max_length} cuts every row of {name} before the part the loss is on (the "
                          "prompt alone is longer)", "raise --max-length")
    if positions is not None and min(longest, max_length) > positions:
        raise ConfigError(f"rows of {name} are up to {longest} tokens and max_length is {max_length}, but the model "
                          f"has only {positions} positions", f"pass --max-length {positions} or less")
    return cut
