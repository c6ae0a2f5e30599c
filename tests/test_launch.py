"""`--num-processes` / `--accelerate-config`: the re-launch command line and the shipped accelerate config files.

The runs themselves (2 processes on CPU, gloo) are in tests/test_multiprocess.py.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlchat import cli, launch
from rlchat.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
ACCELERATE_CONFIGS = {
    "multi-gpu.yaml": ("MULTI_GPU", None),
    "zero2.yaml": ("DEEPSPEED", 2),
    "zero3.yaml": ("DEEPSPEED", 3),
    "fsdp.yaml": ("FSDP", None),
    "multi-node.yaml": ("MULTI_GPU", None),
}
runner = CliRunner()


def test_every_shipped_accelerate_config_is_tested():
    shipped = {p.name for p in (ROOT / "recipes" / "accelerate").glob("*.yaml")}
    assert shipped == set(ACCELERATE_CONFIGS)


@pytest.mark.parametrize("name", sorted(ACCELERATE_CONFIGS))
def test_accelerate_configs_load_with_accelerates_own_loader(name):
    cfg = launch.check_accelerate_config(ROOT / "recipes" / "accelerate" / name)
    kind, zero = ACCELERATE_CONFIGS[name]
    assert cfg["distributed_type"] == kind
    assert cfg["num_processes"] >= 8 and cfg["mixed_precision"] == "bf16" and cfg["use_cpu"] is False
    if zero is not None:
        assert cfg["deepspeed_config"]["zero_stage"] == zero
    if kind == "FSDP":
        assert cfg["fsdp_config"]["fsdp_version"] == 2
        assert cfg["fsdp_config"]["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # the final save gathers
    if name == "multi-node.yaml":
        assert cfg["num_machines"] == 2 and cfg["main_process_ip"] and cfg["main_process_port"]


def test_a_broken_accelerate_config_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("distributed_type: MULTI_GPU\nnum_processes: 2\nnot_an_accelerate_key: 1\n")
    with pytest.raises(ConfigError, match="does not load"):
        launch.check_accelerate_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        launch.launch_command(["sft"], 2, str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="at least 1"):
        launch.launch_command(["sft"], 0, None)


def test_launch_command_is_accelerate_launch_of_the_same_stage():
    cmd = launch.launch_command(["sft", "--run-dir", "r", "--json"], 2, None, port=29512)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert "--multi_gpu" in cmd and cmd[cmd.index("--num_processes") + 1] == "2"
    assert cmd[cmd.index("--main_process_port") + 1] == "29512"
    assert cmd[-6:] == ["-m", "rlchat", "sft", "--run-dir", "r", "--json"]
    cfg = str(ROOT / "recipes" / "accelerate" / "zero2.yaml")
    cmd = launch.launch_command(["sft"], None, cfg)
    assert cmd[cmd.index("--config_file") + 1] == cfg and "--multi_gpu" not in cmd and "--num_processes" not in cmd


def test_no_relaunch_inside_a_launched_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv(launch.LAUNCHED_ENV, raising=False)
    assert launch.should_relaunch(2, None) and launch.should_relaunch(None, "x.yaml")
    assert not launch.should_relaunch(1, None) and not launch.should_relaunch(None, None)
    monkeypatch.setenv("WORLD_SIZE", "2")  # started by accelerate/torchrun already
    assert not launch.should_relaunch(2, None)


def test_relaunch_arguments_parse_back_to_the_same_settings(monkeypatch, tmp_path):
    """The child gets the parent's settings: stage_argv(...) parsed by the CLI gives the same overrides."""
    seen = []
    monkeypatch.setattr(cli, "run_stage", lambda stage, module, recipe, overrides, json_out, dry_run=False:
                        seen.append((stage, recipe, overrides, json_out)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("sft: {epochs: 1}\n")
    args = ["sft", "--config", str(recipe), "--run-dir", "runs/x", "--model", "m", "--lr", "0.001", "--full",
            "--no-packing", "--lora-target-modules", "q_proj,v_proj", "--overwrite", "--json"]
    assert runner.invoke(cli.app, args).exit_code == 0
    stage, rec, overrides, json_out = seen[-1]
    argv = cli.stage_argv("sft", rec, overrides, json_out)
    assert runner.invoke(cli.app, argv).exit_code == 0
    assert seen[-1] == seen[-2]
    assert overrides["lora_target_modules"] == "q_proj,v_proj" and overrides["packing"] is False
    from rlchat.config import SFTConfig, resolve  # the config splits the list (one place for both CLI and recipe)

    assert resolve(SFTConfig, "sft", rec, overrides).lora_target_modules == ["q_proj", "v_proj"]


def test_num_processes_errors_are_one_line_exit_2(tmp_path):
    res = runner.invoke(cli.app, ["sft", "--run-dir", str(tmp_path / "run"), "--model", "m", "--dataset", "d.jsonl",
                                  "--num-processes", "2", "--accelerate-config", str(tmp_path / "nope.yaml")])
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "nope.yaml" in lines[0]
    assert not (tmp_path / "run").exists()
