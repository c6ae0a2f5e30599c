"""`rlchat sft` end to end on a tiny model: the held-out loss falls, the adapter reloads with plain PEFT and
answers through the chat template, a finished stage refuses to re-run without --overwrite."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from rlchat.cli import app
from tests.conftest import snapshot

runner = CliRunner()


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_model, demo_data):
    run = tmp_path_factory.mktemp("sft") / "run"
    res = runner.invoke(app, ["sft", "--run-dir", str(run), "--model", str(tiny_model), "--dataset",
                              str(demo_data["sft"]), "--max-steps", "40", "--batch-size", "16", "--lr", "1e-2",
                              "--lora-r", "16", "--eval-fraction", "0.05", "--logging-steps", "10",
                              "--save-steps", "20", "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return run, res


def test_sft_lora_learns_and_writes_run_dir(sft_run):
    run, res = sft_run
    manifest = json.loads((run / "run.json").read_text())
    entry = manifest["stages"]["sft"]
    assert entry["status"] == "done"
    m = entry["metrics"]
    # A random-init model predicts ~uniformly (loss ~ ln(vocab), token accuracy ~0). LoRA on a random base sharpens
    # slowly, but 40 steps must still cut the held-out loss by a clear margin and make most next tokens right;
    # a broken trainer (no gradient, wrong labels) stays at the start.
    assert m["eval_loss"] < m["eval_loss_before"] - 0.5, m
    assert m["eval_token_accuracy"] > 0.3, m
    assert entry["outputs"]["kind"] == "lora"
    assert (run / "sft" / "adapter" / "adapter_config.json").exists()
    assert (run / "sft" / "adapter" / "adapter_model.safetensors").exists()
    rows = [json.loads(line) for line in (run / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in rows) and any("eval_loss" in r for r in rows)
    assert entry["inputs"]["dataset"]["hash"].startswith("sha256:")
    assert entry["versions"]["torch"]


def test_sft_adapter_loads_with_plain_peft_and_chats(sft_run, tiny_model):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, _ = sft_run
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = PeftModel.from_pretrained(base, run / "sft" / "adapter")
    tok = AutoTokenizer.from_pretrained(run / "sft" / "tokenizer")
    ids = tok.apply_chat_template([{"role": "user", "content": "Tell me about the red fox."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    reply = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert reply.strip(), "the SFT model should answer with some text"


def test_finished_sft_refuses_rerun_without_overwrite(sft_run, tiny_model, demo_data):
    run, _ = sft_run
    before = snapshot(run)
    res = runner.invoke(app, ["sft", "--run-dir", str(run), "--model", str(tiny_model), "--dataset",
                              str(demo_data["sft"]), "--max-steps", "2"])
    assert res.exit_code == 2
    assert "overwrite" in res.output
    assert snapshot(run) == before


def test_status_table(sft_run):
    run, _ = sft_run
    res = runner.invoke(app, ["status", str(run)])
    assert res.exit_code == 0 and "sft" in res.output and "done" in res.output
