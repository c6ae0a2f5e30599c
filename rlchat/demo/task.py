"""The built-in demo chat task: "tell me about the <color> <thing>", with a programmatic gold judge.

The user asks about one item from a small vocabulary ("Describe the green apple."). A good answer names the
asked-for item, states a fact that belongs to that thing, stays short, is polite and ends with the fixed sign-off
"Hope this helps!". Flawed answers name another colour or thing, ramble, are rude, drop the sign-off, or say
nothing about the item. The task is built so that a model of a few million parameters, trained from random init
on two CPU cores, can learn the format in minutes and a reward model can learn to tell good from flawed.

Four parts, all deterministic for a seed (`write_demo_data` writes them as JSONL):

* SFT conversations (`messages`): demonstrations of MIXED quality, `GOOD_FRACTION` good and the rest with one or
  two flaws (drawn with `FLAW_WEIGHTS`), so the SFT model is imperfect by the gold judge and there is something
  left for RLHF to fix.
* Preference pairs (`prompt`, `chosen`, `rejected`, conversational): two answers to the same prompt whose gold
  scores differ by at least `MIN_PAIR_GAP`, ordered by `judge`, then swapped with probability `LABEL_NOISE` (10%).
  So a perfect reward model agrees with the labels on about 90% of pairs: that is the accuracy ceiling of the
  pairs file, while its accuracy against the gold order can reach 100%.
* Prompts (`prompt`, conversational): for PPO; never used by SFT or pairs. Eval prompts: disjoint from all three.
* `judge(prompts, completions) -> list[float]`: the gold score in [0, 1], a weighted sum of six components
  (see `judge_components`). Robust to empty strings, garbage and leftover special tokens.

What it leaves out on purpose: arithmetic, long answers, multi-turn chats, anything needing world knowledge.
No torch or transformers here; importing this module is cheap.

    from rlchat.demo.task import write_demo_data, judge
    paths = write_demo_data("data", seed=0)
    judge(["Describe the green apple."], ["The green apple tastes sweet. Hope this helps!"])   # -> [1.0]
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

COLORS = ("red", "blue", "green", "yellow", "black", "white", "brown", "pink")

# thing -> facts; each fact holds at least one key word (in FACT_KEYS) that no other thing's facts use.
FACTS: dict[str, tuple[str, ...]] = {
    "fox": ("lives in the forest", "has a bushy tail", "hunts at night"),
    "apple": ("grows on a tree", "tastes sweet", "is crisp and juicy"),
    "boat": ("floats on the lake", "has a white sail", "carries people across the water"),
    "bird": ("sings in the morning", "builds a nest", "flies over the hills"),
    "cat": ("sleeps in the sun", "chases mice", "likes warm milk"),
    "car": ("drives on the road", "has four wheels", "needs fuel to run"),
    "house": ("has a red roof", "keeps the family warm", "stands near the garden"),
    "kite": ("flies in the wind", "has a long string", "dances in the sky"),
    "ball": ("bounces on the floor", "is round", "rolls down the street"),
    "cup": ("holds hot tea", "sits on the table", "has a small handle"),
    "hat": ("keeps the head warm", "has a wide brim", "hangs by the door"),
    "fish": ("swims in the river", "has shiny scales", "breathes through gills"),
}
THINGS = tuple(FACTS)

# Words that identify a thing's facts. Colour words inside facts ("white sail", "red roof") are not counted as
# colour mentions by the judge because they are listed here too.
FACT_KEYS: dict[str, tuple[str, ...]] = {
    "fox": ("forest", "bushy", "hunts"),
    "apple": ("tree", "sweet", "crisp", "juicy"),
    "boat": ("floats", "lake", "sail", "water"),
    "bird": ("sings", "nest", "hills"),
    "cat": ("sleeps", "mice", "milk"),
    "car": ("road", "wheels", "fuel"),
    "house": ("roof", "family", "garden"),
    "kite": ("wind", "string", "sky"),
    "ball": ("bounces", "round", "rolls"),
    "cup": ("tea", "table", "handle"),
    "hat": ("head", "brim", "door"),
    "fish": ("swims", "scales", "gills"),
}
FACT_COLOR_PHRASES = ("white sail", "red roof")

PROMPT_TEMPLATES = (
    "Tell me about the {item}.",
    "Describe the {item}.",
    "What can you say about the {item}?",
    "Write a short note on the {item}.",
    "Please tell me about the {item}.",
    "I want to know about the {item}.",
)
OPENERS = ("", "", "Sure! ", "Of course. ", "Happy to help. ")
SIGN_OFF = "Hope this helps!"
RUDE_OPENERS = ("Ugh, ", "Whatever, ")
RUDE_CLOSERS = ("Stop asking me.", "Look it up yourself.", "What a boring question.", "That was annoying.")
RUDE_WORDS = ("ugh", "whatever", "stop", "yourself", "boring", "annoying", "stupid")
RAMBLE_FILLERS = ("I think that is true.", "Some people say so.", "That is what I heard.", "And so on and so on.")
VAGUE_ANSWERS = ("It is a nice thing.", "That is a good one.", "There is not much to say.", "It is quite common.")

GOOD_FRACTION = 0.10   # share of SFT demonstrations with no flaw (low enough that a sampled SFT answer is
#                        usually flawed, so "PPO beats SFT" is measurable: two perfect answers tie at 0.5)
# How often each flaw is drawn. The content flaws (wrong colour or thing, a vague non-answer) need the model to
# compare the answer with the prompt word by word; the demo's tiny LoRA reward model does not learn that from
# 2000 pairs (measured: ~50% on pairs that differ only there, against 95-100% for the format flaws), so PPO
# cannot remove them. They are drawn half as often as the format flaws (ramble, rude, no sign-off), which the
# reward model learns, so what RLHF can fix dominates what it cannot. The judge weighs every flaw as before.
FLAW_WEIGHTS = {"wrong_color": 0.5, "wrong_thing": 0.5, "vague": 0.5, "ramble": 1.0, "rude": 1.0, "no_signoff": 1.0}
LABEL_NOISE = 0.10     # share of preference pairs whose chosen/rejected are swapped against the judge
MIN_PAIR_GAP = 0.05    # pairs differ at least this much in gold score, so they are never ties
FLAWS = ("wrong_color", "wrong_thing", "ramble", "rude", "no_signoff", "vague")

# Judge weights (sum to 1). A good answer scores 1.0; each flaw costs between 0.1 and 0.5.
WEIGHTS = {"thing": 0.2, "color": 0.15, "fact": 0.15, "length": 0.2, "signoff": 0.15, "tone": 0.15}
SHORT_WORDS, LONG_WORDS, ZERO_WORDS = 4, 20, 45   # length score: 1 in [4, 20] words, 0 from 45 words on

_SPECIAL = re.compile(r"<\|[^|>]*\|>")
_WORD = re.compile(r"[a-z]+")


# ---------------------------------------------------------------- prompts

def all_prompts() -> list[tuple[str, str, str]]:
    """Every (prompt text, color, thing) of the task, in a fixed order (576 prompts)."""
    return [(t.format(item=f"{c} {n}"), c, n) for n in THINGS for c in COLORS for t in PROMPT_TEMPLATES]


def split_prompts(seed: int = 0, n_prompts: int = 96, n_eval: int = 128) -> dict[str, list[tuple[str, str, str]]]:
    """Split all prompts into disjoint `train` (SFT + pairs), `ppo` and `eval` lists, deterministically."""
    items = all_prompts()
    random.Random(f"split-{seed}").shuffle(items)
    if n_prompts + n_eval >= len(items):
        raise ValueError(f"n_prompts + n_eval must be below {len(items)}, got {n_prompts} + {n_eval}")
    return {"eval": items[:n_eval], "ppo": items[n_eval:n_eval + n_prompts], "train": items[n_eval + n_prompts:]}


def parse_prompt(prompt) -> tuple[str | None, str | None]:
    """The (color, thing) a prompt asks about; None where missing. Accepts a string or a list of chat messages."""
    text = _prompt_text(prompt).lower()
    words = _WORD.findall(text)
    for i in range(len(words) - 1):
        if words[i] in COLORS and words[i + 1] in FACTS:
            return words[i], words[i + 1]
    color = next((w for w in words if w in COLORS), None)
    thing = next((w for w in words if w in FACTS), None)
    return color, thing


def _prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, dict):
        return str(prompt.get("content", ""))
    if isinstance(prompt, (list, tuple)):   # chat messages: the last user turn
        users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return str(users[-1].get("content", "")) if users else ""
    return "" if prompt is None else str(prompt)


# ---------------------------------------------------------------- answers

def make_answer(rng: random.Random, color: str, thing: str, flaws: tuple[str, ...] = ()) -> str:
    """One answer to "tell me about the <color> <thing>", good when `flaws` is empty (see FLAWS).

    Every random choice is drawn whatever the flaws, in a fixed order, so two calls from the same rng state with
    different flaws give the same answer edited only where the flaws differ (`flaw_pairs`)."""
    other_color = rng.choice([c for c in COLORS if c != color])
    other_thing = rng.choice([t for t in THINGS if t != thing])
    fact_order, two_facts = rng.sample(range(3), 2), rng.random() >= 0.5
    vague = rng.choice(VAGUE_ANSWERS)
    ramble = [(rng.randrange(3), rng.randrange(3), rng.choice(RAMBLE_FILLERS)) for _ in range(rng.randint(4, 7))]
    rude_opener, rude_closer, opener = rng.choice(RUDE_OPENERS), rng.choice(RUDE_CLOSERS), rng.choice(OPENERS)

    shown_color = other_color if "wrong_color" in flaws else color
    shown_thing = other_thing if "wrong_thing" in flaws else thing
    facts = [FACTS[shown_thing][i] for i in fact_order]
    if "vague" in flaws:
        body = vague
    elif two_facts:
        body = f"The {shown_color} {shown_thing} {facts[0]} and {facts[1]}."
    else:
        body = f"The {shown_color} {shown_thing} {facts[0]}."
    parts = [body]
    if "ramble" in flaws:
        for form, i, filler in ramble:
            extra = FACTS[shown_thing][i]
            parts.append((f"It {extra}.", f"Also it {extra}.", filler)[form])
    if "rude" in flaws:
        parts[0] = rude_opener + parts[0][0].lower() + parts[0][1:]
        parts.append(rude_closer)
    elif "no_signoff" not in flaws:
        parts.append(SIGN_OFF)
    return ("" if "rude" in flaws else opener) + " ".join(parts)


def sample_flaws(rng: random.Random, good_fraction: float = GOOD_FRACTION) -> tuple[str, ...]:
    """No flaw with probability `good_fraction`, else one flaw (70%) or two different flaws (30%), drawn with
    FLAW_WEIGHTS."""
    if rng.random() < good_fraction:
        return ()
    pool, chosen = list(FLAWS), []
    for _ in range(1 if rng.random() < 0.7 else 2):
        flaw = rng.choices(pool, weights=[FLAW_WEIGHTS[f] for f in pool])[0]
        pool.remove(flaw)
        chosen.append(flaw)
    return tuple(chosen)


# ---------------------------------------------------------------- gold judge

def judge_components(prompt, completion: str) -> dict[str, float]:
    """Per-component gold scores in [0, 1] for one answer.

    thing:   1 if the asked thing is named and no other thing; 0.5 if others too; 0 if absent.
    color:   1 if "<color> <thing>" appears and no other colour; 0.5 if the colour is there but not only/adjacent.
    fact:    1 if a fact key word of the asked thing appears and none of another thing's; 0.5 if mixed.
    length:  1 for 4..20 words, rising linearly from 0 words, falling linearly to 0 at 45 words.
    signoff: 1 if the answer ends with "Hope this helps!", 0.5 if it appears elsewhere, else 0.
    tone:    1 minus 0.5 per rude word (ugh, whatever, stop, yourself, boring, ...), floored at 0.
    An answer with no words scores 0 everywhere.
    """
    color, thing = parse_prompt(prompt)
    text = _SPECIAL.sub(" ", completion if isinstance(completion, str) else "").strip().lower()
    words = _WORD.findall(text)
    if not words:
        return {k: 0.0 for k in WEIGHTS}
    n = len(words)

    bare = text
    for phrase in FACT_COLOR_PHRASES:   # "white sail" is a boat fact, not a colour mention
        bare = bare.replace(phrase, " ")
    bare_words = _WORD.findall(bare)
    things = {w for w in bare_words if w in FACTS}
    colors = {w for w in bare_words if w in COLORS}

    c = {}
    c["thing"] = 0.0 if thing not in things else (1.0 if things == {thing} else 0.5)
    adjacent = f"{color} {thing}" in " ".join(bare_words)
    if color in colors and adjacent and colors == {color}:
        c["color"] = 1.0
    elif color in colors:
        c["color"] = 0.5
    else:
        c["color"] = 0.0
    keyed = {t for t, keys in FACT_KEYS.items() if any(k in words for k in keys)}
    c["fact"] = 0.0 if thing not in keyed else (1.0 if keyed == {thing} else 0.5)
    if n < SHORT_WORDS:
        c["length"] = n / SHORT_WORDS
    elif n <= LONG_WORDS:
        c["length"] = 1.0
    else:
        c["length"] = max(0.0, 1.0 - (n - LONG_WORDS) / (ZERO_WORDS - LONG_WORDS))
    sign = SIGN_OFF.lower()
    c["signoff"] = 1.0 if text.endswith(sign) else (0.5 if sign in text else 0.0)
    c["tone"] = max(0.0, 1.0 - 0.5 * sum(w in RUDE_WORDS for w in words))
    return c


def judge(prompts: list, completions: list[str]) -> list[float]:
    """Gold scores in [0, 1], one per (prompt, completion); prompts are user-message strings or chat messages."""
    if len(prompts) != len(completions):
        raise ValueError(f"judge got {len(prompts)} prompts but {len(completions)} completions")
    out = []
    for p, comp in zip(prompts, completions):
        c = judge_components(p, comp)
        out.append(round(sum(WEIGHTS[k] * v for k, v in c.items()), 6))
    return out


# ---------------------------------------------------------------- datasets

def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def sft_rows(seed: int = 0, n: int = 2000, prompts: list | None = None) -> list[dict]:
    """SFT conversations of mixed quality: {"messages": [user, assistant]}."""
    prompts = prompts if prompts is not None else split_prompts(seed)["train"]
    rng = random.Random(f"sft-{seed}")
    rows = []
    for _ in range(n):
        text, color, thing = rng.choice(prompts)
        answer = make_answer(rng, color, thing, sample_flaws(rng))
        rows.append({"messages": _user(text) + _assistant(answer)})
    return rows


def pair_rows(seed: int = 0, n: int = 2000, prompts: list | None = None,
              noise: float = LABEL_NOISE) -> list[dict]:
    """Preference pairs labelled by `judge`, then swapped with probability `noise`.

    One answer is good with probability 0.5 (else flawed), the other always flawed; both are redrawn until their
    gold scores differ by at least MIN_PAIR_GAP.
    """
    prompts = prompts if prompts is not None else split_prompts(seed)["train"]
    rng = random.Random(f"pairs-{seed}")
    rows = []
    for _ in range(n):
        text, color, thing = rng.choice(prompts)
        chosen, rejected = judged_pair(
            rng, text, lambda good: make_answer(rng, color, thing, sample_flaws(rng, good_fraction=good)), judge,
            noise)
        rows.append({"prompt": _user(text), "chosen": _assistant(chosen), "rejected": _assistant(rejected)})
    return rows


def judged_pair(rng: random.Random, text: str, draw, judge_fn, noise: float,
                min_gap: float = MIN_PAIR_GAP) -> tuple[str, str]:
    """(chosen, rejected): draw(0.5) (good with probability 0.5) against draw(0.0) (always flawed), redrawn until
    their judge scores differ by at least min_gap, ordered by the judge, then swapped with probability `noise`."""
    while True:
        a, b = draw(0.5), draw(0.0)
        sa, sb = judge_fn([text, text], [a, b])
        if abs(sa - sb) >= min_gap:
            break
    chosen, rejected = (a, b) if sa > sb else (b, a)
    if rng.random() < noise:
        chosen, rejected = rejected, chosen
    return chosen, rejected


def prompt_rows(prompts: list) -> list[dict]:
    return [{"prompt": _user(text)} for text, _, _ in prompts]


def corpus_texts(seed: int = 0, n: int = 3000) -> list[str]:
    """Plain text of the task (prompts and answers of every kind) for training a tokenizer."""
    rng = random.Random(f"corpus-{seed}")
    texts = [text for text, _, _ in all_prompts()]
    for thing, facts in FACTS.items():
        for color in COLORS:
            texts.append(f"The {color} {thing} {' and '.join(facts)}.")
    texts += [SIGN_OFF, *RUDE_CLOSERS, *RAMBLE_FILLERS, *VAGUE_ANSWERS, *OPENERS, *RUDE_OPENERS]
    for _ in range(n):
        _, color, thing = rng.choice(all_prompts())
        texts.append(make_answer(rng, color, thing, sample_flaws(rng)))
    return [t for t in texts if t.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def write_demo_data(out_dir, seed: int = 0, n_sft: int = 2000, n_pairs: int = 2000, n_prompts: int = 96,
                    n_eval: int = 128) -> dict[str, Path]:
    """Write sft.jsonl, pairs.jsonl, prompts.jsonl (PPO) and eval_prompts.jsonl (held out) into `out_dir`.

    Returns {"sft": path, "pairs": path, "prompts": path, "eval_prompts": path}. Same seed -> same bytes.
    prompts.jsonl is disjoint from the SFT/pair prompts; eval_prompts.jsonl is disjoint from all three.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    split = split_prompts(seed, n_prompts=n_prompts, n_eval=n_eval)
    files = {
        "sft": ("sft.jsonl", sft_rows(seed, n_sft, split["train"])),
        "pairs": ("pairs.jsonl", pair_rows(seed, n_pairs, split["train"])),
        "prompts": ("prompts.jsonl", prompt_rows(split["ppo"])),
        "eval_prompts": ("eval_prompts.jsonl", prompt_rows(split["eval"])),
    }
    paths = {}
    for key, (name, rows) in files.items():
        paths[key] = out / name
        _write_jsonl(paths[key], rows)
    return paths
