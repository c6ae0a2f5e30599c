"""Plain-text rows read as one-turn chats (rlchat/one_turn.py): what sft and train-reward train on is the chat
template ppo and eval render, token for token.

  * sft: a plain `prompt` + `completion` row gives SFTTrainer exactly the input ids and trained labels of the same
    row given as `messages`, with a template TRL masks and with one rlchat masks (rlchat/assistant_mask.py);
  * train-reward: the reward model's input ids of a plain explicit pair equal those of the pair as messages and
    those RewardScorer builds at PPO time for that prompt (a plain `prompt` column) and response;
  * `text` rows and implicit plain pairs stay raw, and ppo / eval warn once about them (mismatch_warning).
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from rlchat import one_turn
from rlchat.config import SFTConfig, resolve

PROMPT, COMPLETION = "Tell me about the red fox.", "The red fox is quick."
REJECTED = "The blue fox is slow."


def write_jsonl(path, rows: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


class _Built(BaseException):
    """Raised in place of training: the test needs the SFTTrainer the stage built, not a trained model (a
    BaseException, so the stage passes it on as it is)."""


def sft_trained_tokens(tmp_path, model, rows: list[dict], name: str, monkeypatch) -> tuple[list, dict]:
    """[(input_ids, trained token ids)] of every row as `rlchat sft` hands them to TRL's SFTTrainer (its own
    collator makes the labels), and the log lines' text."""
    from rlchat.progress import console
    from rlchat.stages import common, sft

    seen = {}

    def build_only(trainer, *args, **kwargs):
        seen["trainer"] = trainer
        raise _Built

    monkeypatch.setattr(common, "train", build_only)
    cfg = resolve(SFTConfig, "sft", None, {"run_dir": str(tmp_path / f"run-{name}"), "model": str(model),
                                           "dataset": str(write_jsonl(tmp_path / f"{name}.jsonl", rows)),
                                           "eval_fraction": 0.0, "max_steps": 1})
    with console.capture() as out, pytest.raises(_Built):
        sft.run(cfg)
    trainer = seen["trainer"]
    tokens = []
    for row in trainer.train_dataset:
        batch = trainer.data_collator([row])
        ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
        tokens.append((ids, [t for t, label in zip(ids, labels) if label != -100]))
    return sorted(tokens), {"log": out.get()}


@pytest.fixture(scope="module")
def chatml_model(tmp_path_factory, tiny_model):
    """The tiny model with a ChatML-like template TRL cannot patch: rlchat masks the assistant tokens."""
    from tests.test_assistant_mask import CHATML, _with_template

    return _with_template(tiny_model, tmp_path_factory.mktemp("one-turn") / "chatml", CHATML)


@pytest.mark.parametrize("which", ["tiny", "chatml"])
def test_sft_plain_prompt_completion_trains_the_tokens_of_the_same_chat(which, tmp_path, tiny_model, chatml_model,
                                                                        monkeypatch):
    from rlchat import models

    model = tiny_model if which == "tiny" else chatml_model
    pairs = [(f"{PROMPT} ({i})", f"{COMPLETION} Number {i}.") for i in range(4)]
    plain, plain_out = sft_trained_tokens(tmp_path, model, [{"prompt": p, "completion": c} for p, c in pairs],
                                          "plain", monkeypatch)
    chats, _ = sft_trained_tokens(tmp_path, model, [{"messages": chat(p, c)} for p, c in pairs], "messages",
                                  monkeypatch)
    assert plain == chats  # token by token: input ids and the trained (label) tokens
    assert "prompt-completion strings read as one-turn chats" in plain_out["log"]

    tok = models.load_tokenizer(str(model))
    for (ids, trained), (p, c) in zip(plain, sorted(pairs)):
        # what ppo generates from: the prompt rendered with the generation prompt, then the answer is trained
        prompt_ids = list(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True, return_dict=True,
                                                  add_generation_prompt=True)["input_ids"])
        assert ids[:len(prompt_ids)] == prompt_ids
        assert trained == ids[len(prompt_ids):] and tok.decode(trained).startswith(c)


def test_sft_text_rows_and_chats_are_left_as_they_are():
    from datasets import Dataset

    text = Dataset.from_list([{"text": "Tell me about the red fox. The red fox is quick."}])
    assert one_turn.sft_as_chats(text, "text") == (text, one_turn.RAW)
    messages = Dataset.from_list([{"messages": chat(PROMPT, COMPLETION)}])
    assert one_turn.sft_as_chats(messages, "messages") == (messages, one_turn.CHAT)
    conversational = Dataset.from_list([{"prompt": chat(PROMPT, COMPLETION)[:1],
                                         "completion": chat(PROMPT, COMPLETION)[1:]}])
    assert one_turn.sft_as_chats(conversational, "prompt_completion") == (conversational, one_turn.CHAT)
    plain = Dataset.from_list([{"prompt": PROMPT, "completion": COMPLETION, "id": 7}])
    converted, rendering = one_turn.sft_as_chats(plain, "prompt_completion")
    assert rendering == one_turn.ONE_TURN
    assert converted.to_list() == [{"prompt": chat(PROMPT, COMPLETION)[:1], "completion": chat(PROMPT, COMPLETION)[1:],
                                    "id": 7}]


# ------------------------------------------------------------------------------------------------ reward pairs


def reward_ids(rows: list[dict], fmt: str, tok) -> tuple[list, list]:
    """(chosen ids, rejected ids) train-reward trains on for `rows` (pairs.read_pairs + tokenize_pairs)."""
    from datasets import Dataset

    from rlchat.pairs import read_pairs, tokenize_pairs

    pairs, _ = read_pairs(Dataset.from_list(rows), fmt)
    cols, _, _ = tokenize_pairs(pairs, tok, None)
    return cols["chosen_ids"], cols["rejected_ids"]


def ppo_scorer_ids(tok, prompt_rows: list[dict], responses: list[str]) -> list[list[int]]:
    """The ids RewardScorer builds at PPO time: prompts as rlchat/prompts.py reads them, responses as text."""
    from rlchat.data import to_prompt_messages
    from rlchat.run_models import RewardScorer

    scorer = RewardScorer(model=None, tokenizer=tok)
    built = []
    scorer.score_ids = built.extend  # the scorer's forward pass is not needed: only what it would read
    scorer([to_prompt_messages(row, "prompt") for row in prompt_rows], responses)
    return built


def test_reward_plain_explicit_pair_is_read_as_the_chat_ppo_scores(tiny_model):
    from rlchat import models
    from rlchat.generation import encode_prompt

    tok = models.load_tokenizer(str(tiny_model))
    plain = reward_ids([{"prompt": PROMPT, "chosen": COMPLETION, "rejected": REJECTED}], "explicit", tok)
    as_chat = reward_ids([{"prompt": chat(PROMPT, "")[:1], "chosen": chat("", COMPLETION)[1:],
                           "rejected": chat("", REJECTED)[1:]}], "explicit", tok)
    assert plain == as_chat
    at_ppo = ppo_scorer_ids(tok, [{"prompt": PROMPT}] * 2, [COMPLETION, REJECTED])
    assert [plain[0][0], plain[1][0]] == at_ppo
    # the prompt part is what PPO generates from, and the answer ends at EOS, where PPO reads the reward
    prompt_ids = encode_prompt(tok, chat(PROMPT, "")[:1])
    assert plain[0][0][:len(prompt_ids)] == prompt_ids and plain[0][0][-1] == tok.eos_token_id


def test_reward_implicit_plain_pairs_stay_raw_text(tiny_model):
    from datasets import Dataset

    from rlchat import models
    from rlchat.pairs import read_pairs

    tok = models.load_tokenizer(str(tiny_model))
    rows = [{"chosen": f"{PROMPT} {COMPLETION}", "rejected": f"{PROMPT} {REJECTED}"}]
    (pair,), _ = read_pairs(Dataset.from_list(rows), "implicit")
    assert not pair.one_turn and pair.prompt == f"{PROMPT} The"  # the shared prefix, cut at a word
    chosen, rejected = reward_ids(rows, "implicit", tok)
    assert chosen[0] == tok(rows[0]["chosen"] + tok.eos_token)["input_ids"]
    assert rejected[0] == tok(rows[0]["rejected"] + tok.eos_token)["input_ids"]
    assert one_turn.pairs_rendering(pair.one_turn, conversational=False) == one_turn.RAW


def test_score_reads_plain_rows_as_chats_and_writes_them_as_given():
    from datasets import Dataset

    from rlchat.score import score_items

    pc = score_items(Dataset.from_list([{"prompt": PROMPT, "completion": COMPLETION}]))
    assert pc[0]["prompt"] == PROMPT and pc[0]["completion"] == COMPLETION
    assert pc[0]["scored"] == (chat(PROMPT, "")[:1], chat("", COMPLETION)[1:])
    pairs = score_items(Dataset.from_list([{"prompt": PROMPT, "chosen": COMPLETION, "rejected": REJECTED}]))
    assert [(it["prompt"], it["completion"], it["label"]) for it in pairs] == [
        (PROMPT, COMPLETION, "chosen"), (PROMPT, REJECTED, "rejected")]
    assert pairs[0]["scored"] == pc[0]["scored"]
    implicit = score_items(Dataset.from_list([{"chosen": f"{PROMPT} {COMPLETION}",
                                               "rejected": f"{PROMPT} {REJECTED}"}]))
    assert "scored" not in implicit[0] and implicit[0]["prompt"] == f"{PROMPT} The"


# ---------------------------------------------------------------------------------------- the ppo/eval warning


def fake_run(**stages) -> SimpleNamespace:
    """A run whose `record(stage)` is the given {status, metrics}."""
    return SimpleNamespace(record=lambda stage: stages.get(stage))


def done(**metrics) -> dict:
    return {"status": "done", "metrics": metrics}


def test_mismatch_warning_names_the_raw_stage_and_the_fix():
    chats = fake_run(sft=done(format="prompt_completion", rendering=one_turn.ONE_TURN),
                     reward=done(format="explicit", rendering=one_turn.ONE_TURN))
    assert one_turn.mismatch_warning(chats, "ppo") is None
    text = fake_run(sft=done(format="text", rendering=one_turn.RAW), reward=done(rendering=one_turn.CHAT))
    line = one_turn.mismatch_warning(text, "ppo")
    assert line.startswith("warning: the sft policy was trained on plain `text` rows") and "\n" not in line
    assert "Fix: give sft `prompt` + `completion` or `messages` rows" in line and "reward" not in line
    assert one_turn.mismatch_warning(text, "ppo", sft=False) is None  # ppo --model: the sft policy is not used
    both = fake_run(sft=done(format="text"), reward=done(format="implicit", rendering=one_turn.RAW))
    line = one_turn.mismatch_warning(both, "eval")
    assert "the reward model was trained on implicit plain-text pairs" in line and "eval renders" in line
    assert "train-reward explicit `prompt` + `chosen` + `rejected`" in line
    failed = fake_run(sft={"status": "failed", "metrics": {"rendering": one_turn.RAW}})
    assert one_turn.mismatch_warning(failed, "eval") is None


def test_stages_record_the_rendering_and_ppo_eval_warn_about_raw_text(tmp_path, tiny_model):
    """Two short runs: plain prompt/completion sft + plain explicit pairs (one-turn chats, no warning), and `text`
    sft + implicit plain pairs (raw text: the manifest says so, and the start of eval and of ppo warns once,
    naming both)."""
    from rlchat.config import EvalConfig, PPOConfig, RewardConfig
    from rlchat.progress import console
    from rlchat.stages import evaluate, ppo, reward, sft

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": PROMPT}])
    steps = {"max_steps": 1, "batch_size": 4, "eval_fraction": 0.0, "save_steps": 100}
    texts = {"one-turn": [{"prompt": f"{PROMPT} {i}", "completion": COMPLETION} for i in range(4)],
             "raw": [{"text": f"{PROMPT} {i} {COMPLETION}"} for i in range(4)]}
    pairs = {"one-turn": [{"prompt": f"{PROMPT} {i}", "chosen": COMPLETION, "rejected": REJECTED} for i in range(4)],
             "raw": [{"chosen": f"{PROMPT} {i} {COMPLETION}", "rejected": f"{PROMPT} {i} {REJECTED}"}
                     for i in range(4)]}
    for kind, rendering in (("one-turn", one_turn.ONE_TURN), ("raw", one_turn.RAW)):
        run = tmp_path / f"run-{kind}"
        with console.capture() as out:
            sft_m = sft.run(resolve(SFTConfig, "sft", None, {
                "run_dir": str(run), "model": str(tiny_model), **steps,
                "dataset": str(write_jsonl(tmp_path / f"sft-{kind}.jsonl", texts[kind]))}))
            reward_m = reward.run(resolve(RewardConfig, "reward", None, {
                "run_dir": str(run), **steps, "dataset": str(write_jsonl(tmp_path / f"pairs-{kind}.jsonl",
                                                                         pairs[kind]))}))
        log = out.get()
        stages = json.loads((run / "run.json").read_text())["stages"]
        assert sft_m["rendering"] == stages["sft"]["metrics"]["rendering"] == rendering
        assert reward_m["rendering"] == stages["reward"]["metrics"]["rendering"] == rendering
        assert ("prompt-completion strings read as one-turn chats" in log) == (kind == "one-turn")
        assert ("prompt/chosen/rejected strings read as one-turn chats" in log) == (kind == "one-turn")

        for stage, validate, config in (("eval", evaluate._validate, EvalConfig), ("ppo", ppo._validate, PPOConfig)):
            with console.capture() as out:  # step 1 of each stage (reading only)
                validate(resolve(config, stage, None, {"run_dir": str(run), "dataset": str(prompts)}))
            warnings = [line for line in out.get().splitlines() if line.startswith("warning:")]
            if kind == "one-turn":
                assert warnings == [], stage
            else:
                expected = one_turn.mismatch_warning(SimpleNamespace(record=lambda s: stages.get(s)), stage)
                assert warnings == [expected] and f"but {stage} renders" in expected
                assert "sft policy" in expected and "reward model" in expected
