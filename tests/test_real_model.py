"""A short pipeline on the real SmolLM2-135M-Instruct (`make real-model` -> .models/smollm2-135m-instruct/; skipped
when it is not there): sample-pairs -> train-reward (LoRA, a few steps) -> ppo (LoRA, two steps) -> eval on a few
held-out prompts, with no SFT stage. Checks that the outputs load with stock transformers/peft (no rlchat code),
that generation goes through the model's own chat template and stops at <|im_end|>, and that the reward model is
read at the token PPO reads it at. Minutes on 2 CPU cores, hence slow."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlchat.cli import app

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / ".models" / "smollm2-135m-instruct"
TOP = r"re:.*layers\.(2[6-9])\..*_proj"  # LoRA on the top 4 layers: a fast backward pass
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (MODEL / "config.json").is_file(),
                                 reason="no real model: run `make real-model` (fetched by `make test`)")]
runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    work = tmp_path_factory.mktemp("real")
    invoke("demo-data", work / "data", "--task", "readable")
    pairs = work / "pairs.jsonl"
    invoke("sample-pairs", "--model", MODEL, "--dataset", work / "data" / "prompts.jsonl", "--judge",
           "rlchat.tasks.readable:judge", "--out", pairs, "--max-prompts", 8, "--samples", 3,
           "--max-new-tokens", 24, "--temperature", 0.7, "--batch-size", 24, "--label-noise", 0.1)
    run = work / "run"
    invoke("train-reward", "--run-dir", run, "--model", MODEL, "--dataset", pairs, "--max-steps", 3,
           "--batch-size", 2, "--eval-fraction", 0.25, "--lr", "1e-3", "--lora-target-modules", TOP)
    invoke("ppo", "--run-dir", run, "--model", MODEL, "--dataset", work / "data" / "prompts.jsonl",
           "--episodes", 8, "--batch-size", 4, "--response-length", 24, "--ppo-epochs", 1, "--lr", "1e-3",
           "--value-model", "policy", "--lora-target-modules", TOP)
    invoke("eval", "--run-dir", run, "--dataset", work / "data" / "eval_prompts.jsonl", "--max-prompts", 4,
           "--max-new-tokens", 48, "--judge", "rlchat.tasks.readable:judge")
    return {"work": work, "run": run, "pairs": pairs}


def test_pairs_are_sampled_from_the_model_and_labelled(pipeline):
    rows = read_jsonl(pipeline["pairs"])
    assert rows and all(r["judge_chosen"] >= r["judge_rejected"] or r["label_flipped"] for r in rows)
    assert all("<|im_end|>" not in r["chosen"][0]["content"] for r in rows)  # decoded without special tokens


def test_outputs_load_with_stock_transformers_and_peft(pipeline):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    run = pipeline["run"]
    # the tokenizer the run saved: its pad token is not the EOS (a GGUF's may be: SmolLM2's says pad = <|im_end|>),
    # so the stock classifier's "last token that is not pad" is the final <|im_end|>, as in training
    tok = AutoTokenizer.from_pretrained(str(run / "reward" / "tokenizer"))
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(MODEL)), str(run / "ppo" / "policy"))
    assert any("lora_A" in n for n, _ in policy.named_parameters())
    seq = AutoModelForSequenceClassification.from_pretrained(str(MODEL), num_labels=1)
    seq.config.pad_token_id = tok.pad_token_id
    reward = PeftModel.from_pretrained(seq, str(run / "reward" / "adapter")).eval()
    # the stage's own held-out scores are reproduced by the stock model on the same token ids
    from rlchat.run_models import reward_input_ids

    saved = read_jsonl(run / "reward" / "eval_scores.jsonl")[0]
    pair = read_jsonl(pipeline["pairs"])[saved["row"]]
    ids = reward_input_ids(tok, pair["prompt"], pair["chosen"], 192)[0]
    assert ids[-1] == tok.eos_token_id  # read at <|im_end|>, as PPO reads it, not at the template's "\n" after it
    with torch.no_grad():
        score = reward(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert score == pytest.approx(saved["chosen"], abs=1e-3)


def test_generation_uses_the_chat_template_and_stops_at_im_end(pipeline):
    from rlchat import models
    from rlchat.generation import encode_prompt, stop_token_ids

    tok = models.load_tokenizer(str(MODEL))
    lm = models.load_causal_lm(str(MODEL))
    assert tok.eos_token == "<|im_end|>" and stop_token_ids(lm, tok) == [tok.convert_tokens_to_ids("<|im_end|>")]
    assert tok.pad_token_id != tok.eos_token_id
    ids = encode_prompt(tok, [{"role": "user", "content": "Hi"}])
    assert tok.decode(ids).endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")  # its own template
    rows = read_jsonl(pipeline["run"] / "eval" / "responses.jsonl")
    report = json.loads((pipeline["run"] / "eval" / "report.json").read_text())
    assert report["settings"]["policies"] == ["base", "ppo"] and report["settings"]["reference"] == "base"
    for row in rows:
        for name in ("base", "ppo"):
            r = row["policies"][name]
            assert "<|im_end|>" not in r["response"] and "<|im_start|>" not in r["response"]
            assert r["eos"] or r["length"] == 48  # stopped at <|im_end|>, or ran to the limit
    # a short answer ends at <|im_end|> well before the limit ("What is the capital of France?" style)
    greedy = lm.generate(**tok.apply_chat_template([[{"role": "user", "content": "What is the capital of France?"}]],
                                                   add_generation_prompt=True, return_tensors="pt",
                                                   return_dict=True), max_new_tokens=40, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    text = tok.decode(greedy[0])
    assert "Paris" in text and text.rstrip().endswith("<|im_end|>")


def test_manifest_records_the_lineage_without_sft(pipeline):
    stages = json.loads((pipeline["run"] / "run.json").read_text())["stages"]
    assert "sft" not in stages
    assert stages["reward"]["inputs"]["base"]["name"] == str(MODEL) and stages["reward"]["inputs"]["base"]["hash"]
    assert stages["ppo"]["parent"] == "reward" and stages["ppo"]["outputs"]["base"] == str(MODEL)
    assert stages["eval"]["parent"] == "ppo"
