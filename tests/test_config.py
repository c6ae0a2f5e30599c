"""Stage configs: defaults, recipe precedence, unknown keys, coercion, validation. Fast, no torch."""
from __future__ import annotations

import dataclasses
import textwrap

import pytest
import yaml

from rlchat.config import (STAGE_CONFIGS, EvalConfig, PPOConfig, RewardConfig, SFTConfig, TrainConfig, field_help,
                           resolve, to_dict, to_yaml)
from rlchat.errors import ConfigError


def write_recipe(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(excinfo) -> list[str]:
    return excinfo.value.problems


# ---- defaults and help -----------------------------------------------------------------------------------------


def test_defaults():
    assert SFTConfig().lr == 2e-4 and SFTConfig().assistant_only_loss and not SFTConfig().packing
    assert RewardConfig().lr == 1e-4 and RewardConfig().center_rewards_coef is None
    assert PPOConfig().lr == 5e-5 and PPOConfig().lora_dropout == 0.0 and PPOConfig().logging_steps == 1
    assert EvalConfig().temperature == 0.0
    assert issubclass(SFTConfig, TrainConfig) and issubclass(RewardConfig, TrainConfig)
    shared = {"run_dir", "model", "dataset", "split", "dataset_config", "eval_fraction", "epochs", "max_steps", "lr",
              "batch_size", "grad_accum", "max_length", "lora_r", "lora_alpha", "lora_dropout",
              "lora_target_modules", "full", "seed", "report_to", "trust_remote_code", "overwrite", "logging_steps",
              "save_steps", "eval_steps", "gradient_checkpointing"}
    assert shared <= {f.name for f in dataclasses.fields(TrainConfig)}
    assert "epochs" not in field_help(PPOConfig)  # PPO trains for `episodes`


@pytest.mark.parametrize("cls", list(STAGE_CONFIGS.values()))
def test_every_field_has_help(cls):
    helps = field_help(cls)
    assert list(helps) == [f.name for f in dataclasses.fields(cls)]
    assert all(isinstance(h, str) and len(h) > 8 for h in helps.values())


def test_overridden_field_keeps_help():
    assert field_help(SFTConfig)["lr"] == field_help(TrainConfig)["lr"]
    assert "rollouts" in field_help(PPOConfig)["batch_size"]


# ---- precedence ------------------------------------------------------------------------------------------------


def test_precedence_default_shared_section_override(tmp_path):
    recipe = write_recipe(tmp_path, """
        run_dir: runs/a
        lr: 0.001
        seed: 7
        epochs: 3
        sft:
          lr: 0.002
          packing: true
        ppo:
          episodes: 64
    """)
    assert resolve(SFTConfig, "sft", None, {"run_dir": "r"}).lr == 2e-4          # default
    reward = resolve(RewardConfig, "reward", recipe, {})
    assert reward.lr == 0.001 and reward.seed == 7 and reward.epochs == 3.0      # top level
    sft = resolve(SFTConfig, "sft", recipe, {})
    assert sft.lr == 0.002 and sft.packing is True and sft.run_dir == "runs/a"   # section beats top level
    sft = resolve(SFTConfig, "sft", recipe, {"lr": 0.5, "seed": None, "packing": None})
    assert sft.lr == 0.5 and sft.seed == 7 and sft.packing is True               # override beats all; None skipped
    ppo = resolve(PPOConfig, "ppo", recipe, {})
    assert ppo.episodes == 64 and ppo.lr == 0.001 and not hasattr(ppo, "epochs")  # epochs: top level, not for ppo
    assert resolve(None, "eval", recipe, {}).seed == 7                           # stage_cls looked up


def test_run_dir_required():
    with pytest.raises(ConfigError, match="run_dir is required"):
        resolve(SFTConfig, "sft", None, {})


# ---- unknown keys ----------------------------------------------------------------------------------------------


def test_unknown_keys_reported_together(tmp_path):
    recipe = write_recipe(tmp_path, """
        run_dir: r
        learning_rate: 0.1
        sft:
          lrr: 0.1
          epochz: 2
        ppo:
          episods: 10
    """)
    with pytest.raises(ConfigError) as err:
        resolve(SFTConfig, "sft", recipe, {"batchsize": 4})
    probs = problems_of(err)
    assert len(probs) == 5
    # TRL's name for lr: named exactly, with no list of every key
    assert any("'learning_rate'" in p and f"{recipe} (top level)" in p and "did you mean 'lr'?" in p
               and "TRL's learning_rate" in p for p in probs)
    assert any("'lrr'" in p and "(sft section)" in p and "did you mean 'lr'?" in p for p in probs)
    assert any("'epochz'" in p and "did you mean 'epochs'?" in p for p in probs)
    assert any("'episods'" in p and "(ppo section)" in p and "did you mean 'episodes'?" in p for p in probs)
    assert any("'batchsize'" in p and "command line" in p and "did you mean 'batch_size'?" in p for p in probs)
    assert str(err.value).startswith("5 config problems:") and "\n" not in str(err.value)


def test_top_level_key_of_another_stage_is_fine(tmp_path):
    recipe = write_recipe(tmp_path, "run_dir: r\nepisodes: 64\npacking: true\n")
    assert resolve(SFTConfig, "sft", recipe, {}).packing is True
    assert resolve(PPOConfig, "ppo", recipe, {}).episodes == 64
    assert resolve(EvalConfig, "eval", recipe, {}).run_dir == "r"


def test_recipe_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        resolve(SFTConfig, "sft", tmp_path / "nope.yaml", {"run_dir": "r"})
    bad = write_recipe(tmp_path, "sft: {lr: 1\nseed: [\n")
    with pytest.raises(ConfigError, match="not valid YAML \\(line"):
        resolve(SFTConfig, "sft", bad, {"run_dir": "r"})
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        resolve(SFTConfig, "sft", bad, {"run_dir": "r"})
    bad.write_text("sft: 3\n")
    with pytest.raises(ConfigError, match="section 'sft'"):
        resolve(SFTConfig, "sft", bad, {"run_dir": "r"})
    bad.write_text("")
    assert resolve(SFTConfig, "sft", bad, {"run_dir": "r"}).lr == 2e-4


# ---- values ----------------------------------------------------------------------------------------------------


def test_bad_values_reported_together(tmp_path):
    recipe = write_recipe(tmp_path, """
        sft:
          lr: 0
          batch_size: -1
          epochs: 0
          eval_fraction: 1.0
          lora_dropout: 1
          report_to: wandbb
          max_steps: 0
          eval_steps: 0
    """)
    with pytest.raises(ConfigError) as err:
        resolve(SFTConfig, "sft", recipe, {"run_dir": "r", "grad_accum": 0})
    probs = problems_of(err)
    expected = ["lr must be > 0, got 0", "batch_size must be > 0, got -1", "epochs must be > 0, got 0",
                "eval_fraction must be in [0, 1), got 1", "lora_dropout must be in [0, 1), got 1",
                "report_to must be one of none, tensorboard, wandb, got 'wandbb' (did you mean 'wandb'?)",
                "max_steps must be -1 (no limit) or > 0, got 0", "eval_steps must be > 0, got 0",
                "grad_accum must be > 0, got 0 (in the command line)"]
    assert len(probs) == len(expected)
    for e in expected:
        assert any(p.startswith(e) for p in probs), e
    assert any(p == f"lr must be > 0, got 0 (in {recipe} (sft section))" for p in probs)


def test_validate_directly():
    assert SFTConfig(run_dir="r").validate() == []
    assert PPOConfig(run_dir="r", top_p=0.0, gamma=1.5).validate() == [
        "top_p must be in (0, 1], got 0", "gamma must be in [0, 1], got 1.5"]
    assert EvalConfig(run_dir="r", policies=["sft", "ppoo"]).validate() == [
        "policies must be one of base, sft, ppo, ppo-best, grpo, rloo, dpo, got 'ppoo' (did you mean 'ppo'?)"]


def test_ppo_batch_divisibility():
    with pytest.raises(ConfigError) as err:
        resolve(PPOConfig, "ppo", None, {"run_dir": "r", "batch_size": 16, "mini_batches": 3})
    (msg,) = problems_of(err)
    assert "batch_size (16)" in msg and "mini_batches (3)" in msg and "1, 2, 4, 8 or 16" in msg

    with pytest.raises(ConfigError) as err:
        resolve(PPOConfig, "ppo", None, {"run_dir": "r", "batch_size": 16, "mini_batches": 2, "grad_accum": 3})
    (msg,) = problems_of(err)
    assert "16 / 2 = 8" in msg and "grad_accum (3)" in msg

    with pytest.raises(ConfigError) as err:
        resolve(PPOConfig, "ppo", None, {"run_dir": "r", "episodes": 8, "reward_fn": "nocolon"})
    probs = problems_of(err)
    assert any("episodes (8) must be >= batch_size (16)" in p for p in probs)
    assert any("reward_fn must look like 'module:function'" in p for p in probs)

    # a range error on mini_batches is reported once, without a division by zero
    with pytest.raises(ConfigError) as err:
        resolve(PPOConfig, "ppo", None, {"run_dir": "r", "mini_batches": 0})
    assert problems_of(err) == ["mini_batches must be > 0, got 0 (in the command line)"]

    cfg = resolve(PPOConfig, "ppo", None, {"run_dir": "r", "batch_size": 16, "mini_batches": 4, "grad_accum": 2})
    assert cfg.validate() == []


@pytest.mark.parametrize("layout", ["separate_models", "full"])
def test_shared_critic_needs_the_shared_base(layout):
    """value_model 'policy' puts the value head on the policy adapter: a rule of the config, checked by resolve."""
    with pytest.raises(ConfigError) as err:
        resolve(PPOConfig, "ppo", None, {"run_dir": "r", "value_model": "policy", layout: True})
    (msg,) = problems_of(err)
    assert "value_model 'policy' (a shared critic) needs the shared base" in msg
    assert resolve(PPOConfig, "ppo", None, {"run_dir": "r", "value_model": "adapter", layout: True}).validate() == []
    assert resolve(PPOConfig, "ppo", None, {"run_dir": "r", "value_model": "policy"}).validate() == []


def test_type_coercion(tmp_path):
    recipe = write_recipe(tmp_path, """
        run_dir: r
        ppo:
          lr: 1e-4            # YAML 1.1 reads this as a string
          episodes: "256"
          batch_size: 8.0
          full: "true"
          whiten_rewards: no
          target_kl: "6"
          missing_eos_penalty: null
          lora_target_modules: [q_proj, v_proj]
          dataset_config: 2023
    """)
    cfg = resolve(PPOConfig, "ppo", recipe, {"normalize_reward": "false", "reward_fn": "my.mod:score"})
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float)
    assert cfg.episodes == 256 and cfg.batch_size == 8 and isinstance(cfg.batch_size, int)
    assert cfg.full is True and cfg.whiten_rewards is False and cfg.normalize_reward is False
    assert cfg.target_kl == 6.0 and cfg.missing_eos_penalty is None
    assert cfg.lora_target_modules == ["q_proj", "v_proj"] and cfg.dataset_config == "2023"

    cfg = resolve(PPOConfig, "ppo", None, {"run_dir": "r", "target_kl": "none", "lora_target_modules": "q_proj,k_proj"})
    assert cfg.target_kl is None and cfg.lora_target_modules == ["q_proj", "k_proj"]
    assert resolve(SFTConfig, "sft", None, {"run_dir": "r"}).lora_target_modules == "all-linear"
    cfg = resolve(EvalConfig, "eval", None, {"run_dir": "r", "policies": "sft, ppo", "max_prompts": "50"})
    assert cfg.policies == ["sft", "ppo"] and cfg.max_prompts == 50


def test_bad_types_reported_together():
    with pytest.raises(ConfigError) as err:
        resolve(SFTConfig, "sft", None, {"run_dir": "r", "lr": "fast", "batch_size": 2.5, "full": "maybe",
                                         "eval_steps": "x", "lora_target_modules": 3})
    probs = problems_of(err)
    assert probs == [
        "lr must be a number, got 'fast' (in the command line)",
        "batch_size must be an integer, got 2.5 (in the command line)",
        "full must be true or false, got 'maybe' (in the command line)",
        "eval_steps must be an integer or null, got 'x' (in the command line)",
        "lora_target_modules must be a string or a list of strings, got 3 (in the command line)",
    ]


# ---- output ----------------------------------------------------------------------------------------------------


def test_to_dict_and_yaml_round_trip(tmp_path):
    cfg = resolve(PPOConfig, "ppo", None, {"run_dir": "r", "episodes": 64, "lora_target_modules": "q_proj,v_proj"})
    d = to_dict(cfg)
    assert d["episodes"] == 64 and d["lora_target_modules"] == ["q_proj", "v_proj"]
    for with_help in (False, True):
        text = to_yaml(cfg, with_help=with_help)
        assert yaml.safe_load(text) == d
        saved = tmp_path / "config.yaml"
        saved.write_text(text)
        assert resolve(PPOConfig, "ppo", saved, {}) == cfg  # a saved config is a valid recipe
    assert "# total rollouts" in to_yaml(cfg, with_help=True)
