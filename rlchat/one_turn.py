"""Plain-text rows read as one-turn chats, so that every stage renders text through the same chat template.

Why: ppo and eval render every prompt through the model's chat template (rlchat/prompts.py,
generation.encode_prompt_cut) and the reward model scores rollouts as chat messages (run_models.RewardScorer). TRL
trains plain strings as raw concatenations instead (SFTTrainer: prompt + completion + eos; rlchat's reward inputs
did the same), so a policy and a reward model trained on plain-text rows would never see the text PPO generates
from and scores. rlchat is a chat pipeline, so where the data mark a turn boundary, plain strings become one-turn
chats (TRL's conversational formats):

  * sft `prompt` + `completion` strings (`sft_as_chats`): prompt -> [user turn], completion -> [assistant turn];
    TRL then renders the prompt with the generation prompt and trains on the completion's tokens
    (completion_only_loss), exactly the tokens of the same row given as `messages`;
  * explicit preference pairs of strings (`pair_as_chat`, called by pairs.read_pairs, which train-reward, dpo and
    score read pairs through): prompt -> [user turn], chosen / rejected -> [assistant turn].

Left as they are (no turn boundary to put a template around): sft `text` rows and implicit plain-text pairs (the
prompt is only the shared prefix of two strings). A stage trained on those records `rendering: "raw text"` in its
manifest metrics, and ppo / eval print `mismatch_warning(...)`, one line naming the mismatch and the fix.

Imports: nothing from rlchat (datasets inside a function).
"""
from __future__ import annotations

from typing import Any

# the manifest's `rendering` metric of sft and train-reward
CHAT = "chat"                  # the rows were chat messages
ONE_TURN = "one-turn chat"     # plain prompt/response strings, read as one-turn chats
RAW = "raw text"               # plain text without a turn boundary, trained without the chat template

SFT_NOTE = "prompt-completion strings read as one-turn chats"
PAIRS_NOTE = "prompt/chosen/rejected strings read as one-turn chats"


def user_turn(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def assistant_turn(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def sft_as_chats(ds, fmt: str) -> tuple[Any, str]:
    """(dataset, rendering) of an SFT dataset of format `fmt` (data.detect_sft_format): plain `prompt` +
    `completion` strings as one-turn chats (other columns kept), everything else unchanged. Rows hold one kind
    in a column (Arrow refuses a column of strings and lists), so the first row tells."""
    if fmt == "text":
        return ds, RAW
    if fmt != "prompt_completion" or not len(ds) or not isinstance(ds[0]["prompt"], str):
        return ds, CHAT

    prompts = [user_turn(p) for p in ds["prompt"]]
    completions = [assistant_turn(c) for c in ds["completion"]]
    # table operations: no cache file next to the user's data (data.py's rule), no progress bar
    ds = ds.add_column("_chat_prompt", prompts).add_column("_chat_completion", completions)
    ds = ds.remove_columns(["prompt", "completion"])
    return ds.rename_columns({"_chat_prompt": "prompt", "_chat_completion": "completion"}), ONE_TURN


def pair_as_chat(prompt: str, chosen: str, rejected: str) -> tuple[list[dict], list[dict], list[dict]]:
    """An explicit plain-text pair as (user turn, chosen assistant turn, rejected assistant turn)."""
    return user_turn(prompt), assistant_turn(chosen), assistant_turn(rejected)


def pairs_rendering(one_turn: bool, conversational: bool) -> str:
    """The `rendering` metric of pairs read by pairs.read_pairs: explicit plain-text pairs were read as one-turn
    chats (`one_turn`), pairs of messages are chats, implicit plain-text pairs stay raw text."""
    if one_turn:
        return ONE_TURN
    return CHAT if conversational else RAW


def _raw_stage(run, stage: str) -> bool:
    """Whether the run's finished `stage` trained on text without the chat template (runs from before the
    `rendering` metric: sft `text` rows)."""
    rec = run.record(stage) or {}
    if rec.get("status") != "done":
        return False
    metrics = rec.get("metrics") or {}
    if "rendering" in metrics:
        return metrics["rendering"] == RAW
    return stage == "sft" and metrics.get("format") == "text"


def mismatch_warning(run, stage: str, sft: bool = True, reward: bool = True) -> str | None:
    """One warning line when the run's sft policy (`sft`) or reward model (`reward`), which `stage` ("ppo",
    "eval") uses, was trained on raw text while `stage` renders chats; None when nothing mismatches."""
    raw = [name for name, used in (("sft", sft), ("reward", reward)) if used and _raw_stage(run, name)]
    if not raw:
        return None
    what = {"sft": "the sft policy was trained on plain `text` rows",
            "reward": "the reward model was trained on implicit plain-text pairs"}
    fixes = {"sft": "give sft `prompt` + `completion` or `messages` rows",
             "reward": "give train-reward explicit `prompt` + `chosen` + `rejected` pairs or messages"}
    return (f"warning: {' and '.join(what[n] for n in raw)}, without the chat template, but {stage} renders every "
            "prompt and response through it: the model never saw this format. "
            f"Fix: {', and '.join(fixes[n] for n in raw)}")
