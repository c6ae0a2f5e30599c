"""`rlchat sample-pairs` (rlchat/sample_pairs.py) on a tiny model and the reward stage's "data, training or
held-out size?" diagnosis (rlchat/reward_checks.py). (A run that starts from --model with no SFT stage is
tests/test_eval.py's; the reward model's read position under a ChatML template is tests/test_reward_inputs.py's.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlchat.cli import app
from rlchat.errors import DataError
from tests.conftest import snapshot

runner = CliRunner()
JUDGE_FILE = '''
def judge(prompts, completions):
    # longer answers are better: a judge whose order is easy to check
    return [float(len(c)) for c in completions]
'''


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture()
def judge_file(tmp_path) -> str:
    path = tmp_path / "judge_len.py"
    path.write_text(JUDGE_FILE)
    return f"{path}:judge"


# ------------------------------------------------------------------------------------------------ pure parts


def test_make_pairs_orders_by_judge_skips_ties_and_flips_with_noise():
    from rlchat.sample_pairs import make_pairs

    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(4)]
    answers = [("short", "longer one"), ("b", "a"), ("same", "same"), ("x", "yy")]
    scores = [(0.1, 0.9), (0.8, 0.2), (0.5, 0.5), (0.40, 0.45)]
    eos = [(True, False)] * 4
    rows, skipped = make_pairs(prompts, answers, scores, eos, label_noise=0.0, min_margin=0.1, seed=0)
    assert skipped == 2  # the tie and the pair within min_margin
    assert [r["chosen"][0]["content"] for r in rows] == ["longer one", "b"]
    assert rows[0]["judge_chosen"] == 0.9 and rows[0]["judge_rejected"] == 0.1 and rows[0]["eos_chosen"] is False
    assert all(not r["label_flipped"] for r in rows)
    many = [(f"a{i}", f"b{i}") for i in range(2000)]
    rows, _ = make_pairs(prompts * 500, many, [(0.0, 1.0)] * 2000, [(True, True)] * 2000, 0.1, 0.0, seed=1)
    flipped = [r for r in rows if r["label_flipped"]]
    assert 0.08 < len(flipped) / len(rows) < 0.12
    assert all(r["judge_chosen"] < r["judge_rejected"] for r in flipped)  # a flip puts the worse answer first


def test_make_pairs_takes_the_best_and_the_worst_of_k_answers():
    from rlchat.sample_pairs import make_pairs

    prompts = [[{"role": "user", "content": "q"}]] * 2
    answers = [("a", "b", "c", "d"), ("w", "x", "y", "z")]
    scores = [(0.3, 0.9, 0.1, 0.5), (0.2, 0.2, 0.2, 0.25)]
    eos = [(True, False, True, True)] * 2
    rows, skipped = make_pairs(prompts, answers, scores, eos, label_noise=0.0, min_margin=0.1, seed=0)
    assert skipped == 1  # best and worst of the second prompt are 0.05 apart
    assert (rows[0]["chosen"][0]["content"], rows[0]["rejected"][0]["content"]) == ("b", "c")
    assert (rows[0]["judge_chosen"], rows[0]["judge_rejected"]) == (0.9, 0.1)
    assert (rows[0]["eos_chosen"], rows[0]["eos_rejected"]) == (False, True)


def test_make_pairs_all_keeps_every_two_answers_ordered_by_the_judge():
    from rlchat.sample_pairs import make_pairs

    prompts = [[{"role": "user", "content": "q"}]]
    answers = [("a", "b", "c", "d")]
    scores = [(0.3, 0.9, 0.1, 0.35)]
    rows, skipped = make_pairs(prompts, answers, scores, [(True,) * 4], label_noise=0.0, min_margin=0.1, seed=0,
                               pairing="all")
    got = [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows]
    # best first: b 0.9, d 0.35, a 0.3, c 0.1; (d, a) differ by 0.05 <= min_margin: skipped
    assert got == [("b", "d"), ("b", "a"), ("b", "c"), ("d", "c"), ("a", "c")] and skipped == 1
    assert all(r["judge_chosen"] > r["judge_rejected"] for r in rows)
    best_worst, _ = make_pairs(prompts, answers, scores, [(True,) * 4], 0.0, 0.1, 0)
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in best_worst] == [("b", "c")]


def test_pairs_of_one_prompt_are_held_out_together():
    """Several pairs per prompt (sample-pairs --pairs all): train-reward's and dpo's split holds out whole
    prompts; with one pair per prompt it is the plain row split, row for row."""
    from datasets import Dataset

    from rlchat import data
    from rlchat.pairs import Pair, prompt_groups

    pairs = [Pair(i, [{"role": "user", "content": f"q{i // 6}"}], "a", "b", None) for i in range(60)]
    ds = Dataset.from_dict({"i": list(range(60))})
    train, held = data.split_eval(ds, 0.2, 0, groups=prompt_groups(pairs))
    assert len(held) == 12 and len(train) == 48
    held_prompts = {i // 6 for i in held["i"]}
    assert len(held_prompts) == 2 and not held_prompts & {i // 6 for i in train["i"]}
    assert data.split_eval(ds, 0.2, 0, groups=prompt_groups(pairs))[1]["i"] == held["i"]  # seeded
    assert data.split_eval(ds, 0.2, 1, groups=prompt_groups(pairs))[1]["i"] != held["i"]
    unique = [Pair(i, [{"role": "user", "content": f"q{i}"}], "a", "b", None) for i in range(60)]
    assert data.split_eval(ds, 0.2, 0, groups=prompt_groups(unique))[1]["i"] == data.split_eval(ds, 0.2, 0)[1]["i"]
    one = [Pair(i, [{"role": "user", "content": "q"}], "a", "b", None) for i in range(60)]
    with pytest.raises(DataError, match="share one prompt"):
        data.split_eval(ds, 0.2, 0, groups=prompt_groups(one))


def test_diagnose_tells_training_from_data():
    from rlchat.reward_checks import diagnose, judge_margin_stats

    assert diagnose(0.80, 100, 0.9, 64, 0.4)["verdict"] == "ok"
    # training-pair accuracy at chance and a flat loss: the training did not fit
    d = diagnose(0.50, 100, 0.52, 64, 0.693)
    assert d["verdict"] == "optimisation" and "--lr" in d["lines"][-1]
    # measured on SmolLM2 (192 sampled pairs, lr 5e-4, 1 epoch): 0.64 on training pairs, loss 0.687: underfit
    assert diagnose(0.55, 29, 0.64, 64, 0.687)["verdict"] == "optimisation"
    # fits its training pairs, chance on held-out ones: the data
    judge = judge_margin_stats([{"judge_chosen": 0.50 + 0.0001 * i, "judge_rejected": 0.50, "label_flipped": i < 2}
                                for i in range(20)] + [{"judge_chosen": 0.9, "judge_rejected": 0.1,
                                                         "label_flipped": False}])
    assert judge["small_fraction"] > 0.9 and judge["flip_rate"] == pytest.approx(2 / 21)
    d = diagnose(0.52, 100, 0.95, 64, 0.2, judge)
    assert d["verdict"] == "data" and "margins are small" in d["lines"][-1] and "median |margin|" in d["lines"][0]
    # 0.70 on 10 pairs: the interval [0.40, 0.89] contains 0.5 only because there are few pairs
    assert diagnose(0.70, 10, 0.95, 64, 0.2)["verdict"] == "too_few_eval_pairs"
    assert judge_margin_stats([{"chosen": "a"}]) is None


# ------------------------------------------------------------------------------------------- sample-pairs CLI


def test_sample_pairs_on_a_tiny_model(tiny_model, demo_data, judge_file, tmp_path):
    out = tmp_path / "pairs.jsonl"
    result = invoke("sample-pairs", "--model", tiny_model, "--dataset", demo_data["prompts"], "--judge", judge_file,
                    "--out", out, "--max-prompts", 6, "--max-new-tokens", 12, "--batch-size", 4,
                    "--label-noise", 0.0, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    rows = read_jsonl(out)
    assert summary["pairs"] == len(rows) and summary["prompts"] == 6 and summary["pairs"] + summary["skipped"] == 6
    prompts = [json.loads(line)["prompt"] for line in open(demo_data["prompts"])][:6]
    for r in rows:
        assert r["prompt"] in prompts
        assert r["chosen"][0]["role"] == r["rejected"][0]["role"] == "assistant"
        # chosen is the longer answer (the judge), no label noise asked for
        assert len(r["chosen"][0]["content"]) > len(r["rejected"][0]["content"])
        assert r["judge_chosen"] == float(len(r["chosen"][0]["content"]))
    # the pairs are what train-reward reads (TRL's explicit conversational preference format)
    from rlchat import data

    ds = data.load_any(str(out))
    assert data.detect_preference_format(ds, str(out)) == "explicit"
    # same seed, same pairs
    again = tmp_path / "again.jsonl"
    invoke("sample-pairs", "--model", tiny_model, "--dataset", demo_data["prompts"], "--judge", judge_file,
           "--out", again, "--max-prompts", 6, "--max-new-tokens", 12, "--batch-size", 4)
    assert again.read_text() == out.read_text()
    # train-reward on them says what it makes of a weak model, with the pairs' judge margins
    run = tmp_path / "run"
    res = invoke("train-reward", "--run-dir", run, "--model", tiny_model, "--dataset", out, "--max-steps", 1,
                 "--batch-size", 2, "--eval-fraction", "0.34")
    assert res.exit_code == 0, res.output
    metrics = json.loads((run / "run.json").read_text())["stages"]["reward"]["metrics"]
    assert metrics["diagnosis"] in ("ok", "optimisation", "data", "too_few_eval_pairs")
    assert "judge margins of the pairs: median |margin|" in res.output


@pytest.mark.parametrize("extra, message", [
    (["--label-noise", "0.5"], "label_noise must be in [0, 0.5)"),
    (["--temperature", "0"], "temperature must be > 0"),
    (["--samples", "1"], "samples must be >= 2"),
    (["--judge", "nosuchmodule_xyz:judge"], "could not be imported"),
    (["--dataset", "missing.jsonl"], "dataset file not found"),
    (["--out", "EXISTING"], "already exists"),
])
def test_sample_pairs_bad_input_is_one_line_and_writes_nothing(tiny_model, demo_data, judge_file, tmp_path, extra,
                                                               message):
    existing = tmp_path / "existing.jsonl"
    existing.write_text("keep\n")
    args = {"--model": str(tiny_model), "--dataset": demo_data["prompts"], "--judge": judge_file,
            "--out": str(tmp_path / "new.jsonl")}
    for k, v in zip(extra[::2], extra[1::2]):
        args[k] = str(existing) if v == "EXISTING" else v
    before = snapshot(tmp_path)
    result = invoke("sample-pairs", *[x for kv in args.items() for x in kv], "--max-new-tokens", 4)
    assert result.exit_code == 2
    assert message in result.output and result.output.count("error:") == 1 and "Traceback" not in result.output
    assert snapshot(tmp_path) == before
