"""Preference pairs for the reward model: read and check a dataset's pairs, tokenize them as the reward model sees
them, and the statistics of scored pairs.

Formats (TRL's): explicit (prompt + chosen + rejected) or implicit (the prompt is the shared prefix of chosen and
rejected); plain text or lists of messages; an optional numeric `margin` column. The data rules are in
rlchat/stages/reward.py's docstring. Explicit plain-text pairs are read as one-turn chats (user prompt, assistant
responses: rlchat/one_turn.py), so every stage that reads pairs here renders them through the chat template, as PPO
does; implicit plain-text pairs stay plain text.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rlchat.errors import DataError
from rlchat.one_turn import pair_as_chat
from rlchat.run_models import reward_input_ids
from rlchat.stats import mean_std

if TYPE_CHECKING:  # pragma: no cover
    import torch

MAX_ROWS_NAMED = 5   # rows listed in an error message


@dataclass
class Pair:
    """One preference pair, split into prompt and the two responses (as in the dataset: text or messages)."""

    row: int                      # index in the dataset file/split, for messages
    prompt: Any                   # str | list[dict] | None (implicit prompt without a shared prefix)
    chosen: Any                   # the chosen response (after the prompt)
    rejected: Any
    margin: float | None = None
    one_turn: bool = False        # an explicit plain-text pair, read as a one-turn chat (rlchat/one_turn.py)


def clean_messages(value: list[dict]) -> list[dict]:
    """Messages without the None-valued keys Arrow adds (every message gets the union of keys; chat templates may
    trip on those)."""
    return [{k: v for k, v in m.items() if v is not None or k in ("role", "content")} for m in value]


def value_kind(value: Any) -> str | None:
    """"text" for a string, "messages" for a list of {role, content}, else None."""
    from rlchat.data import is_message_list

    if isinstance(value, str):
        return "text"
    if is_message_list(value):
        return "messages"
    return None


def _common_prefix(a: Any, b: Any) -> int:
    """Length of the shared prefix (characters of two strings, or whole messages of two message lists)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def rows_text(rows: list[int]) -> str:
    """Row numbers for a message: the first MAX_ROWS_NAMED, then how many more."""
    shown = ", ".join(str(r) for r in rows[:MAX_ROWS_NAMED])
    return shown + (f" and {len(rows) - MAX_ROWS_NAMED} more" if len(rows) > MAX_ROWS_NAMED else "")


def read_pairs(ds, fmt: str, name: str | None = None, keep_identical: bool = False
               ) -> tuple[list[Pair], list[int]]:
    """Check every row of a preference dataset and split it into Pairs.

    Returns (pairs, identical_rows): rows whose chosen and rejected are identical are listed and, unless
    keep_identical (scoring), left out. Raises DataError for a value of the wrong type, a bad margin,
    implicit-prompt rows sharing no prefix, or no pair left.
    """
    where = f"dataset {name}" if name else "the dataset"
    has_margin = "margin" in ds.column_names
    columns = ["prompt", "chosen", "rejected"] if fmt == "explicit" else ["chosen", "rejected"]
    pairs: list[Pair] = []
    identical, no_prefix, bad_margin = [], [], []
    for i, row in enumerate(ds):
        kinds = {c: value_kind(row[c]) for c in columns}
        for c, k in kinds.items():
            if k is None:
                raise DataError(f"row {i} of {where} has {row[c]!r:.60} in column '{c}', expected a string or a "
                                "list of {role, content} messages",
                                "fix or remove that row; every row needs the same format")
        if len(set(kinds.values())) > 1:
            raise DataError(f"row {i} of {where} mixes plain text and messages in columns {', '.join(columns)}",
                            "make these columns all strings or all lists of {role, content}")
        conv = kinds["chosen"] == "messages"
        prompt = row.get("prompt") if fmt == "explicit" else None
        chosen, rejected = row["chosen"], row["rejected"]
        if conv:
            chosen, rejected = clean_messages(chosen), clean_messages(rejected)
            prompt = clean_messages(prompt) if prompt is not None else None
        elif fmt == "explicit":  # the chat template PPO renders and scores with (rlchat/one_turn.py)
            prompt, chosen, rejected = pair_as_chat(prompt, chosen, rejected)
        margin = None
        if has_margin:
            margin = row["margin"]
            if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
                bad_margin.append(i)
                continue
            margin = float(margin)
        if chosen == rejected:
            identical.append(i)
            if not keep_identical:
                continue
        if fmt == "implicit":
            n = _common_prefix(chosen, rejected)
            shared = chosen[:n]
            if chosen != rejected and ((conv and n == 0) or (not conv and not shared.strip())):
                no_prefix.append(i)
                continue
            if not conv:
                # cut at the last word boundary (TRL's extract_prompt also backs off a space) so that the
                # responses start with whole words; training sees prompt + response joined again either way
                cut = max(shared.rfind(" "), shared.rfind("\n"))
                if cut > 0:
                    n = cut
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        pairs.append(Pair(i, prompt, chosen, rejected, margin, one_turn=fmt == "explicit" and not conv))
    if bad_margin:
        raise DataError(f"{len(bad_margin)} row(s) of {where} have a 'margin' that is not a finite number (rows "
                        f"{rows_text(bad_margin)})", "give every row a numeric margin, or drop the column")
    if no_prefix:
        raise DataError(f"{len(no_prefix)} of {len(ds)} implicit-prompt pairs in {where} share no prefix, so they "
                        f"have no prompt (rows {rows_text(no_prefix)})",
                        "start chosen and rejected with the same prompt text (or the same user message), or add "
                        "an explicit 'prompt' column")
    if not pairs:
        raise DataError(f"all {len(ds)} pairs in {where} have identical chosen and rejected responses, so there "
                        "is nothing to learn", "give each pair two different responses")
    return pairs, identical


def tokenize_pairs(pairs: list[Pair], tokenizer, max_length: int | None) -> tuple[dict, int, list[int]]:
    """({"chosen_ids", "rejected_ids"[, "margin"]}, n_truncated, rows that became identical when truncated).

    `rows` (the dataset row of each kept pair) is returned in the dict too; pop it before training."""
    chosen_ids, rejected_ids, margins, rows = [], [], [], []
    n_truncated, collapsed = 0, []
    for p in pairs:
        c, c_cut = reward_input_ids(tokenizer, p.prompt, p.chosen, max_length)
        r, r_cut = reward_input_ids(tokenizer, p.prompt, p.rejected, max_length)
        n_truncated += int(c_cut or r_cut)
        if c == r:
            collapsed.append(p.row)
            continue
        chosen_ids.append(c)
        rejected_ids.append(r)
        margins.append(p.margin)
        rows.append(p.row)
    columns = {"chosen_ids": chosen_ids, "rejected_ids": rejected_ids, "rows": rows}
    if pairs and pairs[0].margin is not None:
        columns["margin"] = margins
    return columns, n_truncated, collapsed


def pair_stats(chosen: "torch.Tensor", rejected: "torch.Tensor") -> dict:
    """Pairwise accuracy (chosen strictly above rejected; ties count as wrong), mean margin and reward stats."""
    both = chosen.tolist() + rejected.tolist()
    mean, std = mean_std(both, ddof=0)  # population std: PPO normalises scores as (r - mean) / std with these
    c_mean, c_std = mean_std(chosen.tolist(), ddof=0)
    r_mean, r_std = mean_std(rejected.tolist(), ddof=0)
    return {
        "accuracy": float((chosen > rejected).float().mean()),
        "margin": float((chosen - rejected).mean()),
        "mean": mean, "std": std,
        "chosen_mean": c_mean, "chosen_std": c_std,
        "rejected_mean": r_mean, "rejected_std": r_std,
    }


CALIBRATION_BINS = 10
COLLAPSED_STD = 1e-3   # scores with a population std below this (x max(1, |mean|)) are one constant


def reward_health(chosen: list[float], rejected: list[float]) -> dict:
    """The reward model's own health on scored pairs (held-out when there are some), with Bradley-Terry
    probabilities p = sigmoid(r_chosen - r_rejected) (the model's P(chosen preferred)).

    accuracy / accuracy_ci   fraction with chosen strictly above rejected, 95% Wilson interval
    ece                      expected calibration error: pairs binned by confidence max(p, 1 - p) into
                             CALIBRATION_BINS equal-width bins over [0.5, 1]; sum over bins of
                             (bin size / n) * |fraction right in the bin - mean confidence in the bin|
    mean_confidence          mean max(p, 1 - p): above the accuracy = overconfident, below = underconfident
    mean_abs_error           mean |p - 1| (the label is 1: chosen preferred): 1 - mean p
    warnings                 [text] for accuracy not above chance (the Wilson interval reaches 0.5) and for
                             collapsed scores (std below COLLAPSED_STD: every response scores the same)
    """
    from rlchat.stats import wilson_interval

    n = len(chosen)
    if n == 0:
        return {"accuracy": None, "accuracy_ci": None, "ece": None, "mean_confidence": None,
                "mean_abs_error": None, "warnings": []}
    p = [1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, c - r)))) for c, r in zip(chosen, rejected)]
    right = [c > r for c, r in zip(chosen, rejected)]
    conf = [max(x, 1.0 - x) for x in p]
    acc = sum(right) / n
    bins: dict[int, list[int]] = {}
    for i, c in enumerate(conf):
        bins.setdefault(min(CALIBRATION_BINS - 1, int((c - 0.5) * 2 * CALIBRATION_BINS)), []).append(i)
    ece = sum(len(ix) / n * abs(sum(right[i] for i in ix) / len(ix) - sum(conf[i] for i in ix) / len(ix))
              for ix in bins.values())
    lo, hi = wilson_interval(acc, n)
    both = list(chosen) + list(rejected)
    mean, std = mean_std(both, ddof=0)
    warnings = []
    if lo <= 0.5:
        warnings.append(f"reward model accuracy {acc:.3f} [{lo:.3f}, {hi:.3f}] on {n} pairs is not above chance "
                        "(0.5): it cannot tell chosen from rejected, and PPO would optimise noise. Fix: train longer "
                        "(--epochs) or with another --lr, check the pairs (chosen really better), or hold out more "
                        "pairs (--eval-fraction) if the interval is wide")
    if std < COLLAPSED_STD * max(1.0, abs(mean)):
        warnings.append(f"the reward model's scores collapsed to a constant (std {std:.2g} around {mean:.3g}): it "
                        "gives every response the same reward. Fix: lower --lr (training diverged or saturated), "
                        "or check that chosen and rejected differ")
    return {"accuracy": acc, "accuracy_ci": [lo, hi], "ece": ece, "mean_confidence": sum(conf) / n,
            "mean_abs_error": 1.0 - sum(p) / n, "warnings": warnings}


def prompt_groups(pairs: list[Pair]) -> list:
    """One key per pair for the held-out split (data.split_eval's `groups`): pairs with the same prompt are held
    out together. A pair without a prompt (implicit, no shared prefix) is its own group."""
    import json

    return [json.dumps(p.prompt, sort_keys=True, default=str) if p.prompt is not None else ("row", p.row)
            for p in pairs]
