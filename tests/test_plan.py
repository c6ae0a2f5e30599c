"""Dry runs: every shipped recipe resolves and validates offline without loading weights or writing anything."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlchat.cli import app

runner = CliRunner()
RECIPES = sorted(Path(__file__).resolve().parents[1].joinpath("recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_dry_runs(recipe, tmp_path, monkeypatch, demo_data, tiny_model):
    root = recipe.parents[1]
    local = recipe.name in ("demo.yaml", "sums.yaml")  # built-in tasks: files the README's commands create
    monkeypatch.chdir(root if not local else tmp_path)
    if recipe.name == "demo.yaml":  # make them here
        (tmp_path / ".demo").mkdir()
        (tmp_path / ".demo" / "data").symlink_to(Path(demo_data["sft"]).parent)
        (tmp_path / ".demo" / "model").symlink_to(tiny_model)
    if recipe.name == "sums.yaml":
        from rlchat.demo.sums import write_sums_data

        write_sums_data(tmp_path / ".sums" / "data", n_sft=64, n_pairs=64)
        (tmp_path / ".sums" / "model").symlink_to(tiny_model)
    if "smollm2" in recipe.name:  # the real-model recipe: files `make real-model` / `make demo-real` create
        from rlchat.tasks.readable import write_data

        monkeypatch.chdir(tmp_path)
        import shutil

        from transformers import LlamaConfig

        # SmolLM2-135M's shape (a dry run reads the config only; no weights are needed)
        model_dir = tmp_path / ".models" / "smollm2-135m-instruct"
        shutil.copytree(tiny_model, model_dir)
        LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True).save_pretrained(model_dir)
        write_data(tmp_path / ".demo-real" / "data", n_prompts=20, n_eval=5)
        (tmp_path / ".demo-real" / "pairs.jsonl").symlink_to(demo_data["pairs"])
    res = runner.invoke(app, ["plan", str(recipe), "--run-dir", str(tmp_path / "run"), "--json"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout[res.stdout.index("["):])
    # an instruct-model recipe may start at train-reward (no sft stage); the first stage trains either way
    assert [e["stage"] for e in plan][0] == ("reward" if "smollm2" in recipe.name else "sft")
    first = plan[0]
    assert first["params"]["total"] > first["params"]["trainable"] > 0 or first["params"]["mode"] == "full"
    if "smollm2" in recipe.name:  # LoRA r=16 on every projection of the top 8 of 30 layers (the recipe's regex)
        assert first["params"]["trainable"] == 8 * 16 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536))
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_known_model_parameter_count_matches_published_size():
    from rlchat.config import SFTConfig
    from rlchat.plan import _model_config, count_params

    config, source = _model_config("Qwen/Qwen2.5-0.5B-Instruct")
    assert config is not None
    counts = count_params(config, SFTConfig(run_dir="r", lora_r=16))
    assert 490e6 < counts["total"] < 500e6  # published: 494M
    # LoRA r=16 on all linear layers of 24 blocks: 16 * sum(in+out) over q,k,v,o,gate,up,down
    per_block = 16 * ((896 + 896) + (896 + 128) * 2 + (896 + 896) + (896 + 4864) * 2 + (4864 + 896))
    assert counts["trainable"] == 24 * per_block


def test_stage_dry_run_checks_local_dataset_format(tmp_path, tiny_model):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    res = runner.invoke(app, ["train-reward", "--dry-run", "--run-dir", str(tmp_path / "run"), "--model",
                              str(tiny_model), "--dataset", str(bad)])
    assert res.exit_code == 2 and "chosen" in res.output
    assert not (tmp_path / "run").exists()
