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
    res = runner.invoke(app, ["plan", str(recipe), "--run-dir", str(tmp_path / "run"), "--json"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout[res.stdout.index("["):])
    assert [e["stage"] for e in plan][0] == "sft"
    sft = plan[0]
    assert sft["params"]["total"] > sft["params"]["trainable"] > 0 or sft["params"]["mode"] == "full"
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
