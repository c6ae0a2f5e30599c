"""rlchat.demo.task: deterministic data, disjoint prompt splits, a gold judge that ranks good over bad."""
import json
import random

import pytest

from rlchat.demo import task
from rlchat.demo.task import judge, judge_components, write_demo_data

GOOD = "The red fox lives in the forest. Hope this helps!"
BAD = {
    "wrong color": "The blue fox lives in the forest. Hope this helps!",
    "wrong thing": "The red boat floats on the lake. Hope this helps!",
    "no sign-off": "The red fox lives in the forest.",
    "rude": "Ugh, the red fox lives in the forest. Look it up yourself.",
    "vague": "It is a nice thing. Hope this helps!",
    "ramble": "The red fox lives in the forest. " + "It hunts at night. Also it has a bushy tail. " * 5
              + "Hope this helps!",
    "empty": "",
    "garbage": "xq zzv ##!! 1234 qwpoe",
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    paths = write_demo_data(out, seed=0, n_sft=300, n_pairs=1000)
    return {k: [json.loads(line) for line in p.read_text().splitlines()] for k, p in paths.items()}, paths


def _user_text(prompt):
    return prompt[0]["content"]


def test_judge_ranks_good_above_bad():
    assert judge(["Tell me about the red fox."], [GOOD]) == [1.0]
    prompts = ["Tell me about the red fox."] * len(BAD)
    for (name, _), score in zip(BAD.items(), judge(prompts, list(BAD.values()))):
        assert 0.0 <= score < 0.95, name
    # more prompts, good answers written by hand
    cases = [("Describe the green apple.", "Sure! The green apple tastes sweet. Hope this helps!",
              "The green apple tastes sweet and so on and so on and so on and so on and so on and so on and so on"),
             ("What can you say about the pink kite?", "The pink kite flies in the wind. Hope this helps!",
              "Whatever, the pink bird sings in the morning. Stop asking me."),
             ("Please tell me about the black cup?", "Of course. The black cup holds hot tea. Hope this helps!",
              "The white cup holds hot tea.")]
    for prompt, good, bad in cases:
        g, b = judge([prompt, prompt], [good, bad])
        assert g == 1.0 and b < g - 0.15, prompt


def test_judge_graded_and_robust():
    p = "Tell me about the red fox."
    scores = judge([p] * len(BAD), list(BAD.values()))
    assert len(scores) == len(BAD) and all(0.0 <= s <= 1.0 for s in scores)
    assert len(set(scores)) >= 6   # graded, mostly not ties
    assert judge([p], [""]) == [0.0] and judge([p], ["   \n"]) == [0.0]
    assert judge([], []) == []
    # special tokens left in a decoded completion, chat-message prompts, prompts with no known item
    assert judge([p], [GOOD + "<|endoftext|><|pad|>"]) == [1.0]
    assert judge([[{"role": "user", "content": p}]], [GOOD]) == [1.0]
    assert 0.0 <= judge(["hello?"], [GOOD])[0] < 1.0
    assert judge([p], [None])[0] == 0.0
    with pytest.raises(ValueError, match="2 prompts but 1"):
        judge([p, p], [GOOD])
    c = judge_components(p, BAD["rude"])
    assert c["tone"] == 0.0 and c["signoff"] == 0.0 and c["thing"] == 1.0


def test_every_fact_is_recognised_for_its_own_thing_only():
    for thing, facts in task.FACTS.items():
        for fact in facts:
            words = fact.split()
            owners = {t for t, keys in task.FACT_KEYS.items() if any(k in words for k in keys)}
            assert owners == {thing}, (thing, fact)
    for color in task.COLORS:   # "red roof"/"white sail" are facts, not colour mentions
        for thing in task.THINGS:
            for fact in task.FACTS[thing]:
                answer = f"The {color} {thing} {fact}. {task.SIGN_OFF}"
                assert judge([f"Describe the {color} {thing}."], [answer]) == [1.0], answer


def test_generated_answers_score_as_designed():
    rng = random.Random(0)
    for flaws in [()] + [(f,) for f in task.FLAWS]:
        for _ in range(20):
            text, color, thing = rng.choice(task.all_prompts())
            score = judge([text], [task.make_answer(rng, color, thing, flaws)])[0]
            assert (score == 1.0) == (flaws == ()), (flaws, score)


def test_writer_deterministic(tmp_path):
    a = write_demo_data(tmp_path / "a", seed=1, n_sft=50, n_pairs=50)
    b = write_demo_data(tmp_path / "b", seed=1, n_sft=50, n_pairs=50)
    c = write_demo_data(tmp_path / "c", seed=2, n_sft=50, n_pairs=50)
    assert set(a) == {"sft", "pairs", "prompts", "eval_prompts"}
    for key in a:
        assert a[key].read_bytes() == b[key].read_bytes(), key
    assert a["sft"].read_bytes() != c["sft"].read_bytes()
    assert task.corpus_texts(0) == task.corpus_texts(0)


def test_formats_and_disjoint_prompts(data):
    rows, _ = data
    sft, pairs, prompts, eval_prompts = rows["sft"], rows["pairs"], rows["prompts"], rows["eval_prompts"]
    assert len(sft) == 300 and len(pairs) == 1000 and len(prompts) == 96 and len(eval_prompts) == 128
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in sft)
    assert all(set(r) == {"prompt", "chosen", "rejected"} and r["prompt"][0]["role"] == "user"
               and r["chosen"][0]["role"] == r["rejected"][0]["role"] == "assistant" for r in pairs)
    train = {r["messages"][0]["content"] for r in sft} | {_user_text(r["prompt"]) for r in pairs}
    ppo = {_user_text(r["prompt"]) for r in prompts}
    held = {_user_text(r["prompt"]) for r in eval_prompts}
    assert len(ppo) == 96 and len(held) == 128
    assert not train & ppo and not train & held and not ppo & held


def test_sft_demos_are_mixed_quality(data):
    rows, _ = data
    sft = rows["sft"]
    scores = judge([r["messages"][0]["content"] for r in sft], [r["messages"][1]["content"] for r in sft])
    good = sum(s == 1.0 for s in scores) / len(scores)
    assert abs(good - task.GOOD_FRACTION) < 0.08
    assert 0.7 < sum(scores) / len(scores) < 0.9


def test_pair_labels_agree_with_judge_except_noise(data):
    rows, _ = data
    pairs = rows["pairs"]
    agree = 0
    for r in pairs:
        p = _user_text(r["prompt"])
        chosen, rejected = judge([p, p], [r["chosen"][0]["content"], r["rejected"][0]["content"]])
        assert abs(chosen - rejected) >= task.MIN_PAIR_GAP   # never ties
        agree += chosen > rejected
    # 1000 pairs, 10% flipped: binomial sd ~0.0095, so +-0.03 is over 3 sd
    assert abs(agree / len(pairs) - (1 - task.LABEL_NOISE)) < 0.03
