"""The second built-in task (rlchat/demo/sums.py): its judge by hand, its splits, its plain-text formats."""
from __future__ import annotations

import json

import pytest

from rlchat.demo import sums


@pytest.mark.parametrize("answer, expected", [
    ("23 plus 45 is 68.", 1.0),                                         # every component 1
    ("23 plus 45 is 69.", 0.7),                                         # wrong sum: loses correct (0.3)
    ("It is 68.", 0.75),                                                # no restatement: loses restate (0.25)
    ("Maybe 23 plus 45 is 68.", 0.9),                                   # one hedge word: confident 0.5 -> -0.1
    # 11 words: length 1 - 3/16; two hedge words (sure, maybe): confident 0
    ("I am not sure, but maybe 23 plus 45 is 68.", 0.3 + 0.25 + 0.25 * (1 - 3 / 16)),
    ("45 is 68.", 0.3 + 0.25 * 0.5 + 0.25 + 0.2),                       # one operand restated: restate 0.5
    ("", 0.0),
    ("<|im_end|>", 0.0),
])
def test_judge_by_hand(answer, expected):
    assert sums.judge(["What is 23 plus 45?"], [answer]) == [pytest.approx(expected, abs=1e-6)]


def test_judge_reads_chat_prompts_and_length_falls_to_zero():
    msgs = [{"role": "user", "content": "Add 2 and 3."}]
    assert sums.judge([msgs], ["2 plus 3 is 5."]) == [1.0]
    long = "2 plus 3 is 5. " + " ".join(["word"] * 30)
    assert sums.judge_components("Add 2 and 3.", long)["length"] == 0.0
    with pytest.raises(ValueError):
        sums.judge(["a"], [])


def test_splits_are_disjoint_and_deterministic():
    s = sums.split_prompts(0)
    ab = {k: {(a, b) for _, a, b in v} for k, v in s.items()}
    assert not (ab["train"] & ab["ppo"]) and not (ab["train"] & ab["eval"]) and not (ab["ppo"] & ab["eval"])
    assert len(s["ppo"]) == 96 and len(s["eval"]) == 128
    assert sums.split_prompts(0) == s and sums.split_prompts(1) != s


def test_data_is_plain_text_and_mixed_quality(tmp_path):
    paths = sums.write_sums_data(tmp_path, seed=0, n_sft=200, n_pairs=200)
    sft = [json.loads(x) for x in paths["sft"].read_text().splitlines()]
    pairs = [json.loads(x) for x in paths["pairs"].read_text().splitlines()]
    assert all(set(r) == {"prompt", "completion"} and isinstance(r["completion"], str) for r in sft)
    assert all(set(r) == {"prompt", "chosen", "rejected"} and isinstance(r["chosen"], str) for r in pairs)
    scores = sums.judge([r["prompt"] for r in sft], [r["completion"] for r in sft])
    assert 0.02 < sum(s == 1.0 for s in scores) / len(scores) < 0.3   # ~GOOD_FRACTION perfect answers
    agree = sums.judge([r["prompt"] for r in pairs], [r["chosen"] for r in pairs])
    worse = sums.judge([r["prompt"] for r in pairs], [r["rejected"] for r in pairs])
    frac = sum(a > b for a, b in zip(agree, worse)) / len(pairs)
    assert 0.8 < frac < 0.97                                           # LABEL_NOISE of the labels swapped
    assert paths["corpus"].read_text().count("\n") > 1000
    assert sums.write_sums_data(tmp_path / "again", seed=0, n_sft=200, n_pairs=200)["sft"].read_bytes() == \
        paths["sft"].read_bytes()


def test_demo_data_task_option(tmp_path):
    from typer.testing import CliRunner

    from rlchat.cli import app

    res = CliRunner().invoke(app, ["demo-data", str(tmp_path / "d"), "--task", "sums"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "d" / "prompts.jsonl").read_text().splitlines()[0])["prompt"].endswith(("?", "."))
    res = CliRunner().invoke(app, ["demo-data", str(tmp_path / "e"), "--task", "nope"])
    assert res.exit_code == 2 and not (tmp_path / "e").exists()
