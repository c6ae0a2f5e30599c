"""`rlchat dpo` on a tiny random-init model.

The learning test uses the colour-matching pairs of test_reward_stage.py (the chosen answer names the colour the
prompt asks about, the rejected one another colour): DPO's loss must fall from log 2 and its chosen-vs-rejected
margin must rise from exactly 0 (the LoRA adapter starts at zero, so the policy starts equal to its reference,
the same model with the adapter off). The other tests take a few steps (resume) or none (bad input must fail
before anything is written).
"""
from __future__ import annotations

import json
import math

import pytest

from rlchat.config import DPOConfig, resolve
from rlchat.errors import ConfigError, DataError, RunDirError
from rlchat.stages import dpo
from tests.conftest import interrupt_trainer_at, snapshot
from tests.test_reward_stage import colour_pairs, read_jsonl, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def make_cfg(run_dir, dataset, **overrides) -> DPOConfig:
    values = dict(run_dir=str(run_dir), dataset=str(dataset), batch_size=8, max_steps=2, logging_steps=1,
                  save_steps=100, lora_r=8, lora_alpha=16, lr=1e-3, seed=0, max_length=64)
    values.update(overrides)
    return resolve(DPOConfig, "dpo", None, values)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    """A LoRA DPO policy trained for 120 steps on 400 colour pairs (~40 held out, by prompt), and the trainer it
    used."""
    from rlchat.progress import TrainerProgress

    root = tmp_path_factory.mktemp("dpo")
    pairs_path = write_jsonl(root / "pairs.jsonl", colour_pairs(400))
    seen = {}
    original = dpo._trainer

    def spy(*args, **kwargs):
        trainer = original(*args, **kwargs)
        seen["ref_model"], seen["peft"] = trainer.ref_model, hasattr(trainer.model, "disable_adapter")
        return trainer

    dpo._trainer = spy
    try:
        cfg = make_cfg(root / "run", pairs_path, model=str(tiny_model), max_steps=120, eval_fraction=0.1, lr=5e-3, beta=0.5,
                       logging_steps=4, eval_steps=40)
        metrics = dpo.run(cfg)
    finally:
        dpo._trainer = original
    assert TrainerProgress  # the rows below are what its metrics.jsonl writer logged
    return {"run": root / "run", "metrics": metrics, "seen": seen, "tiny_model": tiny_model}


def test_dpo_loss_falls_and_margin_rises(trained):
    rows = [r for r in read_jsonl(trained["run"] / "dpo" / "metrics.jsonl") if "rewards/margins" in r]
    first, last = rows[0], rows[-3:]
    # step 1: policy == reference, so every log-ratio is 0: margin 0, loss log 2
    assert first["step"] == 1
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    last_loss = sum(r["loss"] for r in last) / len(last)
    last_margin = sum(r["rewards/margins"] for r in last) / len(last)
    assert last_loss < 0.5 * math.log(2), rows
    assert last_margin > 0.5, rows
    m = trained["metrics"]
    assert m["eval_accuracy"] >= 0.9 and m["eval_margin"] > 0.5 and m["eval_loss"] < math.log(2)
    # prompts repeat in these pairs: whole prompts are held out, 10% of the pairs rounded up to a prompt boundary
    assert m["n_eval"] + m["n_train"] == 400 and 40 <= m["n_eval"] <= 50 and m["steps"] == 120


def test_reference_is_the_adapter_switched_off(trained):
    # TRL 1.16 keeps no reference model for a PEFT policy with ref_model=None: one model in memory
    assert trained["seen"] == {"ref_model": None, "peft": True}


def test_outputs_and_lineage(trained):
    from peft import AutoPeftModelForCausalLM

    run = trained["run"]
    entry = json.loads((run / "run.json").read_text())["stages"]["dpo"]
    assert entry["status"] == "done" and entry["parent"] is None  # --model, no sft
    assert entry["inputs"]["base"]["name"] == str(trained["tiny_model"])
    assert entry["outputs"]["adapter"] == "dpo/adapter" and entry["outputs"]["policy"] == "dpo/adapter"
    assert (run / "dpo" / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "dpo" / "tokenizer" / "tokenizer_config.json").is_file()
    assert (run / "dpo" / "config.yaml").is_file()
    assert not list((run / "dpo").rglob("*.bin")) and not list((run / "dpo").rglob("*.tmp*"))
    # the adapter names its base, so stock peft loads it without rlchat
    model = AutoPeftModelForCausalLM.from_pretrained(str(run / "dpo" / "adapter"))
    assert model.peft_config["default"].base_model_name_or_path == str(trained["tiny_model"].resolve())


def test_interrupted_run_resumes_from_checkpoint(tmp_path, tiny_model, monkeypatch):
    path = write_jsonl(tmp_path / "pairs.jsonl", colour_pairs(40))
    run = tmp_path / "run"
    cfg = make_cfg(run, path, model=str(tiny_model), max_steps=4, save_steps=2, eval_fraction=0)
    interrupt_trainer_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        dpo.run(cfg)
    monkeypatch.undo()
    assert json.loads((run / "run.json").read_text())["stages"]["dpo"]["status"] == "interrupted"
    assert (run / "dpo" / "checkpoints" / "checkpoint-2").is_dir()

    # another loss or other pairs would mix two trainings in one policy: refused, nothing touched
    before = snapshot(run)
    for changed in ({"beta": 0.5}, {"dataset": write_jsonl(tmp_path / "other.jsonl", colour_pairs(40, seed=1))}):
        settings = dict(model=str(tiny_model), max_steps=4, save_steps=2, eval_fraction=0)
        with pytest.raises(RunDirError, match="cannot resume the dpo stage"):
            dpo.run(make_cfg(run, changed.pop("dataset", path), **settings, **changed))
    assert snapshot(run) == before

    m = dpo.run(cfg)
    assert m["resumed_from"] == "checkpoint-2" and m["steps"] == 4 and m["train_loss"] is not None
    steps = [r["step"] for r in read_jsonl(run / "dpo" / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4]  # one uninterrupted run: the rows logged after checkpoint-2 were dropped once


def test_full_weights_train_against_a_frozen_copy(tmp_path, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    path = write_jsonl(tmp_path / "pairs.jsonl", colour_pairs(16))
    m = dpo.run(make_cfg(tmp_path / "run", path, model=str(tiny_model), full=True, eval_fraction=0, lr=1e-3))
    entry = json.loads((tmp_path / "run" / "run.json").read_text())["stages"]["dpo"]
    assert entry["outputs"]["kind"] == "full" and entry["outputs"]["policy"] == "dpo/model"
    assert m["trainable_params"] == m["total_params"]
    trained = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "dpo" / "model"))
    start = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    moved = [n for (n, p), q in zip(trained.named_parameters(), start.parameters()) if not torch.equal(p, q)]
    assert moved  # the policy trained; its reference was the untouched start (TRL: loss log 2 at step 1)
    first = next(r for r in read_jsonl(tmp_path / "run" / "dpo" / "metrics.jsonl") if "loss" in r)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)


@pytest.mark.parametrize("rows, match", [
    ([{"prompt": "a", "completion": "b"}] * 3, "no 'chosen' and 'rejected'"),
    ([{"text": "hello"}] * 3, "no 'chosen' and 'rejected'"),
    ([{"prompt": "Q:", "chosen": " yes", "rejected": " yes"}] * 3, "all 3 pairs .* identical"),
])
def test_data_without_pairs_fails_before_writing(tmp_path, tiny_model, rows, match):
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    run = tmp_path / "run"
    with pytest.raises(DataError, match=match) as info:
        dpo.run(make_cfg(run, path, model=str(tiny_model)))
    assert "\n" not in str(info.value) and "Fix:" in str(info.value)
    assert not run.exists()


def test_no_sft_no_model_no_dataset_and_bad_settings(tmp_path, tiny_model):
    path = write_jsonl(tmp_path / "pairs.jsonl", colour_pairs(4))
    with pytest.raises(RunDirError, match="no sft stage.*--model"):
        dpo.run(make_cfg(tmp_path / "run", path))
    with pytest.raises(ConfigError, match="needs preference pairs"):
        dpo.run(make_cfg(tmp_path / "run", "", model=str(tiny_model)))
    with pytest.raises(ConfigError, match="beta"):
        make_cfg(tmp_path / "run", path, beta=0)
    with pytest.raises(ConfigError, match="loss_type"):
        make_cfg(tmp_path / "run", path, loss_type="kto")
    assert not (tmp_path / "run").exists()


def test_as_chat_renders_text_pairs_as_turns():
    from rlchat.pairs import Pair

    row = dpo.as_chat(Pair(0, "Tell me about the red fox.", " The red fox.", " The blue fox."))
    assert row == {"prompt": [{"role": "user", "content": "Tell me about the red fox."}],
                   "chosen": [{"role": "assistant", "content": " The red fox."}],
                   "rejected": [{"role": "assistant", "content": " The blue fox."}]}


# ------------------------------------------------------------------------------------ from the run's SFT model


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_model, demo_data):
    """A run directory with a finished LoRA sft stage (2 steps) on the demo data."""
    from typer.testing import CliRunner

    from rlchat.cli import app

    run = tmp_path_factory.mktemp("dpo-cli") / "run"
    res = CliRunner().invoke(app, [str(a) for a in (
        "sft", "--run-dir", run, "--model", tiny_model, "--dataset", demo_data["sft"], "--max-steps", 2,
        "--batch-size", 4, "--eval-fraction", 0, "--lora-r", 4, "--lora-alpha", 8)])
    assert res.exit_code == 0, res.output
    return run


def test_cli_dpo_from_sft_and_bad_input(sft_run, demo_data, tmp_path):
    from typer.testing import CliRunner

    from rlchat.cli import app

    runner = CliRunner()
    not_pairs = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Tell me about the red fox."}] * 4)
    before = snapshot(sft_run)
    res = runner.invoke(app, ["dpo", "--run-dir", str(sft_run), "--dataset", str(not_pairs)])
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "no 'chosen' and 'rejected'" in lines[0] and "Fix:" in lines[0], res.output
    assert "Traceback" not in res.output and snapshot(sft_run) == before

    res = runner.invoke(app, ["dpo", "--run-dir", str(sft_run), "--dataset", str(demo_data["pairs"]),
                              "--max-steps", "2", "--batch-size", "4", "--lora-r", "4", "--lora-alpha", "8",
                              "--max-length", "96", "--json"])
    assert res.exit_code == 0, res.output
    entry = json.loads((sft_run / "run.json").read_text())["stages"]["dpo"]
    assert entry["status"] == "done" and entry["parent"] == "sft" and entry["inputs"]["base"]["name"] == "sft"
    adapter_cfg = json.loads((sft_run / "dpo" / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str((sft_run / "sft" / "merged").resolve())

    # the policy goes where the other policies go: export (merged, standalone) and chat
    out = tmp_path / "exported"
    res = runner.invoke(app, ["export", str(sft_run), str(out), "--stage", "dpo"])
    assert res.exit_code == 0, res.output
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    res = runner.invoke(app, ["chat", str(sft_run), "--stage", "dpo", "--prompt", "Tell me about the red fox.",
                              "--max-new-tokens", "8"])
    assert res.exit_code == 0, res.output
