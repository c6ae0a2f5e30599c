"""The second built-in task, "sums": "What is 23 plus 45?", in PLAIN-TEXT formats, with a programmatic gold judge.

It exists to check rlchat's defaults on something that is not the demo: another architecture (the recipe builds a
GPT-2 model), other data formats (TRL's standard plain-text `prompt`/`completion` SFT rows and plain-text explicit
preference pairs, where the demo uses chat messages), another kind of answer (numbers, not descriptions).

A good answer restates the question and gives the sum, confidently and briefly: "23 plus 45 is 68." Flawed
answers get the sum wrong, hedge ("I am not sure, but ..."), ramble (filler sentences), or drop the restatement
("It is 68."). As in the demo, SFT demonstrations are of mixed quality (`GOOD_FRACTION` good), preference pairs
are ordered by the judge with `LABEL_NOISE` swapped, and PPO/eval prompts are disjoint from them and each other.

`judge(prompts, completions)`: gold score in [0, 1], a weighted sum of four components (see `judge_components`).
No torch or transformers here.

    from rlchat.demo.sums import write_sums_data, judge
    write_sums_data("data2", seed=0)
    judge(["What is 23 plus 45?"], ["23 plus 45 is 68."])   # -> [1.0]
"""
from __future__ import annotations

import random
import re
from pathlib import Path

from rlchat.demo.task import _write_jsonl, judged_pair

NUMBERS = range(1, 41)
PROMPT_TEMPLATES = ("What is {a} plus {b}?", "Add {a} and {b}.", "How much is {a} plus {b}?",
                    "Please add {a} and {b}.", "Tell me the sum of {a} and {b}.")
HEDGES = ("I am not sure, but ", "Maybe ", "I think ")
HEDGE_WORDS = ("sure", "maybe", "think", "guess", "perhaps")
FILLERS = ("Numbers are fun.", "Math is useful every day.", "Adding is easy once you practice.",
           "Let me know if you have more questions.")
FLAWS = ("wrong", "hedge", "ramble", "no_restate")
FLAW_WEIGHTS = {"wrong": 0.5, "hedge": 1.0, "ramble": 1.0, "no_restate": 1.0}
GOOD_FRACTION = 0.10
LABEL_NOISE = 0.10
MIN_PAIR_GAP = 0.05
WEIGHTS = {"correct": 0.3, "restate": 0.25, "length": 0.25, "confident": 0.2}
MAX_WORDS, ZERO_WORDS = 8, 24   # length score: 1 up to 8 words, 0 from 24 words on

_NUM = re.compile(r"\d+")
_WORD = re.compile(r"[a-z]+|\d+")
_SPECIAL = re.compile(r"<\|[^|>]*\|>")


def all_prompts() -> list[tuple[str, int, int]]:
    """Every (prompt text, a, b) of the task, in a fixed order."""
    return [(t.format(a=a, b=b), a, b) for a in NUMBERS for b in NUMBERS for t in PROMPT_TEMPLATES]


def split_prompts(seed: int = 0, n_prompts: int = 96, n_eval: int = 128) -> dict[str, list]:
    """Disjoint `train` (SFT + pairs), `ppo` and `eval` prompt lists, deterministically; no (a, b) is shared."""
    pairs = sorted({(a, b) for _, a, b in all_prompts()})
    random.Random(f"sums-split-{seed}").shuffle(pairs)
    eval_ab, ppo_ab, train_ab = pairs[:n_eval], pairs[n_eval:n_eval + n_prompts], pairs[n_eval + n_prompts:]
    rng = random.Random(f"sums-templates-{seed}")
    pick = lambda ab: [(rng.choice(PROMPT_TEMPLATES).format(a=a, b=b), a, b) for a, b in ab]  # noqa: E731
    train = [p for p in all_prompts() if (p[1], p[2]) in set(train_ab)]
    return {"train": train, "ppo": pick(ppo_ab), "eval": pick(eval_ab)}


def parse_prompt(prompt) -> tuple[int | None, int | None]:
    """(a, b) of a prompt: a string or chat messages (the last user turn)."""
    if isinstance(prompt, list):
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        prompt = users[-1] if users else ""
    nums = _NUM.findall(prompt if isinstance(prompt, str) else "")
    return (int(nums[0]), int(nums[1])) if len(nums) >= 2 else (None, None)


def make_answer(rng: random.Random, a: int, b: int, flaws: tuple[str, ...] = ()) -> str:
    total = a + b
    if "wrong" in flaws:
        total += rng.choice([-1, 1]) * rng.randint(1, 9)
    core = f"It is {total}." if "no_restate" in flaws else f"{a} plus {b} is {total}."
    if "hedge" in flaws:
        core = rng.choice(HEDGES) + core[0].lower() + core[1:]
    if "ramble" in flaws:
        core = " ".join([core, *rng.sample(FILLERS, 2)])
    return core


def sample_flaws(rng: random.Random, good_fraction: float = GOOD_FRACTION) -> tuple[str, ...]:
    if rng.random() < good_fraction:
        return ()
    k = 1 if rng.random() < 0.7 else 2
    names, weights = list(FLAW_WEIGHTS), list(FLAW_WEIGHTS.values())
    out: list[str] = []
    while len(out) < k:
        f = rng.choices(names, weights)[0]
        if f not in out:
            out.append(f)
    return tuple(out)


def judge_components(prompt, completion: str) -> dict[str, float]:
    """Per-component gold scores in [0, 1].

    correct:   1 if the last number in the answer is a + b, else 0.
    restate:   1 if both a and b appear (in order) before the last number, 0.5 if one does, else 0.
    length:    1 up to 8 words, falling linearly to 0 at 24 words.
    confident: 1 minus 0.5 per hedge word (sure, maybe, think, guess, perhaps), floored at 0.
    An answer with no words scores 0 everywhere.
    """
    a, b = parse_prompt(prompt)
    text = _SPECIAL.sub(" ", completion if isinstance(completion, str) else "").strip().lower()
    words = _WORD.findall(text)
    if not words or a is None:
        return {k: 0.0 for k in WEIGHTS}
    nums = [int(n) for n in _NUM.findall(text)]
    c = {"correct": 1.0 if nums and nums[-1] == a + b else 0.0}
    before = nums[:-1]
    c["restate"] = 1.0 if before[:2] == [a, b] else (0.5 if a in before or b in before else 0.0)
    n = len(words)
    c["length"] = 1.0 if n <= MAX_WORDS else max(0.0, 1.0 - (n - MAX_WORDS) / (ZERO_WORDS - MAX_WORDS))
    c["confident"] = max(0.0, 1.0 - 0.5 * sum(w in HEDGE_WORDS for w in words))
    return c


def judge(prompts: list, completions: list[str]) -> list[float]:
    """Gold scores in [0, 1], one per (prompt, completion); prompts are strings or chat messages."""
    if len(prompts) != len(completions):
        raise ValueError(f"judge got {len(prompts)} prompts but {len(completions)} completions")
    return [round(sum(WEIGHTS[k] * v for k, v in judge_components(p, c).items()), 6)
            for p, c in zip(prompts, completions)]


def sft_rows(seed: int, n: int, prompts: list) -> list[dict]:
    """Plain-text prompt/completion rows of mixed quality (TRL's standard prompt-completion format)."""
    rng = random.Random(f"sums-sft-{seed}")
    rows = []
    for _ in range(n):
        text, a, b = rng.choice(prompts)
        rows.append({"prompt": text, "completion": make_answer(rng, a, b, sample_flaws(rng))})
    return rows


def pair_rows(seed: int, n: int, prompts: list, noise: float = LABEL_NOISE) -> list[dict]:
    """Plain-text explicit preference pairs, ordered by `judge`, then swapped with probability `noise`."""
    rng = random.Random(f"sums-pairs-{seed}")
    rows = []
    for _ in range(n):
        text, a, b = rng.choice(prompts)
        chosen, rejected = judged_pair(
            rng, text, lambda good: make_answer(rng, a, b, sample_flaws(rng, good_fraction=good)), judge, noise,
            MIN_PAIR_GAP)
        rows.append({"prompt": text, "chosen": chosen, "rejected": rejected})
    return rows


def corpus_texts(seed: int = 0, n: int = 3000) -> list[str]:
    """Plain text of the task for training a tokenizer."""
    rng = random.Random(f"sums-corpus-{seed}")
    texts = [t for t, _, _ in all_prompts()] + list(FILLERS) + list(HEDGES)
    for _ in range(n):
        _, a, b = rng.choice(all_prompts())
        texts.append(make_answer(rng, a, b, sample_flaws(rng)))
    return texts


def write_sums_data(out_dir, seed: int = 0, n_sft: int = 2000, n_pairs: int = 2000) -> dict[str, Path]:
    """Write sft.jsonl, pairs.jsonl, prompts.jsonl, eval_prompts.jsonl and corpus.txt (for `rlchat new-model
    --corpus`) into `out_dir`, all plain text. Same seed -> same bytes."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    split = split_prompts(seed)
    files = {
        "sft": sft_rows(seed, n_sft, split["train"]),
        "pairs": pair_rows(seed, n_pairs, split["train"]),
        "prompts": [{"prompt": t} for t, _, _ in split["ppo"]],
        "eval_prompts": [{"prompt": t} for t, _, _ in split["eval"]],
    }
    paths = {}
    for name, rows in files.items():
        paths[name] = out / f"{name}.jsonl"
        _write_jsonl(paths[name], rows)
    corpus = out / "corpus.txt"
    tmp = corpus.with_name("corpus.txt.tmp")
    tmp.write_text("\n".join(corpus_texts(seed)) + "\n", encoding="utf-8")
    tmp.replace(corpus)
    paths["corpus"] = corpus
    return paths
