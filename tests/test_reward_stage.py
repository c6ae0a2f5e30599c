"""`rlchat train-reward` / `score` on a tiny random-init model.

The learning test uses a colour-matching task: the prompt asks about "the red fox", the chosen answer names the
same colour, the rejected one another colour. The task is symmetric in the colours, so ANY model that has not
learned it (random score head, broken trainer) sits at about 0.5 pairwise accuracy; the test checks that for the
untrained model, then that training lifts held-out accuracy to >= 0.9 and that the saved model reloads with the
same scores. The other tests use a few training steps (formats, margins, truncation, resume, full weights) or
none at all (bad input must fail before anything is written).
"""
from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest

from rlchat.config import RewardConfig, resolve
from rlchat.errors import ConfigError, DataError, ModelError, RunDirError
from rlchat.one_turn import user_turn
from rlchat.pairs import pair_stats, read_pairs, tokenize_pairs
from rlchat.run_models import (Base, RewardScorer, check_reward_base, load_base_causal, load_reward_model,
                               reward_input_ids)
from rlchat.score import score
from rlchat.stages import reward
from tests.conftest import interrupt_trainer_at, snapshot

COLORS = ("red", "blue", "green", "yellow", "black", "white", "brown", "pink")
THINGS = ("fox", "apple", "boat", "bird", "cat", "car", "house", "kite", "ball", "cup", "hat", "fish")


def colour_pairs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        color, thing = rng.choice(COLORS), rng.choice(THINGS)
        other = rng.choice([c for c in COLORS if c != color])
        rows.append({"prompt": f"Tell me about the {color} {thing}.", "chosen": f" The {color} {thing}.",
                     "rejected": f" The {other} {thing}."})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_cfg(run_dir: Path, dataset: Path, **overrides) -> RewardConfig:
    values = dict(run_dir=str(run_dir), dataset=str(dataset), batch_size=8, max_steps=2, logging_steps=1,
                  save_steps=100, lora_r=8, lora_alpha=16, lr=1e-3, seed=0)
    values.update(overrides)
    return resolve(RewardConfig, "reward", None, values)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Two cores shared with other jobs: one intra-op thread is several times faster than two fighting ones.
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------- learning


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    """A LoRA reward model trained for 200 steps on ~800 colour pairs (~200 held out: whole prompts, as the
    colour prompts repeat)."""
    import time

    import torch
    from transformers import set_seed

    from rlchat import data, models

    root = tmp_path_factory.mktemp("reward")
    pairs_path = write_jsonl(root / "pairs.jsonl", colour_pairs(1000))

    # the same base the stage starts from, with a fresh random score head, before any training
    causal, tok = load_base_causal(None, Base(str(tiny_model), None, None))
    set_seed(0)
    untrained = models.seq_cls_from_causal(causal, pad_token_id=tok.pad_token_id)
    pairs, _ = read_pairs(data.load_any(str(pairs_path)), "explicit")
    cols, _, _ = tokenize_pairs(pairs, tok, 512)
    scores = RewardScorer(untrained, tok, sort_by_length=True).score_ids(cols["chosen_ids"] + cols["rejected_ids"])
    n = len(pairs)
    untrained_acc = pair_stats(scores[:n], scores[n:])["accuracy"]
    del causal, untrained, scores
    torch.manual_seed(0)

    cfg = make_cfg(root / "run", pairs_path, model=str(tiny_model), max_steps=200, batch_size=16, lr=1e-3,
                   lora_r=16, lora_alpha=32, eval_fraction=0.2, logging_steps=20, save_steps=100)
    t0 = time.time()
    metrics = reward.run(cfg)
    return {"run": root / "run", "metrics": metrics, "untrained_acc": untrained_acc, "wall": time.time() - t0,
            "pairs": pairs_path, "root": root}


@pytest.mark.slow
def test_reward_model_learns_held_out_preferences(trained):
    m = trained["metrics"]
    # symmetric task: an untrained model is at chance whatever its random head prefers
    assert 0.35 <= trained["untrained_acc"] <= 0.65, trained["untrained_acc"]
    assert m["eval_accuracy"] >= 0.9, m
    assert m["eval_margin"] > 1.0, m
    assert m["trl_eval_accuracy"] >= 0.9, m
    assert m["chosen_mean"] > m["rejected_mean"]
    assert m["n_train"] + m["n_eval"] == 1000 and 200 <= m["n_eval"] <= 220  # 20%, rounded up to whole prompts
    assert (m["n_truncated"], m["n_identical_skipped"]) == (0, 0)
    assert m["steps"] == 200 and math.isfinite(m["train_loss"])
    assert "eval_accuracy" in m["summary"] and str(trained["run"]) in m["summary"]
    # the reward model's health: a good model on 200 held-out pairs is above chance and not collapsed
    assert m["warnings"] == [] and m["accuracy_ci"][0] > 0.8 and 0 <= m["calibration_ece"] <= 1
    assert "ECE" in m["summary"] and "warning" not in m["summary"]
    print(f"\nheld-out accuracy {m['eval_accuracy']:.3f} (untrained {trained['untrained_acc']:.3f}), "
          f"stage {m['wall_s']:.1f}s, test fixture {trained['wall']:.1f}s")


@pytest.mark.slow
def test_run_dir_outputs(trained, tiny_model):
    from safetensors import safe_open

    from rlchat.fileio import content_hash

    run = trained["run"]
    entry = json.loads((run / "run.json").read_text())["stages"]["reward"]
    assert entry["status"] == "done" and entry["parent"] is None  # --model: no SFT stage needed
    out = entry["outputs"]
    assert out["kind"] == "lora" and out["adapter"] == "reward/adapter" and out["model"] is None
    assert out["tokenizer"] == "reward/tokenizer" and out["base"] == str(tiny_model)
    assert out["base_hash"] == content_hash(tiny_model)
    for key in ("eval_accuracy", "eval_margin", "chosen_mean", "chosen_std", "rejected_mean", "rejected_std",
                "n_train", "n_eval", "n_truncated", "n_identical_skipped", "wall_s"):
        assert key in entry["metrics"], key
    adapter = run / "reward" / "adapter"
    assert (adapter / "adapter_config.json").exists()
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        assert any("score" in k for k in f.keys()), "the score head must be saved with the adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    assert (run / "reward" / "tokenizer" / "tokenizer_config.json").exists()
    assert (run / "reward" / "config.yaml").exists()
    stats = json.loads((run / "reward" / "reward_stats.json").read_text())
    assert {"mean", "std", "chosen_mean", "chosen_std", "rejected_mean", "rejected_std"} <= set(stats)
    assert stats["std"] > 0 and stats["source"] == "eval" and stats["n_pairs"] == entry["metrics"]["n_eval"]
    rows = read_jsonl(run / "reward" / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    assert train_rows and all({"accuracy", "margin"} <= set(r) for r in train_rows)
    assert any("eval_accuracy" in r for r in rows)


@pytest.mark.slow
def test_reloaded_model_gives_the_same_scores(trained, tiny_model):
    import torch
    from peft import PeftModel

    from rlchat import data, models

    run = trained["run"]
    saved = read_jsonl(run / "reward" / "eval_scores.jsonl")
    assert len(saved) == trained["metrics"]["n_eval"]
    # no held-out prompt was trained on (pairs that share a prompt stay on one side of the split)
    prompts = [json.loads(line)["prompt"] for line in trained["pairs"].read_text().splitlines()]
    held = {r["row"] for r in saved}
    assert not {prompts[i] for i in held} & {p for i, p in enumerate(prompts) if i not in held}
    model, tok = load_reward_model(run, device=models.pick_device())  # where the stage scored them
    ds = data.load_any(str(trained["pairs"]))
    pairs, _ = read_pairs(ds.select([r["row"] for r in saved]), "explicit")
    cols, _, _ = tokenize_pairs(pairs, tok, 512)
    scores = RewardScorer(model, tok, sort_by_length=True).score_ids(cols["chosen_ids"] + cols["rejected_ids"])
    n = len(saved)
    torch.testing.assert_close(scores[:n], torch.tensor([r["chosen"] for r in saved]), atol=1e-5, rtol=0)
    torch.testing.assert_close(scores[n:], torch.tensor([r["rejected"] for r in saved]), atol=1e-5, rtol=0)

    # plain PEFT on a seq-cls model of the base loads the adapter too (what PPO or a user would do)
    base = models.seq_cls_from_causal(models.load_causal_lm(str(tiny_model)), pad_token_id=tok.pad_token_id)
    plain = PeftModel.from_pretrained(base, str(run / "reward" / "adapter")).to(models.pick_device())
    again = RewardScorer(plain, tok, sort_by_length=True).score_ids(cols["chosen_ids"][:16])
    torch.testing.assert_close(again, scores[:16], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_score_writes_rows(trained):
    root, run = trained["root"], trained["run"]
    rows = colour_pairs(12, seed=7)
    pairs_path = write_jsonl(root / "score_pairs.jsonl", rows)
    res = score(run, str(pairs_path), root / "scored_pairs.jsonl", batch_size=5)
    out = read_jsonl(root / "scored_pairs.jsonl")
    assert res["n"] == len(out) == 24
    assert [r["label"] for r in out[:2]] == ["chosen", "rejected"]
    assert out[0]["prompt"] == rows[0]["prompt"] and out[0]["completion"] == rows[0]["chosen"]
    assert all(isinstance(r["score"], float) for r in out)
    assert res["accuracy"] >= 0.9 and "pairwise accuracy" in res["summary"]

    pc_path = write_jsonl(root / "score_pc.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows])
    score(run, str(pc_path), root / "scored_pc.jsonl")
    pc = read_jsonl(root / "scored_pc.jsonl")
    assert [set(r) for r in pc] == [{"prompt", "completion", "score"}] * 12
    # the same text gets the same score whatever the row format and batch
    for a, b in zip(pc, out[0::2]):
        assert abs(a["score"] - b["score"]) < 1e-5

    with pytest.raises(DataError, match="none of which"):
        score(run, str(write_jsonl(root / "bad.jsonl", [{"text": "hi"}])), root / "never.jsonl")
    assert not (root / "never.jsonl").exists()


# ------------------------------------------------------------------------------ SFT base, base mismatch


@pytest.mark.slow
def test_starts_from_sft_and_refuses_a_changed_sft_base(tmp_path, tiny_model, demo_data):
    from rlchat.config import SFTConfig
    from rlchat.fileio import content_hash
    from rlchat.stages import sft

    run = tmp_path / "run"
    sft.run(resolve(SFTConfig, "sft", None, dict(run_dir=str(run), model=str(tiny_model),
                                                  dataset=str(demo_data["sft"]), max_steps=2, batch_size=4,
                                                  eval_fraction=0, save_steps=100)))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", read_jsonl(demo_data["pairs"])[:64])  # conversational, explicit
    m = reward.run(make_cfg(run, pairs, max_steps=2, eval_fraction=0.25))
    entry = json.loads((run / "run.json").read_text())["stages"]["reward"]
    assert entry["parent"] == "sft" and entry["outputs"]["base"] == "sft"
    assert entry["outputs"]["base_hash"] == content_hash(run / "sft" / "adapter")
    assert m["n_eval"] == 16 and m["format"] == "explicit" and m["rendering"] == "chat"
    model, _ = load_reward_model(run)  # the matching base loads
    assert model.config.num_labels == 1

    # retrain-like change of the SFT adapter: the reward adapter no longer fits it
    cfg_file = run / "sft" / "adapter" / "adapter_config.json"
    cfg_file.write_text(cfg_file.read_text() + "\n")
    with pytest.raises(ModelError, match="different version of the run's SFT model"):
        load_reward_model(run)
    with pytest.raises(ModelError, match="retrain"):
        score(run, str(pairs), tmp_path / "scores.jsonl")
    assert not (tmp_path / "scores.jsonl").exists()


def test_mismatched_model_base_refused(tmp_path, tiny_model):
    """--model base: a changed local model directory is caught by its content hash (no training needed)."""
    from rlchat.rundir import RunDir
    from rlchat.fileio import content_hash

    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    run = RunDir(tmp_path / "run")
    run.begin_stage("reward", config={}, inputs={}, parent=None, overwrite=False)
    run.finish_stage("reward", metrics={}, outputs={"kind": "lora", "adapter": "reward/adapter", "model": None,
                                                    "tokenizer": "reward/tokenizer", "base": str(base),
                                                    "base_hash": content_hash(base)})
    assert check_reward_base(run.path).name == str(base)
    (base / "config.json").write_text((base / "config.json").read_text() + " ")
    with pytest.raises(ModelError, match="different version of the model"):
        load_reward_model(run.path)


# ------------------------------------------------------------------- formats, margins, truncation, full


@pytest.mark.slow
def test_implicit_prompt_margin_truncation_identical(tmp_path, tiny_model, capsys):
    rows = []
    for i, r in enumerate(colour_pairs(40)):
        row = {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"], "margin": 0.5}
        if i < 8:  # long prompts: 20 extra words, over max_length
            pre = "Please answer kindly and briefly. " * 4
            row = {"chosen": pre + row["chosen"], "rejected": pre + row["rejected"], "margin": 0.5}
        if i in (10, 11):
            row["rejected"] = row["chosen"]
        rows.append(row)
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    m = reward.run(make_cfg(tmp_path / "run", path, model=str(tiny_model), max_length=24, eval_fraction=0.2,
                            center_rewards_coef=0.01))
    assert m["n_identical_skipped"] == 2
    assert m["n_truncated"] == 8
    assert m["has_margin"] and m["format"] == "implicit" and m["rendering"] == "raw text"
    assert m["n_train"] + m["n_eval"] == 38
    err = capsys.readouterr()
    text = " ".join((err.out + err.err).split())
    assert "skipped 2 of 40 pairs" in text and "rows 10, 11" in text
    assert "8 of 38 pairs are longer than max_length=24" in text
    rows = read_jsonl(tmp_path / "run" / "reward" / "metrics.jsonl")
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)


@pytest.mark.slow
def test_full_weights_save_and_reload(tmp_path, tiny_model):
    import torch

    path = write_jsonl(tmp_path / "pairs.jsonl", colour_pairs(40))
    m = reward.run(make_cfg(tmp_path / "run", path, model=str(tiny_model), full=True, eval_fraction=0.25))
    model_dir = tmp_path / "run" / "reward" / "model"
    assert (model_dir / "model.safetensors").exists() and not (tmp_path / "run" / "reward" / "adapter").exists()
    out = json.loads((tmp_path / "run" / "run.json").read_text())["stages"]["reward"]["outputs"]
    assert out["kind"] == "full" and out["model"] == "reward/model" and out["adapter"] is None
    from rlchat.models import pick_device

    model, tok = load_reward_model(tmp_path / "run", device=pick_device())
    saved = read_jsonl(tmp_path / "run" / "reward" / "eval_scores.jsonl")
    assert len(saved) == m["n_eval"] == 10
    rows = read_jsonl(path)
    # plain explicit pairs train as one-turn chats (rlchat/one_turn.py): the reloaded model scores each chosen
    # answer as PPO asks it, after the prompt as the user's turn
    scores = RewardScorer(model, tok, sort_by_length=True)([user_turn(rows[r["row"]]["prompt"]) for r in saved],
                                                           [rows[r["row"]]["chosen"] for r in saved])
    torch.testing.assert_close(scores, torch.tensor([r["chosen"] for r in saved]), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_killed_run_resumes_from_checkpoint(tmp_path, tiny_model, monkeypatch):
    path = write_jsonl(tmp_path / "pairs.jsonl", colour_pairs(40))
    cfg = make_cfg(tmp_path / "run", path, model=str(tiny_model), max_steps=4, save_steps=2, eval_fraction=0)
    interrupt_trainer_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        reward.run(cfg)
    monkeypatch.undo()
    entry = json.loads((tmp_path / "run" / "run.json").read_text())["stages"]["reward"]
    assert entry["status"] == "interrupted"
    assert (tmp_path / "run" / "reward" / "checkpoints" / "checkpoint-2").is_dir()

    # resuming with other data would mix two trainings: refused, nothing touched
    other = write_jsonl(tmp_path / "other.jsonl", colour_pairs(40, seed=1))
    before = snapshot(tmp_path / "run")
    with pytest.raises(RunDirError, match="cannot resume"):
        reward.run(make_cfg(tmp_path / "run", other, model=str(tiny_model), max_steps=4, save_steps=2,
                            eval_fraction=0))
    assert snapshot(tmp_path / "run") == before

    m = reward.run(cfg)
    assert m["resumed_from"] == "checkpoint-2" and m["steps"] == 4
    assert m["train_accuracy"] is not None and m["eval_accuracy"] is None  # no held-out split: stats on train
    stats = json.loads((tmp_path / "run" / "reward" / "reward_stats.json").read_text())
    assert stats["source"] == "train"


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("rows, error, match", [
    ([{"prompt": "a", "completion": "b"}], DataError, "no 'chosen' and 'rejected'"),
    ([{"prompt": "Q:", "chosen": " yes", "rejected": " yes"}] * 3, DataError, "all 3 pairs .* identical"),
    ([{"chosen": "Q: a", "rejected": "Q: b"}, {"chosen": "yes", "rejected": "no"},
      {"chosen": "fine", "rejected": "bad"}], DataError, r"2 of 3 implicit-prompt pairs .* share no prefix.*rows 1, 2"),
    ([{"prompt": "Q:", "chosen": " a", "rejected": " b", "margin": 1.0},
      {"prompt": "Q:", "chosen": " a", "rejected": " b", "margin": None}], DataError, "margin.*rows 1"),
    ([{"prompt": "Q:", "chosen": " a", "rejected": 3}], DataError, "row 0"),
])
def test_bad_pairs_fail_before_writing(tmp_path, tiny_model, rows, error, match):
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    run = tmp_path / "run"
    with pytest.raises(error, match=match) as info:
        reward.run(make_cfg(run, path, model=str(tiny_model)))
    assert "\n" not in str(info.value) and "Fix:" in str(info.value)
    assert not run.exists()


def test_no_sft_and_no_model_fails_before_writing(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", colour_pairs(4))
    with pytest.raises(RunDirError, match="has not run.*--model"):
        reward.run(make_cfg(tmp_path / "run", path))
    assert not (tmp_path / "run").exists()


def test_no_dataset_and_finished_stage(tmp_path, tiny_model):
    from rlchat.rundir import RunDir

    with pytest.raises(ConfigError, match="needs preference pairs"):
        reward.run(make_cfg(tmp_path / "run", "", model=str(tiny_model)))
    run = RunDir(tmp_path / "run")
    run.begin_stage("reward", config={}, inputs={}, parent=None, overwrite=False)
    run.finish_stage("reward", metrics={}, outputs={})
    before = snapshot(tmp_path / "run")
    path = write_jsonl(tmp_path / "pairs.jsonl", colour_pairs(4))
    with pytest.raises(RunDirError, match="overwrite"):
        reward.run(make_cfg(tmp_path / "run", path, model=str(tiny_model)))
    assert snapshot(tmp_path / "run") == before


# -------------------------------------------------------------------------------------------- helpers


def test_read_pairs_splits_implicit_prompts():
    from datasets import Dataset

    user = {"role": "user", "content": "Tell me about the red fox."}
    ds = Dataset.from_list([
        {"chosen": [user, {"role": "assistant", "content": "A red fox."}],
         "rejected": [user, {"role": "assistant", "content": "A blue fox."}]},
    ])
    (pair,), identical = read_pairs(ds, "implicit")
    assert pair.prompt == [user] and pair.chosen == [{"role": "assistant", "content": "A red fox."}]
    assert identical == []
    text = Dataset.from_list([{"chosen": "Q: the sky? A: blue", "rejected": "Q: the sky? A: bleak"}])
    (pair,), _ = read_pairs(text, "implicit")
    assert pair.prompt == "Q: the sky? A:" and pair.chosen == " blue" and pair.rejected == " bleak"
    no_prefix = Dataset.from_list([
        {"chosen": [user, {"role": "assistant", "content": "x"}],
         "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "y"}]},
    ])
    with pytest.raises(DataError, match="row.*0"):
        read_pairs(no_prefix, "implicit")


def test_encode_left_truncates(tiny_model):
    from rlchat import models

    tok = models.load_tokenizer(str(tiny_model))
    full, cut = reward_input_ids(tok, "Tell me about the red fox. ", "The red fox is here.", None)
    assert not cut and full[-1] == tok.eos_token_id  # plain text gets eos, as in TRL
    short, cut = reward_input_ids(tok, "Tell me about the red fox. ", "The red fox is here.", 5)
    assert cut and short == full[-5:]
    chat, _ = reward_input_ids(tok, [{"role": "user", "content": "Hi"}], [{"role": "assistant", "content": "Hello"}],
                            None)
    assert chat == list(tok.apply_chat_template([{"role": "user", "content": "Hi"},
                                                 {"role": "assistant", "content": "Hello"}],
                                                tokenize=True, return_dict=True)["input_ids"])


def test_pair_stats_by_hand():
    import torch

    s = pair_stats(torch.tensor([1.0, 2.0, 0.0]), torch.tensor([0.0, 2.0, 1.0]))
    # chosen > rejected in 1 of 3 pairs (a tie counts as wrong); margins 1, 0, -1
    assert s["accuracy"] == pytest.approx(1 / 3) and s["margin"] == pytest.approx(0.0)
    assert s["chosen_mean"] == pytest.approx(1.0) and s["rejected_mean"] == pytest.approx(1.0)
    assert s["mean"] == pytest.approx(1.0) and s["std"] == pytest.approx(math.sqrt(4 / 6))


def test_reward_health_calibration_by_hand_and_its_warnings():
    from rlchat.pairs import reward_health

    # margins 0 (p 0.5, conf 0.5, wrong: a tie), ln 3 (p 0.75, right), -ln 3 (p 0.25, conf 0.75, wrong), ln 9 (p 0.9)
    ln3, ln9 = math.log(3), math.log(9)
    h = reward_health([0.0, ln3, 0.0, ln9], [0.0, 0.0, ln3, 0.0])
    assert h["accuracy"] == pytest.approx(0.5)
    # bins of confidence over [0.5, 1] in tenths: 0.5 -> bin 0 {wrong}; 0.75 -> bin 5 {right, wrong}; 0.9 -> bin 8
    # ECE = 1/4 |0 - 0.5| + 2/4 |0.5 - 0.75| + 1/4 |1 - 0.9| = 0.125 + 0.125 + 0.025
    assert h["ece"] == pytest.approx(0.275)
    assert h["mean_confidence"] == pytest.approx((0.5 + 0.75 + 0.75 + 0.9) / 4)
    assert h["mean_abs_error"] == pytest.approx(1 - (0.5 + 0.75 + 0.25 + 0.9) / 4)
    assert len(h["warnings"]) == 1 and "not above chance" in h["warnings"][0]   # 4 pairs: CI reaches 0.5
    # a good model on enough pairs: no warning; a constant reward: collapsed (and at chance: ties count as wrong)
    good = reward_health([1.0 + 0.01 * i for i in range(100)], [-1.0] * 100)
    assert good["accuracy"] == 1.0 and good["warnings"] == []
    flat = reward_health([0.3] * 100, [0.3] * 100)
    assert any("collapsed to a constant" in w for w in flat["warnings"])
    assert any("not above chance" in w for w in flat["warnings"])
