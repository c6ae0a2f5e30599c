"""`rlchat score`: score every response in a dataset with a run's reward model and write them as JSONL.

    rlchat score runs/demo --dataset pairs.jsonl --out scored.jsonl

Items: prompt + completion rows; pairs (prompt + chosen + rejected, or chosen + rejected: two items each, with
pairwise accuracy and margin in the summary); or conversations (`messages`, the last turn is the completion).
Plain-text prompt + completion rows and explicit pairs are scored as one-turn chats, as train-reward reads them
(rlchat/one_turn.py), and written out as given.
Each is truncated to the reward stage's max_length as in training (the first tokens are dropped). Raw scores:
PPO's normalisation (reward_stats.json) is not applied.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from rlchat.errors import ConfigError, DataError
from rlchat.one_turn import assistant_turn, user_turn
from rlchat.pairs import clean_messages, pair_stats, read_pairs, value_kind
from rlchat.run_models import RewardScorer, load_reward_model, reward_record
from rlchat.stats import mean_std


def score_items(ds, name: str | None = None) -> list[dict]:
    """The (prompt, completion) items to score in a dataset, each {"prompt", "completion"[, "label", "row",
    "scored"]}: "scored" is (prompt, completion) as chat turns where the dataset gave plain strings.

    Columns: prompt + completion; prompt + chosen + rejected or chosen + rejected (two items per pair, labelled
    "chosen"/"rejected"); messages (the last turn is the completion and must be the assistant's).
    """
    from rlchat.data import is_message_list

    columns = ds.column_names
    where = f"dataset {name}" if name else "the dataset"
    items: list[dict] = []
    if "chosen" in columns and "rejected" in columns:
        fmt = "explicit" if "prompt" in columns else "implicit"
        pairs, _ = read_pairs(ds, fmt, name, keep_identical=True)
        for p in pairs:
            for label, response in (("chosen", p.chosen), ("rejected", p.rejected)):
                item = {"prompt": p.prompt, "completion": response, "label": label, "row": p.row}
                items.append(_shown_as_given(item) if p.one_turn else item)
        return items
    if "prompt" in columns and "completion" in columns:
        for i, row in enumerate(ds):
            prompt, completion = row["prompt"], row["completion"]
            kinds = {value_kind(prompt), value_kind(completion)}
            if None in kinds or len(kinds) > 1:
                raise DataError(f"row {i} of {where} needs 'prompt' and 'completion' both strings or both lists "
                                "of {role, content} messages", "fix or remove that row")
            if isinstance(completion, list):
                items.append({"prompt": clean_messages(prompt), "completion": clean_messages(completion), "row": i})
            else:  # scored as a one-turn chat, as train-reward reads plain explicit pairs (rlchat/one_turn.py)
                items.append(_shown_as_given({"prompt": user_turn(prompt), "completion": assistant_turn(completion),
                                              "row": i}))
        return items
    if "messages" in columns:
        for i, row in enumerate(ds):
            messages = row["messages"]
            if not is_message_list(messages) or len(messages) < 2 or messages[-1]["role"] != "assistant":
                raise DataError(f"row {i} of {where} is not a conversation ending in an assistant turn after at "
                                "least one other turn", "fix or remove that row")
            messages = clean_messages(messages)
            items.append({"prompt": messages[:-1], "completion": messages[-1:], "row": i})
        return items
    raise DataError(f"{where} has columns [{', '.join(columns)}], none of which the reward model can score",
                    "give it 'prompt' + 'completion', 'prompt' + 'chosen' + 'rejected', 'chosen' + 'rejected', or "
                    "'messages'")


def _shown_as_given(item: dict) -> dict:
    """A one-turn chat item scored as chat turns ("scored") and written out as the strings the dataset gave."""
    shown = {"prompt": item["prompt"][0]["content"], "completion": item["completion"][0]["content"]}
    return {**item, **shown, "scored": (item["prompt"], item["completion"])}


def score(run_dir: str | Path, dataset: str, out_path: str | Path, split: str = "train", batch_size: int = 16,
          dataset_config: str | None = None, trust_remote_code: bool = False) -> dict:
    """Score every response in `dataset` with the run's reward model; write JSONL rows {prompt, completion, score}
    (plus "label": "chosen"/"rejected" for pairs) to out_path. Returns {"n", "mean", "std", "out_path", "summary"}
    and, for pairs, "accuracy" and "margin". Sequences are truncated to the reward stage's max_length as in
    training. Raw scores: PPO's normalisation (reward_stats.json) is not applied."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from rlchat import data
    from rlchat.models import pick_device
    from rlchat.rundir import RunDir
    from rlchat.fileio import atomic_write_text
    from rlchat.progress import quiet_libraries

    from rlchat.checks import template_errors
    from rlchat.rundir import check_output_path

    if not 1 <= batch_size <= 65536:
        raise ConfigError(f"batch_size must be between 1 and 65536, got {batch_size}", "pass --batch-size 16")
    check_output_path(out_path, "--out")
    if Path(out_path).is_dir():
        raise ConfigError(f"--out {out_path} is a directory", "pass a file path such as scores.jsonl")
    t_start = time.time()
    run = RunDir(run_dir)
    rec = reward_record(run)
    max_length = (rec.get("config") or {}).get("max_length")
    ds = data.load_any(dataset, split=split, config=dataset_config)
    items = score_items(ds, dataset)
    quiet_libraries()
    model, tokenizer = load_reward_model(run.path, trust_remote_code=trust_remote_code, device=pick_device())
    scorer = RewardScorer(model, tokenizer, batch_size, max_length, sort_by_length=True)
    with template_errors(f"a row of {dataset}"):
        scored = [it.get("scored") or (it["prompt"], it["completion"]) for it in items]
        scores = scorer([prompt for prompt, _ in scored], [completion for _, completion in scored])

    lines = []
    for it, s in zip(items, scores.tolist()):
        row = {"prompt": it["prompt"], "completion": it["completion"], "score": s}
        if "label" in it:
            row["label"] = it["label"]
        lines.append(json.dumps(row, ensure_ascii=False))
    out_path = Path(out_path)
    atomic_write_text(out_path, "\n".join(lines) + "\n")
    mean, std = mean_std(scores.tolist(), ddof=0)
    result = {"n": len(items), "mean": mean, "std": std, "out_path": str(out_path)}
    text = f"scored {len(items)} responses: mean {mean:.3f}, std {std:.3f}"
    if items and "label" in items[0]:
        stats = pair_stats(scores[0::2], scores[1::2])
        result.update(accuracy=stats["accuracy"], margin=stats["margin"])
        text += f"; pairwise accuracy {stats['accuracy']:.3f}, margin {stats['margin']:.3f}"
    result["wall_s"] = round(time.time() - t_start, 1)
    result["summary"] = f"{text} in {result['wall_s']:.0f}s -> {out_path}"
    return result
