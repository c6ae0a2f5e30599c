"""Assistant-only loss with a chat template TRL cannot patch (rlchat/assistant_mask.py): the mask covers exactly the
assistant replies and their end token, the trained labels are -100 everywhere else, `rlchat sft` trains through it,
and a template that is not prefix-preserving stops with one line before anything is written.

The chat model here is the tiny test model with a ChatML-like template without `{% generation %}` markers (TRL's
get_training_chat_template raises for it, as for SmolLM2's); the slow test runs the real SmolLM2-135M-Instruct
(.models/smollm2-135m-instruct, `make real-model`) when it is there.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlchat.cli import app
from tests.conftest import snapshot

runner = CliRunner()

# ChatML-like: role header and newline, the reply, the eos token (assistant) or <|end|> (others), a newline
# (newlines as {{ '\\n' }}: transformers renders templates with trim_blocks, which drops one after a block tag)
CHATML = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
          "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}<|end|>{% endif %}{{ '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
# counts the messages in its first line: rendering a prefix of a chat changes how the chat starts
NOT_PREFIX_PRESERVING = "<|system|>{{ messages | length }}<|end|>" + CHATML

CHAT = [{"role": "system", "content": "Answer in one sentence."},
        {"role": "user", "content": "What color is the red apple?"},
        {"role": "assistant", "content": "The apple is red."},
        {"role": "user", "content": "And the green pear?"},
        {"role": "assistant", "content": "The pear is green."}]


def _with_template(src: Path, dst: Path, template: str) -> Path:
    """A copy of the model directory `src` whose tokenizer has `template` as its chat template."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(dst)
    tok.chat_template = template
    tok.save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def chatml_model(tmp_path_factory, tiny_model) -> Path:
    return _with_template(tiny_model, tmp_path_factory.mktemp("chatml") / "model", CHATML)


@pytest.fixture(scope="module")
def chatml_tokenizer(chatml_model):
    from rlchat import models

    return models.load_tokenizer(str(chatml_model))


@pytest.fixture(scope="module")
def chats_file(tmp_path_factory) -> Path:
    """24 chats: single-turn, with a system message, and two assistant turns."""
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    rows = []
    for i in range(24):
        chat = [{"role": "user", "content": f"What is {i} plus one?"},
                {"role": "assistant", "content": f"{i} plus one is {i + 1}."}]
        if i % 3 == 1:
            chat = [{"role": "system", "content": "Be brief."}, *chat]
        if i % 3 == 2:
            chat += [{"role": "user", "content": "And plus two?"}, {"role": "assistant", "content": f"{i + 2}."}]
        rows.append(json.dumps({"messages": chat}))
    path.write_text("\n".join(rows) + "\n")
    return path


def _hand_built(tok, chat: list[dict]) -> tuple[list[int], list[int]]:
    """The expected (input_ids, mask), piece by piece: every role header, every system/user turn and its end are
    not trained; each assistant reply with its eos token and the newline after it are."""
    pieces = []
    for m in chat:
        if m["role"] == "assistant":
            pieces += [(f"<|assistant|>\n", 0), (m["content"] + tok.eos_token + "\n", 1)]
        else:
            pieces += [(f"<|{m['role']}|>\n{m['content']}<|end|>\n", 0)]
    ids, mask = [], []
    for text, trained in pieces:
        piece_ids = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece_ids
        mask += [trained] * len(piece_ids)
    return ids, mask


def test_trl_cannot_patch_this_template_but_keeps_its_own(chatml_tokenizer, tiny_model):
    from rlchat import models
    from rlchat.assistant_mask import trl_can_mask

    assert not trl_can_mask(chatml_tokenizer)
    assert trl_can_mask(models.load_tokenizer(str(tiny_model)))  # {% generation %} markers: TRL's own path


@pytest.mark.parametrize("chat", [CHAT[1:3], CHAT[:3], CHAT[1:], CHAT], ids=["one-turn", "system", "two-turns",
                                                                          "system-two-turns"])
def test_mask_is_the_assistant_replies_and_their_end_token(chatml_tokenizer, chat):
    from rlchat.assistant_mask import chat_masks

    tok = chatml_tokenizer
    ids, mask = chat_masks(tok, chat)
    want_ids, want_mask = _hand_built(tok, chat)
    assert ids == want_ids  # the pieces tokenize as the whole chat does
    assert mask == want_mask, [(tok.decode([i]), m) for i, m in zip(ids, mask)]
    replies = [m["content"] for m in chat if m["role"] == "assistant"]
    assert sum(mask) == sum(len(tok(r + tok.eos_token + "\n", add_special_tokens=False)["input_ids"])
                            for r in replies)


def test_an_opening_assistant_turn_is_not_trained(chatml_tokenizer):
    from rlchat.assistant_mask import chat_masks

    chat = [{"role": "assistant", "content": "Hello."}, *CHAT[1:3]]
    ids, mask = chat_masks(chatml_tokenizer, chat)
    opening = len(chatml_tokenizer("<|assistant|>\nHello." + chatml_tokenizer.eos_token + "\n",
                                   add_special_tokens=False)["input_ids"])
    assert mask[:opening] == [0] * opening
    assert mask[opening:] == _hand_built(chatml_tokenizer, chat[1:])[1]


def _capture_trainer(monkeypatch) -> dict:
    """Patch the stages' train() so the test sees the SFTTrainer rlchat built (then train as usual)."""
    from rlchat.stages import common

    seen, real_train = {}, common.train

    def train(trainer, *args, **kwargs):
        seen["trainer"] = trainer
        return real_train(trainer, *args, **kwargs)

    monkeypatch.setattr(common, "train", train)
    return seen


def _labels_are_the_mask(trainer, tokenizer, chats: list[list[dict]], max_length: int) -> None:
    """Every prepared row (train, in any order) has the chat's tokens truncated to max_length, and labels equal to
    them where the hand-built mask says trained, -100 elsewhere."""
    from rlchat.assistant_mask import chat_masks

    want = set()
    for chat in chats:
        ids, mask = chat_masks(tokenizer, chat)
        want.add((tuple(ids[:max_length]), tuple(t if m else -100 for t, m in zip(ids[:max_length],
                                                                                mask[:max_length]))))
    got = {(tuple(r["input_ids"]), tuple(r["labels"])) for r in trainer.train_dataset}
    assert got <= want and len(got) == len(trainer.train_dataset)


def test_sft_trains_on_assistant_tokens_only(chatml_model, chatml_tokenizer, chats_file, tmp_path, monkeypatch):
    import torch

    seen = _capture_trainer(monkeypatch)
    run = tmp_path / "run"
    res = runner.invoke(app, ["sft", "--run-dir", str(run), "--model", str(chatml_model), "--dataset",
                              str(chats_file), "--max-steps", "2", "--batch-size", "4", "--eval-fraction", "0.25",
                              "--max-length", "32", "--lora-r", "4", "--save-steps", "100"])
    assert res.exit_code == 0, res.output
    assert "rlchat masks the assistant tokens" in res.output
    entry = json.loads((run / "run.json").read_text())["stages"]["sft"]
    assert entry["status"] == "done" and entry["metrics"]["assistant_masks"] == "rlchat"

    trainer = seen["trainer"]
    chats = [json.loads(line)["messages"] for line in chats_file.read_text().splitlines()]
    # 32 tokens keep every chat's first reply (they start at token 16 to 27) and cut the longer chats (up to 51)
    _labels_are_the_mask(trainer, chatml_tokenizer, chats, max_length=32)
    assert len(trainer.train_dataset) == 18 and len(trainer.eval_dataset) == 6
    assert max(len(r["input_ids"]) for r in trainer.train_dataset) == 32
    assert trainer.eval_dataset.column_names == ["input_ids", "labels"]
    # the loss only counts those tokens: the model's loss is the cross-entropy of the labelled positions alone
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    model = trainer.model.eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    logits, targets = out.logits[:, :-1], batch["input_ids"][:, 1:]
    trained = batch["labels"][:, 1:] != -100
    assert bool(trained.any()) and bool((~trained & (batch["attention_mask"][:, 1:] == 1)).any())
    manual = torch.nn.functional.cross_entropy(logits[trained].float(), targets[trained])
    assert torch.allclose(out.loss, manual, atol=1e-5)


def test_not_prefix_preserving_template_is_one_line_exit_2(tiny_model, chats_file, tmp_path):
    model = _with_template(tiny_model, tmp_path / "model", NOT_PREFIX_PRESERVING)
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("kept\n")
    before = snapshot(run)
    res = runner.invoke(app, ["sft", "--run-dir", str(run), "--model", str(model), "--dataset", str(chats_file),
                              "--max-steps", "2"])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.output
    assert "not prefix-preserving" in errors[0] and "row 0 of" in errors[0]
    assert "Fix: pass --no-assistant-only-loss, or use a chat template with {% generation %} markers" in errors[0]
    assert snapshot(run) == before


def test_no_assistant_only_loss_leaves_the_datasets_to_trl(chatml_tokenizer):
    from types import SimpleNamespace

    from rlchat.assistant_mask import prepare

    cfg = SimpleNamespace(assistant_only_loss=False, dataset="d.jsonl", model="m", eval_split=None)
    assert prepare(cfg, chatml_tokenizer, "messages", "train", None) == ("train", None, None)
    cfg.assistant_only_loss = True
    assert prepare(cfg, chatml_tokenizer, "prompt_completion", "train", "eval") == ("train", "eval", None)


# ------------------------------------------------------------------------------------------------ real model

REAL = Path(__file__).resolve().parents[1] / ".models" / "smollm2-135m-instruct"


@pytest.mark.slow
@pytest.mark.skipif(not (REAL / "config.json").is_file(), reason="real model not there (make real-model)")
def test_real_smollm2_sft_masks_the_assistant_spans(chats_file, tmp_path, monkeypatch):
    """SmolLM2-135M-Instruct's ChatML template (no markers, not one TRL patches): 2 steps of `rlchat sft` finish, and
    the trained labels of every row decode to exactly its assistant replies, each closed by <|im_end|> and newline."""
    seen = _capture_trainer(monkeypatch)
    run = tmp_path / "run"
    res = runner.invoke(app, ["sft", "--run-dir", str(run), "--model", str(REAL), "--dataset", str(chats_file),
                              "--max-steps", "2", "--batch-size", "2", "--eval-fraction", "0", "--lora-r", "4",
                              "--save-steps", "100"])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "run.json").read_text())["stages"]["sft"]["metrics"]["assistant_masks"] == "rlchat"
    trainer = seen["trainer"]
    tok = trainer.processing_class
    want = sorted("".join(m["content"] + "<|im_end|>\n" for m in json.loads(line)["messages"]
                          if m["role"] == "assistant") for line in chats_file.read_text().splitlines())
    got = sorted(tok.decode([t for t in row["labels"] if t != -100]) for row in trainer.train_dataset)
    assert got == want
